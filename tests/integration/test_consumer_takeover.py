"""A consumer group that replaces others starts where they left off (`shared.kafka.TakeOver`).

Reporting and alerts once had one consumer group per input topic; each now reads all of its topics
with one consumer in one new group. Their input topics are kept forever, so a new group starting
at the earliest offset would re-read years of events on upgrade. Here a real broker, an old group
with committed offsets, and the new consumer (`subscribe_batch(takes_over=...)`) in a service
`Runtime`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, TopicPartition
from fastapi import FastAPI

from shared.http import Runtime
from shared.kafka import InboundRecord, make_broker, subscribe_batch
from tests.support.services import Namespace
from tests.support.wait import eventually

SERVICE = "takeover-test"


async def commit_as(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    """What the old group committed (a consumer of the group, assigned rather than subscribed)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


@asynccontextmanager
async def new_consumer(ns: Namespace, group: str, topics: list[str], takes_over: dict[str, str],
                       seen: list[tuple[str, int, int]]) -> AsyncIterator[None]:
    async def keep(records: list[InboundRecord]) -> None:
        seen.extend((r.topic, r.partition, r.offset) for r in records)

    kafka = ns.kafka()
    broker = make_broker(kafka, SERVICE)
    subscribe_batch(broker, topics, group_id=group, service=SERVICE, handler=keep, settings=kafka,
                    takes_over=takes_over)
    runtime = Runtime(SERVICE, broker=broker)
    async with runtime.lifespan(FastAPI()):
        yield


async def test_a_new_group_resumes_each_partition_where_the_group_it_replaces_committed(namespace: Namespace) -> None:
    bootstrap, t = namespace.stack.bootstrap, namespace.kafka().topics()
    old = f"{namespace.prefix}old-scored"
    await namespace.produce(t.scored, 10, partition=0)
    await namespace.produce(t.scored, 4, partition=1)  # the old group committed nothing here
    await namespace.produce(t.deterioration, 3, partition=0)  # no group had this topic
    await commit_as(bootstrap, old, {TopicPartition(t.scored, 0): 6})
    seen: list[tuple[str, int, int]] = []
    async with new_consumer(namespace, f"{namespace.prefix}new", [t.scored, t.deterioration], {t.scored: old}, seen):
        await eventually(lambda: _count(seen, 11), timeout=60)
    assert sorted(seen) == sorted([(t.scored, 0, o) for o in range(6, 10)] + [(t.scored, 1, o) for o in range(4)]
                                  + [(t.deterioration, 0, o) for o in range(3)])


async def test_a_partition_the_new_group_has_committed_stays_where_the_new_group_is(namespace: Namespace) -> None:
    bootstrap, t = namespace.stack.bootstrap, namespace.kafka().topics()
    old, new = f"{namespace.prefix}old-scored", f"{namespace.prefix}new"
    await namespace.produce(t.scored, 5, partition=0)
    await commit_as(bootstrap, old, {TopicPartition(t.scored, 0): 2})
    first: list[tuple[str, int, int]] = []
    async with new_consumer(namespace, new, [t.scored], {t.scored: old}, first):
        await eventually(lambda: _count(first, 3), timeout=60)
        await eventually(lambda: _committed(bootstrap, new, TopicPartition(t.scored, 0), 5), timeout=30)
    await namespace.produce(t.scored, 2, partition=0)
    again: list[tuple[str, int, int]] = []
    async with new_consumer(namespace, new, [t.scored], {t.scored: old}, again):
        await eventually(lambda: _count(again, 2), timeout=60)
    assert sorted(again) == [(t.scored, 0, 5), (t.scored, 0, 6)]


async def test_the_new_group_commits_the_offsets_it_took_over_before_it_handles_any_record(
        namespace: Namespace) -> None:
    bootstrap, t = namespace.stack.bootstrap, namespace.kafka().topics()
    old, new = f"{namespace.prefix}old-scored", f"{namespace.prefix}new"
    await namespace.produce(t.scored, 4, partition=0)
    await commit_as(bootstrap, old, {TopicPartition(t.scored, 0): 4})  # nothing left to read
    seen: list[tuple[str, int, int]] = []
    async with new_consumer(namespace, new, [t.scored], {t.scored: old}, seen):
        await eventually(lambda: _committed(bootstrap, new, TopicPartition(t.scored, 0), 4), timeout=30)
    assert seen == []


async def _count(seen: list[tuple[str, int, int]], n: int) -> bool:
    return len(seen) >= n


async def _committed(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> bool:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return bool(await consumer.committed(tp) == offset)
    finally:
        await consumer.stop()
