"""Kafka wiring shared by every service.

- `make_broker`: a FastStream KafkaBroker with `acks=all`, idempotence per settings, TLS/SASL.
- `subscribe_batch`: a batch subscriber with manual commits. The handler gets raw records (so
  one undecodable record cannot fail a whole batch) and must publish its outputs, dead-letter
  what it cannot process, and return; the offsets are committed only after that. A transient
  failure is retried with backoff; after a bounded number of attempts the batch is rewound
  (seek) so the partition is re-read later, never skipped and never spun in a hot loop.
- `Publisher`: publishes many records and waits for all acknowledgements together.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import ssl
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from shared.events import DeadLetter
from shared.metrics import (
    CONSUMER_BATCH_SECONDS,
    CONSUMER_LAG,
    CONSUMER_RECORDS,
    CONSUMER_RETRIES,
    DEADLETTER,
)
from shared.settings import KafkaSettings

log = logging.getLogger("alliance.kafka")

CORRELATION_HEADER = "correlation_id"
JSON_HEADERS = {"content-type": "application/json"}


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=settings.ssl_cafile or None)
    if settings.ssl_certfile:
        ctx.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile or None)
    return ctx


def _security(settings: KafkaSettings) -> BaseSecurity | None:
    proto = settings.security_protocol
    if proto == "PLAINTEXT":
        return None
    ctx = _ssl_context(settings) if proto in ("SSL", "SASL_SSL") else None
    if proto == "SSL":
        return BaseSecurity(ssl_context=ctx, use_ssl=True)
    user, password = settings.sasl_username, settings.sasl_password.get_secret_value()
    use_ssl = proto == "SASL_SSL"
    if settings.sasl_mechanism == "SCRAM-SHA-256":
        return SASLScram256(user, password, ssl_context=ctx, use_ssl=use_ssl)
    if settings.sasl_mechanism == "SCRAM-SHA-512":
        return SASLScram512(user, password, ssl_context=ctx, use_ssl=use_ssl)
    return SASLPlaintext(user, password, ssl_context=ctx, use_ssl=use_ssl)


def admin_security_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """TLS/SASL keyword arguments for plain aiokafka clients (admin, tools), matching `make_broker`."""
    proto = settings.security_protocol
    if proto == "PLAINTEXT":
        return {}
    kwargs: dict[str, Any] = {"security_protocol": proto}
    if proto in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = _ssl_context(settings)
    if proto.startswith("SASL"):
        kwargs.update(sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username,
                      sasl_plain_password=settings.sasl_password.get_secret_value())
    return kwargs


# Settings each broker was made from, so subscribers created on it use the same fetch tuning.
_BROKER_SETTINGS: weakref.WeakKeyDictionary[KafkaBroker, KafkaSettings] = weakref.WeakKeyDictionary()


def make_broker(settings: KafkaSettings, client_id: str) -> KafkaBroker:
    """A broker whose producer waits for all in-sync replicas (and is idempotent where supported)."""
    acks: Any = "all" if settings.acks == "all" else int(settings.acks)
    broker = KafkaBroker(
        settings.bootstrap,
        client_id=f"alliance-{client_id}",
        acks=acks,
        enable_idempotence=settings.idempotence,
        linger_ms=settings.linger_ms,
        request_timeout_ms=settings.request_timeout_ms,
        security=_security(settings),
        logger=logging.getLogger(f"alliance.{client_id}.faststream"),
    )
    _BROKER_SETTINGS[broker] = settings
    return broker


@dataclass(frozen=True)
class InboundRecord:
    """One consumed record, undecoded."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, str]
    timestamp_ms: int

    @property
    def correlation_id(self) -> str:
        # Derived from the record's coordinates when missing, so a redelivery carries the same id.
        return self.headers.get(CORRELATION_HEADER) or str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"kafka:{self.topic}:{self.partition}:{self.offset}"))

    @classmethod
    def from_consumer_record(cls, rec: ConsumerRecord[Any, Any]) -> InboundRecord:
        headers: dict[str, str] = {}
        for name, raw in rec.headers or ():
            # A header that is not UTF-8 must not make the whole record unreadable.
            headers[name] = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        value = rec.value if isinstance(rec.value, bytes) else (rec.value or b"")
        key = rec.key if isinstance(rec.key, bytes) or rec.key is None else str(rec.key).encode()
        return cls(rec.topic, rec.partition, rec.offset, key, value, headers, rec.timestamp)


@dataclass(frozen=True)
class OutboundRecord:
    """One record to publish."""

    topic: str
    value: bytes
    key: bytes | None = None
    correlation_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Publisher:
    """Publishes records and waits for every acknowledgement before returning."""

    def __init__(self, broker: KafkaBroker, timeout_seconds: float) -> None:
        self._broker = broker
        self._timeout = timeout_seconds

    async def publish_all(self, records: Sequence[OutboundRecord]) -> None:
        """Send all records, then wait for all acks; raises if any is not acknowledged in time."""
        if not records:
            return
        futures = []
        for r in records:
            futures.append(
                await self._broker.publish(
                    r.value,
                    r.topic,
                    key=r.key,
                    headers={**JSON_HEADERS, **r.headers},
                    correlation_id=r.correlation_id,
                    no_confirm=True,
                )
            )
        await asyncio.wait_for(asyncio.gather(*futures), self._timeout)


def dead_letter_record(service: str, rec: InboundRecord, reason: str, detail: str, dlq_topic: str,
                       tenant_id: str | None = None) -> OutboundRecord:
    """A dead-letter record for `rec`, keeping its source coordinates and its original bytes."""
    try:
        payload, encoding = rec.value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(rec.value).decode(), "base64"
    key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
    dl = DeadLetter(
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"dl:{service}:{rec.topic}:{rec.partition}:{rec.offset}:{reason}")),
        tenant_id=tenant_id,
        occurred_at=datetime.now(UTC),
        service=service,
        reason=reason,
        detail=detail[:2000],
        source_topic=rec.topic,
        source_partition=rec.partition,
        source_offset=rec.offset,
        key=key,
        payload=payload,
        payload_encoding=encoding,
    )
    DEADLETTER.labels(service, reason).inc()
    CONSUMER_RECORDS.labels(service, rec.topic, "deadlettered").inc()
    return OutboundRecord(dlq_topic, dl.model_dump_json().encode(), key=rec.key, correlation_id=rec.correlation_id)


BatchHandler = Callable[[list[InboundRecord]], Awaitable[None]]


@dataclass
class RetryPolicy:
    """Backoff for transient failures of a whole batch."""

    attempts: int = 6
    first_delay: float = 0.2
    max_delay: float = 5.0

    def delays(self) -> list[float]:
        return [min(self.max_delay, self.first_delay * 2**i) for i in range(self.attempts - 1)]


def _sanitize_headers(rec: ConsumerRecord[Any, Any]) -> ConsumerRecord[Any, Any]:
    headers = rec.headers or ()
    try:
        for _, value in headers:
            value.decode("utf-8")
    except (UnicodeDecodeError, AttributeError):
        fixed = [(k, v.decode("utf-8", "replace").encode() if isinstance(v, bytes) else str(v).encode())
                 for k, v in headers]
        return dataclasses.replace(rec, headers=fixed)
    return rec


def _record_lag(service: str, consumer: Any, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
    last: dict[tuple[str, int], int] = {}
    for r in records:
        last[(r.topic, r.partition)] = r.offset
    for (topic, partition), offset in last.items():
        try:
            hw = consumer.highwater(TopicPartition(topic, partition))
        except Exception:
            hw = None
        if hw is not None:
            CONSUMER_LAG.labels(service, topic, str(partition)).set(max(0, hw - offset - 1))


def subscribe_batch(
    broker: KafkaBroker,
    topic: str,
    *,
    group_id: str,
    service: str,
    handler: BatchHandler,
    max_records: int = 500,
    retry: RetryPolicy | None = None,
    batch_timeout_ms: int = 50,
    fetch_max_wait_ms: int | None = None,
) -> None:
    """Register an at-least-once batch consumer of `topic` for `handler` (see module docs).

    `fetch_max_wait_ms` defaults to the broker's `KafkaSettings.fetch_max_wait_ms` (see there).
    """
    policy = retry or RetryPolicy()
    if fetch_max_wait_ms is None:
        known = _BROKER_SETTINGS.get(broker)
        fetch_max_wait_ms = known.fetch_max_wait_ms if known is not None else 500

    async def _raw(msg: Any) -> None:  # skip FastStream's JSON decoding: we decode per record
        return None

    async def _safe_parser(raw: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
        # FastStream decodes header values strictly; one non-UTF-8 header would fail the whole
        # batch before our handler sees it, so such values are made decodable first.
        return await original(tuple(_sanitize_headers(r) for r in raw))

    @broker.subscriber(
        topic,
        group_id=group_id,
        batch=True,
        max_records=max_records,
        batch_timeout_ms=batch_timeout_ms,
        fetch_max_wait_ms=fetch_max_wait_ms,
        ack_policy=AckPolicy.MANUAL,
        auto_offset_reset="earliest",
        decoder=_raw,
        parser=_safe_parser,
        title=f"{service}:{topic}",
    )
    async def _consume(body: Any, message: KafkaMessage) -> None:
        raw: tuple[ConsumerRecord[Any, Any], ...] = message.raw_message
        records = [InboundRecord.from_consumer_record(r) for r in raw]
        started = time.perf_counter()
        for attempt, delay in enumerate([*policy.delays(), None]):
            try:
                await handler(records)
                await message.ack()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                CONSUMER_RETRIES.labels(service, topic).inc()
                if delay is None:
                    log.error("batch failed %d times, rewinding for redelivery: %r", attempt + 1, exc)
                    await asyncio.sleep(policy.max_delay)
                    await message.nack()  # seeks back to the batch's first offsets
                    return
                log.warning("batch failed (attempt %d), retrying in %.1fs: %r", attempt + 1, delay, exc)
                await asyncio.sleep(delay)
            else:
                CONSUMER_RECORDS.labels(service, topic, "committed").inc(len(records))
                CONSUMER_BATCH_SECONDS.labels(service, topic).observe(time.perf_counter() - started)
                _record_lag(service, getattr(message, "consumer", None), raw)
                return
