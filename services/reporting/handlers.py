"""Batch handlers: typed events in, read-model writes out.

The subscriber decodes each batch (`shared.kafka.subscribe_batch(model=...)`) and dead-letters,
through `dead_letter`, what cannot be decoded or validated (`undecodable`, `invalid`: a poison
record never blocks the partition); each handler writes the events with one bulk write per
generation and returns, and the subscriber commits only after that. The dead-letter topic's
handler reads raw records: it must never dead-letter its own input. A store failure raises: a
transient one is retried and never committed past; a deterministic one (a document the store
refuses as too large or invalid) makes the subscriber isolate and dead-letter the record at
fault. Sessions that would grow a client's record past its size cap are refused by the store
adapter before any write and dead-lettered here as `record_too_large`, so one client's history
never stalls its partition.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from pydantic import ValidationError

from services.reporting import metrics
from services.reporting.rules import Scored, ScoredT, Submitted
from services.reporting.store import ApplyReport, GenerationState, Ride
from shared.events import (
    AlertStatusChanged,
    AllianceDeterioration,
    DeadLetter,
    DeadLetterReason,
    OrsScored,
    OrsSubmitted,
    OutcomeAlert,
    OutcomeAlertStatusChanged,
    SrsScored,
    SrsSubmitted,
)
from shared.kafka import Decoded, InboundRecord, OutboundRecord, coordinates, dead_letter_record, decode_records
from shared.metrics import POISON_RECORDS
from shared.topics import Topics

log = logging.getLogger("alliance.reporting")

SERVICE = "reporting"
DeadLetterSink = Callable[[Sequence[OutboundRecord]], Awaitable[None]]
AlertT = TypeVar("AlertT", AllianceDeterioration, AlertStatusChanged, OutcomeAlert, OutcomeAlertStatusChanged)


def too_large_letters(refused: Sequence[tuple[Scored, int]], sources: dict[int, InboundRecord], cap: int,
                      dlq_topic: str) -> list[OutboundRecord]:
    """Dead letters (`record_too_large`) of events the store refused to add to a full record; each
    event's record found by identity in `sources`. An event refused in two generations is sent once."""
    out: list[OutboundRecord] = []
    done: set[int] = set()
    for event, size in refused:
        rec = sources.get(id(event))
        if rec is None or id(event) in done:
            continue
        done.add(id(event))
        detail = (f"the client's record would be {size} bytes with this session, over the cap of {cap} "
                  "(ALLIANCE_REPORTING_MAX_RECORD_BYTES); the record keeps the sessions it had")
        out.append(dead_letter_record(SERVICE, rec, DeadLetterReason.RECORD_TOO_LARGE, detail, dlq_topic,
                                      event.tenant_id))
        POISON_RECORDS.labels(SERVICE, rec.topic, DeadLetterReason.RECORD_TOO_LARGE).inc()
    if out:
        first, last = sources[id(refused[0][0])], sources[id(refused[-1][0])]
        log.warning("%d sessions refused: their client's record is at its size cap (first %s, last %s)",
                    len(out), coordinates(first), coordinates(last))
    return out


def rejection(dead: DeadLetter, topics: Topics) -> tuple[str, Submitted] | None:
    """(tenant, submission) of a dead letter about a submitted record (SRS or ORS); None for any other."""
    model: type[SrsSubmitted] | type[OrsSubmitted]
    if dead.source_topic == topics.submitted:
        model = SrsSubmitted
    elif dead.source_topic == topics.ors_submitted:
        model = OrsSubmitted
    else:
        return None
    try:
        raw = base64.b64decode(dead.payload, validate=True) if dead.payload_encoding == "base64" else dead.payload
        submitted: Submitted = model.model_validate_json(raw)
    except (ValidationError, ValueError, binascii.Error):
        return None
    return dead.tenant_id or submitted.tenant_id, submitted


class ReadModels(Protocol):
    """What the handlers need of the read models (`ReportingStore`; a fake in the unit tests)."""

    @property
    def max_record_bytes(self) -> int: ...

    async def ensure_indexes(self, gen: str) -> None: ...

    async def apply_scored(self, gen: str, events: Sequence[SrsScored], *, ride: Ride | None = None) -> ApplyReport: ...

    async def apply_deterioration(self, gen: str, events: Sequence[AllianceDeterioration]) -> int: ...

    async def apply_alert_status(self, gen: str, events: Sequence[AlertStatusChanged]) -> int: ...

    async def apply_outcomes(self, gen: str, events: Sequence[OrsScored], *,
                             ride: Ride | None = None) -> ApplyReport: ...

    async def apply_outcome_alerts(self, gen: str, events: Sequence[OutcomeAlert]) -> int: ...

    async def apply_outcome_alert_status(self, gen: str, events: Sequence[OutcomeAlertStatusChanged]) -> int: ...


_E = TypeVar("_E", contravariant=True)


class ApplyScored(Protocol[_E]):
    """`ReadModels.apply_scored` or `apply_outcomes`: merge a batch into one generation."""

    async def __call__(self, gen: str, events: Sequence[_E], *, ride: Ride | None = None) -> ApplyReport: ...


class GenerationPointer(Protocol):
    """Which generations the consumers write (`Generations`)."""

    async def current(self) -> GenerationState: ...


class SubmissionStatuses(Protocol):
    """The submissions' status, outside the generations (`SubmissionStore`)."""

    async def apply_scored(self, events: Sequence[Scored]) -> int: ...

    def ride(self, events: Sequence[Scored]) -> Ride: ...

    async def apply_rejected(self, rejections: Sequence[tuple[str, DeadLetter, Submitted]]) -> int: ...


class ReportingHandlers:
    """The consumers of reporting: three write to every generation the pointer names; the scored
    one and the dead-letter one also keep the submissions' status (outside the generations)."""

    def __init__(self, store: ReadModels, generations: GenerationPointer, dead_letters: DeadLetterSink,
                 topics: Topics, submissions: SubmissionStatuses) -> None:
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

    async def dead_letter(self, dead: Sequence[OutboundRecord]) -> None:
        """Publish dead letters and count them (the subscriber's target for the records that do not
        decode or are poison, and the handlers' for the records they refuse)."""
        if dead:
            await self._dead_letters(dead)
            metrics.EVENTS.labels("deadlettered").inc(len(dead))

    async def scored(self, decoded: list[Decoded[SrsScored]]) -> None:
        """`srs.scored.v1`: merge sessions into records, and note each submission's scored revision."""
        await self._scored(decoded, self.store.apply_scored)

    async def ors_scored(self, decoded: list[Decoded[OrsScored]]) -> None:
        """`ors.scored.v1`: merge outcome sessions into outcome records (the same algebra), and note
        each submission's scored revision (`GET /v1/submissions/{id}` answers for ORS ones too)."""
        await self._scored(decoded, self.store.apply_outcomes)

    async def _scored(self, decoded: list[Decoded[ScoredT]],
                      apply: ApplyScored[ScoredT]) -> None:
        events = [d.event for d in decoded]
        dead: list[OutboundRecord] = []
        started = time.perf_counter()
        if events:
            active, building = await self._targets()
            # The submissions' statuses are another collection, independent of the records: they ride
            # last in the command of the records' counters (`Ride`: one round trip fewer per batch),
            # else are written apart after it. Both idempotent: a failure of either fails the batch,
            # whose retry repeats nothing.
            ride = self.submissions.ride(events)
            report = await apply(active, events, ride=ride)
            statuses = len(ride.ops) if ride.taken else await self.submissions.apply_scored(events)
            refused = list(report.refused)
            if building is not None:
                refused.extend((await apply(building, events)).refused)
            if refused:
                sources = {id(d.event): d.record for d in decoded}
                dead.extend(too_large_letters(refused, sources, self.store.max_record_bytes, self._dlq))
            metrics.SUBMISSION_WRITES.inc(statuses)
            now = datetime.now(UTC)
            for outcome, n in report.outcomes.items():
                metrics.EVENTS.labels(outcome).inc(n)
            for e in report.visible:
                metrics.SCORED_TO_VISIBLE.observe(max(0.0, (now - e.scored_at).total_seconds()))
            metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
            if report.conflicts:
                log.info("batch met %d concurrent trajectory writes (retried)", report.conflicts)
        await self.dead_letter(dead)

    async def deterioration(self, decoded: list[Decoded[AllianceDeterioration]]) -> None:
        """`alliance.deterioration.v1`: count raised alerts and mark them on trajectories."""
        await self._alerts(decoded, self.store.apply_deterioration)

    async def alert_status(self, decoded: list[Decoded[AlertStatusChanged]]) -> None:
        """`alliance.alert-status.v1`: count acknowledged alerts."""
        await self._alerts(decoded, self.store.apply_alert_status)

    async def outcome_alert(self, decoded: list[Decoded[OutcomeAlert]]) -> None:
        """`outcome.alert.v1`: mark outcome alerts on the ORS series."""
        await self._alerts(decoded, self.store.apply_outcome_alerts)

    async def outcome_alert_status(self, decoded: list[Decoded[OutcomeAlertStatusChanged]]) -> None:
        """`outcome.alert-status.v1`: the outcome alerts' lifecycle and acknowledgements."""
        await self._alerts(decoded, self.store.apply_outcome_alert_status)

    async def _alerts(self, decoded: list[Decoded[AlertT]], apply: Callable[[str, Sequence[AlertT]], Awaitable[int]],
                      ) -> None:
        events = [d.event for d in decoded]
        started = time.perf_counter()
        if events:
            active, building = await self._targets()
            await apply(active, events)
            if building is not None:
                await apply(building, events)
            metrics.EVENTS.labels("applied").inc(len(events))
            metrics.APPLY_SECONDS.observe(time.perf_counter() - started)

    async def deadletter(self, records: list[InboundRecord]) -> None:
        """`srs.deadletter.v1`: note the rejected submissions (dead letters of a submitted topic,
        SRS or ORS, whose payload is a submission). Anything else is skipped and counted, never
        dead-lettered again: this consumer must not stall or feed its own input."""
        found: list[tuple[str, DeadLetter, Submitted]] = []
        decoded, unparseable = decode_records(records, DeadLetter)
        if unparseable:
            metrics.DEAD_LETTERS.labels("unparseable").inc(len(unparseable))
        for d in decoded:
            dead = d.event
            hit = rejection(dead, self._topics)
            if hit is None:
                metrics.DEAD_LETTERS.labels("ignored").inc()
                continue
            found.append((hit[0], dead, hit[1]))
        if found:
            metrics.SUBMISSION_WRITES.inc(await self.submissions.apply_rejected(found))
            metrics.DEAD_LETTERS.labels("recorded").inc(len(found))
