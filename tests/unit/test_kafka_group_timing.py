"""Consumer group liveness settings (`ALLIANCE_KAFKA_SESSION_TIMEOUT_MS`, `..._HEARTBEAT_INTERVAL_MS`)."""

from __future__ import annotations

import pytest
from faststream.kafka import KafkaBroker
from pydantic import ValidationError

from shared.kafka import InboundRecord, subscribe_batch
from shared.settings import KafkaSettings


async def _ignore(records: list[InboundRecord]) -> None:
    return None


def test_a_heartbeat_not_shorter_than_the_session_timeout_is_refused() -> None:
    with pytest.raises(ValidationError, match="heartbeat_interval_ms"):
        KafkaSettings(session_timeout_ms=3_000, heartbeat_interval_ms=3_000)


def test_a_batch_consumer_joins_its_group_with_the_settings_session_timeout_and_heartbeat() -> None:
    broker = KafkaBroker()
    subscribe_batch(broker, "t", group_id="g", service="s", handler=_ignore,
                    settings=KafkaSettings(session_timeout_ms=3_000, heartbeat_interval_ms=300))
    (subscriber,) = broker.subscribers
    # FastStream 0.7 (pinned in requirements) keeps the aiokafka consumer's arguments here.
    consumer_args = subscriber._connection_args  # type: ignore[attr-defined]
    assert (consumer_args["session_timeout_ms"], consumer_args["heartbeat_interval_ms"]) == (3_000, 300)
