"""The topic recorder of the benches and the tests: a topic's records, read into memory.

It reads every partition of one topic without a consumer group (no join pause, nothing
committed), from the beginning or from the end, either when asked (`poll`) or in the background
(`start(background=True)`), and keeps every record in `records` (as the consumers see them:
`shared.kafka.InboundRecord`, headers decoded); `on_record` sees each record with the time its
fetch returned (what the benches measure latency against).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka import InboundRecord, admin_security_kwargs
from shared.settings import KafkaSettings

Record = InboundRecord


@dataclass
class TopicRecorder:
    """Every record of `topic` read so far, in partition order."""

    bootstrap: str
    topic: str
    kafka: KafkaSettings | None = None  # for a deployment's TLS / SASL settings
    from_end: bool = False  # only what arrives after `start`
    fetch_max_wait_ms: int = 500  # a bench lowers it: an empty fetch waits this long on the broker
    on_record: Callable[[Record, float], None] | None = None
    records: list[Record] = field(default_factory=list)
    _consumer: AIOKafkaConsumer | None = None
    _task: asyncio.Task[None] | None = None

    async def start(self, background: bool = False, wait_for_topic: float = 5.0) -> TopicRecorder:
        """Assign every partition (waiting up to `wait_for_topic` seconds for the topic to show in
        the metadata); with `background`, keep reading until `stop`."""
        security: dict[str, Any] = admin_security_kwargs(self.kafka) if self.kafka is not None else {}
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=self.fetch_max_wait_ms,
                                    **security)
        await consumer.start()
        self._consumer = consumer
        deadline = time.monotonic() + wait_for_topic
        partitions = consumer.partitions_for_topic(self.topic)
        while not partitions:
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"topic {self.topic} does not exist")
            await asyncio.sleep(0.1)
            await consumer.topics()  # refreshes the metadata
            partitions = consumer.partitions_for_topic(self.topic)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        if self.from_end:
            await consumer.seek_to_end(*tps)
        else:
            await consumer.seek_to_beginning(*tps)
        if background:
            self._task = asyncio.create_task(self._run())
        return self

    async def poll(self, timeout_ms: int = 200) -> list[Record]:
        """Read what has arrived since the last poll; returns everything read so far."""
        if self._consumer is None:
            raise RuntimeError("the recorder is not started")
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
        at = time.time()
        for recs in batches.values():
            for raw in recs:
                r = InboundRecord.from_consumer_record(raw)
                self.records.append(r)
                if self.on_record is not None:
                    self.on_record(r, at)
        return self.records

    async def _run(self) -> None:
        while True:
            await self.poll()

    def values(self) -> list[bytes]:
        return [r.value for r in self.records]

    async def until(self, done: Callable[[list[Record]], bool], timeout: float = 30.0) -> list[Record]:
        """Read until `done(everything read)` holds; raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done(self.records):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic}: condition not met after {timeout}s ({len(self.records)} read)")
            if self._task is None:
                await self.poll()
            else:
                await asyncio.sleep(0.05)
        return self.records

    async def written(self) -> int:
        """How many records the topic holds (its end offsets), whether read yet or not."""
        if self._consumer is None:
            raise RuntimeError("the recorder is not started")
        ends = await self._consumer.end_offsets(list(self._consumer.assignment()))
        return sum(ends.values())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def __aenter__(self) -> TopicRecorder:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
