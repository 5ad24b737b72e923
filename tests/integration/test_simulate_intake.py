"""The simulator against a real intake process: what intake accepted is exactly what reached the broker."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from shared.auth import create_key
from shared.topic_admin import ensure_topics
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.simulate import PlannedSubmission, SendStats, run_simulation

TENANTS = ("sim-a", "sim-b")


@dataclass
class Run:
    ns: Namespace
    planned: list[PlannedSubmission]
    stats: SendStats


@pytest.fixture(scope="module")
async def simulated(stack: StackUnderTest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Run]:
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
                                              seed=3, quiet=True, keep=True)
    yield Run(ns, planned, stats)


async def read_topic(ns: Namespace, want: int) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on the namespace's submitted topic (no consumer group), once `want` have arrived."""
    topic = ns.kafka().topics().submitted
    consumer = AIOKafkaConsumer(bootstrap_servers=ns.stack.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        parts = [TopicPartition(topic, p) for p in range(ns.partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)

        async def enough() -> bool:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(batch)
            return len(records) >= want

        await eventually(enough, timeout=30)
        # anything beyond `want` would be a second copy: give it a moment to show up
        for batch in (await consumer.getmany(timeout_ms=1000)).values():
            records.extend(batch)
    finally:
        await consumer.stop()
    return records


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
