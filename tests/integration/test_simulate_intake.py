"""The simulator against a real intake process: what intake accepted is exactly what reached the broker."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.auth import create_key
from shared.kafka import InboundRecord
from shared.topic_admin import ensure_topics
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest
from tools.recorder import TopicRecorder
from tools.simulate import PlannedSubmission, SendStats, run_simulation

TENANTS = ("sim-a", "sim-b")


@dataclass
class Run:
    ns: Namespace
    planned: list[PlannedSubmission]
    stats: SendStats


async def simulate_run(stack: StackUnderTest, tmp_path_factory: pytest.TempPathFactory, ors: bool) -> Run:
    """A few seconds of a two-tenant network posted to one intake process."""
    ns = Namespace.fresh(stack)
    await ensure_topics(ns.kafka())
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(stack.mongo_url)
    try:
        keys = [(await create_key(client[ns.database], t, "submit"))[0] for t in TENANTS]
    finally:
        await client.close()
    log_dir = tmp_path_factory.mktemp("simulate-logs")
    with running(["intake"], ns, Path(log_dir)) as procs:
        planned, stats = await run_simulation(2, 4, 8, 40, rate=60, duration=4, url=procs["intake"].url, keys=keys,
                                              seed=3, quiet=True, keep=True, ors=ors)
    return Run(ns, planned, stats)


@pytest.fixture(scope="module")
async def simulated(stack: StackUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The SRS alone (`--no-ors`)."""
    return await simulate_run(stack, tmp_path_factory, ors=False)


@pytest.fixture(scope="module")
async def simulated_ors(stack: StackUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Each session's ORS, then its SRS."""
    return await simulate_run(stack, tmp_path_factory, ors=True)


async def read_topic(ns: Namespace, want: int, topic: str | None = None) -> list[InboundRecord]:
    """Every record on the namespace's submitted topic (or `topic`; no consumer group), once `want` have arrived."""
    async with TopicRecorder(ns.stack.bootstrap, topic or ns.kafka().topics().submitted) as recorder:
        await recorder.until(lambda records: len(records) >= want)
        # anything beyond `want` would be a second copy: give it a moment to show up
        return await recorder.poll(timeout_ms=1000)


async def test_simulator_gets_the_answer_it_planned_for_every_submission(simulated: Run) -> None:
    s = simulated.stats
    assert s.sent > 100 and s.duplicates > 0 and s.invalid > 0
    assert s.unexpected == 0, "a valid submission was rejected or an invalid one accepted"
    assert set(s.rejected) == {"422"}
    assert s.accepted + s.rejected["422"] == s.sent


async def test_accepted_count_equals_the_events_on_the_submitted_topic(simulated: Run) -> None:
    records = await read_topic(simulated.ns, simulated.stats.accepted)
    assert len(records) == simulated.stats.accepted
    ids = Counter(json.loads(r.value)["submission_id"] for r in records)
    assert set(ids) == simulated.stats.accepted_ids


async def test_events_carry_the_tenant_of_the_key_that_posted_them(simulated: Run) -> None:
    records = await read_topic(simulated.ns, simulated.stats.accepted)
    tenant_of = {p.submission_id: TENANTS[p.tenant] for p in simulated.planned if p.valid}
    for r in records:
        event = json.loads(r.value)
        assert event["tenant_id"] == tenant_of[event["submission_id"]]
        assert r.key == f"{event['tenant_id']}:{event['client_id']}".encode()


async def test_with_the_ors_intake_accepts_every_valid_form_of_both_scales(simulated_ors: Run) -> None:
    s = simulated_ors.stats
    assert s.ors > 50 and s.unexpected == 0 and set(s.rejected) <= {"422"}


async def test_with_the_ors_each_accepted_form_reaches_the_topic_of_its_scale_once(simulated_ors: Run) -> None:
    is_ors = {p.submission_id: p.ors for p in simulated_ors.planned}
    accepted_ors = {sid for sid in simulated_ors.stats.accepted_ids if is_ors[sid]}
    topics = simulated_ors.ns.kafka().topics()
    ors_records = await read_topic(simulated_ors.ns, len(accepted_ors), topics.ors_submitted)
    accepted_srs = simulated_ors.stats.accepted_ids - accepted_ors
    srs_records = await read_topic(simulated_ors.ns, len(accepted_srs))
    assert {json.loads(r.value)["submission_id"] for r in ors_records} == accepted_ors
    assert {json.loads(r.value)["submission_id"] for r in srs_records} == accepted_srs
    assert {json.loads(r.value)["instrument"] for r in ors_records} <= {"ORS", "CORS"}
