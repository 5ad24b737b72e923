"""The scoring consumer: one batch of `srs.submitted.v1` records in, scored/alert events out.

Per batch (never per message):

1. decode every record; undecodable or invalid ones become dead letters (the batch goes on);
2. read the state of every series in the batch - from this process's cache of the series it
   wrote, the rest with ONE query - and the tenants' rules (cached for a few seconds);
3. apply the records in order in memory (`History.apply`): a submission id already in the state
   returns its stored outcome, so a redelivery yields exactly what was computed the first time;
4. write the changed series with bulk writes of `save_chunk` series each (one bulk write for a
   batch of up to `save_chunk` clients), each series guarded by the version it was read at;
5. publish the scored events and alerts of each written chunk as soon as its write returned
   (so the broker works while the next chunk is written), then the dead letters, and wait for
   every acknowledgement;
6. return: the shared subscriber then commits the offsets.

State is written BEFORE publishing (not after) so that an outcome exists in exactly one version
before anyone can see it. What a `kill -9` at each point leaves behind:

- during 1-3: nothing was written or published; the batch is redelivered and scored afresh.
- during 4 (some documents or chunks written, some not): the written ones hold their outcomes;
  the redelivered batch finds them (same flags, same `scored_at`, same ids) and scores the rest.
- during or after 5, before the commit (some or all events published): the state holds every
  published outcome; the redelivery re-publishes the same events with the same ids and bytes
  (consumers dedupe by event id / alert id). Nothing is lost: the offsets were not committed,
  so the records come back.
- after 6: nothing is redelivered.

A transient failure (store or broker down, acknowledgements late) raises out of the handler:
the shared subscriber retries the batch with backoff and never commits past it.

Had we published first and written state after, a crash between the two would make the
redelivery score again with a new `scored_at` (and possibly changed tenant rules): two different
outputs for one input. Writing first closes that window.

Two scoring processes share the consumer group. The Kafka key is `tenant:client`, so one client
(every series of it) is in one partition, owned by one process at a time. During a rebalance the
old owner may still be mid-batch while the new owner re-reads the uncommitted records; the
version check in step 4 decides: whoever writes first wins, the other gets a conflict, reloads
that state (now holding the winner's outcomes) and re-applies, so it publishes the winner's
outcomes, byte-equal. Both may publish them (a duplicate, same ids) but never two different ones.
The same check makes the state cache safe when a partition comes back after another process
wrote its series: scoring against the stale entry ends in a conflict, never in a publish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from pydantic import ValidationError

from services.scoring import metrics
from services.scoring.history import History, Outcome, Submission
from services.scoring.rules import TenantRules, Unscorable
from services.scoring.store import SeriesKey, StatePort, series_key
from shared import ids
from shared.events import (
    AllianceDeterioration,
    SrsScored,
    SrsSubmitted,
    SubmissionIdentity,
)
from shared.kafka import CORRELATION_HEADER, InboundRecord, OutboundRecord, dead_letter_record
from shared.topics import Topics

log = logging.getLogger("alliance.scoring")

SERVICE = "scoring"
IDENTITY_FIELDS: tuple[str, ...] = tuple(SubmissionIdentity.model_fields)


class RulesPort(Protocol):
    """Where tenant rules come from."""

    async def get_many(self, tenants: Iterable[str]) -> dict[str, TenantRules]: ...


Publish = Callable[[Sequence[OutboundRecord]], Awaitable[None]]


class StateConflict(RuntimeError):
    """Another process kept writing the same series; the batch is retried by the subscriber."""


def _tenant_hint(value: bytes) -> str | None:
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    t = doc.get("tenant_id") if isinstance(doc, dict) else None
    return t if isinstance(t, str) else None


def _describe(exc: ValidationError) -> str:
    # Field paths and messages only: the input values may hold client ids and ratings.
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


def decode(rec: InboundRecord) -> SrsSubmitted | tuple[str, str]:
    """The submitted event, or (reason, detail) for the dead-letter topic."""
    try:
        return SrsSubmitted.model_validate_json(rec.value)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            return "undecodable", _describe(exc)
        return "invalid", _describe(exc)


def scored_event(ev: SrsSubmitted, o: Outcome) -> SrsScored:
    """The `srs.scored.v1` event of one outcome; a pure function of its inputs."""
    assert o.total is not None and o.cutoff is not None
    return SrsScored(
        **{f: getattr(ev, f) for f in IDENTITY_FIELDS},
        event_id=ids.scored_event_id(ev.tenant_id, ev.submission_id),
        occurred_at=o.scored_at,
        items=ev.items,
        total=o.total,
        cutoff=o.cutoff,
        previous_total=o.previous_total,
        change_from_previous=o.change_from_previous,
        flags=list(o.flags),
        latest=o.latest,
        scored_at=o.scored_at,
        accepted_at=ev.accepted_at,
    )


def alert_event(ev: SrsSubmitted, o: Outcome) -> AllianceDeterioration:
    """The `alliance.deterioration.v1` event of an outcome that raised an alert."""
    assert o.severity is not None and o.total is not None and o.cutoff is not None
    alert = ids.alert_id(ev.tenant_id, ev.submission_id)
    return AllianceDeterioration(
        **{f: getattr(ev, f) for f in IDENTITY_FIELDS},
        event_id=alert,
        occurred_at=o.scored_at,
        alert_id=alert,
        triggers=list(o.triggers),
        severity=o.severity,
        total=o.total,
        previous_total=o.previous_total,
        change_from_previous=o.change_from_previous,
        cutoff=o.cutoff,
        accepted_at=ev.accepted_at,
    )


def _submission(ev: SrsSubmitted) -> Submission:
    return Submission(ev.submission_id, ev.session_number, ev.instrument, ev.accepted_at, ev.items, ev.total)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Pass:
    """The result of applying events to the state once."""

    # per series, in input order: (record, event, outcome) - what the series will publish
    outcomes: dict[SeriesKey, list[tuple[InboundRecord, SrsSubmitted, Outcome]]] = field(default_factory=dict)
    fresh: dict[SeriesKey, list[tuple[SrsSubmitted, Outcome]]] = field(default_factory=dict)
    unscorable: list[tuple[InboundRecord, SrsSubmitted, str]] = field(default_factory=list)


@dataclass
class ScoringHandler:
    """The batch handler given to `shared.kafka.subscribe_batch`.

    The state write is split into chunks of `save_chunk` series, and the events of a chunk are
    published as soon as its write succeeded, while the next chunk is being written: the store
    and the broker work at the same time, and no event is ever published before its state.
    """

    states: StatePort
    rules: RulesPort
    publish: Publish
    topics: Topics
    clock: Callable[[], datetime] = _now
    conflict_attempts: int = 5
    save_chunk: int = 128

    async def __call__(self, records: list[InboundRecord]) -> None:
        started = time.perf_counter()
        dead: list[OutboundRecord] = []
        events: list[tuple[InboundRecord, SrsSubmitted]] = []
        for rec in records:
            got = decode(rec)
            if isinstance(got, SrsSubmitted):
                events.append((rec, got))
            else:
                reason, detail = got
                dead.append(dead_letter_record(SERVICE, rec, reason, detail, self.topics.deadletter,
                                               _tenant_hint(rec.value)))
        sending: list[asyncio.Task[None]] = []
        try:
            if events:
                unscorable = await self._score(events, sending)
                dead.extend(dead_letter_record(SERVICE, rec, "unscorable", detail, self.topics.deadletter, ev.tenant_id)
                            for rec, ev, detail in unscorable)
            if dead:
                sending.append(asyncio.create_task(self._send(dead)))
            await asyncio.gather(*sending)
        finally:
            for task in sending:  # after a failure, let no send outlive the batch attempt
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _send(self, records: list[OutboundRecord]) -> None:
        with metrics.PHASE_SECONDS.labels("publish").time():
            await self.publish(records)

    async def _score(self, events: list[tuple[InboundRecord, SrsSubmitted]],
                     sending: list[asyncio.Task[None]]) -> list[tuple[InboundRecord, SrsSubmitted, str]]:
        """Score, write state, and start publishing; returns the unscorable events."""
        unscorable: dict[int, tuple[InboundRecord, SrsSubmitted, str]] = {}
        published: set[tuple[str, str]] = set()  # (tenant, submission) already sent in this batch
        remaining = events
        for _attempt in range(self.conflict_attempts):
            keys = {self._key(ev) for _, ev in remaining}
            with metrics.PHASE_SECONDS.labels("load").time():
                states = await self.states.load(keys)
                rules = await self.rules.get_many({ev.tenant_id for _, ev in remaining})
            with metrics.PHASE_SECONDS.labels("apply").time():
                p = self._apply(remaining, states, rules)
            for rec, ev, detail in p.unscorable:
                unscorable.setdefault(id(rec), (rec, ev, detail))
            # Series with nothing new were stored before: their events can go right away.
            ready = self._outputs(p, [k for k in p.outcomes if k not in p.fresh], published)
            if ready:
                sending.append(asyncio.create_task(self._send(ready)))
            conflicts: set[SeriesKey] = set()
            dirty = list(p.fresh)
            for i in range(0, len(dirty), self.save_chunk):
                chunk = dirty[i : i + self.save_chunk]
                with metrics.PHASE_SECONDS.labels("save").time():
                    lost = await self.states.save({k: states[k] for k in chunk})
                saved = [k for k in chunk if k not in lost]
                metrics.STATE_WRITES.inc(len(saved))
                self._count({k: p.fresh[k] for k in saved})
                outputs = self._outputs(p, saved, published)
                if outputs:
                    sending.append(asyncio.create_task(self._send(outputs)))
                conflicts |= lost
            if not conflicts:
                return list(unscorable.values())
            # Another process wrote these series since we read them (a partition moved): read
            # them again; its outcomes are now in the state and are what we publish.
            metrics.STATE_CONFLICTS.inc(len(conflicts))
            log.warning("state conflict on %d series; re-reading", len(conflicts))
            remaining = [(rec, ev) for rec, ev in remaining if self._key(ev) in conflicts]
        raise StateConflict(f"state kept changing under us after {self.conflict_attempts} attempts")

    @staticmethod
    def _key(ev: SrsSubmitted) -> SeriesKey:
        return series_key(ev.tenant_id, ev.client_id, ev.instrument, ev.episode_id)

    def _apply(self, events: list[tuple[InboundRecord, SrsSubmitted]], states: dict[SeriesKey, History],
               rules: dict[str, TenantRules]) -> _Pass:
        p = _Pass()
        for rec, ev in events:
            key = self._key(ev)
            try:
                outcome, fresh = states[key].apply(_submission(ev), rules[ev.tenant_id], self.clock())
            except Unscorable as exc:
                p.unscorable.append((rec, ev, str(exc)))
                continue
            p.outcomes.setdefault(key, []).append((rec, ev, outcome))
            if fresh:
                p.fresh.setdefault(key, []).append((ev, outcome))
            else:
                metrics.REEMITTED.inc()
        return p

    @staticmethod
    def _count(written: dict[SeriesKey, list[tuple[SrsSubmitted, Outcome]]]) -> None:
        for pairs in written.values():
            for ev, o in pairs:
                if not o.scored:
                    metrics.AUDITED.labels(ev.instrument.value).inc()
                    continue
                metrics.SCORED.labels(ev.instrument.value).inc()
                metrics.SUBMISSION_TO_SCORED.observe(max(0.0, (o.scored_at - ev.accepted_at).total_seconds()))
                if o.severity is not None:
                    for trigger in o.triggers:
                        metrics.DETERIORATION.labels(trigger, o.severity).inc()
                    log.debug("deterioration alert", extra={
                        "alert_id": ids.alert_id(ev.tenant_id, ev.submission_id),
                        "submission_id": ev.submission_id, "tenant_id": ev.tenant_id})

    def _outputs(self, p: _Pass, keys: Iterable[SeriesKey], published: set[tuple[str, str]]) -> list[OutboundRecord]:
        """The events of the given series, in input order; each submission once per batch."""
        out: list[OutboundRecord] = []
        for key in keys:
            for rec, ev, o in p.outcomes[key]:
                if not o.scored or (ev.tenant_id, ev.submission_id) in published:
                    continue  # audit-only, or the same submission twice in one batch
                published.add((ev.tenant_id, ev.submission_id))
                pkey = ids.partition_key(ev.tenant_id, ev.client_id)
                corr = rec.headers.get(CORRELATION_HEADER) or ev.submission_id
                out.append(OutboundRecord(self.topics.scored, scored_event(ev, o).model_dump_json().encode(),
                                          key=pkey, correlation_id=corr))
                if o.severity is not None:
                    out.append(OutboundRecord(self.topics.deterioration,
                                              alert_event(ev, o).model_dump_json().encode(),
                                              key=pkey, correlation_id=corr))
        return out
