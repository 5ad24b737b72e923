"""Intake without a broker: 503 with Retry-After within the publish bound (never a hang), and it
recovers by itself when the broker (re)appears. Uses a broker of its own, so killing it harms no
other test; keys live in the session store."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from services.intake.app import IntakeConfig, create_app
from services.intake.settings import IntakeSettings
from shared.settings import KafkaSettings, MongoSettings
from shared.topic_admin import ensure_topics
from tests.integration.test_intake_api import Intake, TopicReader, make_keys, submission
from tests.support.services import Namespace
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.stack import LocalStack, free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

BOUND = 1.5  # ALLIANCE_INTAKE_PUBLISH_TIMEOUT_SECONDS for this intake


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A Tansu of this module's own, not started yet."""
    local = LocalStack(Path(tmp_path_factory.mktemp("intake-broker")), kafka_port=free_port())
    yield local
    local.stop()


@pytest.fixture(scope="module")
async def fragile(stack: StackUnderTest, own_broker: LocalStack) -> AsyncIterator[Intake]:
    ns = Namespace.fresh(stack)
    kafka = KafkaSettings(bootstrap=own_broker.bootstrap, idempotence=False, topic_prefix=ns.prefix)
    config = IntakeConfig(kafka=kafka, mongo=ns.mongo(), intake=IntakeSettings(publish_timeout_seconds=BOUND))
    app = create_app(config)
    keys = await make_keys(ns)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://intake", timeout=30) as http:
        yield Intake(app, http, keys, TopicReader(own_broker.bootstrap, kafka.topics().submitted), ns)


async def _start_broker(local: LocalStack, intake: Intake) -> None:
    local.start_kafka()
    await ensure_topics(KafkaSettings(bootstrap=local.bootstrap, idempotence=False, topic_prefix=intake.ns.prefix))


async def _accepts_once_the_broker_is_back(local: LocalStack, intake: Intake) -> None:
    """Start the broker: intake accepts again, and what it accepts is on the topic."""
    await _start_broker(local, intake)
    sid = await _accepted_again(intake)
    await intake.reader.start()
    try:
        await intake.reader.wait_for(sid)
    finally:
        await intake.reader.stop()


async def _accepted_again(intake: Intake) -> str:
    async def attempt() -> str | None:
        sid = f"back-{uuid.uuid4().hex[:8]}"
        r = await intake.post(submission(submission_id=sid))
        return sid if r.status_code == 202 else None

    sid = await eventually(attempt, timeout=60, interval=0.5)
    assert sid is not None
    return sid


async def test_without_a_broker_intake_answers_503_at_once_and_starts_when_one_appears(
        fragile: Intake, own_broker: LocalStack) -> None:
    started = time.monotonic()
    r = await fragile.post(submission(submission_id="early-1"))
    assert r.status_code == 503, r.text
    assert time.monotonic() - started < BOUND
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["submission_ids"] == ["early-1"]
    assert (await fragile.http.get("/readyz")).status_code == 503

    await _accepts_once_the_broker_is_back(own_broker, fragile)


async def test_broker_killed_gives_503_within_the_bound_and_intake_recovers(
        fragile: Intake, own_broker: LocalStack) -> None:
    if own_broker.procs.get("kafka") is None:
        await _start_broker(own_broker, fragile)
    await _accepted_again(fragile)

    own_broker.kill("kafka")
    for path, body, key in (
            ("/v1/submissions", submission(submission_id="down-1"), None),
            ("/v1/submissions/batch", {"submissions": [submission(submission_id="down-2")]}, None),
            ("/v1/clients/p-down/transfer", {"site_id": "south"}, fragile.keys.admin)):
        started = time.monotonic()
        r = await fragile.post(body, key=key, path=path)
        elapsed = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
        assert elapsed < BOUND + 1.0, f"{path} took {elapsed:.1f}s with a {BOUND}s bound"
    metrics = (await fragile.http.get("/metrics")).text
    assert 'alliance_intake_submissions_total{outcome="unavailable",reason="broker_timeout"}' in metrics
    assert 'alliance_intake_client_transfers_total{outcome="unavailable",reason="broker_timeout"}' in metrics

    await _accepts_once_the_broker_is_back(own_broker, fragile)


async def test_an_unreachable_key_store_gives_503_within_the_bound(stack: StackUnderTest) -> None:
    ns = Namespace.fresh(stack)
    dead_store = MongoSettings(url=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", database="x")
    config = IntakeConfig(kafka=ns.kafka(), mongo=dead_store, intake=IntakeSettings(auth_timeout_seconds=0.5))
    app = create_app(config)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://intake", timeout=30) as http:
        started = time.monotonic()
        r = await http.post("/v1/submissions", json=submission(), headers={"Authorization": "Bearer ak_any"})
        assert r.status_code == 503, r.text
        assert time.monotonic() - started < 0.5 + 1.0
        assert r.headers["retry-after"]
        assert r.json()["errors"][0]["field"] == "Authorization"
