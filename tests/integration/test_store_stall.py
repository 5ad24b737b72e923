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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient

from services.scoring.store import StateStore
from shared.events import SrsScored
from shared.mongo import Document
from shared.topic_admin import ensure_topics
from tests.support.apps import PROBES, HttpService, build_app, client, new_key
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest, failpoint_store
from tests.support.stall import Stall
from tests.support.wait import eventually
from tools.loadgen import publish, start_producer, submission
from tools.processes import ServiceProcess
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
    async with client(build_app(service, ns)) as http:
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
