"""In-memory stand-ins for the ports of the services' batch handlers, for unit tests that run a
real handler without a broker or a store (tests/unit/test_*_handler.py).

Each fake keeps what it was given so a test can read it back, and behaves like the real adapter
in what the handler relies on: `MemoryAlertsStore` keeps the greatest lifecycle key of an alert
and inserts a delivery id once; `MemoryReadModels` applies an event id once per generation.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel

from services.alerts.rules import (
    Clinician,
    Routing,
    Subscription,
    UnroutedReason,
    lifecycle_order,
    tells_status,
    to_person,
)
from services.alerts.store import STATUS_OUTBOX, Alert, Delivery, SubscriptionRow
from services.reporting.store import ApplyReport, GenerationState, Ride
from shared.events import AlertStatusChanged, AllianceDeterioration, DeadLetter, Lifecycle, SrsScored, SrsSubmitted
from shared.kafka import CORRELATION_HEADER, InboundRecord, OutboundRecord
from shared.mongo import Document
from shared.topics import Topics

TOPICS = Topics("u.")  # the topics the handlers under unit test read and write
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # when the unit tests' events happen

_offsets = itertools.count()


def inbound(topic: str, value: bytes | BaseModel, *, key: bytes | None = b"acme:x", correlation: str | None = None,
            headers: dict[str, str] | None = None, partition: int = 0, offset: int | None = None) -> InboundRecord:
    """A consumed record of `topic` (an event is written as its JSON); each gets a new offset unless given."""
    body = value.model_dump_json().encode() if isinstance(value, BaseModel) else value
    all_headers = {**({CORRELATION_HEADER: correlation} if correlation else {}), **(headers or {})}
    return InboundRecord(topic, partition, next(_offsets) if offset is None else offset, key, body, all_headers, 0)


class Sink:
    """A publisher that keeps what it was given; it can fail its next N calls (broker down, or a
    kill -9 before the acks), a failing call still getting its first half acknowledged (or only the
    records on `reached_topics` when that is set: a crash that lost exactly some of them).

    Callable (`publish(records)`, the handlers' sink) and `publish_all` (`shared.kafka.Publisher`)."""

    def __init__(self) -> None:
        self.published: list[OutboundRecord] = []
        self.attempted: list[OutboundRecord] = []
        self.fail_next = 0
        self.reached_topics: set[str] | None = None

    async def __call__(self, records: Sequence[OutboundRecord]) -> None:
        self.attempted.extend(records)
        if self.fail_next:
            self.fail_next -= 1
            reached = self.reached_topics
            self.published.extend(records[: len(records) // 2] if reached is None
                                  else [r for r in records if r.topic in reached])
            raise ConnectionError("broker did not acknowledge")
        self.published.extend(records)

    async def publish_all(self, records: Sequence[OutboundRecord]) -> None:
        await self(records)

    def of_topic(self, topic: str) -> list[OutboundRecord]:
        return [r for r in self.published if r.topic == topic]

    def letters(self, topic: str) -> list[DeadLetter]:
        """The dead letters published to `topic`."""
        return [DeadLetter.model_validate_json(r.value) for r in self.of_topic(topic)]


class StoreDown(ConnectionError):
    """What a fake store raises while it is `down` (a transient failure for the subscriber)."""


# ---- alerts ----------------------------------------------------------------------------------------


@dataclass
class MemoryAlertsStore:
    """The alerts store as the handlers and the API's commands use it: directory, subscriptions,
    lifecycles, alerts, deliveries."""

    clinicians: dict[tuple[str, str], Clinician] = field(default_factory=dict)
    subscriptions: list[Subscription] = field(default_factory=list)
    lkeys: dict[str, str] = field(default_factory=dict)  # alert id -> greatest lifecycle key
    types: dict[str, str] = field(default_factory=dict)  # alert id -> its type (the first event's)
    contents: dict[str, tuple[int, Document]] = field(default_factory=dict)  # alert id -> (revision, content)
    deliveries: dict[str, Document] = field(default_factory=dict)
    alerts: dict[str, Document] = field(default_factory=dict)  # alert documents as the API reads them
    routings: dict[str, tuple[int, Routing]] = field(default_factory=dict)  # alert id -> (revision, who it reached)
    # partner subscriptions as the API's commands write them: id -> (tenant, row, sealed secret)
    subscription_rows: dict[str, tuple[str, SubscriptionRow, str]] = field(default_factory=dict)
    webhook_secrets: dict[str, str] = field(default_factory=dict)  # tenant -> sealed clinician-webhook secret
    escalations: dict[str, float] = field(default_factory=dict)  # tenant -> its own interval
    now: datetime = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # when an acknowledgement happens
    down: bool = False

    def _check(self) -> None:
        if self.down:
            raise StoreDown("store unreachable")

    async def clinicians_for(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Clinician]:
        self._check()
        return {k: self.clinicians[k] for k in keys if k in self.clinicians}

    async def fallbacks_for(self, sites: Iterable[tuple[str, str]]) -> list[Clinician]:
        self._check()
        wanted = set(sites)
        return [c for c in self.clinicians.values() if c.fallback and (c.tenant_id, c.site_id) in wanted]

    async def routed_revisions(self, alert_ids: Iterable[str]) -> dict[str, int]:
        self._check()
        return {a: self.routings[a][0] for a in alert_ids if a in self.routings}

    async def record_routing(self, routings: Sequence[tuple[str, int, Routing]]) -> None:
        self._check()
        for alert_id, revision, routing in routings:
            if revision > self.routings.get(alert_id, (0, routing))[0]:
                self.routings[alert_id] = (revision, routing)

    async def subscriptions_for(self, tenant_ids: Iterable[str], topic: str) -> list[Subscription]:
        self._check()
        tenants = set(tenant_ids)
        return [s for s in self.subscriptions if s.tenant_id in tenants and topic in s.events]

    def _raise_key(self, alert_id: str, key: str) -> None:
        if key > self.lkeys.get(alert_id, ""):
            self.lkeys[alert_id] = key

    def _typed(self, doc: Document) -> bool:
        """Like the real store: an event of one alert type never touches an alert of the other."""
        alert_type = str(doc.get("alert_type", "alliance"))
        return self.types.setdefault(doc["_id"], alert_type) == alert_type

    async def record_raises(self, raises: Sequence[tuple[int, Document]]) -> None:
        self._check()
        for revision, content in raises:
            alert_id = content["_id"]
            if not self._typed(content):
                continue
            if revision > self.contents.get(alert_id, (0, {}))[0]:
                self.contents[alert_id] = (revision, content)
            self._raise_key(alert_id, lifecycle_order(Lifecycle.RAISED, revision))

    async def record_statuses(self, statuses: Sequence[tuple[str, int, Document]]) -> None:
        self._check()
        for status, revision, identity in statuses:
            if self._typed(identity):
                self._raise_key(identity["_id"], lifecycle_order(status, revision))

    async def lifecycle_orders(self, alert_ids: Iterable[str]) -> dict[str, str]:
        self._check()
        return {a: self.lkeys[a] for a in alert_ids if a in self.lkeys}

    async def insert_deliveries(self, docs: Sequence[Document]) -> int:
        return len(await self.insert_new_deliveries(docs))

    async def insert_new_deliveries(self, docs: Sequence[Document]) -> list[Document]:
        self._check()
        new = [d for d in {d["_id"]: d for d in docs}.values() if d["_id"] not in self.deliveries]
        self.deliveries.update((d["_id"], d) for d in new)
        return new

    # what the status teller uses (services/alerts/statuses.py): the debt of a status is kept here as a
    # flag on the delivery (the real store keeps it as an entry in `delivery_outbox`)

    async def owed_statuses(self, delivery_ids: Sequence[str] = (), finished_before: datetime | None = None,
                            limit: int = 500) -> list[Document]:
        self._check()
        owed = [d for d in self.deliveries.values() if d.get(STATUS_OUTBOX) and d["status"] in ("delivered", "failed")
                and (not delivery_ids or d["_id"] in delivery_ids)
                and (finished_before is None or d["finished_at"] < finished_before)]
        return sorted(owed, key=lambda d: d["finished_at"])[:limit]

    async def clinician_deliveries(self, alert_ids: Sequence[str]) -> list[Document]:
        self._check()
        return [d for d in self.deliveries.values() if d.get("alert_id") in alert_ids and d["status"] == "delivered"
                and tells_status(d.get("kind"), d.get("recipient"))]

    async def person_deliveries(self, revisions: Sequence[tuple[str, str]]) -> list[Document]:
        self._check()
        return [d for d in self.deliveries.values() if (d.get("alert_id"), d.get("subject_id")) in set(revisions)
                and to_person(d.get("kind"), d.get("recipient"))]

    async def record_unreached(self, revisions: Sequence[tuple[str, int]]) -> set[str]:
        self._check()
        changed = set()
        for alert_id, revision in revisions:
            was = self.routings.get(alert_id)
            if was is not None and was[0] == revision and was[1].reason != "undelivered":
                self.routings[alert_id] = (revision, Routing("none", "undelivered", was[1].fallback_ids))
                changed.add(alert_id)
        return changed

    async def record_fell_back(self, revisions: Sequence[tuple[str, int, UnroutedReason]]) -> set[str]:
        self._check()
        changed = set()
        for alert_id, revision, reason in revisions:
            was = self.routings.get(alert_id)
            if was is not None and was[0] == revision and was[1].to == "clinician":
                self.routings[alert_id] = (revision, Routing("fallback", reason, was[1].fallback_ids))
                changed.add(alert_id)
        return changed

    async def reschedule_cancelled(self, delivery_ids: Sequence[str]) -> int:
        self._check()
        hits = [d for d in self.deliveries.values() if d["status"] == "cancelled" and d["_id"] in delivery_ids]
        for d in hits:
            d.update(status="pending", attempts=0)
        return len(hits)

    async def statuses_told(self, told: Sequence[tuple[str, datetime | None]]) -> None:
        self._check()
        for delivery_id, finished_at in told:
            d = self.deliveries.get(delivery_id)
            if d is not None and d.get("finished_at") == finished_at:
                d.pop(STATUS_OUTBOX, None)

    # what the API's commands use (services/alerts/service.py)

    async def get_clinician(self, tenant_id: str, clinician_id: str) -> Clinician | None:
        self._check()
        return self.clinicians.get((tenant_id, clinician_id))

    async def put_clinician(self, c: Clinician) -> bool:
        self._check()
        created = (c.tenant_id, c.clinician_id) not in self.clinicians
        self.clinicians[(c.tenant_id, c.clinician_id)] = c
        return created

    async def has_webhook_secret(self, tenant_id: str) -> bool:
        self._check()
        return tenant_id in self.webhook_secrets

    async def get_alert(self, tenant_id: str, alert_id: str) -> Alert | None:
        self._check()
        doc = self.alerts.get(alert_id)
        return Alert.from_doc(doc) if doc is not None and doc["tenant_id"] == tenant_id else None

    async def acknowledge(self, tenant_id: str, alert_id: str, by: str) -> Alert | None:
        self._check()
        doc = self.alerts.get(alert_id)
        if doc is not None and doc["tenant_id"] == tenant_id and doc["status"] == "open":
            doc.update(status="acknowledged", acknowledged_at=self.now, acknowledged_by=by)
        return await self.get_alert(tenant_id, alert_id)

    async def get_delivery(self, tenant_id: str, delivery_id: str) -> Delivery | None:
        self._check()
        doc = self.deliveries.get(delivery_id)
        return Delivery.from_doc(doc) if doc is not None and doc["tenant_id"] == tenant_id else None

    async def requeue_failed(self, tenant_id: str | None, delivery_ids: Sequence[str] | None = None) -> int:
        self._check()
        hits = [d for d in self.deliveries.values() if d["status"] == "failed"
                and tenant_id in (None, d["tenant_id"]) and (not delivery_ids or d["_id"] in delivery_ids)]
        for d in hits:
            d.update(status="pending", attempts=0)
        return len(hits)

    @staticmethod
    def new_subscription_id() -> str:
        return f"sub-{next(_offsets)}"

    async def create_subscription(self, tenant_id: str, url: str, events: Sequence[str], sealed_secret: str,
                                  subscription_id: str | None = None) -> SubscriptionRow:
        self._check()
        row = SubscriptionRow(subscription_id=subscription_id or self.new_subscription_id(), url=url,
                              events=tuple(events), created_at=self.now)
        self.subscription_rows[row.subscription_id] = (tenant_id, row, sealed_secret)
        return row

    async def count_subscriptions(self, tenant_id: str) -> int:
        self._check()
        return sum(1 for tenant, _, _ in self.subscription_rows.values() if tenant == tenant_id)

    async def remove_subscription(self, tenant_id: str, subscription_id: str) -> None:
        await self.delete_subscription(tenant_id, subscription_id)

    async def delete_subscription(self, tenant_id: str, subscription_id: str) -> bool:
        self._check()
        held = self.subscription_rows.get(subscription_id)
        if held is None or held[0] != tenant_id:
            return False
        del self.subscription_rows[subscription_id]
        return True

    async def rotate_webhook_secret(self, tenant_id: str, sealed_secret: str, grace: timedelta) -> datetime | None:
        self._check()
        previous = self.webhook_secrets.get(tenant_id)
        self.webhook_secrets[tenant_id] = sealed_secret
        return self.now + grace if previous and grace else None

    async def escalation_seconds(self, tenant_id: str) -> float | None:
        self._check()
        return self.escalations.get(tenant_id)

    async def set_escalation(self, tenant_id: str, seconds: float | None) -> None:
        self._check()
        if seconds is None:
            self.escalations.pop(tenant_id, None)
        else:
            self.escalations[tenant_id] = seconds


# ---- reporting -------------------------------------------------------------------------------------


@dataclass
class MemoryReadModels:
    """Reporting's read models as the handlers use them: each event id applied once per generation;
    the scored events of the clients in `full` are refused as over the record cap."""

    max_record_bytes: int = 1000
    full: set[str] = field(default_factory=set)  # client ids whose record is at its cap
    scored: dict[str, dict[str, SrsScored]] = field(default_factory=dict)  # generation -> event id -> event
    alerts: dict[str, dict[str, AllianceDeterioration]] = field(default_factory=dict)
    statuses: dict[str, dict[str, AlertStatusChanged]] = field(default_factory=dict)
    indexed: set[str] = field(default_factory=set)
    down: bool = False

    def _check(self) -> None:
        if self.down:
            raise StoreDown("store unreachable")

    async def ensure_indexes(self, gen: str) -> None:
        self._check()
        self.indexed.add(gen)

    async def apply_scored(self, gen: str, events: Sequence[SrsScored], *, ride: Ride | None = None) -> ApplyReport:
        """The events as given; a `ride` is never taken (its owner then writes it apart)."""
        self._check()
        report = ApplyReport()
        held = self.scored.setdefault(gen, {})
        for e in events:
            if e.client_id in self.full:
                report.refused.append((e, self.max_record_bytes + 1))
            elif e.event_id in held:
                report.outcomes["duplicate"] += 1
            else:
                held[e.event_id] = e
                report.outcomes["applied"] += 1
                report.visible.append(e)
        return report

    async def apply_deterioration(self, gen: str, events: Sequence[AllianceDeterioration]) -> int:
        self._check()
        held = self.alerts.setdefault(gen, {})
        new = [e for e in events if e.event_id not in held]
        held.update((e.event_id, e) for e in new)
        return len(new)

    async def apply_alert_status(self, gen: str, events: Sequence[AlertStatusChanged]) -> int:
        self._check()
        held = self.statuses.setdefault(gen, {})
        new = [e for e in events if e.event_id not in held]
        held.update((e.event_id, e) for e in new)
        return len(new)


@dataclass
class FixedGenerations:
    """A generation pointer that says what the test set."""

    state: GenerationState = field(default_factory=lambda: GenerationState("g1"))

    async def current(self) -> GenerationState:
        return self.state


@dataclass
class MemorySubmissions:
    """The submissions' status: the scored submission ids and the rejections, as given."""

    scored: Counter[str] = field(default_factory=Counter)
    rejected: dict[str, tuple[str, DeadLetter]] = field(default_factory=dict)  # submission id -> (tenant, letter)

    async def apply_scored(self, events: Sequence[SrsScored]) -> int:
        self.scored.update(e.submission_id for e in events)
        return len(events)

    def ride(self, events: Sequence[SrsScored]) -> Ride:
        return Ride([])

    async def apply_rejected(self, rejections: Sequence[tuple[str, DeadLetter, SrsSubmitted]]) -> int:
        for tenant, letter, submitted in rejections:
            self.rejected[submitted.submission_id] = (tenant, letter)
        return len(rejections)
