"""Feeding and reading scoring's topics directly (benchmark and tests): synthetic submitted
events published the way intake publishes them (read them back with `tools.recorder`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer

from shared import ids
from shared.events import (
    CLIENT_TRANSFER,
    RECORD_TYPE_HEADER,
    ClientTransfer,
    Instrument,
    Items,
    OrsSubmitted,
    SrsSubmitted,
)
from shared.kafka import CORRELATION_HEADER

BASE = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def submission(tenant: str, client: str, session: int, total: float | None = None, *,
               items: Items | None = None, submission_id: str | None = None,
               instrument: Instrument = Instrument.SRS, episode_id: str | None = None,
               accepted_at: datetime | None = None, site: str = "north", clinician: str = "c-1",
               administered_at: datetime | None = None) -> SrsSubmitted:
    """A submitted event as intake would publish it (administered weekly from BASE by default)."""
    sid = submission_id or f"{client}-s{session}"
    now = datetime.now(UTC)
    return SrsSubmitted(
        event_id=ids.submitted_event_id(tenant, sid), tenant_id=tenant, occurred_at=now,
        submission_id=sid, site_id=site, clinician_id=clinician, client_id=client, episode_id=episode_id,
        instrument=instrument, session_number=session,
        administered_at=administered_at or BASE + timedelta(days=7 * session),
        items=items, total=total, accepted_at=accepted_at or now,
    )


def client_transfer(tenant: str, client: str, site: str, request_id: str = "r-1",
                    accepted_at: datetime | None = None) -> ClientTransfer:
    """A client transfer as intake publishes it (on the submitted topic, see `publish`)."""
    now = datetime.now(UTC)
    return ClientTransfer(event_id=ids.client_transfer_event_id(tenant, client, site, request_id), tenant_id=tenant,
                          occurred_at=now, client_id=client, site_id=site, accepted_at=accepted_at or now,
                          requested_by="admin")


def series_total(client_index: int, session: int) -> float:
    """A deterministic, varied series: most clients stable and high, some declining, some low."""
    if client_index % 7 == 0:
        return max(20.0, 39.0 - 2.5 * (session - 1))
    if client_index % 11 == 0:
        return min(39.0, 28.0 + 1.5 * (session - 1))
    return 38.0 + (client_index + session) % 2 * 0.5


async def start_producer(bootstrap: str, **kwargs: Any) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **kwargs)
    await producer.start()
    return producer


async def publish(producer: AIOKafkaProducer, topic: str,
                  events: Sequence[SrsSubmitted | OrsSubmitted | ClientTransfer], correlation: str | None = None
                  ) -> None:
    """Publish events keyed `tenant:client` and wait for every acknowledgement. A transfer gets the
    `record-type: client-transfer` header, as intake writes it (on either submitted topic)."""
    futures = []
    for ev in events:
        name = ev.event_id if isinstance(ev, ClientTransfer) else ev.submission_id
        headers = [(CORRELATION_HEADER, (correlation or f"corr-{name}").encode())]
        if isinstance(ev, ClientTransfer):
            headers.append((RECORD_TYPE_HEADER, CLIENT_TRANSFER.encode()))
        futures.append(await producer.send(topic, ev.model_dump_json().encode(),
                                           key=ids.partition_key(ev.tenant_id, ev.client_id), headers=headers))
    await asyncio.gather(*futures)
