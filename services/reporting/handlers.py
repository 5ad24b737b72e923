"""Batch handlers: raw records in, read-model writes out.

Each handler decodes its batch, dead-letters what cannot be decoded or validated (a poison
record never blocks the partition), writes the rest with one bulk write per generation, and
returns; `shared.kafka.subscribe_batch` commits only after that. A store failure raises, so the
batch is retried and never committed past.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from services.reporting import metrics
from services.reporting.store import Generations, ReportingStore, SubmissionStore
from shared.events import AlertStatusChanged, AllianceDeterioration, DeadLetter, SrsScored, SrsSubmitted
from shared.kafka import InboundRecord, OutboundRecord, dead_letter_record
from shared.topics import Topics

log = logging.getLogger("alliance.reporting")

SERVICE = "reporting"
M = TypeVar("M", bound=BaseModel)
DeadLetterSink = Callable[[Sequence[OutboundRecord]], Awaitable[None]]


def parse(records: Sequence[InboundRecord], model: type[M]) -> tuple[list[M], list[tuple[InboundRecord, str, str]]]:
    """Decode records into `model`; the rest come back as (record, reason, detail)."""
    good: list[M] = []
    bad: list[tuple[InboundRecord, str, str]] = []
    for rec in records:
        try:
            good.append(model.model_validate_json(rec.value))
        except ValidationError as exc:
            reason = "undecodable" if any(e.get("type") == "json_invalid" for e in exc.errors()) else "invalid"
            bad.append((rec, reason, str(exc)))
        except (UnicodeDecodeError, ValueError) as exc:
            bad.append((rec, "undecodable", repr(exc)))
    return good, bad


def decode(records: Sequence[InboundRecord], model: type[M], dlq_topic: str,
           service: str = SERVICE) -> tuple[list[M], list[OutboundRecord]]:
    """Decode records into `model`; undecodable or invalid ones become dead letters."""
    good, bad = parse(records, model)
    return good, [dead_letter_record(service, rec, reason, detail, dlq_topic) for rec, reason, detail in bad]


def rejection(dead: DeadLetter, topics: Topics) -> tuple[str, SrsSubmitted] | None:
    """(tenant, submission) of a dead letter about a submitted record; None for any other."""
    if dead.source_topic != topics.submitted:
        return None
    try:
        raw = base64.b64decode(dead.payload, validate=True) if dead.payload_encoding == "base64" else dead.payload
        submitted = SrsSubmitted.model_validate_json(raw)
    except (ValidationError, ValueError, binascii.Error):
        return None
    return dead.tenant_id or submitted.tenant_id, submitted


class ReportingHandlers:
    """The consumers of reporting: three write to every generation the pointer names; the scored
    one and the dead-letter one also keep the submissions' status (outside the generations)."""

    def __init__(self, store: ReportingStore, generations: Generations, dead_letters: DeadLetterSink,
                 topics: Topics, submissions: SubmissionStore) -> None:
        self.store = store
        self.generations = generations
        self.submissions = submissions
        self._dead_letters = dead_letters
        self._topics = topics
        self._dlq = topics.deadletter

    async def _targets(self) -> tuple[str, str | None]:
        state = await self.generations.current()
        await self.store.ensure_indexes(state.active)  # a generation being built gets them from its rebuild
        return state.active, state.building if state.building != state.active else None

    async def _dead(self, dead: list[OutboundRecord]) -> None:
        if dead:
            await self._dead_letters(dead)
            metrics.EVENTS.labels("deadlettered").inc(len(dead))

    async def scored(self, records: list[InboundRecord]) -> None:
        """`srs.scored.v1`: merge sessions into records, and note each submission's scored revision."""
        events, dead = decode(records, SrsScored, self._dlq)
        started = time.perf_counter()
        if events:
            active, building = await self._targets()
            report = await self.store.apply_scored(active, events)
            if building is not None:
                await self.store.apply_scored(building, events)
            metrics.SUBMISSION_WRITES.inc(await self.submissions.apply_scored(events))
            now = datetime.now(UTC)
            for outcome, n in report.outcomes.items():
                metrics.EVENTS.labels(outcome).inc(n)
            for e in report.visible:
                metrics.SCORED_TO_VISIBLE.observe(max(0.0, (now - e.scored_at).total_seconds()))
            metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
            if report.conflicts:
                log.info("batch met %d concurrent trajectory writes (retried)", report.conflicts)
        await self._dead(dead)

    async def deterioration(self, records: list[InboundRecord]) -> None:
        """`alliance.deterioration.v1`: count raised alerts and mark them on trajectories."""
        events, dead = decode(records, AllianceDeterioration, self._dlq)
        started = time.perf_counter()
        if events:
            active, building = await self._targets()
            await self.store.apply_deterioration(active, events)
            if building is not None:
                await self.store.apply_deterioration(building, events)
            metrics.EVENTS.labels("applied").inc(len(events))
            metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
        await self._dead(dead)

    async def alert_status(self, records: list[InboundRecord]) -> None:
        """`alliance.alert-status.v1`: count acknowledged alerts."""
        events, dead = decode(records, AlertStatusChanged, self._dlq)
        started = time.perf_counter()
        if events:
            active, building = await self._targets()
            await self.store.apply_alert_status(active, events)
            if building is not None:
                await self.store.apply_alert_status(building, events)
            metrics.EVENTS.labels("applied").inc(len(events))
            metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
        await self._dead(dead)

    async def deadletter(self, records: list[InboundRecord]) -> None:
        """`srs.deadletter.v1`: note the rejected submissions (dead letters of the submitted topic
        whose payload is a submission). Anything else is skipped and counted, never
        dead-lettered again: this consumer must not stall or feed its own input."""
        found: list[tuple[str, DeadLetter, SrsSubmitted]] = []
        for rec in records:
            try:
                dead = DeadLetter.model_validate_json(rec.value)
            except (ValidationError, ValueError):
                metrics.DEAD_LETTERS.labels("unparseable").inc()
                continue
            hit = rejection(dead, self._topics)
            if hit is None:
                metrics.DEAD_LETTERS.labels("ignored").inc()
                continue
            found.append((hit[0], dead, hit[1]))
        if found:
            metrics.SUBMISSION_WRITES.inc(await self.submissions.apply_rejected(found))
            metrics.DEAD_LETTERS.labels("recorded").inc(len(found))
