"""`delivered` and `failed`: telling the alert's status topic what became of a clinician's delivery.

Which deliveries tell, and what, are the rules of `rules.py` ("delivered / failed"): a
clinician's delivery of a raised revision, webhook or email; `delivered` once per revision (the
first channel that got through), `failed` once per revision and channel whose delivery used up its
attempts; on the alert's type's status topic (`alliance.alert-status.v1`, or
`outcome.alert-status.v1` for an outcome alert); a partner's, a supervisor's or a withdrawal's
delivery tells nothing. And when the last delivery to a person of a raised revision (its
clinician's, or its site's fallbacks', `rules.to_person`) fails, so that all of them used up their
attempts (`rules.revision_reached`; none cancelled by a reroute, see below), the revision reached nobody
after all: the channel-less `failed` with `routing_reason` `undelivered` is published
(`nobody_record`), then the alert's routing is recorded `none` and, when that write is news,
`alliance_alerts_unrouted_total{reason="undelivered", fallback="no"}` is counted. A revision a
directory fix rerouted to its clinician (services/alerts/reroute.py) none of whose deliveries to
them got through is its site's fallback's again (`fell_back`): routing `fallback` with the reason it
had gone there, `alliance_alerts_unrouted_total{reason="undelivered", fallback="yes"}` counted when
that write is news, and nothing told. When a fallback's delivery had reached it, that is all; when
the reroute had cancelled the fallbacks' deliveries still waiting for a retry, those are scheduled
again with a fresh attempt budget (the fallback would have kept trying without the reroute; a
fallback's delivery that had already used up its attempts is not), and only if they fail too does
the revision reach nobody as above. Those deliveries' outcomes write outbox entries too, so none of this is lost.

A rerouted revision whose clinician deliveries all failed, step by step
-----------------------------------------------------------------------
When the last of the clinician's deliveries is recorded `failed` (its outbox entry written with it):

1. the teller reads every delivery of the revision to a person (`person_deliveries`) and asks
   `rules.revision_reached`: `fallback`, with the ids of the fallbacks' cancelled deliveries;
2. records routing `fallback` (`record_fell_back`: conditional on the revision being the routed one
   and still `clinician`, so it is news once; counted then);
3. puts those deliveries back on the schedule (`reschedule_cancelled`: conditional on each being
   still `cancelled`), and wakes the worker;
4. deletes the clinician delivery's outbox entry (`statuses_told`).

What a `kill -9` (or a store error) at each point leaves behind:

- before 2: the entry is there; the sweep (any alerts process) does 1-4 from the start.
- between 2 and 3: routing says `fallback`, the deliveries are still cancelled, the entry is there;
  the sweep sees the same in 1, its write in 2 is no news (not counted again) and 3 schedules them.
  The routing is written first for this: the other order would leave, after a crash, deliveries
  pending under a routing still `clinician`, which the sweep's look (1: pending, not settled)
  would not correct until they finish.
- between 3 and 4: the deliveries are pending (or already being tried); the sweep's look finds one
  pending and settles nothing, or finds them finished and settles what they say (delivered: the
  fallback's, already recorded; failed: nobody, below). 3 is conditional on `cancelled`, so
  nothing is scheduled twice and no attempt budget is reset twice.
- after 4: done; what the fallback's deliveries become is told when they finish, as for any
  fallback's delivery: the last to fail tells `undelivered` (routing `none`, counted), once per
  revision under its derived `event_id`.

Two alerts processes telling the clinician's two channels at the same moment either each see the
other's still pending (neither settles; the later write's teller does), or both see both failed:
both write 2 (one of them is news, counted once) and 3 (each delivery is scheduled by whichever
matches it first). A teller whose read in 1 is stale can only find its writes no longer match (the
routing moved on, the deliveries are no longer cancelled). The one exception is a directory fix
that reroutes the revision again between 1 and 3 of a slow teller: the fallback is then scheduled
alongside the clinician's retries, and both may get it (never fewer people).

Exactly-once effect under at-least-once (an outbox beside the deliveries)
-------------------------------------------------------------------------
The debt of a status is an entry in `delivery_outbox` (`_id` = the delivery id, `finished_at` = the
time of the outcome it was written with), not a flag on the delivery: a delivery document carries
its body and five indexes, and the local store rewrites all of it on every write, so unsetting a
flag cost a second full write of every told delivery (4.8 ms per document at `alliance bench`),
where an entry is a small insert and delete with only its `_id` index. Per recorded batch:

1. the worker's write (`AlertsStore.record`) stores the entries of the outcomes that owe a status
   and then the outcomes, as one ordered cross-collection command (two writes in that order on a
   store without it);
2. the worker hands the teller the recorded documents when every outcome matched (the claimed
   document plus what it wrote, and the entry's time: the teller reads nothing back), else their
   ids, and the teller reads their entries and then the finished deliveries they name;
3. the teller publishes the statuses and waits for the broker's acknowledgement;
4. it deletes the entries (`statuses_told`), each conditional on the `finished_at` it read or
   was handed.

What a `kill -9` (or a store error, a broker outage) at each point leaves behind:

- during 1, the entries written and not the outcomes: the deliveries are pending, still leased;
  once the lease ends they are attempted again, and the outcome recorded then writes the entry
  again (with its own time). The sweep drops an entry whose delivery owes nothing (not finished,
  or gone) once it is older than `status_sweep_seconds`, conditional on the time it read, so an
  entry written again since stays. The same holds for an entry written with an outcome that did
  not match (another worker recorded the delivery, or the lease had run out): it names a delivery
  still pending (dropped as above) or finished by the other writer, whose status is then told
  (again: at least once).
- after 1, before 4: the entries are there, and the sweep (every `status_sweep_seconds`, in every
  alerts process) publishes what each names whose entry is older than that, reading the entries
  first and the deliveries after.
- after 3, before 4: the same, so the status is published twice.
- after 4: done.

No outcome is stored without its entry, so the status of a recorded outcome is never lost. A
status can be published twice (a crash after the publish and before the delete, two processes
sweeping at once, the sweep racing the worker's own publish), never lost; every copy has the same
derived `event_id` and the same content (`occurred_at` is the recorded `delivered_at` /
`finished_at`), so consumers that dedupe on `event_id` (the contract) see it once. A sweep reads
`batch` entries at a time, in no order (the entries have no other index; every one it reads is
settled or dropped); a batch that held entries owing nothing ends that sweep early, and the next
one goes on.
A second channel delivering the same revision is not told
(`rules.first_deliveries`); where two processes record the two channels at the same moment both
may tell it, under the one id.

A delivery an operator re-queues and that finishes again owes its status again (its outcome writes
its entry again, with the new `finished_at`, and the delete is conditional on the one that was read
before the delivery was): a `delivered` after a `failed`, or the same `failed` again under the same
id. Entries left pending by a re-queue before their status was told are dropped by the sweep (the
delivery is not finished) and written again when it finishes.

Deliveries whose status was owed before the upgrade carried the flag `status_outbox`; the first
start of this version moves them to the outbox (`AlertsStore.ensure_indexes`, docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from pydantic import ValidationError

from services.alerts import metrics
from services.alerts.handlers import PublishesAll, status_record
from services.alerts.rules import (
    UNROUTED_REASONS,
    DeliveryStatus,
    RaisedAlert,
    Reached,
    UnroutedReason,
    alert_kind,
    delivery_status,
    first_deliveries,
    kind_of_topic,
    revision_reached,
    tells_status,
    unrouted_status,
)
from services.alerts.settings import AlertsSettings
from services.alerts.store import OWED_AT, utcnow
from shared.events import AlertStatus
from shared.kafka import OutboundRecord
from shared.mongo import Document
from shared.topics import Topics

log = logging.getLogger("alliance.alerts.statuses")


class OwedStatuses(Protocol):
    """What the teller needs of the store (`AlertsStore`; an in-memory fake in the unit tests)."""

    async def owed_statuses(self, delivery_ids: Sequence[str] = (), finished_before: datetime | None = None,
                            limit: int = 500) -> list[Document]: ...

    async def clinician_deliveries(self, alert_ids: Sequence[str]) -> list[Document]: ...

    async def statuses_told(self, told: Sequence[tuple[str, datetime | None]]) -> None: ...

    async def person_deliveries(self, revisions: Sequence[tuple[str, str]]) -> list[Document]: ...

    async def record_unreached(self, revisions: Sequence[tuple[str, int]]) -> set[str]: ...

    async def record_fell_back(self, revisions: Sequence[tuple[str, int, UnroutedReason]]) -> set[str]: ...

    async def reschedule_cancelled(self, delivery_ids: Sequence[str]) -> int: ...


def status_of(d: Document) -> tuple[DeliveryStatus, datetime] | None:
    """The status a recorded delivery owes and when it happened, or None for one not finished."""
    if d.get("status") == "delivered" and isinstance(d.get("delivered_at"), datetime):
        return AlertStatus.DELIVERED, d["delivered_at"]
    if d.get("status") == "failed" and isinstance(d.get("finished_at"), datetime):
        return AlertStatus.FAILED, d["finished_at"]
    return None


def _delivered_alert(d: Document) -> RaisedAlert | None:
    """The raised revision a delivery carried (its body), or None for a body that no longer decodes
    (which no retry fixes)."""
    try:
        return kind_of_topic(str(d.get("topic", ""))).raised_model().model_validate_json(str(d.get("body", "")))
    except ValidationError:
        log.error("a delivered alert's body does not decode: its status is not published",
                  extra={"delivery_id": d["_id"]})
        return None


def owed_record(d: Document, topics: Topics) -> OutboundRecord | None:
    """The status record an owing clinician's delivery owes (its body is the raised revision it
    delivered), or None when it cannot owe one (not finished; a body that no longer decodes)."""
    owed = status_of(d)
    alert = None if owed is None else _delivered_alert(d)
    if owed is None or alert is None:
        return None
    event = delivery_status(alert, owed[0], d["channel"], owed[1])
    return status_record(event, alert.client_id, topics, d.get("correlation_id"), d.get("traceparent"),
                         alert_kind(alert))


def reached_in_the_end(siblings: Sequence[Document]) -> Reached | None:
    """Who a revision reached in the end (`rules.revision_reached`), from `siblings`: every delivery
    of it to a person."""
    return revision_reached((str(s["_id"]), str(s.get("recipient")), str(s.get("status"))) for s in siblings)


def nobody_record(d: Document, siblings: Sequence[Document],
                  topics: Topics) -> tuple[RaisedAlert, OutboundRecord] | None:
    """The channel-less `failed` (`undelivered`) of the revision a failed delivery `d` carried, when
    `siblings` (every delivery of that revision to a person, `d` included) reached nobody: each used
    up its attempts (`rules.revision_reached`); else None. It happened when the last of them failed,
    so every copy of it (another sibling's teller, the sweep) is the same event."""
    reached = reached_in_the_end(siblings)
    if reached is None or reached.to != "none":
        return None
    alert = _delivered_alert(d)
    if alert is None:
        return None
    at = max(s["finished_at"] for s in siblings if s.get("status") == "failed" and isinstance(s.get("finished_at"),
                                                                                            datetime))
    event = unrouted_status(alert, "undelivered", at)
    return alert, status_record(event, alert.client_id, topics, d.get("correlation_id"), d.get("traceparent"),
                                alert_kind(alert))


@dataclass(frozen=True)
class FellBack:
    """A revision rerouted to its clinician that its site's fallback has after all (`fell_back`)."""

    alert: RaisedAlert
    reason: UnroutedReason  # why it had gone to the fallback: the routing's reason again
    again: tuple[str, ...]  # the fallbacks' deliveries the reroute cancelled, to schedule again


def fell_back(d: Document, siblings: Sequence[Document]) -> FellBack | None:
    """The revision a finished delivery `d` carried, when it was rerouted to its clinician (a
    clinician's delivery is among `siblings`), none of those got through, and its site's fallback
    has it (`rules.revision_reached`): a fallback's delivery got through, or the ones the reroute
    cancelled are to be scheduled again; else None."""
    if not any(str(s.get("recipient")).startswith("clinician:") for s in siblings):
        return None  # routed to the fallbacks and never rerouted: its routing says so already
    reached = reached_in_the_end(siblings)
    if reached is None or reached.to != "fallback":
        return None
    theirs = set(reached.again)
    reason = next((s.get("routed_reason") for s in siblings if (s.get("status") == "delivered" or s["_id"] in theirs)
                   and s.get("routed_reason") in UNROUTED_REASONS), None)
    alert = None if reason is None else _delivered_alert(d)
    return None if alert is None or reason is None else FellBack(alert, reason, reached.again)


@dataclass(eq=False)
class StatusTeller:
    """Publishes the statuses the delivery worker recorded as owed, and sweeps up the ones left owed."""

    store: OwedStatuses
    publisher: PublishesAll
    topics: Topics
    settings: AlertsSettings
    batch: int = 500
    # Wakes the delivery worker (its `wake`): fallbacks' deliveries scheduled again are due at once.
    wake: Callable[[], None] = field(default=lambda: None)
    # Ids of deliveries recorded owing a status (read back before telling), or the recorded documents.
    _recorded: asyncio.Queue[tuple[Sequence[str], Sequence[Document]]] = field(default_factory=asyncio.Queue,
                                                                               init=False)

    def recorded(self, delivery_ids: Sequence[str]) -> None:
        """These deliveries were just recorded owing a status (called by the worker after the write)."""
        if delivery_ids:
            self._recorded.put_nowait((delivery_ids, ()))

    def recorded_docs(self, docs: Sequence[Document]) -> None:
        """These deliveries were just recorded owing a status, and this is what the write left in
        the store (the worker knows it when every update of the write matched): told as they are,
        without reading them back."""
        if docs:
            self._recorded.put_nowait(((), docs))

    async def run(self) -> None:
        """Until cancelled: tell what the worker recorded as it comes, and sweep every
        `status_sweep_seconds`. Failures only log: whatever was not told stays owed for the sweep."""
        loop = asyncio.get_running_loop()
        every = self.settings.status_sweep_seconds
        next_sweep = loop.time() + every
        while True:
            try:
                first = await asyncio.wait_for(self._recorded.get(), max(0.0, next_sweep - loop.time()))
            except TimeoutError:
                first = None
            try:
                if first is not None:
                    ids, docs = list(first[0]), list(first[1])
                    while not self._recorded.empty():
                        more_ids, more_docs = self._recorded.get_nowait()
                        ids.extend(more_ids)
                        docs.extend(more_docs)
                    if ids:
                        docs.extend(await self.store.owed_statuses(ids, limit=len(ids)))
                    await self.tell(docs)
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + every
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("delivery statuses not published yet (broker or store unavailable?): %r", exc)

    async def sweep(self) -> int:
        """Tell every status owed for longer than `status_sweep_seconds` (left by a crash, an outage,
        or another process); returns how many deliveries it settled."""
        settled = 0
        cutoff = utcnow() - timedelta(seconds=self.settings.status_sweep_seconds)
        while True:
            owed = await self.store.owed_statuses(finished_before=cutoff, limit=self.batch)
            settled += await self.tell(owed, swept=True)
            if len(owed) < self.batch:
                return settled

    async def tell(self, owed: Sequence[Document], swept: bool = False) -> int:
        """Publish the statuses `owed` (deliveries with an outbox entry), then delete the entries; returns how
        many were settled. A clinician's delivery tells its `delivered` / `failed`; a `delivered` of a
        revision another channel delivered first is settled without publishing (that one tells it).
        A failed one (a clinician's or a fallback's) whose revision's deliveries to persons all
        failed also tells that the revision reached nobody
        (`nobody_record`), recorded on the alert and counted once the event is published. A revision
        rerouted to its clinician that none of their deliveries got is recorded `fallback` again
        (`fell_back`), and the fallbacks' deliveries the reroute cancelled are scheduled again."""
        if not owed:
            return 0
        delivered = [d for d in owed if d.get("status") == "delivered"]
        first: set[str] = set()
        if delivered:
            siblings = await self.store.clinician_deliveries([str(d["alert_id"]) for d in delivered])
            first = first_deliveries((str(s["_id"]), str(s["subject_id"]), s["delivered_at"]) for s in siblings
                                     if isinstance(s.get("delivered_at"), datetime))
        failed = {(str(d["alert_id"]), str(d["subject_id"])): d for d in owed if d.get("status") == "failed"}
        # A fallback's delivery that got through settles a rerouted revision too, when it finished
        # after the clinician's last failure (it was being attempted when the reroute cancelled the rest).
        settling = {**{(str(d["alert_id"]), str(d["subject_id"])): d for d in delivered
                       if str(d.get("recipient")).startswith("fallback:")}, **failed}
        people: dict[str, list[Document]] = {}
        for s in await self.store.person_deliveries(sorted(settling)) if settling else []:
            people.setdefault(str(s["subject_id"]), []).append(s)
        records: list[tuple[str, OutboundRecord]] = []
        told: list[tuple[str, datetime | None]] = []
        for d in owed:
            record = None
            if tells_status(d.get("kind"), d.get("recipient")) and (d.get("status") == "failed" or d["_id"] in first):
                record = owed_record(d, self.topics)
            if record is not None:
                records.append((str(d["status"]), record))
            # The entry's time as read (the outcome's, unless the entry outlived an outcome that did not match).
            told.append((d["_id"], d.get(OWED_AT, d.get("finished_at"))))
        nobody = [told_of for (_, subject), d in sorted(failed.items())
                  if (told_of := nobody_record(d, people.get(subject, [d]), self.topics)) is not None]
        back = [b for (_, subject), d in sorted(settling.items()) if (b := fell_back(d, people.get(subject, [d])))]
        await self.publisher.publish_all([r for _, r in records] + [r for _, r in nobody])
        for status, _ in records:
            metrics.DELIVERY_STATUSES.labels(status, "swept" if swept else "recorded").inc()
        if nobody:
            for alert_id in await self.store.record_unreached([(a.alert_id, a.revision) for a, _ in nobody]):
                alert = next(a for a, _ in nobody if a.alert_id == alert_id)
                metrics.UNROUTED.labels(alert_kind(alert).alert_type, "undelivered", "no").inc()
                log.warning("revision %d of an alert reached nobody: every delivery to a person used up its "
                            "attempts", alert.revision, extra={"alert_id": alert_id})
        if back:
            # The routing first, the schedule after: a crash in between leaves the outbox entries,
            # and the next look (the sweep's) sees the same deliveries still cancelled and schedules them.
            changed = await self.store.record_fell_back([(b.alert.alert_id, b.alert.revision, b.reason) for b in back])
            for b in back:
                if b.alert.alert_id in changed:
                    metrics.UNROUTED.labels(alert_kind(b.alert).alert_type, "undelivered", "yes").inc()
                    log.warning("revision %d of an alert rerouted to its clinician did not reach them: every delivery "
                                "used up its attempts; its site's fallback has it%s", b.alert.revision,
                                " (its deliveries the reroute cancelled are scheduled again)" if b.again else "",
                                extra={"alert_id": b.alert.alert_id})
            if await self.store.reschedule_cancelled([i for b in back for i in b.again]):
                self.wake()
        await self.store.statuses_told(told)
        return len(told)
