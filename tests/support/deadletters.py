"""Read the dead-letter topic of a namespace: what the services refused, with reason and coordinates."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.events import DeadLetter
from shared.kafka import admin_security_kwargs
from shared.settings import KafkaSettings
from tests.support.wait import eventually


@dataclass
class DeadLetters:
    """Every dead letter read so far (from the topic's beginning), in topic order per partition."""

    consumer: AIOKafkaConsumer
    seen: list[DeadLetter] = field(default_factory=list)

    async def poll(self) -> list[DeadLetter]:
        """Read what has arrived since the last poll; returns everything read so far."""
        for records in (await self.consumer.getmany(timeout_ms=500)).values():
            self.seen.extend(DeadLetter.model_validate_json(r.value) for r in records)
        return self.seen

    async def written(self) -> int:
        """How many dead letters the topic holds (its end offsets), whether read yet or not."""
        topic = next(iter(self.consumer.subscription()))
        partitions = self.consumer.partitions_for_topic(topic) or set()
        ends = await self.consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return sum(ends.values())

    async def until(self, done: Callable[[list[DeadLetter]], bool], timeout: float = 30.0) -> list[DeadLetter]:
        """Poll until `done(everything read)` holds; fails after `timeout` seconds."""
        async def check() -> bool:
            return done(await self.poll())

        await eventually(check, timeout=timeout)
        return self.seen


@asynccontextmanager
async def dead_letters(kafka: KafkaSettings) -> AsyncIterator[DeadLetters]:
    """A reader of `kafka`'s dead-letter topic from its beginning (no consumer group, nothing committed)."""
    consumer = AIOKafkaConsumer(kafka.topics().deadletter, bootstrap_servers=kafka.bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                **admin_security_kwargs(kafka))
    await consumer.start()
    try:
        yield DeadLetters(consumer)
    finally:
        await consumer.stop()
