"""Kafka wiring shared by every service.

- `make_broker`: a FastStream KafkaBroker with `acks=all`, idempotence per settings, TLS/SASL.
- `subscribe_batch`: a batch subscriber with manual commits. Given the `model` of the topic's
  events, it decodes each batch (`typed_handler`: one undecodable record cannot fail a whole
  batch), runs the handler on the typed events (`Decoded`), then dead-letters the records that
  did not decode; without a model the handler gets the raw records. The handler must publish its
  outputs, dead-letter what it cannot process, and return; the offsets are committed only after
  that.
  Every failure that escapes the handler is classified (`classify`):
    * *transient* (the store or broker unreachable, a timeout, not primary, a write concern, and
      anything not known to be deterministic): the batch is retried with backoff; after a
      bounded number of attempts it is rewound (seek) so the partition is re-read later, never
      skipped and never spun in a hot loop. Nothing is committed past it.
    * *deterministic* (a document too large for the store, a document BSON cannot encode or the
      store refuses as invalid, a pydantic `ValidationError`, a `PermanentError` the handler
      raised): it would fail the same way on every attempt. After `RetryPolicy.poison_attempts`
      such failures of the whole batch, the culprits are isolated: the handler is run again on
      halves of the batch, recursively, down to single records (handlers are idempotent, so
      running a record twice is safe by design). Every record that fails deterministically on
      its own is dead-lettered (`dead_letter_record`, with the failure's reason, e.g.
      `document_too_large`, and the record's coordinates), counted in
      `alliance_consumer_poison_records_total` and logged with its topic, partition, offset and
      a hash of its key (no payload values); the rest of the batch has then been handled and the
      offsets are committed. A transient failure during isolation sends the batch back to the
      retries above. Without a dead-letter target a deterministic failure is retried like a
      transient one.
  A crash (or a lost partition) before the commit leaves the whole batch to be delivered again:
  its effects may already be in the store (re-applied idempotently) and its poison records may
  already be on the dead-letter topic; a redelivery dead-letters them again under the same
  `event_id` (derived from source coordinates and reason), so readers can drop the copies.
- `decode_batch`: the typed layer: decodes a batch into `Decoded` events (each with its record:
  coordinates, key, headers) with one model or one chosen per record, and builds the dead letters
  of the records that do not decode (`DeadLetterReason` `undecodable` or `invalid`, with the
  tenant the record names). `typed_handler` publishes them after the handler returned and before
  the commit, so the crash rule above holds for them (and a batch retried after a failure of the
  handler does not publish them once per attempt).
- `Publisher`: publishes many records and waits for all acknowledgements together.

Tracing (`shared.tracing`, when on): each consumed batch gets a span linked to its records' contexts
and each record a span continuing its own trace; `InboundRecord.traceparent` is that span's, and an
`OutboundRecord` made from the record carries it on (`traceparent=rec.traceparent`) in its
`traceparent` header. Tracing off, the header a record arrived with is passed on unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast, overload

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from bson.errors import BSONError, InvalidDocument
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, ValidationError
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DocumentTooLarge,
    ExecutionTimeout,
    OperationFailure,
    WriteConcernError,
    WriteError,
)

from shared import ids
from shared.events import DeadLetter, DeadLetterReason
from shared.metrics import (
    CONSUMER_BATCH_SECONDS,
    CONSUMER_LAG,
    CONSUMER_RECORDS,
    CONSUMER_RETRIES,
    DEADLETTER,
    POISON_RECORDS,
)
from shared.mongo import DUPLICATE_KEY
from shared.settings import KafkaSettings
from shared.tracing import TRACEPARENT, BatchTrace
from shared.tracing import enabled as tracing_enabled
from shared.tracing import exemplar as tracing_exemplar
from shared.tracing import span as trace_span

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
    return broker


async def start_broker(broker: KafkaBroker) -> None:
    """What `broker.start()` does, with the subscribers started together instead of in turn.

    Why: FastStream starts subscribers one after another, and aiokafka's `start()` of a subscribed
    consumer returns only once its group has assigned it partitions. The coordinator holds a group's
    first join (Apache Kafka: `group.initial.rebalance.delay.ms`, 3 s by default; Tansu: half the
    session timeout), so a service was ready only after as many joins in a row as it has
    subscribers: reporting (seven) 14 s on the local stack, alerts (six) 12 s, after every start
    and every restart, `kill -9` included. Every subscriber of a service has a group of its own
    (`KafkaSettings.group`), so their joins do not depend on one another and can overlap.

    When one subscriber fails to start, the others' starts are cancelled and the first error is
    raised, as from `broker.start()` (the runtime then stops the broker and retries).

    A subscriber whose group replaces others (`TakeOver`) has its offsets seeded first.
    """
    await broker.connect()
    for takeover in _TAKEOVERS.get(broker, ()):
        await takeover.seed()
    starts = [asyncio.create_task(sub.start()) for sub in broker.subscribers]
    try:
        await asyncio.gather(*starts)
    except BaseException:
        for task in starts:
            task.cancel()
        await asyncio.gather(*starts, return_exceptions=True)
        raise
    for pub in broker.publishers:
        await pub.start()
    broker.running = True


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
    # The W3C traceparent of this record's process span, set by `subscribe_batch` when tracing is on.
    process_traceparent: str | None = None

    @property
    def traceparent(self) -> str | None:
        """The trace context this record's outputs carry: its process span's when tracing is on, else
        the one it arrived with (passed on, so a trace joins up across a service that does not export)."""
        return self.process_traceparent or self.headers.get(TRACEPARENT)

    @property
    def correlation_id(self) -> str:
        # Derived from the record's coordinates when missing, so a redelivery carries the same id.
        return self.headers.get(CORRELATION_HEADER) or ids.record_correlation_id(self.topic, self.partition,
                                                                                 self.offset)

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
    # The W3C trace context of what caused the record (`InboundRecord.traceparent`), sent as a header.
    traceparent: str | None = None

    def all_headers(self) -> dict[str, str]:
        """The headers it is published with: content type, its own, and its trace context."""
        if self.traceparent is None:
            return {**JSON_HEADERS, **self.headers}
        return {**JSON_HEADERS, **self.headers, TRACEPARENT: self.traceparent}


class Publisher:
    """Publishes records and waits for every acknowledgement before returning."""

    def __init__(self, broker: KafkaBroker, timeout_seconds: float) -> None:
        self._broker = broker
        self._timeout = timeout_seconds

    async def publish_all(self, records: Sequence[OutboundRecord]) -> None:
        """Send all records, then wait for all acks; raises if any is not acknowledged in time."""
        if not records:
            return
        with trace_span("publish", kind=SpanKind.PRODUCER,
                        attributes={"messaging.system": "kafka", "messaging.operation.type": "send",
                                    "messaging.batch.message_count": len(records)}):
            futures = []
            for r in records:
                futures.append(
                    await self._broker.publish(
                        r.value,
                        r.topic,
                        key=r.key,
                        headers=r.all_headers(),
                        correlation_id=r.correlation_id,
                        no_confirm=True,
                    )
                )
            await asyncio.wait_for(asyncio.gather(*futures), self._timeout)


def dead_letter_record(service: str, rec: InboundRecord, reason: str, detail: str, dlq_topic: str,
                       tenant_id: str | None = None, judgement: int = 0) -> OutboundRecord:
    """A dead-letter record for `rec`, keeping its source coordinates and its original bytes
    (`judgement`: `DeadLetter.judgement`, scoring's, of a refusal a transfer re-judged)."""
    try:
        payload, encoding = rec.value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(rec.value).decode(), "base64"
    key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
    dl = DeadLetter(
        event_id=ids.dead_letter_event_id(service, rec.topic, rec.partition, rec.offset, reason),
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
        headers=rec.headers,
        judgement=judgement,
    )
    DEADLETTER.labels(service, reason).inc()
    CONSUMER_RECORDS.labels(service, rec.topic, "deadlettered").inc()
    return OutboundRecord(dlq_topic, dl.model_dump_json().encode(), key=rec.key, correlation_id=rec.correlation_id,
                          traceparent=rec.traceparent)


M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Decoded(Generic[M]):
    """One record decoded into its event, with the record (coordinates, key, headers: for
    correlation ids, sources and dead letters)."""

    record: InboundRecord
    event: M

    @property
    def body(self) -> str:
        """The record's value as text (it decoded, so it is UTF-8)."""
        return self.record.value.decode("utf-8")

    @property
    def correlation_id(self) -> str:
        return self.record.correlation_id

    @property
    def traceparent(self) -> str | None:
        return self.record.traceparent


@dataclass(frozen=True)
class Refused:
    """A record that did not decode: `undecodable` (not UTF-8 JSON) or `invalid` (not the event)."""

    record: InboundRecord
    reason: DeadLetterReason
    detail: str  # field paths and messages, never the values (they may hold client ids and ratings)


# Which model a record holds: one for the topic, or chosen per record (e.g. by a header).
ModelOf = type[M] | Callable[[InboundRecord], type[M]]


def describe(exc: ValidationError) -> str:
    """A validation error as field paths and messages only: the input values may hold client ids and ratings."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


def decode_records(records: Sequence[InboundRecord], model: ModelOf[M]) -> tuple[list[Decoded[M]], list[Refused]]:
    """Decode each record into its model, in order; the others come back refused, with the reason."""
    good: list[Decoded[M]] = []
    refused: list[Refused] = []
    for rec in records:
        chosen: type[M] = model if isinstance(model, type) else model(rec)
        try:
            good.append(Decoded(rec, chosen.model_validate_json(rec.value)))
        except ValidationError as exc:
            undecodable = any(e["type"] == "json_invalid" for e in exc.errors())
            reason = DeadLetterReason.UNDECODABLE if undecodable else DeadLetterReason.INVALID
            refused.append(Refused(rec, reason, describe(exc)))
    return good, refused


def decode_batch(records: Sequence[InboundRecord], model: ModelOf[M], *, service: str, dlq_topic: str,
                 reason: DeadLetterReason | None = None) -> tuple[list[Decoded[M]], list[OutboundRecord]]:
    """Decode a batch: the events in record order, and a dead letter (with the tenant the record
    names, when it names one) for each record that did not decode. `reason` replaces both decode
    reasons for a service whose dead letters have always carried one (alerts: `invalid_event`).
    Nothing is published here: the handler sends the dead letters with its other outputs, before
    it returns (so a crash before the commit dead-letters them again, under the same ids)."""
    good, refused = decode_records(records, model)
    return good, [dead_letter_record(service, r.record, reason or r.reason, r.detail, dlq_topic, _tenant_of(r.record))
                  for r in refused]


BatchHandler = Callable[[list[InboundRecord]], Awaitable[None]]
TypedHandler = Callable[[list[Decoded[M]]], Awaitable[None]]
DeadLetterSink = Callable[[Sequence[OutboundRecord]], Awaitable[None]]


class PermanentError(Exception):
    """Raised by a handler for a failure that will recur on every attempt: the records it was
    given cannot be processed, ever (see `subscribe_batch`, which isolates and dead-letters them).

    `reason` becomes the dead letter's reason and a metric label: keep it to a few fixed words.
    `detail` goes to the dead letter only, never to a log.
    """

    def __init__(self, reason: str = DeadLetterReason.PERMANENT_ERROR, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# Store error codes that say the document itself is at fault, whoever sends it and however often.
TOO_LARGE_CODES = frozenset({
    10334,  # BSONObjectTooLarge: an inserted or replaced document over 16 MiB
    17419,  # an update whose resulting document is over 16 MiB
    17420,  # an upsert whose document is over 16 MiB
    17280,  # KeyTooLong: an indexed value too large for an index entry (before 4.2)
})
# Only trusted as the record's fault when the store attributes them to one written document (a
# write error): a command-level BadValue may just as well be a bug in a query, which must stall
# (and alert), not dead-letter every record it meets.
INVALID_WRITE_CODES = frozenset({
    2,  # BadValue
    52,  # DollarPrefixedFieldName
    53,  # InvalidIdField
    55,  # InvalidDBRef
    56,  # EmptyFieldName
    57,  # DottedFieldName
    66,  # ImmutableField
    121,  # DocumentValidationFailure
})


@dataclass(frozen=True)
class Failure:
    """What `classify` made of an exception."""

    deterministic: bool
    reason: str  # dead-letter reason and metric label; "transient" for the others
    summary: str  # exception type and store codes only: safe to log (no document, no value)
    detail: str = ""  # for the dead letter (which holds the record anyway), never for a log


TRANSIENT = "transient"


def _write_error_reason(codes: Sequence[int]) -> str | None:
    """The reason when every (non-duplicate) write error is the document's own fault, else None."""
    own = [c for c in codes if c != DUPLICATE_KEY]
    if not own or not all(c in TOO_LARGE_CODES or c in INVALID_WRITE_CODES for c in own):
        return None
    return DeadLetterReason.DOCUMENT_TOO_LARGE if any(c in TOO_LARGE_CODES for c in own) \
        else DeadLetterReason.INVALID_DOCUMENT


def classify(exc: BaseException) -> Failure:
    """Deterministic (the records are at fault: retrying cannot help) or transient (anything else).

    Deterministic: pymongo's `DocumentTooLarge` and other BSON encoding errors; a `BulkWriteError`
    whose write errors all carry a too-large or invalid-document code (duplicate keys aside) and
    no write concern error; a `WriteError` or `OperationFailure` with such a code (the invalid
    ones only as a write error); a pydantic `ValidationError`; a `PermanentError`. An exception
    raised `from` one of these counts as it. An exception group is deterministic when all of its
    members are. Everything else — network errors, timeouts, not primary, write concern errors,
    errors with a retryable label, exceptions nobody classified — is transient.
    """
    name = type(exc).__name__
    if isinstance(exc, PermanentError):
        return Failure(True, exc.reason, f"{name}({exc.reason})", exc.detail)
    if isinstance(exc, DocumentTooLarge):
        return Failure(True, DeadLetterReason.DOCUMENT_TOO_LARGE, name, str(exc)[:500])
    if isinstance(exc, (InvalidDocument, BSONError)):
        return Failure(True, DeadLetterReason.INVALID_DOCUMENT, name, str(exc)[:500])
    if isinstance(exc, ValidationError):
        return Failure(True, DeadLetterReason.VALIDATION_ERROR, f"{name}({exc.error_count()} errors, {exc.title})",
                       str(exc)[:2000])
    if isinstance(exc, (ConnectionFailure, ExecutionTimeout, WriteConcernError)):
        return Failure(False, TRANSIENT, f"{name}(code={getattr(exc, 'code', None)})")
    if isinstance(exc, BulkWriteError):
        details = exc.details or {}
        errors = details.get("writeErrors") or []
        codes = [int(e.get("code") or 0) for e in errors]
        summary = f"{name}(codes={sorted(set(codes))}, writes={len(errors)})"
        reason = None if details.get("writeConcernErrors") else _write_error_reason(codes)
        if reason is None:
            return Failure(False, TRANSIENT, summary)
        messages = "; ".join(sorted({str(e.get("errmsg", ""))[:300] for e in errors if e.get("code") != DUPLICATE_KEY}))
        return Failure(True, reason, summary, messages)
    if isinstance(exc, OperationFailure):
        code = int(exc.code or 0)
        summary = f"{name}(code={code})"
        if exc.has_error_label("RetryableWriteError") or exc.has_error_label("TransientTransactionError"):
            return Failure(False, TRANSIENT, summary)
        message = str((exc.details or {}).get("errmsg", ""))[:500]
        if code in TOO_LARGE_CODES:
            return Failure(True, DeadLetterReason.DOCUMENT_TOO_LARGE, summary, message)
        if isinstance(exc, WriteError) and code in INVALID_WRITE_CODES:
            return Failure(True, DeadLetterReason.INVALID_DOCUMENT, summary, message)
        return Failure(False, TRANSIENT, summary)
    if isinstance(exc, BaseExceptionGroup):
        members = [classify(e) for e in exc.exceptions]
        summary = f"{name}[{', '.join(m.summary for m in members)}]"
        if members and all(m.deterministic for m in members):
            return Failure(True, members[0].reason, summary, members[0].detail)
        return Failure(False, TRANSIENT, summary)
    if exc.__cause__ is not None:
        inner = classify(exc.__cause__)
        return dataclasses.replace(inner, summary=f"{name} from {inner.summary}")
    return Failure(False, TRANSIENT, name)


@dataclass(frozen=True)
class DeadLetterTarget:
    """Where `subscribe_batch` sends the records that fail deterministically on their own."""

    topic: str
    publish: DeadLetterSink


@dataclass
class RetryPolicy:
    """Backoff for failures of a whole batch, and when a deterministic one is isolated."""

    attempts: int = 6
    first_delay: float = 0.2
    max_delay: float = 5.0
    # Deterministic failures of the whole batch before its records are isolated (at least 1; at
    # most `attempts`, after which the batch would be rewound and the count start again).
    poison_attempts: int = 2

    def delays(self) -> list[float]:
        return [min(self.max_delay, self.first_delay * 2**i) for i in range(self.attempts - 1)]


def key_hash(key: bytes | None) -> str:
    """A short digest of a record key for logs (keys name tenants and clients)."""
    return hashlib.blake2b(key, digest_size=6).hexdigest() if key is not None else "-"


def coordinates(rec: InboundRecord) -> str:
    """Where a record is, for logs: topic, partition, offset and its key's hash; no values."""
    return f"{rec.topic}/{rec.partition}@{rec.offset} key#{key_hash(rec.key)}"


async def isolate_poison(handler: BatchHandler, records: list[InboundRecord],
                         failure: Failure) -> list[tuple[InboundRecord, Failure]]:
    """The records of a batch that failed deterministically (`failure`) that fail on their own.

    The halves are run through `handler` in order, and a half that fails deterministically is
    split again, down to single records; every other record has been handled when this returns.
    Raises the first transient failure (the caller retries the whole batch).
    """
    if len(records) == 1:
        return [(records[0], failure)]
    poison: list[tuple[InboundRecord, Failure]] = []
    mid = len(records) // 2
    for part in (records[:mid], records[mid:]):
        try:
            await handler(part)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            found = classify(exc)
            if not found.deterministic:
                raise
            poison.extend(await isolate_poison(handler, part, found))
    return poison


def _tenant_of(rec: InboundRecord) -> str | None:
    # Events name their tenant at the top level; a dead letter that keeps it can be routed back.
    try:
        value = json.loads(rec.value)
    except ValueError:
        return None
    tenant = value.get("tenant_id") if isinstance(value, dict) else None
    return tenant if isinstance(tenant, str) else None


def poison_letters(service: str, poison: Sequence[tuple[InboundRecord, Failure]],
                   target: DeadLetterTarget) -> list[OutboundRecord]:
    """Dead letters of isolated poison records; counts and logs each (coordinates only)."""
    out = []
    for rec, failure in poison:
        detail = f"failed on its own, deterministically: {failure.summary}"
        if failure.detail:
            detail += f": {failure.detail}"
        out.append(dead_letter_record(service, rec, failure.reason, detail, target.topic, _tenant_of(rec)))
        POISON_RECORDS.labels(service, rec.topic, failure.reason).inc()
        log.error("poison record dead-lettered (%s): %s, %s", failure.reason, coordinates(rec), failure.summary)
    return out


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


# Partitions whose lag this process reports, per service: a partition a rebalance moved to another
# replica is dropped from the gauge, so only its owner reports it.
_LAG_REPORTED: dict[str, set[tuple[str, str]]] = {}


# Where each partition's group resumes, as this process's batch consumers know it (per service):
# the first offset of the batch in hand (a batch starts where the last commit left off, or where a
# rewind put it back) and, once a batch is committed, the offset after it.
_RESUME: dict[str, dict[TopicPartition, int]] = {}


def _note_batch(service: str, records: Sequence[InboundRecord], committed: bool) -> None:
    resume = _RESUME.setdefault(service, {})
    if committed:
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            resume[tp] = max(resume.get(tp, 0), r.offset + 1)
        return
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    resume.update(first)


async def _consumer_lag(service: str, consumer: Any) -> dict[TopicPartition, int]:
    """Lag of each partition assigned to an aiokafka consumer: the log end offset minus where the
    group resumes (`_RESUME`; for a partition no batch has reached in this process yet, the
    consumer's position, which is then the committed offset).

    The log end is asked of the broker (ListOffsets): a consumer whose batch keeps failing holds
    fetched records in its buffer and fetches that partition no further, so the high-water mark of
    its last fetch answer stops moving while records keep arriving. That mark is the floor (the
    local broker's ListOffsets is approximate, ../shared/stack/NOTES.md). Where the group resumes is
    known here, so no OffsetFetch is sent."""
    parts = sorted(consumer.assignment())
    if not parts:
        return {}
    ends: dict[TopicPartition, int] = await consumer.end_offsets(parts)
    resume = _RESUME.get(service, {})
    lags: dict[TopicPartition, int] = {}
    for tp in parts:
        high = max(ends.get(tp, 0), consumer.highwater(tp) or 0)
        start = resume.get(tp)
        if start is None:
            start = await consumer.position(tp)  # local once assigned: the fetch position
        lags[tp] = max(0, high - start)
    return lags


async def measure_lag(service: str, broker: KafkaBroker, timeout_seconds: float) -> None:
    """Set `alliance_consumer_lag_messages` for every partition the broker's consumers own now, and
    drop the partitions they no longer own (and what this process knew of where they resume: their
    new owner moves them on). Called by the service runtime's monitor loop (shared.http `Runtime`)
    whether or not batches succeed. A consumer the broker does not answer for (or whose position is
    not known, just assigned) within `timeout_seconds` keeps its last values."""
    seen: set[tuple[str, str]] = set()
    assigned: set[TopicPartition] = set()
    for subscriber in broker.subscribers:
        consumer = getattr(subscriber, "consumer", None)
        if consumer is None:
            continue
        assigned |= set(consumer.assignment())
        try:
            async with asyncio.timeout(timeout_seconds):
                lags = await _consumer_lag(service, consumer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("%s: consumer lag not measured: %r", service, exc)
            # Unknown is not zero: keep what was reported for this consumer's partitions.
            seen |= {(tp.topic, str(tp.partition)) for tp in consumer.assignment()}
            continue
        for tp, value in lags.items():
            CONSUMER_LAG.labels(service, tp.topic, str(tp.partition)).set(value)
            seen.add((tp.topic, str(tp.partition)))
    for topic, partition in _LAG_REPORTED.get(service, set()) - seen:
        CONSUMER_LAG.remove(service, topic, partition)
    _LAG_REPORTED[service] = seen
    resume = _RESUME.get(service, {})
    for tp in set(resume) - assigned:
        del resume[tp]


def _count_committed(service: str, records: list[InboundRecord], poison: list[tuple[InboundRecord, Failure]]) -> None:
    """`alliance_consumer_records_total{outcome="committed"}` per topic, for a consumer of several."""
    dead = {id(r) for r, _ in poison}
    counts = collections.Counter(r.topic for r in records if id(r) not in dead)
    for name, n in counts.items():
        CONSUMER_RECORDS.labels(service, name, "committed").inc(n)


def typed_handler(model: ModelOf[M], handler: TypedHandler[M], *, service: str, dead_letters: DeadLetterTarget,
                  invalid_reason: DeadLetterReason | None = None) -> BatchHandler:
    """The raw-record handler `subscribe_batch(model=...)` runs: decode the batch (`decode_batch`),
    run `handler` on the events in record order, then publish the dead letters of the records that
    did not decode (`invalid_reason` replaces both decode reasons, see `decode_batch`)."""

    async def run(records: list[InboundRecord]) -> None:
        decoded, dead = decode_batch(records, model, service=service, dlq_topic=dead_letters.topic,
                                     reason=invalid_reason)
        await handler(decoded)
        if dead:
            await dead_letters.publish(dead)

    return run


@dataclass(frozen=True)
class Route(Generic[M]):
    """One topic of a consumer over several (`by_topic`): its events' model and their handler."""

    topic: str
    model: ModelOf[M]
    handler: TypedHandler[M]


def by_topic(routes: Sequence[Route[Any]], *, service: str, dead_letters: DeadLetterTarget,
             invalid_reason: DeadLetterReason | None = None) -> BatchHandler:
    """The raw-record handler of one consumer over several topics: a batch is split by topic (each
    part in record order) and each part goes through its route's `typed_handler`, the parts at the
    same time. Every part runs to its end before a failure is raised, so nothing is left running;
    a transient failure is raised before a deterministic one (the batch is then retried whole, and
    the parts that succeeded run again: handlers are idempotent). One consumer instead of one per
    topic: each polls the broker all the time, idle or not (README, "What idle consumers cost")."""
    handlers = {r.topic: typed_handler(r.model, r.handler, service=service, dead_letters=dead_letters,
                                       invalid_reason=invalid_reason) for r in routes}
    if len(handlers) != len(routes):
        raise ValueError("one route per topic")

    async def run(records: list[InboundRecord]) -> None:
        parts: dict[str, list[InboundRecord]] = {}
        for rec in records:
            parts.setdefault(rec.topic, []).append(rec)
        results = await asyncio.gather(*(handlers[topic](part) for topic, part in parts.items()),
                                       return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        for exc in failures:
            if not isinstance(exc, Exception):  # cancelled (or worse): not a failure to retry
                raise exc
        if failures:
            raise next((e for e in failures if not classify(e).deterministic), failures[0])

    return run


class TakeOver:
    """Where a consumer group that replaces others starts reading (`subscribe_batch(takes_over=)`).

    `previous` names, per topic, the group that consumed it before. Before the subscriber joins its
    group (`start_broker` runs `seed`), every partition of those topics that the new group has no
    committed offset for and the previous group has one for is committed in the new group at the
    previous group's offset. Without it the new group would start at the earliest retained offset,
    and reporting's and alerts' input topics are kept forever: an upgrade would re-read all of them
    (idempotently, but for hours). A partition neither group committed starts at the earliest
    offset, as before.

    Why before the join and not in a rebalance listener: aiokafka's fetcher resets a partition
    without a committed offset as soon as it is assigned, while the listener is still running, so
    the first batch could come from the earliest offset before the listener's seek (seen on the
    local broker). A commit outside the group is accepted while the group has no member; a new
    replica joining a group that already has members finds every offset there already (the first
    one seeded them all), so it commits nothing. A failure (the broker away, no Describe on the old
    group) fails start-up, which the runtime retries: re-reading everything would be safe but slow,
    skipping is not safe.
    """

    def __init__(self, group_id: str, previous: dict[str, str], settings: KafkaSettings) -> None:
        self.group_id = group_id
        self.previous = previous
        self.settings = settings

    async def seed(self) -> dict[TopicPartition, int]:
        """Commit the previous groups' offsets where the new group has none; returns what it committed."""
        kafka = self.settings
        common: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap, "request_timeout_ms": kafka.request_timeout_ms,
                                  **admin_security_kwargs(kafka)}
        async with contextlib.AsyncExitStack() as started:
            admin = AIOKafkaAdminClient(**common)
            await admin.start()
            started.push_async_callback(admin.close)
            consumer = AIOKafkaConsumer(group_id=self.group_id, enable_auto_commit=False, **common)
            await consumer.start()
            started.push_async_callback(consumer.stop)
            await consumer.topics()  # the topics' partitions, fresh
            partitions = [TopicPartition(topic, p) for topic in self.previous
                          for p in sorted(consumer.partitions_for_topic(topic) or ())]
            ours = await admin.list_consumer_group_offsets(self.group_id, partitions=partitions)
            missing = [tp for tp in partitions if tp not in ours or ours[tp].offset < 0]
            found: dict[TopicPartition, int] = {}
            for group in sorted({self.previous[tp.topic] for tp in missing}):
                # Tansu answers only for the partitions named (../shared/stack/NOTES.md).
                theirs = await admin.list_consumer_group_offsets(
                    group, partitions=[tp for tp in missing if self.previous[tp.topic] == group])
                found.update({tp: meta.offset for tp, meta in theirs.items() if meta.offset >= 0})
            if found:
                consumer.assign(list(found))
                await consumer.commit(found)
                log.info("%s took over %d partitions at the offsets of %s", self.group_id, len(found),
                         ", ".join(sorted({self.previous[tp.topic] for tp in found})))
            return found


# The takeovers `start_broker` runs before it starts a broker's subscribers.
_TAKEOVERS: weakref.WeakKeyDictionary[KafkaBroker, list[TakeOver]] = weakref.WeakKeyDictionary()


@overload
def subscribe_batch(broker: KafkaBroker, topic: str | Sequence[str], *, group_id: str, service: str,
                    handler: TypedHandler[M],
                    model: ModelOf[M], invalid_reason: DeadLetterReason | None = None, max_records: int = 500,
                    retry: RetryPolicy | None = None, batch_timeout_ms: int = 50,
                    fetch_max_wait_ms: int | None = None, dead_letters: DeadLetterTarget,
                    settings: KafkaSettings | None = None, takes_over: dict[str, str] | None = None) -> None: ...


@overload
def subscribe_batch(broker: KafkaBroker, topic: str | Sequence[str], *, group_id: str, service: str,
                    handler: BatchHandler,
                    model: None = None, invalid_reason: None = None, max_records: int = 500,
                    retry: RetryPolicy | None = None, batch_timeout_ms: int = 50,
                    fetch_max_wait_ms: int | None = None, dead_letters: DeadLetterTarget | None = None,
                    settings: KafkaSettings | None = None, takes_over: dict[str, str] | None = None) -> None: ...


def subscribe_batch(
    broker: KafkaBroker,
    topic: str | Sequence[str],
    *,
    group_id: str,
    service: str,
    handler: TypedHandler[Any] | BatchHandler,
    model: ModelOf[Any] | None = None,
    invalid_reason: DeadLetterReason | None = None,
    max_records: int = 500,
    retry: RetryPolicy | None = None,
    batch_timeout_ms: int = 50,
    fetch_max_wait_ms: int | None = None,
    dead_letters: DeadLetterTarget | None = None,
    settings: KafkaSettings | None = None,
    takes_over: dict[str, str] | None = None,
) -> None:
    """Register an at-least-once batch consumer of `topic` for `handler` (see module docs).

    `topic` may be several topics, consumed by one consumer in one group (a batch then mixes their
    records; scoring reads SRS and ORS submissions so): the batch-level metrics and the trace are
    labelled with the first, the committed records are counted per topic.

    With `model` (the topic's event model, or a function choosing one per record) the handler gets
    the decoded events, and the records that do not decode are dead-lettered to `dead_letters`
    (`typed_handler`); without it, the raw records. `settings` are the service's Kafka settings
    (those its broker was made from): `fetch_max_wait_ms` defaults to their `fetch_max_wait_ms`
    (see there), `retry.poison_attempts` to their `poison_attempts` (without settings, 500 ms and
    2). `dead_letters` is where records failing deterministically on their own go; without it they
    are retried forever. `takes_over` names, per topic, the group that consumed it before this one
    (`TakeOver`: where the new group starts; it needs `settings`).
    """
    # The overloads pair a typed handler with a model, a raw one with none.
    if model is not None:
        if dead_letters is None:
            raise ValueError("a typed consumer dead-letters the records that do not decode: give dead_letters")
        raw_handler = typed_handler(model, cast(TypedHandler[Any], handler), service=service,
                                    dead_letters=dead_letters, invalid_reason=invalid_reason)
    else:
        raw_handler = cast(BatchHandler, handler)
    topics = (topic,) if isinstance(topic, str) else tuple(topic)
    topic = topics[0]
    policy = retry or RetryPolicy(poison_attempts=settings.poison_attempts if settings is not None else 2)
    if fetch_max_wait_ms is None:
        fetch_max_wait_ms = settings.fetch_max_wait_ms if settings is not None else 500
    if takes_over:
        if settings is None:
            raise ValueError("taking over from other groups reads their offsets: give settings")
        _TAKEOVERS.setdefault(broker, []).append(TakeOver(group_id, dict(takes_over), settings))

    async def _raw(msg: Any) -> None:  # skip FastStream's JSON decoding: we decode per record
        return None

    async def _safe_parser(raw: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
        # FastStream decodes header values strictly; one non-UTF-8 header would fail the whole
        # batch before our handler sees it, so such values are made decodable first.
        return await original(tuple(_sanitize_headers(r) for r in raw))

    @broker.subscriber(
        *topics,
        group_id=group_id,
        batch=True,
        max_records=max_records,
        batch_timeout_ms=batch_timeout_ms,
        fetch_max_wait_ms=fetch_max_wait_ms,
        # aiokafka's defaults without settings (see KafkaSettings.session_timeout_ms)
        session_timeout_ms=settings.session_timeout_ms if settings is not None else 10_000,
        heartbeat_interval_ms=settings.heartbeat_interval_ms if settings is not None else 3_000,
        ack_policy=AckPolicy.MANUAL,
        auto_offset_reset="earliest",
        decoder=_raw,
        parser=_safe_parser,
        # Several topics: FastStream names their channels "<title>:<topic>" itself.
        title=f"{service}:{topic}" if len(topics) == 1 else service,
    )
    async def _consume(body: Any, message: KafkaMessage) -> None:
        records = [InboundRecord.from_consumer_record(r) for r in message.raw_message]
        traced = None
        if tracing_enabled():
            on = topic if len(topics) == 1 else ", ".join(sorted({r.topic for r in records}))
            traced = BatchTrace(service, on, group_id, [r.headers for r in records],
                                topics=None if len(topics) == 1 else [r.topic for r in records])
        if traced is not None:
            records = [dataclasses.replace(r, process_traceparent=tp) for r, tp in zip(records, traced.traceparents,
                                                                                      strict=True)]
            try:
                with traced.current():
                    await _consume_batch(message, records, traced)
            finally:
                traced.end(False, "interrupted")  # cancelled or raised: ends what nothing ended
        else:
            await _consume_batch(message, records, None)

    async def _consume_batch(message: KafkaMessage, records: list[InboundRecord], traced: BatchTrace | None) -> None:
        started = time.perf_counter()
        deterministic: Failure | None = None
        seen_deterministic = 0
        _note_batch(service, records, committed=False)
        for attempt, delay in enumerate([*policy.delays(), None]):
            poison: list[tuple[InboundRecord, Failure]] = []
            try:
                if dead_letters is not None and deterministic is not None \
                        and seen_deterministic >= max(1, policy.poison_attempts):
                    poison = await isolate_poison(raw_handler, records, deterministic)
                    if poison:
                        await dead_letters.publish(poison_letters(service, poison, dead_letters))
                else:
                    await raw_handler(records)
                await message.ack()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = classify(exc)
                # Per topic the batch holds: AllianceConsumerStuck joins a topic's lag with its retries.
                for name in (topic,) if len(topics) == 1 else {r.topic for r in records}:
                    CONSUMER_RETRIES.labels(service, name).inc()
                if failure.deterministic:
                    deterministic, seen_deterministic = failure, seen_deterministic + 1
                kind = f"deterministic, {failure.reason}" if failure.deterministic else "transient"
                # The summary names the exception and store codes only: a store error's repr
                # carries the documents it refused (client data, up to 16 MiB of it).
                if traced is not None:
                    traced.retrying(attempt + 1, failure.summary)
                if delay is None:
                    log.error("batch failed %d times (%s: %s), rewinding for redelivery", attempt + 1, kind,
                              failure.summary)
                    await asyncio.sleep(policy.max_delay)
                    await message.nack()  # seeks back to the batch's first offsets
                    if traced is not None:
                        traced.end(False, "rewound for redelivery")
                    return
                log.warning("batch failed (attempt %d, %s: %s), retrying in %.1fs", attempt + 1, kind,
                            failure.summary, delay)
                await asyncio.sleep(delay)
            else:
                _note_batch(service, records, committed=True)
                if len(topics) == 1:
                    CONSUMER_RECORDS.labels(service, topic, "committed").inc(len(records) - len(poison))
                else:
                    _count_committed(service, records, poison)
                CONSUMER_BATCH_SECONDS.labels(service, topic).observe(
                    time.perf_counter() - started, exemplar=None if traced is None else tracing_exemplar(traced.batch))
                if traced is not None:
                    traced.end(True)
                return
