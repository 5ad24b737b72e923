"""Issue 12, finding 1: a partition never stalls on one record.

When a batch fails deterministically, the subscriber runs the handler again on halves of it down
to single records, dead-letters each record that fails on its own (reason and coordinates), lets
the rest through and commits. A transient failure is retried and never dead-lettered.

First with a fake handler and `isolate_poison` alone, then through `subscribe_batch` on the real
broker (its commits read back from the broker).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pymongo import AsyncMongoClient, ReplaceOne
from pymongo.errors import AutoReconnect, BulkWriteError

from shared.kafka import (
    BatchHandler,
    DeadLetterTarget,
    Failure,
    InboundRecord,
    Publisher,
    RetryPolicy,
    isolate_poison,
    make_broker,
    subscribe_batch,
)
from shared.mongo import Document
from tests.support.deadletters import dead_letters
from tests.support.services import Namespace
from tests.support.wait import eventually

POISON = b"poison"


def too_large() -> BulkWriteError:
    return BulkWriteError({"writeErrors": [{"index": 0, "code": 10334, "errmsg": "object to insert too large"}],
                           "writeConcernErrors": []})


@dataclass
class FakeHandler:
    """Handles a batch as a whole, like the services: fails it when it holds a poison record (the
    store refuses that record's document), or while `transient_failures` last (the store is away)."""

    transient_failures: int = 0
    handled: list[bytes] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    async def __call__(self, records: list[InboundRecord]) -> None:
        self.calls.append(len(records))
        if self.transient_failures > 0:
            self.transient_failures -= 1
            raise AutoReconnect("connection reset by peer")
        if any(r.value == POISON for r in records):
            raise too_large()
        self.handled.extend(r.value for r in records)


def records(values: list[bytes]) -> list[InboundRecord]:
    return [InboundRecord("srs.scored.v1", 3, 100 + i, b"acme:c1", v, {}, 0) for i, v in enumerate(values)]


WHOLE = Failure(True, "document_too_large", "BulkWriteError(codes=[10334], writes=1)")


async def test_isolation_handles_the_good_records_and_returns_the_poison_one_with_its_reason() -> None:
    batch = records([b"a", b"b", b"c", POISON, b"d", b"e", b"f"])
    handler = FakeHandler()
    poison = await isolate_poison(handler, batch, WHOLE)
    assert [(r.offset, f.reason) for r, f in poison] == [(103, "document_too_large")]
    assert handler.handled == [b"a", b"b", b"c", b"d", b"e", b"f"]  # every good one, in order


async def test_isolation_finds_every_poison_record_of_a_batch() -> None:
    batch = records([POISON, b"a", POISON, b"b", b"c", b"d", b"e", POISON])
    handler = FakeHandler()
    poison = await isolate_poison(handler, batch, WHOLE)
    assert [r.offset for r, _ in poison] == [100, 102, 107]
    assert handler.handled == [b"a", b"b", b"c", b"d", b"e"]


async def test_isolation_stops_at_a_transient_failure_for_the_batch_to_be_retried() -> None:
    handler = FakeHandler(transient_failures=1)
    try:
        await isolate_poison(handler, records([b"a", POISON]), WHOLE)
    except AutoReconnect:
        pass
    else:
        raise AssertionError("a transient failure during isolation must reach the subscriber")


# ---------------------------------------------------------------------------------------------
# Through subscribe_batch on the real broker


FAST = RetryPolicy(attempts=4, first_delay=0.05, max_delay=0.2, poison_attempts=2)


@asynccontextmanager
async def consuming(ns: Namespace, handler: BatchHandler, group: str) -> AsyncIterator[str]:
    """`handler` subscribed to the namespace's scored topic (dead letters to its dead-letter topic)."""
    kafka = ns.kafka()
    topics = kafka.topics()
    broker = make_broker(kafka, "poison-test")
    publisher = Publisher(broker, kafka.publish_timeout_seconds)
    subscribe_batch(broker, topics.scored, group_id=group, service="poison-test", handler=handler,
                    retry=FAST, dead_letters=DeadLetterTarget(topics.deadletter, publisher.publish_all), settings=kafka)
    await broker.start()
    try:
        yield topics.scored
    finally:
        await broker.stop()


async def produce(ns: Namespace, topic: str, values: list[bytes]) -> TopicPartition:
    """Send values with one key (so to one partition, in order); returns that partition."""
    producer = AIOKafkaProducer(bootstrap_servers=ns.stack.bootstrap, acks="all")
    await producer.start()
    try:
        sent = [await (await producer.send(topic, v, key=b"acme:c1")) for v in values]
    finally:
        await producer.stop()
    return TopicPartition(topic, sent[0].partition)


async def committed(ns: Namespace, group: str, tp: TopicPartition) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=ns.stack.bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(tp)
        return offset
    finally:
        await consumer.stop()


def committed_to(ns: Namespace, group: str, tp: TopicPartition, end: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await committed(ns, group, tp) == end
    return check


def handled(handler: FakeHandler, values: list[bytes]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return sorted(handler.handled) == sorted(values)
    return check


async def test_a_poison_record_is_dead_lettered_with_its_reason_and_the_rest_is_handled_and_committed(
        namespace: Namespace) -> None:
    handler = FakeHandler()
    values = [b"a", b"b", POISON, b"c", b"d"]
    group = namespace.prefix + "poison-one"
    async with consuming(namespace, handler, group) as topic, dead_letters(namespace.kafka()) as letters:
        tp = await produce(namespace, topic, values)
        seen = await letters.until(lambda seen: any(d.payload == POISON.decode() for d in seen))
        await eventually(handled(handler, [b"a", b"b", b"c", b"d"]))
        await eventually(committed_to(namespace, group, tp, len(values)))
    [letter] = [d for d in seen if d.payload == POISON.decode()]
    assert letter.reason == "document_too_large" and letter.service == "poison-test"
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (topic, tp.partition, 2)
    assert "10334" in letter.detail


async def test_a_transient_failure_is_retried_and_nothing_is_dead_lettered(namespace: Namespace) -> None:
    handler = FakeHandler(transient_failures=2)
    values = [b"a", b"b", b"c"]
    group = namespace.prefix + "poison-transient"
    async with consuming(namespace, handler, group) as topic, dead_letters(namespace.kafka()) as letters:
        tp = await produce(namespace, topic, values)
        await eventually(committed_to(namespace, group, tp, len(values)))
        written = await letters.written()  # a dead letter is published before the commit
    assert sorted(handler.handled) == values
    assert len(handler.calls) >= 3  # two failed attempts, then the one that went through
    assert written == 0


async def test_a_record_whose_document_the_real_store_refuses_as_too_large_is_set_aside(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    # A handler like the services': one unordered bulk write per batch, idempotent (upserts by
    # offset); the record `big` becomes a 17 MiB document, which the store refuses (10334).
    col = mongo[namespace.database]["poison_docs"]

    async def write(records: list[InboundRecord]) -> None:
        await col.bulk_write([ReplaceOne({"_id": r.offset}, {"value": r.value.decode(), "blob": "x" * (
            17 * 1024 * 1024 if r.value == b"big" else 10)}, upsert=True) for r in records], ordered=False)

    values = [b"a", b"b", b"c", b"big", b"d", b"e"]
    group = namespace.prefix + "poison-store"
    async with consuming(namespace, write, group) as topic, dead_letters(namespace.kafka()) as letters:
        tp = await produce(namespace, topic, values)
        seen = await letters.until(lambda seen: any(d.payload == "big" for d in seen))
        await eventually(committed_to(namespace, group, tp, len(values)))
    assert sorted([d["value"] async for d in col.find({}, {"value": 1})]) == ["a", "b", "c", "d", "e"]
    [letter] = seen
    assert letter.reason == "document_too_large" and letter.source_offset == 3
