"""The runtime's monitor loop keeps readiness and consumer lag current (issue 14).

Readiness used to change only when someone called `/readyz`; lag only after a successful batch.
These are the loop's rules without a broker or a store (the real-broker case, a consumer whose
batches keep failing, is tests/integration/test_consumer_lag_monitor.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from fastapi import FastAPI

from shared.http import Runtime
from shared.kafka import measure_lag
from shared.metrics import CONSUMER_LAG, DEPENDENCY_UP, READY
from tests.support.wait import eventually


def gauge(metric: Any, **labels: str) -> float | None:
    for family in metric.collect():
        for sample in family.samples:
            if sample.labels == labels:
                return float(sample.value)
    return None


@dataclass
class StoreRuntime(Runtime):
    """A runtime whose only dependency is a store that answers while `store_answers`."""

    store_answers: bool = True

    async def ready(self) -> dict[str, bool]:
        return {"started": self.started, "mongodb": self.store_answers}


async def test_readiness_follows_the_store_without_anyone_calling_readyz() -> None:
    runtime = StoreRuntime("monitor-ready-test", monitor_interval_seconds=0.05)

    async def ready_is(value: float) -> bool:
        return gauge(READY, service="monitor-ready-test") == value

    async with runtime.lifespan(FastAPI()):
        await eventually(lambda: ready_is(1))
        runtime.store_answers = False
        await eventually(lambda: ready_is(0))
        assert gauge(DEPENDENCY_UP, service="monitor-ready-test", dependency="mongodb") == 0
        runtime.store_answers = True
        await eventually(lambda: ready_is(1))
        assert gauge(DEPENDENCY_UP, service="monitor-ready-test", dependency="mongodb") == 1


@dataclass
class StartingBroker:
    """What the runtime uses of a broker: start (refused while `refuses`), stop, ping, subscribers."""

    refuses: bool
    subscribers: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        if self.refuses:
            raise ConnectionError("no broker answers")

    async def stop(self) -> None:
        return None

    async def ping(self, timeout: float) -> bool:
        return not self.refuses


async def test_a_broker_refusing_the_start_up_is_reported_down() -> None:
    runtime = Runtime("monitor-broker-test", broker=StartingBroker(refuses=True),  # type: ignore[arg-type]
                      monitor_interval_seconds=0.05)

    async def kafka_down() -> bool:
        return gauge(DEPENDENCY_UP, service="monitor-broker-test", dependency="kafka") == 0

    async with runtime.lifespan(FastAPI()):
        await eventually(kafka_down)
        assert gauge(READY, service="monitor-broker-test") == 0


async def test_a_start_up_step_failing_on_the_store_says_nothing_about_the_broker() -> None:
    async def store_step() -> None:
        raise ConnectionError("the store is away")

    runtime = Runtime("monitor-steps-test", broker=StartingBroker(refuses=False),  # type: ignore[arg-type]
                      on_start=[store_step], monitor_interval_seconds=0.05)

    async def not_ready() -> bool:
        return gauge(READY, service="monitor-steps-test") == 0

    async with runtime.lifespan(FastAPI()):
        await eventually(not_ready)
        await asyncio.sleep(0.3)  # several more checks
        assert gauge(DEPENDENCY_UP, service="monitor-steps-test", dependency="kafka") is None


@dataclass
class FakeConsumer:
    """What `measure_lag` reads from an aiokafka consumer: assignment, end, committed, beginning."""

    assigned: set[TopicPartition]
    ends: dict[TopicPartition, int]
    commits: dict[TopicPartition, int | None] = field(default_factory=dict)
    starts: dict[TopicPartition, int] = field(default_factory=dict)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def end_offsets(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.ends[tp] for tp in parts}

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.commits.get(tp)

    async def beginning_offsets(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.starts.get(tp, 0) for tp in parts}


@dataclass
class FakeSubscriber:
    consumer: FakeConsumer | None


@dataclass
class FakeBroker:
    subscribers: list[FakeSubscriber]


P0, P1 = TopicPartition("srs.scored.v1", 0), TopicPartition("srs.scored.v1", 1)
SERVICE = "monitor-lag-test"


def lag(partition: int) -> float | None:
    return gauge(CONSUMER_LAG, service=SERVICE, topic="srs.scored.v1", partition=str(partition))


async def test_lag_is_the_log_end_minus_the_committed_offset() -> None:
    consumer = FakeConsumer({P0}, {P0: 120}, {P0: 100})
    await measure_lag(SERVICE, FakeBroker([FakeSubscriber(consumer)]), 1.0)  # type: ignore[arg-type]
    assert lag(0) == 20


async def test_before_the_first_commit_lag_counts_from_the_earliest_offset() -> None:
    consumer = FakeConsumer({P0}, {P0: 120}, {}, {P0: 30})
    await measure_lag(SERVICE, FakeBroker([FakeSubscriber(consumer)]), 1.0)  # type: ignore[arg-type]
    assert lag(0) == 90


async def test_a_partition_moved_to_another_replica_is_no_longer_reported_here() -> None:
    consumer = FakeConsumer({P0, P1}, {P0: 10, P1: 10}, {P0: 5, P1: 5})
    broker = FakeBroker([FakeSubscriber(consumer)])
    await measure_lag(SERVICE, broker, 1.0)  # type: ignore[arg-type]
    assert (lag(0), lag(1)) == (5, 5)
    consumer.assigned = {P0}
    await measure_lag(SERVICE, broker, 1.0)  # type: ignore[arg-type]
    assert (lag(0), lag(1)) == (5, None)


async def test_a_consumer_the_broker_does_not_answer_for_keeps_its_last_lag() -> None:
    consumer = FakeConsumer({P0}, {P0: 50}, {P0: 10})
    broker = FakeBroker([FakeSubscriber(consumer)])
    await measure_lag(SERVICE, broker, 1.0)  # type: ignore[arg-type]
    consumer.ends = {}  # the next offsets request fails
    await measure_lag(SERVICE, broker, 1.0)  # type: ignore[arg-type]
    assert lag(0) == 40
