"""Consumer handlers: translate consumed events into alerts and scheduled deliveries.

Per batch of typed events (`shared.kafka.subscribe_batch(model=...)` decodes the records; one
that does not decode is dead-lettered as `invalid_event`, never retried): load the directory
entries and subscriptions the batch needs (two `$in` reads), merge the alerts' lifecycles (one
bulk write), read back where each alert now stands (one `$in` read), plan the deliveries of the
events that are their alert's current state with the pure routing rules and insert them (one
bulk write, unique ids: a redelivered batch inserts nothing new), and return; the subscriber
then publishes the dead letters — only then are the offsets committed. Nothing is sent here: the
delivery worker does that, so a slow receiver can never hold up a partition.

Raises (`alliance.deterioration.v1`) and their ends (`alliance.alert-status.v1`) arrive on two
topics, consumed independently, so in any order. Outcome alerts (docs/outcome.md) arrive on their
own pair, `outcome.alert.v1` and `outcome.alert-status.v1`, and go through the very same handlers
(`on_outcome_alert`, `on_outcome_status`) with their type (`rules.AlertKind`): same store, same
guarantees; what is told about them is told on, and as, their own topics. A raise is told unless the alert has already
moved past it by a later revision or a withdrawal: its *supersession* does not silence it (a
later session superseding it says nothing about whether it was right, and whether the two
topics' consumers happened to see them in order must not decide who is warned). A withdrawal
is told unless the alert was raised again since (a stale end). What is not told is still
recorded.

A raise whose clinician cannot be reached (`rules.unrouted_reason`: no directory entry, an entry of
another site, no usable channel) goes to the fallback entries of its site (`rules.plan_alert`;
read only when some raise of the batch needs them, in parallel with the lifecycle read, so the
ordinary batch pays nothing for it). Who each told revision reached is recorded on its alert
(`routing`, in parallel with scheduling the deliveries) and counted once per revision
(`alliance_alerts_unrouted_total`, when the record is news); a revision that reaches no person at
all is told `failed` on its type's status topic (`rules.unrouted_status`, published before the
batch's offsets are committed; a redelivered batch publishes it again under the same event id).
Withdrawals follow the same rule (`rules.route_status`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import model_validator

from services.alerts import metrics
from services.alerts.rules import (
    ALLIANCE_KIND,
    OUTCOME_KIND,
    AlertKind,
    Clinician,
    PlannedDelivery,
    RaisedAlert,
    Routing,
    Subscription,
    lifecycle_order,
    plan_alert,
    route_status,
    unrouted_reason,
    unrouted_status,
)
from services.alerts.rules import partner_deliveries as plan_partners
from services.alerts.store import EPOCH
from shared.events import (
    LIFECYCLE_STATUSES,
    AlertStatus,
    AlertStatusChanged,
    AllianceDeterioration,
    DeadLetterReason,
    Lifecycle,
    OrsScored,
    OutcomeAlert,
    OutcomeAlertStatusChanged,
    SrsScored,
)
from shared.ids import partition_key
from shared.kafka import Decoded, InboundRecord, OutboundRecord
from shared.mongo import Document
from shared.topics import ORS_SCORED, SCORED, Topics

log = logging.getLogger("alliance.alerts.handlers")

SERVICE = "alerts"
# Alerts' decode failures have always been dead-lettered as `invalid_event` (kept: it is the wire format).
INVALID = DeadLetterReason.INVALID_EVENT


class StatusEvent(AlertStatusChanged):
    """An alert-status event as alerts reads it: a lifecycle status (superseded, withdrawn) that
    does not name the revision it ends and the client it concerns breaks the contract and cannot
    be ordered, so it does not decode (and is dead-lettered as `invalid_event`)."""

    @model_validator(mode="after")
    def _lifecycle_names_its_revision(self) -> StatusEvent:
        if self.status in LIFECYCLE_STATUSES and (self.revision is None or self.client_id is None):
            raise ValueError(f"a {self.status} status must name its revision and client_id")
        return self


class OutcomeStatusEvent(OutcomeAlertStatusChanged, StatusEvent):
    """An `outcome.alert-status.v1` event as alerts reads it: the same rule as `StatusEvent`, with
    an outcome instrument."""


def _source(rec: InboundRecord) -> dict[str, Any]:
    return {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
            "key": rec.key.decode("utf-8", "replace") if rec.key is not None else None}


def delivery_doc(p: PlannedDelivery, body: str, origin_at: datetime, correlation_id: str | None,
                 source: dict[str, Any] | None, now: datetime, traceparent: str | None = None) -> Document:
    """The schedule entry of one planned delivery: pending, due now, unleased. `traceparent` is the
    trace its attempts continue (the causing record's), so the webhook carries the submission's trace."""
    return {
        "_id": p.delivery_id, "kind": p.kind, "tenant_id": p.tenant_id, "site_id": p.site_id,
        "subject_id": p.subject_id, "alert_id": p.alert_id, "topic": p.topic, "recipient": p.recipient,
        "channel": p.channel, "target": p.target, "subscription_id": p.subscription_id, "body": body,
        # A site fallback's copy: the worker's senders mark it (x-alliance-routed) with the reason.
        "routed_reason": p.routed_reason,
        "status": "pending", "attempts": 0, "next_attempt_at": now, "claimed_until": EPOCH,
        "created_at": now, "origin_at": origin_at, "correlation_id": correlation_id, "source": source,
        "traceparent": traceparent, "last_error": None,
    }


def planned_docs(planned: Iterable[PlannedDelivery], d: Decoded[Any], origin_at: datetime,
                 now: datetime) -> list[Document]:
    """The schedule entries of the deliveries planned for one received event (its body, correlation
    id, trace context and source record travel with each)."""
    return [delivery_doc(p, d.body, origin_at, d.correlation_id, _source(d.record), now, d.traceparent)
            for p in planned]


def alert_content(ev: RaisedAlert, body: str, rec: InboundRecord) -> Document:
    """What one raised revision says about its alert, as clinicians list it (client id is the
    pseudonymous one); `event` is the body escalation sends. The store keeps the highest revision's.
    An alliance alert says whether an outcome alert holds for its session (`outcome_at_risk`); an
    outcome alert where the client stands against intake, and its advice."""
    content: Document = {
        "_id": ev.alert_id, "tenant_id": ev.tenant_id, "site_id": ev.site_id, "clinician_id": ev.clinician_id,
        "client_id": ev.client_id, "submission_id": ev.submission_id, "episode_id": ev.episode_id,
        "instrument": ev.instrument.value, "session_number": ev.session_number, "severity": ev.severity,
        "triggers": list(ev.triggers), "total": ev.total,
        "previous_total": ev.previous_total, "change_from_previous": ev.change_from_previous, "cutoff": ev.cutoff,
        "occurred_at": ev.occurred_at, "accepted_at": ev.accepted_at, "event_id": ev.event_id,
        "correlation_id": rec.correlation_id, "traceparent": rec.traceparent, "event": body,
    }
    if isinstance(ev, OutcomeAlert):
        return {**content, "alert_type": OUTCOME_KIND.alert_type, "low_items": [], "intake_total": ev.intake_total,
                "change_from_intake": ev.change_from_intake, "advice": ev.advice}
    return {**content, "alert_type": ALLIANCE_KIND.alert_type, "low_items": list(ev.low_items),
            "outcome_at_risk": ev.outcome_at_risk}


def status_identity(ev: AlertStatusChanged, kind: AlertKind = ALLIANCE_KIND) -> Document:
    """Who and what a lifecycle status is about: enough to list the alert (and route it) when the
    status arrives before the raise it ends."""
    return {
        "_id": ev.alert_id, "alert_type": kind.alert_type, "tenant_id": ev.tenant_id, "site_id": ev.site_id,
        "clinician_id": ev.clinician_id, "client_id": ev.client_id,
        "instrument": ev.instrument.value if ev.instrument is not None else None,
        "episode_id": ev.episode_id, "session_number": ev.session_number,
    }


def status_record(event: AlertStatusChanged, client_id: str, topics: Topics, correlation_id: str | None = None,
                  traceparent: str | None = None, kind: AlertKind = ALLIANCE_KIND) -> OutboundRecord:
    """An alert-status event on its type's status topic (an outcome alert's never on
    `alliance.alert-status.v1`), keyed like the client's other events so it stays in their order."""
    return OutboundRecord(kind.status_topic(topics), event.model_dump_json().encode(),
                          key=partition_key(event.tenant_id, client_id), correlation_id=correlation_id,
                          traceparent=traceparent)


class HandlerStore(Protocol):
    """What the handlers need of the store (`AlertsStore`; an in-memory fake in the unit tests)."""

    async def clinicians_for(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Clinician]: ...

    async def fallbacks_for(self, sites: Iterable[tuple[str, str]]) -> list[Clinician]: ...

    async def routed_revisions(self, alert_ids: Iterable[str]) -> dict[str, int]: ...

    async def record_routing(self, routings: Sequence[tuple[str, int, Routing]]) -> None: ...

    async def subscriptions_for(self, tenant_ids: Iterable[str], topic: str) -> list[Subscription]: ...

    async def record_raises(self, raises: Sequence[tuple[int, Document]]) -> None: ...

    async def record_statuses(self, statuses: Sequence[tuple[str, int, Document]]) -> None: ...

    async def lifecycle_orders(self, alert_ids: Iterable[str]) -> dict[str, str]: ...

    async def insert_deliveries(self, docs: Sequence[Document]) -> int: ...

    async def insert_new_deliveries(self, docs: Sequence[Document]) -> list[Document]: ...


class HandsOff(Protocol):
    """Inserts new deliveries, leasing to itself and attempting at once those it has room for
    (`DeliveryWorker.hand_off`), and wakes itself for the rest."""

    async def hand_off(self, docs: Sequence[Document],
                       insert: Callable[[Sequence[Document]], Awaitable[list[Document]]]) -> list[Document]: ...


class PublishesAll(Protocol):
    """Publishes records and returns once every one is acknowledged (`shared.kafka.Publisher`)."""

    async def publish_all(self, records: Sequence[OutboundRecord]) -> None: ...


class Handlers:
    """The batch handlers of the service, on typed events. They publish only the `failed` of a
    revision that reached nobody, through `publisher` on `topics` (required: an alert nobody could
    be told of must never go untold): the records that do not decode are the subscriber's to
    dead-letter, and deliveries are the worker's."""

    def __init__(self, store: HandlerStore, email_enabled: bool, on_scheduled: Callable[[], None],
                 publisher: PublishesAll, topics: Topics, hand_off: HandsOff | None = None) -> None:
        self._store = store
        self._email = email_enabled
        self._on_scheduled = on_scheduled
        self._publisher = publisher
        self._topics = topics
        self._hand_off = hand_off

    async def _schedule(self, docs: list[Document]) -> None:
        """Store a batch's deliveries: through this process's worker when there is one (it leases to
        itself at insert what it has room for: see worker.py), else waking the worker when one is
        new. A redelivered batch schedules nothing twice (and the worker attempts only what was new)."""
        if not docs:
            return
        if self._hand_off is not None:
            await self._hand_off.hand_off(docs, self._store.insert_new_deliveries)
        elif await self._store.insert_deliveries(docs):
            self._on_scheduled()

    async def on_deterioration(self, decoded: list[Decoded[AllianceDeterioration]]) -> None:
        """`alliance.deterioration.v1`: record alliance alerts and schedule their deliveries."""
        await self._on_raises(decoded, ALLIANCE_KIND)

    async def on_outcome_alert(self, decoded: list[Decoded[OutcomeAlert]]) -> None:
        """`outcome.alert.v1`: record outcome alerts and schedule their deliveries."""
        await self._on_raises(decoded, OUTCOME_KIND)

    async def _on_raises(self, decoded: Sequence[Decoded[AllianceDeterioration]] | Sequence[Decoded[OutcomeAlert]],
                         kind: AlertKind) -> None:
        """Record alerts of `kind` and schedule their deliveries (clinician webhook/email, the
        tenant's partners subscribed to the kind's topic; the site's fallbacks when the clinician
        cannot be reached), and record who each revision reached."""
        if not decoded:
            return
        docs: list[Document] = []
        now = datetime.now(UTC)
        # The two reads and the merge are independent: one wait for the store, not three
        # (the webhook waits for every round trip of this handler; issue 11).
        clinicians, subscriptions, _ = await asyncio.gather(
            self._store.clinicians_for((d.event.tenant_id, d.event.clinician_id) for d in decoded),
            self._store.subscriptions_for((d.event.tenant_id for d in decoded), kind.raised),
            self._store.record_raises([(d.event.revision, alert_content(d.event, d.body, d.record))
                                       for d in decoded]))
        unreached = [d.event for d in decoded if self._unreached(d.event, clinicians)]
        # After the merge: what the alert's lifecycle is now, with this batch's raises in it;
        # with it (one wait), the fallbacks and recorded routings of the raises that need them.
        current, fallbacks, routed = await asyncio.gather(
            self._store.lifecycle_orders(d.event.alert_id for d in decoded),
            self._store.fallbacks_for((ev.tenant_id, ev.site_id) for ev in unreached),
            self._store.routed_revisions(ev.alert_id for ev in unreached))
        routings: list[tuple[str, int, Routing]] = []
        nobody: list[tuple[Decoded[Any], RaisedAlert, Routing]] = []
        for d in decoded:
            ev = d.event
            if current.get(ev.alert_id) not in (lifecycle_order(Lifecycle.RAISED, ev.revision),
                                                lifecycle_order(Lifecycle.SUPERSEDED, ev.revision)):
                log.info("revision %d of an alert is already withdrawn or revised: not sent",
                         ev.revision, extra={"alert_id": ev.alert_id})
                continue
            routing, planned = plan_alert(ev, clinicians.get((ev.tenant_id, ev.clinician_id)),
                                          subscriptions, self._email, fallbacks)
            docs.extend(planned_docs(planned, d, ev.accepted_at or ev.occurred_at, now))
            routings.append((ev.alert_id, ev.revision, routing))
            if routing.to != "clinician":
                log.warning("revision %d of an alert reached no clinician (%s): routed to %s", ev.revision,
                            routing.reason, routing.to, extra={"alert_id": ev.alert_id})
                if routing.to == "none":
                    nobody.append((d, ev, routing))
        await asyncio.gather(self._schedule(docs), self._store.record_routing(routings))
        await self._tell_nobody(nobody, kind)
        # Once per revision: not again when a redelivery finds it recorded, nor for a copy in the same batch.
        for (alert_id, revision), routing in {(a, r): routing for a, r, routing in routings}.items():
            if routing.reason is not None and routed.get(alert_id, 0) < revision:
                metrics.UNROUTED.labels(kind.alert_type, routing.reason,
                                        "yes" if routing.to == "fallback" else "no").inc()

    def _unreached(self, ev: RaisedAlert | AlertStatusChanged,
                   clinicians: dict[tuple[str, str], Clinician]) -> bool:
        """Whether the clinician an event names cannot be reached (then its site's fallbacks are read)."""
        return unrouted_reason(clinicians.get((ev.tenant_id, ev.clinician_id)), ev.tenant_id, ev.site_id,
                               ev.clinician_id, self._email) is not None

    async def _tell_nobody(self, nobody: Sequence[tuple[Decoded[Any], RaisedAlert, Routing]],
                           kind: AlertKind) -> None:
        """Publish `failed` (no channel, the reason) for the revisions that reached no person at all;
        `occurred_at` is the revision's own, so every copy of the event is the same."""
        if not nobody:
            return
        await self._publisher.publish_all([
            status_record(unrouted_status(ev, routing.reason, ev.occurred_at), ev.client_id, self._topics,
                          d.correlation_id, d.traceparent, kind)
            for d, ev, routing in nobody if routing.reason is not None])

    async def on_alert_status(self, decoded: list[Decoded[StatusEvent]]) -> None:
        """`alliance.alert-status.v1`: see `_on_statuses`."""
        await self._on_statuses(decoded, ALLIANCE_KIND)

    async def on_outcome_status(self, decoded: list[Decoded[OutcomeStatusEvent]]) -> None:
        """`outcome.alert-status.v1`: see `_on_statuses`."""
        await self._on_statuses(decoded, OUTCOME_KIND)

    async def _on_statuses(self, decoded: Sequence[Decoded[StatusEvent]] | Sequence[Decoded[OutcomeStatusEvent]],
                           kind: AlertKind) -> None:
        """Merge superseded/withdrawn into the alerts of `kind`, tell the clinician of a withdrawal,
        and forward status events to the tenant's partners subscribed to the kind's status topic.

        The events alerts publishes itself (acknowledged, escalated, delivered, failed) come back
        here too: they do not touch the lifecycle, and are only forwarded to partners.
        """
        docs: list[Document] = []
        if decoded:
            now = datetime.now(UTC)
            events = [d.event for d in decoded]
            # (status, revision it ends) of the lifecycle events; `StatusEvent` made sure both are set.
            ends = {ev.event_id: (ev.status, ev.revision) for ev in events
                    if ev.status in LIFECYCLE_STATUSES and ev.revision is not None}
            # The merge and the two reads are independent: one wait for the store, not three.
            _, clinicians, subscriptions = await asyncio.gather(
                self._store.record_statuses([(*ends[ev.event_id], status_identity(ev, kind))
                                             for ev in events if ev.event_id in ends]),
                self._store.clinicians_for((ev.tenant_id, ev.clinician_id) for ev in events
                                           if ev.status == AlertStatus.WITHDRAWN),
                self._store.subscriptions_for((ev.tenant_id for ev in events), kind.status))
            unreached = [ev for ev in events if ev.status == AlertStatus.WITHDRAWN and self._unreached(ev, clinicians)]
            current, fallbacks = await asyncio.gather(
                self._store.lifecycle_orders(ev.alert_id for ev in events if ev.event_id in ends),
                self._store.fallbacks_for((ev.tenant_id, ev.site_id) for ev in unreached))
            for d in decoded:
                ev = d.event
                end = ends.get(ev.event_id)
                if end is not None and current.get(ev.alert_id) != lifecycle_order(*end):
                    continue  # stale: the alert has moved on (e.g. raised again); telling anyone would mislead
                planned = route_status(ev, clinicians.get((ev.tenant_id, ev.clinician_id)), subscriptions,
                                       self._email, kind, fallbacks)
                docs.extend(planned_docs(planned, d, ev.occurred_at, now))
        await self._schedule(docs)

    async def on_scored(self, decoded: list[Decoded[SrsScored]]) -> None:
        """`srs.scored.v1`: schedule scored sessions for the partners subscribed to them."""
        await self._forward(decoded, SCORED)

    async def on_ors_scored(self, decoded: list[Decoded[OrsScored]]) -> None:
        """`ors.scored.v1`: schedule scored ORS sessions for the partners subscribed to them."""
        await self._forward(decoded, ORS_SCORED)

    async def _forward(self, decoded: Sequence[Decoded[SrsScored]] | Sequence[Decoded[OrsScored]],
                       topic: str) -> None:
        """Schedule scored events for the partners of their tenant that subscribed to `topic`."""
        docs: list[Document] = []
        if decoded:
            subscriptions = await self._store.subscriptions_for((d.event.tenant_id for d in decoded), topic)
            if subscriptions:
                now = datetime.now(UTC)
                for d in decoded:
                    ev = d.event
                    planned = plan_partners("event", ev.tenant_id, ev.site_id, ev.event_id, None, topic,
                                            subscriptions)
                    docs.extend(planned_docs(planned, d, ev.accepted_at or ev.occurred_at, now))
        await self._schedule(docs)
