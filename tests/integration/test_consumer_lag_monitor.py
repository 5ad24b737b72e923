"""Issue 14: consumer lag and readiness are kept current by the runtime's monitor loop, not by the
traffic that happens to succeed.

Before, the lag gauge was set only after a batch had been handled and committed, so a consumer
whose handler kept failing (the store away, a bug) showed the lag of its last good batch for ever
and `AllianceConsumerLagGrowing` / `AllianceConsumerStuck` could not fire. Here a real broker,
a `subscribe_batch` consumer whose handler always fails, and the service `Runtime` around it: the
gauge must follow the records arriving on the partition.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import REGISTRY
from pymongo.errors import AutoReconnect

from shared.http import Runtime
from shared.kafka import InboundRecord, RetryPolicy, make_broker, subscribe_batch
from shared.metrics import CONSUMER_LAG
from tests.support.services import Namespace
from tests.support.wait import eventually

SERVICE = "lag-monitor-test"
# Long enough that the batch stays in its retries for the whole test: nothing is ever committed.
SLOW = RetryPolicy(attempts=1000, first_delay=0.05, max_delay=0.1)


async def always_failing(records: list[InboundRecord]) -> None:
    raise AutoReconnect("the store is away")


@asynccontextmanager
async def failing_consumer(ns: Namespace, group: str, also: tuple[str, ...] = ()) -> AsyncIterator[str]:
    """A runtime whose only consumer, on the namespace's scored topic (and the topics `also` names),
    fails every batch."""
    kafka = ns.kafka()
    topic = kafka.topics().scored
    broker = make_broker(kafka, SERVICE)
    subscribe_batch(broker, (topic, *also), group_id=group, service=SERVICE, handler=always_failing, retry=SLOW,
                    settings=kafka)
    runtime = Runtime(SERVICE, broker=broker, monitor_interval_seconds=0.2)
    async with runtime.lifespan(FastAPI()):
        await eventually(lambda: _started(runtime), timeout=45)
        yield topic


async def _started(runtime: Runtime) -> bool:
    return runtime.started


def lag(topic: str, partition: int) -> float | None:
    """The gauge's current value for one partition, None when this process reports none."""
    for metric in CONSUMER_LAG.collect():
        for sample in metric.samples:
            if sample.labels == {"service": SERVICE, "topic": topic, "partition": str(partition)}:
                return sample.value
    return None


async def test_the_lag_of_a_consumer_whose_batches_keep_failing_grows_as_records_arrive(namespace: Namespace) -> None:
    async with failing_consumer(namespace, f"{namespace.prefix}lag-failing") as topic:
        await namespace.produce(topic, 5)

        async def lag_is(expected: int) -> bool:
            return lag(topic, 0) == expected

        await eventually(lambda: lag_is(5), timeout=45)
        await namespace.produce(topic, 7)
        await eventually(lambda: lag_is(12), timeout=45)


def retries(topic: str) -> float:
    return REGISTRY.get_sample_value("alliance_consumer_batch_retries_total",
                                     {"service": SERVICE, "topic": topic}) or 0.0


async def test_a_failing_batch_of_several_topics_counts_a_retry_for_each_topic_it_holds(namespace: Namespace) -> None:
    # AllianceConsumerStuck joins a topic's lag with its retries: a record waiting on the second
    # topic of a consumer must show retries of its own topic.
    other = namespace.kafka().topics().deterioration
    before = retries(other)
    async with failing_consumer(namespace, f"{namespace.prefix}lag-several", also=(other,)):
        await namespace.produce(other, 1)

        async def retried() -> bool:
            return retries(other) > before

        await eventually(retried, timeout=45)
