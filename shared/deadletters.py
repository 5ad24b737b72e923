"""Reading the dead-letter topic and replaying its records (`alliance deadletters list | show | replay`).

A dead letter (`shared.events.DeadLetter`) keeps the original record whole: `source_topic`, `key`,
`payload` (base64 when it was not text) and, since they are kept, its `headers`. A replay publishes
exactly that record to its source topic again, so the consumer reads it like the original: same
value, same key (same partition, so in order with the client's other records), same headers (the
`record-type` that marks a client transfer, the correlation id). Consumers are idempotent by ids
derived from the record, so a replayed record that was partly applied before, or replayed twice,
is applied once.

A record that fails again is dead-lettered again, under its new offset. Alerts' `delivery_failed`
letters are not replayable: their source record was processed; the delivery is what failed, and
`alliance alerts retry` puts it back on the schedule.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from shared.events import CLIENT_TRANSFER, RECORD_TYPE_HEADER, DeadLetter, DeadLetterReason
from shared.kafka import CORRELATION_HEADER, InboundRecord, OutboundRecord, admin_security_kwargs
from shared.settings import KafkaSettings
from shared.topics import Topics
from shared.unreachable import BrokerUnreachable


@dataclass(frozen=True)
class Stored:
    """One dead letter as read from the topic, with where it is."""

    partition: int
    offset: int
    letter: DeadLetter
    # The dead-letter record's own correlation id: the original's, for letters that predate `headers`.
    correlation_id: str | None = None

    @property
    def coordinates(self) -> str:
        return f"{self.partition}@{self.offset}"


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command is about; every given criterion must hold."""

    reason: str | None = None
    source_topic: str | None = None
    tenant: str | None = None
    service: str | None = None
    since: datetime | None = None
    event_ids: frozenset[str] = frozenset()

    @property
    def narrowed(self) -> bool:
        """Whether any criterion is given (a replay of everything must be asked for explicitly)."""
        return any(v is not None for v in (self.reason, self.source_topic, self.tenant, self.service,
                                           self.since)) or bool(self.event_ids)

    def matches(self, dl: DeadLetter) -> bool:
        return ((self.reason is None or dl.reason == self.reason)
                and (self.source_topic is None or dl.source_topic == self.source_topic)
                and (self.tenant is None or dl.tenant_id == self.tenant)
                and (self.service is None or dl.service == self.service)
                and (self.since is None or dl.occurred_at >= self.since)
                and (not self.event_ids or dl.event_id in self.event_ids))


class Undecodable(Exception):
    """A record on the dead-letter topic that is not a dead letter."""


def decode(rec: InboundRecord) -> Stored:
    """A consumed dead-letter record as a `Stored`; raises `Undecodable`."""
    try:
        letter = DeadLetter.model_validate_json(rec.value)
    except ValidationError as exc:
        raise Undecodable(f"{rec.partition}@{rec.offset}: not a dead letter ({exc.error_count()} errors)") from None
    return Stored(rec.partition, rec.offset, letter, rec.headers.get(CORRELATION_HEADER))


async def read(kafka: KafkaSettings, *, timeout_seconds: float,
               progress: Callable[[int], None] | None = None) -> tuple[list[Stored], int]:
    """Every dead letter on the topic up to its end when read, oldest first, each once (a copy a
    redelivery wrote under the same `event_id` is dropped); and how many records were not dead
    letters. No consumer group: nothing is committed, any number of operators may read.

    Raises `BrokerUnreachable` when the broker does not answer, or stops answering, for `timeout_seconds`."""
    topic = kafka.topics().deadletter
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, client_id="alliance-cli-deadletters",
                                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                request_timeout_ms=int(timeout_seconds * 1000),
                                fetch_max_wait_ms=kafka.fetch_max_wait_ms, **admin_security_kwargs(kafka))
    try:
        try:
            await asyncio.wait_for(consumer.start(), timeout_seconds)
            await asyncio.wait_for(consumer.topics(), timeout_seconds)
        except TimeoutError as exc:
            raise BrokerUnreachable(f"no answer within {timeout_seconds:g} s") from exc
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return [], 0
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: dict[str, Stored] = {}
        bad, seen = 0, 0
        # The end is each partition's high-water mark from the first fetch answers (exact, where
        # the local broker's ListOffsets is approximate); letters written after it are left.
        end: dict[TopicPartition, int] = {}
        last_answer = time.monotonic()
        while True:
            got = await consumer.getmany(timeout_ms=200, max_records=1000)
            for tp, records in got.items():
                last_answer = time.monotonic()
                for r in records:
                    if tp in end and r.offset >= end[tp]:
                        continue
                    seen += 1
                    try:
                        stored = decode(InboundRecord.from_consumer_record(r))
                    except Undecodable:
                        bad += 1
                        continue
                    out.setdefault(stored.letter.event_id, stored)
            if progress is not None:
                progress(seen)
            caught_up = True
            for tp in tps:
                if tp not in end and (hw := consumer.highwater(tp)) is not None:
                    end[tp] = int(hw)
                caught_up = caught_up and tp in end and await consumer.position(tp) >= end[tp]
            if caught_up:
                return sorted(out.values(), key=lambda s: (s.letter.occurred_at, s.partition, s.offset)), bad
            if time.monotonic() - last_answer > timeout_seconds:
                raise BrokerUnreachable(f"{topic} was not read to its end: the broker stopped answering")
    finally:
        await consumer.stop()


def replay_problem(dl: DeadLetter, topics: Topics) -> str | None:
    """Why a dead letter cannot be replayed, or None."""
    if dl.reason == DeadLetterReason.DELIVERY_FAILED:
        return ("a failed delivery, not a failed record: put it back on the schedule with "
                f"`alliance alerts retry --tenant {dl.tenant_id or 'T'}`")
    if dl.source_topic == topics.deadletter or dl.source_topic not in topics.all():
        return f"its source topic {dl.source_topic!r} is not an input topic of this deployment"
    if dl.payload_encoding == "base64":
        try:
            base64.b64decode(dl.payload, validate=True)
        except ValueError:
            return "its payload is not valid base64"
    return None


def original_headers(stored: Stored) -> dict[str, str]:
    """The original record's headers: as kept, or for a letter written before they were kept, what
    can be told again (the correlation id the dead-letter record carries; a client transfer's
    record type, which its payload names)."""
    dl = stored.letter
    if dl.headers:
        return dict(dl.headers)
    headers: dict[str, str] = {}
    if stored.correlation_id:
        headers[CORRELATION_HEADER] = stored.correlation_id
    try:
        doc = json.loads(dl.payload) if dl.payload_encoding == "utf-8" else None
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("record_type") == CLIENT_TRANSFER:
        headers[RECORD_TYPE_HEADER] = CLIENT_TRANSFER
    return headers


def replay_record(stored: Stored) -> OutboundRecord:
    """The original record, to publish to its source topic (check `replay_problem` first)."""
    dl = stored.letter
    value = base64.b64decode(dl.payload) if dl.payload_encoding == "base64" else dl.payload.encode("utf-8")
    headers = original_headers(stored)
    correlation_id = headers.pop(CORRELATION_HEADER, None)
    return OutboundRecord(dl.source_topic, value, key=dl.key.encode("utf-8") if dl.key is not None else None,
                          correlation_id=correlation_id, headers=headers)
