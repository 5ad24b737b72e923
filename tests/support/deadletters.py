"""Read the dead-letter topic of a namespace: what the services refused, with reason and coordinates."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from shared.events import DeadLetter
from shared.settings import KafkaSettings
from tools.recorder import TopicRecorder


@dataclass
class DeadLetters:
    """Every dead letter read so far (from the topic's beginning), in topic order per partition."""

    recorder: TopicRecorder
    _decoded: list[DeadLetter] = field(default_factory=list)

    @property
    def seen(self) -> list[DeadLetter]:
        records = self.recorder.records
        self._decoded.extend(DeadLetter.model_validate_json(r.value) for r in records[len(self._decoded):])
        return self._decoded

    async def poll(self) -> list[DeadLetter]:
        """Read what has arrived since the last poll; returns everything read so far."""
        await self.recorder.poll(timeout_ms=500)
        return self.seen

    async def written(self) -> int:
        """How many dead letters the topic holds (its end offsets), whether read yet or not."""
        return await self.recorder.written()

    async def until(self, done: Callable[[list[DeadLetter]], bool], timeout: float = 30.0) -> list[DeadLetter]:
        """Poll until `done(everything read)` holds; fails after `timeout` seconds."""
        await self.recorder.until(lambda records: done(self.seen), timeout=timeout)
        return self.seen

    async def first(self, match: Callable[[DeadLetter], bool], timeout: float = 30.0) -> DeadLetter:
        """The first dead letter that `match`es, once it has arrived."""
        await self.until(lambda seen: any(match(d) for d in seen), timeout=timeout)
        return next(d for d in self.seen if match(d))


@asynccontextmanager
async def dead_letters(kafka: KafkaSettings) -> AsyncIterator[DeadLetters]:
    """A reader of `kafka`'s dead-letter topic from its beginning (no consumer group, nothing committed)."""
    async with TopicRecorder(kafka.bootstrap, kafka.topics().deadletter, kafka=kafka) as recorder:
        yield DeadLetters(recorder)
