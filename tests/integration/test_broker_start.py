"""A service's consumers join their groups together when it starts (`shared.kafka.start_broker`).

Each subscriber's start returns only once its group assigned it partitions, and the broker holds a
new group's first join (Tansu: half the session timeout; Apache Kafka:
`group.initial.rebalance.delay.ms`). Started in turn, reporting's seven consumers made it wait
seven joins before it was ready, after every restart; started together, one.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from shared.kafka import InboundRecord, make_broker, start_broker, subscribe_batch
from tests.support.services import Namespace

SERVICE = "broker-start-test"


async def _ignore(records: list[InboundRecord]) -> None:
    return None


async def test_every_consumer_of_a_broker_has_begun_joining_before_any_has_its_partitions(
        namespace: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = namespace.kafka()
    topics = kafka.topics()
    broker = make_broker(kafka, SERVICE)
    for n, topic in enumerate((topics.scored, topics.deterioration, topics.alert_status)):
        subscribe_batch(broker, topic, group_id=f"{namespace.prefix}start-{n}", service=SERVICE, handler=_ignore,
                        settings=kafka)
    spans: list[tuple[float, float]] = []
    subscriber_class = type(broker.subscribers[0])
    original = subscriber_class.start

    async def timed_start(self: Any) -> None:
        began = time.monotonic()
        await original(self)
        spans.append((began, time.monotonic()))

    monkeypatch.setattr(subscriber_class, "start", timed_start)
    try:
        await start_broker(broker)
        assert all(sub.consumer is not None and sub.consumer.assignment() for sub in broker.subscribers)  # type: ignore[attr-defined]
    finally:
        await broker.stop()
    assert len(spans) == 3
    # Started in turn, each start would begin after the one before it had its partitions.
    assert max(began for began, _ in spans) < min(ended for _, ended in spans)
