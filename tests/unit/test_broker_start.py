"""`shared.kafka.start_broker` when a subscriber cannot start (the broker itself is replaced by a
stand-in: what it starts and in which order is what is specified here)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import cast

import pytest
from faststream.kafka import KafkaBroker

from shared.kafka import start_broker


@dataclass
class Starting:
    """A subscriber or publisher whose start takes `delay` seconds, then fails when `error` is set."""

    delay: float = 0.0
    error: Exception | None = None
    started: bool = False
    cancelled: bool = False

    async def start(self) -> None:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        self.started = True


@dataclass(eq=False)  # hashable by identity, as a KafkaBroker is (start_broker looks its takeovers up by broker)
class StandInBroker:
    subscribers: list[Starting]
    publishers: list[Starting] = field(default_factory=list)
    connected: bool = False
    running: bool = False

    async def connect(self) -> None:
        self.connected = True


async def test_a_broker_starts_its_subscribers_then_its_publishers_and_is_running() -> None:
    broker = StandInBroker([Starting(0.01), Starting(0.02)], [Starting()])
    await start_broker(cast(KafkaBroker, broker))
    assert broker.connected and broker.running
    assert all(s.started for s in broker.subscribers + broker.publishers)


async def test_a_subscriber_that_cannot_start_cancels_the_others_starts_and_its_error_is_raised() -> None:
    hanging, failing = Starting(delay=60), Starting(delay=0.01, error=ConnectionError("no coordinator"))
    broker = StandInBroker([hanging, failing], [Starting()])
    with pytest.raises(ConnectionError, match="no coordinator"):
        await start_broker(cast(KafkaBroker, broker))
    assert hanging.cancelled and not hanging.started
    assert not broker.running and not broker.publishers[0].started
