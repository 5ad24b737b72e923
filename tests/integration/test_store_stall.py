"""A store that stops answering (it accepts connections and answers pings, but not the service's
operations: a lock or disk stall, a hung primary) must not stall a partition or hang a request for
ever. Every store operation is bounded (`ALLIANCE_MONGO_OPERATION_TIMEOUT_MS`, 1.5 s here): a batch
whose store call timed out is retried, a read answers 503 with Retry-After, and once the store
answers again the work completes, nothing lost and nothing applied twice.

Before the bound, the batch's store call never returned: no error, no retry, no metric, while the
consumer kept heart-beating (so no rebalance either), and a read waited as long as the store did.
The stall is the store's own failpoint (`tests.support.stall`), on a store of the module's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient

from services.alerts.settings import AlertsSettings
from services.scoring.store import StateStore
from shared.auth import create_key
from shared.events import SrsScored
from shared.mongo import Document
from shared.topic_admin import ensure_topics
from tests.support.alerts import alerts_app
from tests.support.apps import PROBES, HttpService, build_app, client, new_key
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest, failpoint_store
from tests.support.stall import Stall
from tests.support.wait import eventually
from tools.harness import deterioration
from tools.loadgen import publish, start_producer, submission
from tools.processes import ServiceProcess
from tools.receiver import Received
from tools.recorder import TopicRecorder

OPERATION_TIMEOUT_MS = 1_500
# How long a test waits for what the bound makes happen within 1.5 s (a loaded machine included);
# without the bound it never happens while the store stalls (its failpoint holds commands 120 s).
WITHIN_THE_BOUND_SECONDS = 15.0
# A readiness check's bound on its store ping is 2 s (`shared.mongo.PING_TIMEOUT_SECONDS`); 8 s
# leaves a loaded machine room and is still far below the operation bound of 30 s.
READINESS_WITHIN_SECONDS = 8.0


@pytest.fixture(scope="module")
def store(stack: StackUnderTest) -> Iterator[StackUnderTest]:
    """The run's broker with a store of the module's own, test commands on."""
    with failpoint_store(stack) as own:
        yield own


@pytest.fixture
def stall(store: StackUnderTest) -> Stall:
    return Stall(store.mongo_url)


@pytest.fixture
async def store_client(store: StackUnderTest) -> AsyncIterator[AsyncMongoClient[Document]]:
    """The test's own client: the stall never holds it."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(store.mongo_url, tz_aware=True)
    yield client
    await client.close()


async def batch_retries(proc: ServiceProcess, topic: str) -> float:
    """`alliance_consumer_batch_retries_total` of `proc` for `topic` (0 before the first retry)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(proc.url + "/metrics")).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "alliance_consumer_batch_retries_total" and s.labels.get("topic") == topic)


async def test_a_batch_whose_store_stops_answering_is_retried_within_the_bound_and_completes_once(
        store: StackUnderTest, stall: Stall, store_client: AsyncMongoClient[Document], log_dir: Path) -> None:
    ns = Namespace.fresh(store)
    await ensure_topics(ns.kafka())
    topics = ns.kafka().topics()
    t = "t-stall"
    env = {"ALLIANCE_MONGO_URL": stall.client_url, "ALLIANCE_MONGO_OPERATION_TIMEOUT_MS": str(OPERATION_TIMEOUT_MS)}
    producer = await start_producer(store.bootstrap)
    recorder = await TopicRecorder(store.bootstrap, topics.scored).start(background=True)

    async def scored() -> dict[str, SrsScored]:
        events = (SrsScored.model_validate_json(v) for v in recorder.values())
        return {s.event_id: s for s in events if s.tenant_id == t}

    try:
        with running(["scoring"], ns, log_dir, env) as procs:
            await publish(producer, topics.submitted, [submission(t, "c", 1, 38.0)])
            await eventually(scored, until=lambda found: len(found) == 1)  # consuming, its partitions assigned
            before = await batch_retries(procs["scoring"], topics.submitted)
            async with stall.stalled():
                await publish(producer, topics.submitted, [submission(t, "c", 2, 36.5), submission(t, "c", 3, 33.0)])

                async def retried() -> float:
                    return await batch_retries(procs["scoring"], topics.submitted)

                await eventually(retried, timeout=WITHIN_THE_BOUND_SECONDS, until=lambda n: n > before)
            found = await eventually(scored, timeout=60, until=lambda found: len(found) == 3)
    finally:
        await recorder.stop()
        await producer.stop()
    assert sorted((s.session_number, s.total, s.previous_total, s.revision) for s in found.values()) == [
        (1, 38.0, None, 1), (2, 36.5, 38.0, 1), (3, 33.0, 36.5, 1)]
    doc = await StateStore(store_client[ns.database]).client_state(t, "c")
    assert doc is not None and sorted(s["sid"] for s in doc["subs"]) == ["c-s1", "c-s2", "c-s3"]


@pytest.mark.parametrize("service", ["alerts", "reporting"])
async def test_a_read_whose_store_stops_answering_is_a_503_with_retry_after_within_the_bound(
        store: StackUnderTest, stall: Stall, service: HttpService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLIANCE_MONGO_OPERATION_TIMEOUT_MS", str(OPERATION_TIMEOUT_MS))
    ns = Namespace.fresh(dataclasses.replace(store, mongo_url=stall.client_url))
    probe = PROBES[service]
    key = await new_key(ns, probe.role)
    # The read limit in slots of 1,000 s, not the suite's 1 s: a key's rate-limit units are held per
    # slot, and a probe in a new slot would count them in the stalled store first (a 503 of the
    # rate-limit store, Retry-After 2, not the read's own).
    async with client(build_app(service, ns, read_rate_burst=1_000_000, read_rate_per_second=1_000)) as http:
        assert (await probe.send(http, key)).status_code == probe.answer  # the key is known from now on
        async with stall.stalled():
            async with asyncio.timeout(WITHIN_THE_BOUND_SECONDS):
                res = await probe.send(http, key)
        assert res.status_code == 503 and res.headers["retry-after"] == "5"
        assert res.json()["errors"][0]["message"] == "the store is unavailable; retry shortly"
        assert (await probe.send(http, key)).status_code == probe.answer  # and it answers again


async def test_readiness_against_a_store_that_stops_answering_even_pings_says_not_ready_within_seconds(
        store: StackUnderTest, stall: Stall) -> None:
    # The default operation bound (30 s) on purpose: a readiness check is bounded apart, so that a
    # probe (Kubernetes waits 1 s by default) and `alliance_dependency_up` learn of a silent store
    # in seconds rather than after the bound of a real operation.
    ns = Namespace.fresh(dataclasses.replace(store, mongo_url=stall.client_url))
    async with client(build_app("reporting", ns)) as http:
        assert (await http.get("/readyz")).json()["checks"]["mongodb"] is True
        async with stall.stalled(commands=("ping",)):
            async with asyncio.timeout(READINESS_WITHIN_SECONDS):
                res = await http.get("/readyz")
        assert res.status_code == 503 and res.json()["checks"]["mongodb"] is False
        assert (await http.get("/readyz")).json()["checks"]["mongodb"] is True  # and it answers again


async def test_alerts_delivery_and_escalation_loops_outlive_a_store_that_stops_answering_and_deliver_once(
        store: StackUnderTest, stall: Stall, monkeypatch: pytest.MonkeyPatch) -> None:
    # Alerts' claim, delivery-status and escalation loops each catch a failed round and try again on
    # the next: a bounded store call that times out must end the round, not the loop. An alert that
    # arrives while the store is silent reaches its clinician once the store answers, and one left
    # unacknowledged escalates once; nothing the stall interrupted is sent twice.
    monkeypatch.setenv("ALLIANCE_MONGO_OPERATION_TIMEOUT_MS", str(OPERATION_TIMEOUT_MS))
    settings = AlertsSettings(allow_private_targets=True, retry_first_seconds=0.05, retry_max_seconds=0.2,
                              attempt_timeout_seconds=5.0, poll_seconds=0.1, gauge_seconds=0.1,
                              escalation_check_seconds=0.2)
    async with alerts_app(dataclasses.replace(store, mongo_url=stall.client_url), settings) as env:
        t = "t-stall-alerts"
        admin = {"Authorization": f"Bearer {(await create_key(env.db, t, 'admin'))[0]}"}
        assert (await env.client.post("/v1/webhook-secret", headers=admin)).status_code == 201
        for cid, supervisor in (("boss", None), ("c1", "boss")):
            body = {"site_id": "site-a", "email": f"{cid}@clinic.test", "supervisor_id": supervisor,
                    "webhook_url": env.receiver.behave(f"/{cid}")}
            assert (await env.client.put(f"/v1/clinicians/{cid}", json=body, headers=admin)).status_code == 201
        before = deterioration(t, "c1", "client-1")
        await env.publisher.publish(env.topics.deterioration, before, t, before.client_id)
        await eventually(lambda: _requests(env.receiver.at("/c1")), until=lambda got: len(got) == 1)

        async with stall.stalled():
            during = deterioration(t, "c1", "client-2")
            await env.publisher.publish(env.topics.deterioration, during, t, during.client_id)
            # Several rounds of every loop time out while it lasts (1.5 s each).
            await asyncio.sleep(3 * OPERATION_TIMEOUT_MS / 1000)
            assert [r for r in env.receiver.at("/c1") if during.alert_id.encode() in r.body] == []
        assert (await env.client.put("/v1/escalation", json={"interval_seconds": 0.5},
                                     headers=admin)).status_code == 200

        sent = await eventually(lambda: _requests(env.receiver.at("/c1")), timeout=60, until=lambda got: len(got) == 2)
        escalated = await eventually(lambda: _requests(env.receiver.at("/boss")), timeout=60,
                                     until=lambda got: len(got) == 2)
        await asyncio.sleep(2.0)  # what a second, duplicate round would have sent by now
    assert sorted(_alert_ids(env.receiver.at("/c1"))) == sorted(_alert_ids(sent)) == sorted(
        [before.alert_id, during.alert_id])
    assert sorted(_alert_ids(env.receiver.at("/boss"))) == sorted(_alert_ids(escalated)) == sorted(
        [before.alert_id, during.alert_id])


async def _requests(got: list[Received]) -> list[Received]:
    return got


def _alert_ids(requests: list[Received]) -> list[str]:
    return [json.loads(r.body)["alert_id"] for r in requests]
