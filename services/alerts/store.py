"""The alerts service's MongoDB collections (it owns them; no other service reads them).

- `clinicians`: the directory, `_id` = the JSON array `["<tenant>", "<clinician>"]` (see
  `clinician_key`; documents of the older `"<tenant>:<clinician>"` form are migrated at start).
  `fallback: true` marks a site's fallback entry (it receives the alerts of its site that reach
  no clinician; `fallbacks_for`); an entry stored before fallbacks existed has none, and is not one.
  `reroute_owed` (the time of the put, set by the same write, unset once the sweep looked again)
  marks an entry whose stranded alerts are still owed a look (services/alerts/reroute.py).
  An alias (`alias_of`: the id of the entry it names; see `put_alias`) is a document of the same
  key space under its own id, with nothing else of an entry: an id is either one entry's or one
  entry's alias in a tenant, which the `_id` itself makes sure of, at once, whoever writes first.
- `subscriptions`: partner webhooks with their (sealed) signing secrets.
- `alert_tenants`: per-tenant clinician-webhook signing secret and escalation interval.
- `alerts`: one document per alert id, of either type (`alert_type`: `alliance`, or `outcome`
  for the ORS's alerts; a document stored before alerts had types has none and is an alliance
  alert). Every write is also conditional on the type (see `_of_type`), so the events of one
  type never touch an alert of the other. Its lifecycle (raised, superseded, withdrawn; decided by
  scoring) is merged from events in any order: `lkey` is `rules.lifecycle_order` of the greatest
  event seen, and every write is conditional on it (see `record_raises`). Content (triggers,
  severity, totals, the body escalation sends) is that of the highest raised revision, `crev`.
  `status` is kept equal to `rules.api_status(lifecycle, acknowledged)`, so escalation (status
  open) and list filters stay single-field queries. Escalated once. `routing` (`clinician`,
  `fallback`, `none`), `routing_reason` and `routing_fallbacks` (the fallback entries told) are
  those of the highest revision the handlers routed, `rrev` (see `record_routing`); an alert
  stored before routing was recorded has none (the API shows null). A stranded alert a directory
  fix sent to its clinician is `clinician` from then on, with `rerouted_at` and `rerouted_from`
  (the reason it had not reached them; see `record_rerouted`), until its deliveries to them all use
  up their attempts: then `fallback` again (`record_fell_back`; the fallbacks' deliveries the reroute
  cancelled are put back on the schedule, `reschedule_cancelled`), and `none` (`undelivered`,
  `record_unreached`) only once no person got it.
- `deliveries`: one document per (alert or event, recipient, channel) — `_id` is the delivery id,
  so a redelivered event cannot create a second one. It is also the durable retry schedule:
  status pending + `next_attempt_at`, leased by one worker at a time through `claimed_until`.
- `delivery_outbox`: one small document per delivery whose `delivered` / `failed` status (or its
  revision's `undelivered`) is still owed to the alert's status topic (see
  `services/alerts/statuses.py`): `_id` = the delivery id, `finished_at` = the time of the outcome
  it was written with. It is written with the outcome and before it (`record`), and deleted once
  the status is published (`statuses_told`, conditional on that `finished_at`). The debt lived on
  the delivery as a `status_outbox` flag before: a second write of the delivery (index
  maintenance of five indexes and the whole body) for every status told, where an entry costs an
  insert and a delete of a document with only its `_id` index; flags left from before are moved
  here at start (`ensure_indexes`).

Every hot path is one round trip per batch (bulk writes, `$in` reads); see the worker for how
deliveries are claimed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymongo import ASCENDING, DESCENDING, DeleteOne, InsertOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.alerts.rules import (
    ALLIANCE,
    OUTCOME,
    AlertType,
    Clinician,
    RoutedTo,
    Routing,
    Subscription,
    UnroutedReason,
    lifecycle_order,
    tells_status,
    to_person,
)
from services.alerts.rules import Outcome as AttemptClass
from services.alerts.secretbox import Row, subscription_row, tenant_row
from shared import ids
from shared.events import AlertState, Lifecycle, Severity
from shared.mongo import (
    ClientBulk,
    Document,
    TtlCache,
    bulk_write,
    drop_indexes,
    given,
    guarded_upserts,
    namespace_of,
)

CLINICIANS = "clinicians"
SUBSCRIPTIONS = "subscriptions"
TENANTS = "alert_tenants"
ALERTS = "alerts"
DELIVERIES = "deliveries"
OUTBOX = "delivery_outbox"

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The outbox flag a delivery whose status was owed carried before `delivery_outbox` (moved there at start).
STATUS_OUTBOX = "status_outbox"
# Of a delivery the teller is handed (`owed_statuses`, `worker.recorded_doc`): the `finished_at` of its
# outbox entry, what `statuses_told` deletes it by (not stored on the delivery).
OWED_AT = "owed_at"
# Flagged deliveries moved to the outbox per write (`_move_status_flags`).
MIGRATION_BATCH = 1_000
# The outbox flag of a directory entry whose stranded alerts are still to be looked at (services/alerts/reroute.py).
REROUTE_OWED = "reroute_owed"
# The field of an alias document: the id of the entry it names (`AlertsStore.put_alias`).
ALIAS_OF = "alias_of"
# The sparse index of `STATUS_OUTBOX`, dropped by the upgrade (`_move_status_flags`).
_STATUS_OUTBOX_INDEX = f"{STATUS_OUTBOX}_1"
# The deliveries' (status, next_attempt_at): the schedule (`_due`), and the pending ones of a
# deleted subscription (`delete_subscription`).
_SCHEDULE_INDEX = "status_1_next_attempt_at_1"
# The deliveries' (subscription_id, status), dropped at start (`ensure_indexes`).
_SUBSCRIPTION_INDEX = "subscription_id_1_status_1"
# The directory's entries, not its aliases.
_ENTRY: Document = {ALIAS_OF: {"$exists": False}}


class NameTaken(Exception):
    """The id is already another directory entry's, or an alias of another entry, in this tenant."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

Outcome = Literal["delivered", "retry", "failed", "cancelled"]
DeliveryStatus = Literal["pending", "delivered", "failed", "cancelled"]


def utcnow() -> datetime:
    """Now, at the store's precision (BSON dates are milliseconds), so answers match what is stored."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


def clinician_key(tenant_id: str, clinician_id: str) -> str:
    """The directory `_id` of a clinician: a JSON array, not `tenant:clinician`, because with a
    separator that may occur inside an id, tenant `t`'s clinician `x:c1` and tenant `t:x`'s
    clinician `c1` were the same document (one tenant read another's directory entry)."""
    return ids.store_key(tenant_id, clinician_id)


def _below(value: str | int) -> Document:
    """Guard "the stored field is below `value`", also true when the field is missing (an alert
    recorded before alerts had a lifecycle is at the bottom of it)."""
    return {"$not": {"$gte": value}}


def _of_type(alert_type: str | None) -> Document:
    """Filter "the alert is of this type": an alliance alert may have no `alert_type` (stored
    before alerts had types). An equality for outcome alerts, so an upsert inserts it typed."""
    return {"alert_type": OUTCOME} if alert_type == OUTCOME else {"alert_type": {"$ne": OUTCOME}}


def _typed_insert(doc: Mapping[str, Any]) -> Document:
    """What an upsert inserting an alert sets of its type: an alliance alert is stored typed too
    (an outcome alert's type comes from `_of_type`'s equality, which an insert copies)."""
    return {} if doc.get("alert_type") == OUTCOME else {"alert_type": ALLIANCE}


def _clinician(doc: Mapping[str, Any]) -> Clinician:
    return Clinician(doc["tenant_id"], doc["clinician_id"], doc["site_id"], doc.get("email"),
                     doc.get("webhook_url"), doc.get("supervisor_id"), bool(doc.get("fallback", False)))


class SubscriptionRow(BaseModel):
    """A partner subscription as its tenant lists it, mapped from its document like `Alert` and
    `Delivery`: what the document holds besides (its tenant, its sealed secret) is left out."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    subscription_id: str
    url: str
    events: tuple[str, ...]
    created_at: datetime

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> SubscriptionRow:
        return cls.model_validate({**doc, "subscription_id": doc["_id"]})


class AlertFields(BaseModel):
    """What the API shows of an alert (`api.AlertOut`): the content of its highest raised revision
    (None while only scoring's end of the alert is known, before the raise it ends arrived), where
    its lifecycle stands (`status`, `revision`) and what alerts did with it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    alert_id: str
    alert_type: AlertType = Field(default=ALLIANCE, description=(
        "alliance (the SRS: `alliance.deterioration.v1`) or outcome (the ORS: `outcome.alert.v1`)"))
    tenant_id: str
    site_id: str
    clinician_id: str
    client_id: str | None = None
    submission_id: str | None = None
    instrument: str | None = None
    episode_id: str | None = None
    session_number: int | None = None
    severity: Severity | None = None
    triggers: list[str] = Field(default_factory=list)
    low_items: list[str] = Field(default_factory=list, description="items below their threshold, e.g. goals")
    total: float | None = None
    previous_total: float | None = None
    change_from_previous: float | None = None
    cutoff: float | None = None
    outcome_at_risk: bool | None = Field(default=None, description=(
        "alliance alerts: the ORS of the same session triggers an outcome alert, superseded since by a "
        "later session's or not (then the alert is critical); null for outcome alerts"))
    intake_total: float | None = Field(default=None, description="outcome alerts: the total of the episode's "
                                                                  "first session")
    change_from_intake: float | None = Field(default=None, description="outcome alerts: total - intake total")
    advice: str | None = Field(default=None, description="outcome alerts: what to do about it")
    occurred_at: datetime | None = None
    created_at: datetime
    status: AlertState
    revision: int = Field(default=1, description="the revision the status is about (scoring's numbering)")
    acknowledged_at: datetime | None = None
    escalated: bool
    escalated_at: datetime | None = None
    escalated_to: str | None = None
    routing: RoutedTo | None = Field(default=None, description=(
        "who the latest routed revision reached: `clinician` (their directory entry), `fallback` (the clinician "
        "could not be reached: the fallback entries of the alert's site got it), `none` (nobody: told `failed` on "
        "the alert's status topic); null for an alert routed before this field existed, or not routed yet"))
    routing_reason: UnroutedReason | None = Field(default=None, description=(
        "why the clinician was not reached: no_directory_entry, other_site, no_channel; null when routing is "
        "`clinician` (or null)"))

    @model_validator(mode="before")
    @classmethod
    def _alliance_content_says_outcome_at_risk(cls, data: Any) -> Any:
        # An alliance alert stored before `outcome_at_risk` existed was raised by an event whose
        # default is false: say so, as its event does (null only while its content is unknown).
        if (isinstance(data, Mapping) and data.get("alert_type", ALLIANCE) == ALLIANCE
                and data.get("outcome_at_risk") is None and data.get("total") is not None):
            return {**data, "outcome_at_risk": False}
        return data


class Alert(AlertFields):
    """An alert as the store holds it (`alerts` collection, without the body escalation sends)."""

    correlation_id: str | None = None  # of the raise: carried on to what alerts publishes about it
    acknowledged_by: str | None = None  # the key that acknowledged it

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Alert:
        return cls.model_validate({**doc, "alert_id": doc["_id"]})


class DeliveryFields(BaseModel):
    """What tenants see of a delivery (`api.DeliveryOut`): where it goes, and where its schedule stands."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    delivery_id: str
    kind: str
    alert_id: str | None = None
    subject_id: str
    topic: str
    recipient: str
    channel: str
    target: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None = None
    last_outcome: AttemptClass | None = Field(
        default=None, description="the class of the last attempt's result: 2xx, 3xx, 4xx, 5xx, timeout, refused "
                                  "(could not connect), blocked (the target is not a public address), no_secret "
                                  "(the tenant has no signing secret) or error; never a status code or error text")
    created_at: datetime
    delivered_at: datetime | None = None
    finished_at: datetime | None = None


class Delivery(DeliveryFields):
    """A delivery as the store holds it (`deliveries` collection, without its body and lease)."""

    tenant_id: str
    site_id: str
    subscription_id: str | None = None
    last_error: str | None = None  # for operators only (the CLI): never shown to tenants

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Delivery:
        return cls.model_validate({**doc, "delivery_id": doc["_id"]})


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt decided about a claimed delivery."""

    delivery_id: str
    claim: str
    outcome: Outcome
    attempts: int
    error: str | None = None
    next_attempt_at: datetime | None = None
    response_status: int | None = None
    # The class tenants see (rules.Outcome); error and response_status are for operators only.
    last_outcome: str | None = None
    # A delivery of an alert to a person (`rules.to_person`): recording it `delivered` or `failed`
    # also owes the status teller a look (an entry in `delivery_outbox`, written with it).
    tells_status: bool = False


def _entry_op(delivery_id: str, finished_at: datetime, namespace: str | None = None) -> UpdateOne:
    """The `delivery_outbox` entry that owes the status of a delivery recorded at `finished_at`."""
    return UpdateOne({"_id": delivery_id}, {"$set": {"finished_at": finished_at}}, upsert=True, namespace=namespace)


def _outcome_op(r: AttemptResult, now: datetime, namespace: str | None = None) -> UpdateOne:
    """The update that records `r` at `now` on its delivery (`AlertsStore.record`)."""
    if r.outcome == "delivered":
        return UpdateOne({"_id": r.delivery_id, "status": "pending"}, {"$set": {
            "status": "delivered", "attempts": r.attempts, "delivered_at": now, "finished_at": now,
            "response_status": r.response_status, "claimed_until": EPOCH, "last_error": None,
            "last_outcome": r.last_outcome}}, namespace=namespace)
    if r.outcome == "retry":
        return UpdateOne({"_id": r.delivery_id, "status": "pending", "claim": r.claim}, {"$set": {
            "attempts": r.attempts, "next_attempt_at": r.next_attempt_at or now, "claimed_until": EPOCH,
            "last_error": r.error, "last_attempt_at": now, "response_status": r.response_status,
            "last_outcome": r.last_outcome}}, namespace=namespace)
    return UpdateOne({"_id": r.delivery_id, "status": "pending", "claim": r.claim}, {"$set": {
        "status": r.outcome, "attempts": r.attempts, "finished_at": now, "claimed_until": EPOCH,
        "last_error": r.error, "response_status": r.response_status, "last_outcome": r.last_outcome}},
        namespace=namespace)


def _requeued(now: datetime) -> Document:
    """The fields that put a failed delivery back on the schedule with a fresh attempt budget."""
    return {"status": "pending", "attempts": 0, "next_attempt_at": now, "claimed_until": EPOCH}


SubscriptionLoader = Callable[[list[str], str], Awaitable[list[Subscription]]]


class PartnerSubscriptions:
    """Each tenant's partner subscriptions to each topic, trusted for `ttl` seconds.

    Every consumed batch of scored events, alerts and statuses asks which partners of its tenants
    subscribed to its topic. Asking the store each time was one query per batch (1,493 in one
    `alliance bench` run, 4% of the store's CPU) for data that changes when an admin changes it.
    So an answer is kept per (tenant, topic) for `ttl` seconds, and what a lookup does not hold
    is read for all its missing tenants in one query.

    `forget(tenant)` is called by this process's own writes (create, delete, undo over the cap):
    its next lookup reads the store again. A write by another alerts process is seen within `ttl`:
    a new subscription may miss what this process consumes in that time, and a deleted one may be
    scheduled what it consumes in that time (the sender then finds no secret and cancels it, or,
    within its own secret cache time, sends it: docs/partners.md). A lookup that read the store
    while its tenant was forgotten answers what it read but is not kept (`_changes`): without
    that, a batch racing a create could keep the old answer, and the new subscription would miss
    `ttl` seconds of events even in the process that created it.
    """

    def __init__(self, ttl: float, load: SubscriptionLoader, clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        # Each answer with the count of this process's writes of its tenant when it was read: an
        # answer read before (or across) a later write is not trusted.
        self._cache: TtlCache[tuple[str, str], tuple[int, list[Subscription]]] = TtlCache(ttl, clock=clock)
        # Per tenant, how many writes this process made (bounded by the tenants that changed a
        # subscription since start).
        self._changes: dict[str, int] = {}

    async def for_tenants(self, tenant_ids: Iterable[str], topic: str) -> list[Subscription]:
        """The subscriptions of these tenants (each once, in tenant order) to `topic`."""
        tenants = sorted(set(tenant_ids))
        held: dict[str, list[Subscription]] = {}
        for t in tenants:
            hit = self._cache.fresh((t, topic))
            if hit is not None and hit.value[0] == self._changes.get(t, 0):
                held[t] = hit.value[1]
        missing = [t for t in tenants if t not in held]
        if missing:
            seen = {t: self._changes.get(t, 0) for t in missing}
            read = await self._load(missing, topic)
            for t in missing:
                held[t] = [s for s in read if s.tenant_id == t]
                if self._changes.get(t, 0) == seen[t]:
                    self._cache.put((t, topic), (seen[t], held[t]))
        return [s for t in tenants for s in held[t]]

    def forget(self, tenant_id: str) -> None:
        """This process changed the tenant's subscriptions: read them again next time."""
        self._changes[tenant_id] = self._changes.get(tenant_id, 0) + 1


class AlertsStore:
    """Thin adapter over the service's collections.

    `subscription_cache_seconds`: how long a tenant's partner subscriptions to a topic are kept
    (`PartnerSubscriptions`); 0 reads the store at every lookup."""

    def __init__(self, db: AsyncDatabase[Document], subscription_cache_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.clinicians = db[CLINICIANS]
        self.subscriptions = db[SUBSCRIPTIONS]
        self._partners = PartnerSubscriptions(subscription_cache_seconds, self._find_subscriptions, clock)
        self.tenants = db[TENANTS]
        self.alerts = db[ALERTS]
        self.deliveries = db[DELIVERIES]
        self.outbox = db[OUTBOX]
        self._client_bulk = ClientBulk(db)  # `record`: the outbox entries, then the outcomes

    async def migrate_clinician_keys(self) -> int:
        """Rewrite directory documents still keyed `tenant:clinician` to `clinician_key` (from their
        own `tenant_id` / `clinician_id` fields, which were always stored separately, so the move is
        exact); idempotent, run at every start. Returns how many were moved.

        Reading the old form as a fallback is not an option: that lookup is the collision itself."""
        moved = 0
        async for doc in self.clinicians.find({}):
            new_id = clinician_key(doc["tenant_id"], doc["clinician_id"])
            if doc["_id"] == new_id:
                continue
            await self.clinicians.update_one({"_id": new_id}, {"$setOnInsert": {k: v for k, v in doc.items()
                                                                                 if k != "_id"}}, upsert=True)
            await self.clinicians.delete_one({"_id": doc["_id"]})
            moved += 1
        return moved

    async def ensure_indexes(self) -> None:
        """Indexes every query below relies on."""
        await self.clinicians.create_index([("tenant_id", ASCENDING), ("site_id", ASCENDING)])
        await self.subscriptions.create_index([("tenant_id", ASCENDING), ("events", ASCENDING)])
        await self.alerts.create_index([("tenant_id", ASCENDING), ("clinician_id", ASCENDING),
                                        ("status", ASCENDING), ("created_at", DESCENDING)])
        await self.alerts.create_index([("status", ASCENDING), ("escalated", ASCENDING), ("created_at", ASCENDING)])
        await self.deliveries.create_index([("status", ASCENDING), ("next_attempt_at", ASCENDING)],
                                           name=_SCHEDULE_INDEX)
        await self.deliveries.create_index([("tenant_id", ASCENDING), ("status", ASCENDING),
                                            ("created_at", DESCENDING)])
        await self.deliveries.create_index([("alert_id", ASCENDING)])
        await self.clinicians.create_index([(REROUTE_OWED, ASCENDING)], sparse=True)
        # `delivery_outbox` has only its `_id` index: the sweep's scan of the few entries owed is
        # cheaper than maintaining another index on each entry's insert and delete.
        await self._move_status_flags()
        # (subscription_id, status) served only `delete_subscription`, which now reads the pending
        # deliveries by the schedule's index; the local store maintained it on every delivery write.
        await drop_indexes(self.deliveries, (_SUBSCRIPTION_INDEX,))

    async def _move_status_flags(self) -> int:
        """The upgrade from the `status_outbox` flag (docs/operations.md): while the flag's sparse
        index exists, give every flagged delivery its outbox entry (`$setOnInsert`: an entry written
        since by `record` is newer), then unset the flags, then drop the index, which marks it done.
        A crash before the drop leaves entries and flags both: the next start moves again, which
        changes nothing but the flags still set. Returns how many flags it moved."""
        if _STATUS_OUTBOX_INDEX not in {i["name"] async for i in await self.deliveries.list_indexes()}:
            return 0
        moved = 0
        while flagged := await self.deliveries.find({STATUS_OUTBOX: True}, {"finished_at": 1}).limit(
                MIGRATION_BATCH).to_list():
            await self.outbox.bulk_write([
                UpdateOne({"_id": d["_id"]}, {"$setOnInsert": {"finished_at": d.get("finished_at") or EPOCH}},
                          upsert=True) for d in flagged], ordered=False)
            await self.deliveries.update_many({"_id": {"$in": [d["_id"] for d in flagged]}, STATUS_OUTBOX: True},
                                              {"$unset": {STATUS_OUTBOX: ""}})
            moved += len(flagged)
        await drop_indexes(self.deliveries, (_STATUS_OUTBOX_INDEX,))
        return moved

    # ---- directory -------------------------------------------------------------------------

    async def put_clinician(self, c: Clinician) -> bool:
        """Create or replace a directory entry; True when it was created. `NameTaken` when the id is
        an alias of another entry (the upsert finds no entry there and collides with the alias)."""
        now = utcnow()
        try:
            return await self._put_entry(c, now)
        except DuplicateKeyError as exc:
            raise NameTaken(c.clinician_id) from exc

    async def _put_entry(self, c: Clinician, now: datetime) -> bool:
        res = await self.clinicians.update_one(
            {"_id": clinician_key(c.tenant_id, c.clinician_id), **_ENTRY},
            {"$set": {"tenant_id": c.tenant_id, "clinician_id": c.clinician_id, "site_id": c.site_id,
                      "email": c.email, "webhook_url": c.webhook_url, "supervisor_id": c.supervisor_id,
                      "fallback": c.fallback, "updated_at": now,
                      # Owed in the same write: the alerts this change may unstrand (see `owed_reroutes`).
                      REROUTE_OWED: now},
             "$setOnInsert": {"created_at": now}},
            upsert=True,
        )
        return res.upserted_id is not None

    async def get_clinician(self, tenant_id: str, clinician_id: str) -> Clinician | None:
        """The entry under this id (an alias is not an entry: None)."""
        doc = await self.clinicians.find_one({"_id": clinician_key(tenant_id, clinician_id), **_ENTRY})
        return None if doc is None else _clinician(doc)

    async def put_alias(self, tenant_id: str, alias_id: str, clinician_id: str) -> bool:
        """Make `alias_id` an alias of the entry `clinician_id` (which the caller read: an entry); True
        when it is new. Owes the alias's stranded alerts a look, like a put of the entry (`REROUTE_OWED`).
        `NameTaken` when the id is an entry's, or another entry's alias: the upsert, conditional on
        naming this entry, then collides with that document."""
        now = utcnow()
        try:
            res = await self.clinicians.update_one(
                {"_id": clinician_key(tenant_id, alias_id), ALIAS_OF: clinician_id},
                {"$set": {"updated_at": now, REROUTE_OWED: now},
                 "$setOnInsert": {"tenant_id": tenant_id, "clinician_id": alias_id, "created_at": now}},
                upsert=True)
        except DuplicateKeyError as exc:
            raise NameTaken(alias_id) from exc
        return res.upserted_id is not None

    async def delete_alias(self, tenant_id: str, alias_id: str, clinician_id: str) -> bool:
        """Remove `alias_id` as an alias of `clinician_id`; True when it was one."""
        res = await self.clinicians.delete_one({"_id": clinician_key(tenant_id, alias_id), ALIAS_OF: clinician_id})
        return res.deleted_count == 1

    async def aliases_of(self, tenant_id: str, clinician_ids: Iterable[str]) -> dict[str, list[str]]:
        """{entry id: its aliases, sorted} for these entries of one tenant, in one round trip."""
        wanted = sorted(set(clinician_ids))
        out: dict[str, list[str]] = {}
        if wanted:
            for d in await self.clinicians.find({"tenant_id": tenant_id, ALIAS_OF: {"$in": wanted}},
                                                {ALIAS_OF: 1, "clinician_id": 1}).sort("_id", ASCENDING).to_list():
                out.setdefault(d[ALIAS_OF], []).append(d["clinician_id"])
        return out

    async def list_clinicians(self, tenant_id: str, site_id: str | None, limit: int) -> list[Clinician]:
        query: Document = {"tenant_id": tenant_id, **_ENTRY}
        if site_id is not None:
            query["site_id"] = site_id
        docs = await self.clinicians.find(query).sort("_id", ASCENDING).limit(limit).to_list()
        return [_clinician(d) for d in docs]

    async def clinicians_for(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Clinician]:
        """Directory entries for many (tenant, clinician) pairs in one round trip; a pair naming an
        alias gets the entry it names (`Clinician.alias` set), read in a second one only then."""
        wanted = sorted({clinician_key(t, c) for t, c in keys})
        if not wanted:
            return {}
        docs = await self.clinicians.find({"_id": {"$in": wanted}}).to_list()
        found = {(d["tenant_id"], d["clinician_id"]): _clinician(d) for d in docs if ALIAS_OF not in d}
        aliases = {(d["tenant_id"], d["clinician_id"]): str(d[ALIAS_OF]) for d in docs if ALIAS_OF in d}
        if aliases:
            named = sorted({clinician_key(t, c) for (t, _), c in aliases.items()})
            entries = {(d["tenant_id"], d["clinician_id"]): _clinician(d)
                       for d in await self.clinicians.find({"_id": {"$in": named}, **_ENTRY}).to_list()}
            found.update({(t, a): replace(e, alias=a) for (t, a), c in aliases.items()
                          if (e := entries.get((t, c))) is not None})
        return found

    async def fallbacks_for(self, sites: Iterable[tuple[str, str]]) -> list[Clinician]:
        """The fallback entries of these (tenant, site) pairs, in one round trip (the (tenant, site)
        index); only asked when some alert of a batch reaches no clinician."""
        wanted = sorted(set(sites))
        if not wanted:
            return []
        docs = await self.clinicians.find({"fallback": True, "$or": [{"tenant_id": t, "site_id": s}
                                                                     for t, s in wanted]}).to_list()
        return [_clinician(d) for d in docs]

    async def owed_reroutes(self, put_before: datetime, limit: int = 100) -> list[tuple[str, str, datetime]]:
        """(tenant, clinician, when put) of the directory entries put before `put_before` whose
        stranded alerts are still owed a look (the sparse `reroute_owed` index), oldest first."""
        docs = await self.clinicians.find({REROUTE_OWED: {"$lte": put_before}},
                                          {"tenant_id": 1, "clinician_id": 1, REROUTE_OWED: 1}).sort(
            REROUTE_OWED, ASCENDING).limit(limit).to_list()
        return [(d["tenant_id"], d["clinician_id"], d[REROUTE_OWED]) for d in docs]

    async def reroute_done(self, tenant_id: str, clinician_id: str, put_at: datetime) -> None:
        """Unset the flag of the put at `put_at`; a later put of the entry keeps its own debt."""
        await self.clinicians.update_one({"_id": clinician_key(tenant_id, clinician_id), REROUTE_OWED: put_at},
                                         {"$unset": {REROUTE_OWED: ""}})

    # ---- subscriptions -----------------------------------------------------------------------

    @staticmethod
    def new_subscription_id() -> str:
        """A fresh subscription id (chosen before the insert: the sealed secret is bound to it)."""
        return str(uuid.uuid4())

    async def create_subscription(self, tenant_id: str, url: str, events: Sequence[str],
                                  sealed_secret: str, subscription_id: str | None = None) -> SubscriptionRow:
        doc: Document = {"_id": subscription_id or self.new_subscription_id(), "tenant_id": tenant_id,
                         "url": url, "events": list(events),
                         "secret": sealed_secret, "created_at": utcnow()}
        await self.subscriptions.insert_one(doc)
        self._partners.forget(tenant_id)
        return SubscriptionRow.from_doc(doc)

    async def count_subscriptions(self, tenant_id: str) -> int:
        return await self.subscriptions.count_documents({"tenant_id": tenant_id})

    async def remove_subscription(self, tenant_id: str, subscription_id: str) -> None:
        """Undo a `create_subscription` that went over the tenant's cap (nothing was delivered yet)."""
        await self.subscriptions.delete_one({"_id": subscription_id, "tenant_id": tenant_id})
        self._partners.forget(tenant_id)

    async def list_subscriptions(self, tenant_id: str) -> list[SubscriptionRow]:
        docs = await self.subscriptions.find({"tenant_id": tenant_id}, {"secret": 0}).sort(
            "created_at", ASCENDING).to_list()
        return [SubscriptionRow.from_doc(d) for d in docs]

    async def delete_subscription(self, tenant_id: str, subscription_id: str) -> bool:
        """Delete a subscription and cancel what it still had pending; True if it existed."""
        res = await self.subscriptions.delete_one({"_id": subscription_id, "tenant_id": tenant_id})
        self._partners.forget(tenant_id)
        if res.deleted_count:
            # Rare (an admin's action): the pending deliveries by the schedule's index, the
            # subscription's among them by a filter. The store's planner would scan the collection
            # without the hint; an index of their own would cost every delivery write.
            await self.deliveries.update_many(
                {"subscription_id": subscription_id, "status": "pending"},
                {"$set": {"status": "cancelled", "last_error": "subscription deleted", "finished_at": utcnow()}},
                hint=_SCHEDULE_INDEX)
        return res.deleted_count == 1

    async def subscriptions_for(self, tenant_ids: Iterable[str], topic: str) -> list[Subscription]:
        """Every subscription of these tenants to `topic` (logical name): kept for a few seconds
        (`PartnerSubscriptions`), else in one round trip."""
        return await self._partners.for_tenants(tenant_ids, topic)

    async def _find_subscriptions(self, tenants: list[str], topic: str) -> list[Subscription]:
        if not tenants:
            return []
        docs = await self.subscriptions.find({"tenant_id": {"$in": tenants}, "events": topic},
                                             {"secret": 0}).to_list()
        return [Subscription(d["_id"], d["tenant_id"], d["url"], frozenset(d["events"])) for d in docs]

    async def subscription_secret(self, subscription_id: str) -> str | None:
        doc = await self.subscriptions.find_one({"_id": subscription_id}, {"secret": 1})
        return None if doc is None else str(doc["secret"])

    async def reseal_secrets(self, reseal: Callable[[str, Row], str | None]) -> int:
        """Re-seal every stored signing secret: `reseal(stored, row)` returns the new stored form,
        or None to leave it. Each write is conditional on the value read, so a rotation through the
        API meanwhile wins. Returns how many values were rewritten."""
        n = 0
        async for doc in self.subscriptions.find({}, {"tenant_id": 1, "secret": 1}):
            new = reseal(str(doc["secret"]), subscription_row(doc["tenant_id"], doc["_id"]))
            if new is not None:
                res = await self.subscriptions.update_one({"_id": doc["_id"], "secret": doc["secret"]},
                                                          {"$set": {"secret": new}})
                n += res.modified_count
        async for doc in self.tenants.find({}, {"webhook_secret": 1, "previous_secret": 1}):
            for field in ("webhook_secret", "previous_secret"):
                if not doc.get(field):
                    continue
                new = reseal(str(doc[field]), tenant_row(doc["_id"]))
                if new is not None:
                    res = await self.tenants.update_one({"_id": doc["_id"], field: doc[field]},
                                                        {"$set": {field: new}})
                    n += res.modified_count
        return n

    # ---- per-tenant settings -----------------------------------------------------------------

    async def rotate_webhook_secret(self, tenant_id: str, sealed_secret: str, grace: timedelta) -> datetime | None:
        """Install a new clinician-webhook secret; the previous one keeps signing for `grace`.
        Returns until when it does (None: there was none, or no grace)."""
        now = utcnow()
        old = await self.tenants.find_one_and_update(
            {"_id": tenant_id},
            {"$set": {"webhook_secret": sealed_secret, "rotated_at": now}},
            upsert=True, return_document=ReturnDocument.BEFORE)
        previous = (old or {}).get("webhook_secret")
        update: Document = ({"previous_secret": previous, "previous_until": now + grace} if previous and grace
                            else {"previous_secret": None, "previous_until": None})
        await self.tenants.update_one({"_id": tenant_id}, {"$set": update})
        until: datetime | None = update["previous_until"]
        return until

    async def escalation_seconds(self, tenant_id: str) -> float | None:
        """The tenant's own escalation interval; None: the default."""
        doc = await self.tenants.find_one({"_id": tenant_id}, {"escalation_seconds": 1})
        seconds = (doc or {}).get("escalation_seconds")
        return None if seconds is None else float(seconds)

    async def tenant(self, tenant_id: str) -> Document | None:
        return await self.tenants.find_one({"_id": tenant_id})

    async def has_webhook_secret(self, tenant_id: str) -> bool:
        """Whether the tenant has a clinician-webhook signing secret (a rotation only replaces it)."""
        doc = await self.tenants.find_one({"_id": tenant_id, "webhook_secret": {"$nin": [None, ""]}}, {"_id": 1})
        return doc is not None

    async def set_escalation(self, tenant_id: str, seconds: float | None) -> None:
        await self.tenants.update_one({"_id": tenant_id}, {"$set": {"escalation_seconds": seconds}}, upsert=True)

    async def escalation_overrides(self) -> dict[str, float]:
        docs = await self.tenants.find({"escalation_seconds": {"$ne": None}}, {"escalation_seconds": 1}).to_list()
        return {d["_id"]: float(d["escalation_seconds"]) for d in docs if d.get("escalation_seconds") is not None}

    # ---- alerts ------------------------------------------------------------------------------

    async def record_raises(self, raises: Sequence[tuple[int, Document]]) -> None:
        """Merge raised revisions — (revision, content document with `_id`) — into their alerts.

        Three conditional upserts per revision, in one round trip for the batch:

        - content: `{_id, crev < revision}` sets the content of this revision;
        - lifecycle, not acknowledged: `{_id, lkey < key, acknowledged_at: null}` makes it `open`;
        - lifecycle, acknowledged: `{_id, lkey < key, acknowledged_at != null}` keeps it
          `acknowledged` (a revision keeps the acknowledgement). This one never inserts.

        Each guard only lets a greater key in, so a redelivered or stale revision changes nothing
        (its upsert collides with the existing `_id`: E11000, see `_merge`). Each op initialises
        the other guards on insert, whichever of them (or a status event) creates the document.
        The ops are separate writes, not one transaction: whichever inserts the document makes it
        a whole alert at once (the content upsert inserts it `open` at its revision, with the
        lowest `lkey`), so an API read between them never finds an alert without a status.
        """
        now = utcnow()
        ops: list[UpdateOne] = []
        for revision, content in raises:
            key = lifecycle_order(Lifecycle.RAISED, revision)
            alert_id, typed = content["_id"], _of_type(content.get("alert_type"))
            born = {"created_at": now, "escalated": False}
            fields = {k: v for k, v in content.items() if k not in ("_id", "alert_type")}
            ops.append(UpdateOne({"_id": alert_id, **typed, "crev": _below(revision)},
                                 {"$set": {**fields, "crev": revision, "content_at": now},
                                  # Open already, as the lifecycle upsert after it will make it:
                                  # a reader between the two must see a whole alert.
                                  "$setOnInsert": {**born, **_typed_insert(content), "lkey": "",
                                                   "acknowledged_at": None, "status": AlertState.OPEN,
                                                   "lifecycle": Lifecycle.RAISED, "revision": revision}},
                                 upsert=True))
            lifecycle = {"lkey": key, "lifecycle": Lifecycle.RAISED, "revision": revision, "lifecycle_at": now}
            ops.append(UpdateOne({"_id": alert_id, **typed, "lkey": _below(key), "acknowledged_at": None},
                                 {"$set": {**lifecycle, "status": AlertState.OPEN},
                                  "$setOnInsert": {**born, **_typed_insert(content), "crev": 0}}, upsert=True))
            ops.append(UpdateOne({"_id": alert_id, **typed, "lkey": _below(key), "acknowledged_at": {"$ne": None}},
                                 {"$set": {**lifecycle, "status": AlertState.ACKNOWLEDGED}}))
        await self._merge(ops)

    async def record_statuses(self, statuses: Sequence[tuple[str, int, Document]]) -> None:
        """Merge lifecycle statuses — (status, revision it ends, identity document with `_id`:
        tenant, site, clinician, client, ...) — into their alerts, in one round trip.

        `{_id, type, lkey < key}` upserted: a status may arrive before the raise it ends, and then
        creates the alert from its identity fields (the raise fills the content in later, and
        finds it already ended). The status wins over an acknowledgement.
        """
        now = utcnow()
        ops: list[UpdateOne] = []
        for status, revision, identity in statuses:
            key = lifecycle_order(status, revision)
            fields = {k: v for k, v in identity.items() if k not in ("_id", "alert_type")}
            ops.append(UpdateOne({"_id": identity["_id"], **_of_type(identity.get("alert_type")), "lkey": _below(key)},
                                 {"$set": {"lkey": key, "lifecycle": status, "revision": revision, "status": status,
                                           "lifecycle_at": now},
                                  "$setOnInsert": {**fields, **_typed_insert(identity), "crev": 0, "created_at": now,
                                                   "escalated": False, "acknowledged_at": None}}, upsert=True))
        await self._merge(ops)

    async def _merge(self, ops: Sequence[UpdateOne]) -> None:
        """Run guarded upserts; a duplicate key means "the document already holds something at
        least as new": nothing to do. The deterioration and the alert-status consumers run
        independently, so two upserts may race to insert one alert: `guarded_upserts` runs the
        loser once more (documents here are never deleted and guards only grow)."""
        await guarded_upserts(self.alerts, ops)

    async def routed_revisions(self, alert_ids: Iterable[str]) -> dict[str, int]:
        """{alert id: the revision whose routing is recorded} (`rrev`; 0 for none), in one round trip:
        whether a routing the handlers are about to record is news (counted once)."""
        wanted = sorted(set(alert_ids))
        if not wanted:
            return {}
        docs = await self.alerts.find({"_id": {"$in": wanted}}, {"rrev": 1}).to_list()
        return {d["_id"]: int(d.get("rrev") or 0) for d in docs}

    async def record_routing(self, routings: Sequence[tuple[str, int, Routing]]) -> None:
        """Record who (alert id, revision) reached, in one round trip: `{_id, rrev < revision}`, so
        the highest revision's routing stays and a redelivered one changes nothing. The alert exists
        (its raise was merged first), so nothing is upserted."""
        if routings:
            await self.alerts.bulk_write([
                UpdateOne({"_id": alert_id, "rrev": _below(revision)},
                          {"$set": {"rrev": revision, "routing": r.to, "routing_reason": r.reason,
                                    "routing_fallbacks": list(r.fallback_ids)}})
                for alert_id, revision, r in routings], ordered=False)

    async def stranded_alerts(self, tenant_id: str, clinician_ids: Sequence[str]) -> list[Document]:
        """The open alerts of one clinician (under their id or an alias) whose routed revision did not
        reach them (routing `fallback` or `none`), with content, in one read (the (tenant, clinician,
        status) index). Their site is the rule's to judge (`rules.plan_reroute`), not this query's."""
        return await self.alerts.find({"tenant_id": tenant_id, "clinician_id": {"$in": list(clinician_ids)},
                                       "status": AlertState.OPEN, "routing": {"$in": ["fallback", "none"]},
                                       "crev": {"$gte": 1}}).to_list()

    async def record_rerouted(self, reroutes: Sequence[tuple[str, int, UnroutedReason]]) -> set[str]:
        """Record (alert id, revision) as reaching its clinician after all (routing `clinician`,
        `rerouted_at`, `rerouted_from`: the reason it had not), on an alert whose routed revision is
        still that one, still open and still stranded. Returns the alert ids it changed: news,
        counted once whoever else rerouted the same alert at the same moment."""
        changed: set[str] = set()
        now = utcnow()
        for alert_id, revision, reason in reroutes:  # a directory fix's few alerts: no batching
            res = await self.alerts.update_one(
                {"_id": alert_id, "rrev": revision, "status": AlertState.OPEN,
                 "routing": {"$in": ["fallback", "none"]}},
                {"$set": {"routing": "clinician", "routing_reason": None, "rerouted_at": now,
                          "rerouted_from": reason}})
            if res.modified_count:
                changed.add(alert_id)
        return changed

    async def lifecycle_orders(self, alert_ids: Iterable[str]) -> dict[str, str]:
        """{alert id: stored `lkey`} for many alerts in one round trip (after a merge: which events
        of the batch are the alert's current state, and so worth telling anyone)."""
        wanted = sorted(set(alert_ids))
        if not wanted:
            return {}
        docs = await self.alerts.find({"_id": {"$in": wanted}}, {"lkey": 1}).to_list()
        return {d["_id"]: str(d.get("lkey", "")) for d in docs}

    async def get_alert(self, tenant_id: str, alert_id: str) -> Alert | None:
        doc = await self.alerts.find_one({"_id": alert_id, "tenant_id": tenant_id}, {"event": 0})
        return None if doc is None else Alert.from_doc(doc)

    async def list_alerts(self, tenant_id: str, site_id: str | None, clinician_id: str | None,
                          status: AlertState | None, limit: int, alert_type: AlertType | None = None,
                          routing: RoutedTo | None = None) -> list[Alert]:
        """Alerts newest first, of both types unless `alert_type` says which (and of one `routing`)."""
        query = {"tenant_id": tenant_id,
                 **given(site_id=site_id, clinician_id=clinician_id, status=status, routing=routing),
                 **(_of_type(alert_type) if alert_type is not None else {})}
        docs = await self.alerts.find(query, {"event": 0}).sort("created_at", DESCENDING).limit(limit).to_list()
        return [Alert.from_doc(d) for d in docs]

    async def acknowledge(self, tenant_id: str, alert_id: str, by: str) -> Alert | None:
        """Mark an open alert acknowledged; None if unknown. An acknowledged one stays as it was,
        and so does a superseded or withdrawn one (nothing is left to acknowledge)."""
        await self.alerts.update_one({"_id": alert_id, "tenant_id": tenant_id, "status": AlertState.OPEN},
                                     {"$set": {"status": AlertState.ACKNOWLEDGED, "acknowledged_at": utcnow(),
                                               "acknowledged_by": by}})
        return await self.get_alert(tenant_id, alert_id)

    async def due_escalations(self, before: Sequence[tuple[str | None, datetime]], limit: int) -> list[Document]:
        """Open, never-escalated alerts created before their tenant's threshold (with content:
        `crev` >= 1, so there is a body to send)."""
        overridden = [t for t, _ in before if t is not None]
        clauses: list[Document] = []
        for tenant, cutoff in before:
            tenant_clause: Document = ({"tenant_id": tenant} if tenant is not None
                                       else {"tenant_id": {"$nin": overridden}})
            clauses.append({**tenant_clause, "created_at": {"$lte": cutoff}})
        return await self.alerts.find({"status": AlertState.OPEN, "escalated": False, "crev": {"$gte": 1},
                                       "$or": clauses}).sort(
            "created_at", ASCENDING).limit(limit).to_list()

    async def mark_escalated(self, outcomes: Sequence[tuple[str, str | None]]) -> None:
        """(alert id, supervisor id or None) -> escalated once, in one round trip (whatever its
        lifecycle did meanwhile: the flag only means "looked at by escalation")."""
        if not outcomes:
            return
        now = utcnow()
        await self.alerts.bulk_write([
            UpdateOne({"_id": a, "escalated": False},
                      {"$set": {"escalated": True, "escalated_at": now, "escalated_to": sup}})
            for a, sup in outcomes], ordered=False)

    # ---- deliveries (the durable schedule) ---------------------------------------------------

    async def insert_deliveries(self, docs: Sequence[Document]) -> int:
        """Insert new deliveries in one round trip; existing ids are left as they are. Returns # new."""
        return len(await self.insert_new_deliveries(docs))

    async def insert_new_deliveries(self, docs: Sequence[Document]) -> list[Document]:
        """`insert_deliveries`, returning the documents it inserted (an existing id is left as it
        is, and its document here is not among them): one round trip."""
        unique = list({d["_id"]: d for d in docs}.values())
        if not unique:
            return []
        refused = set((await bulk_write(self.deliveries, [InsertOne(d) for d in unique])).duplicates)
        return [d for i, d in enumerate(unique) if i not in refused]

    @staticmethod
    def _due(now: datetime) -> Document:
        return {"status": "pending", "next_attempt_at": {"$lte": now}, "claimed_until": {"$lte": now}}

    async def due_candidates(self, now: datetime, limit: int, exclude_tenants: Sequence[str] = ()
                             ) -> list[tuple[str, str]]:
        """Up to `limit` (delivery id, tenant) that are due and not leased, oldest due first,
        leaving out the tenants in `exclude_tenants` (those already at their share)."""
        query = self._due(now)
        if exclude_tenants:
            query["tenant_id"] = {"$nin": list(exclude_tenants)}
        rows = await self.deliveries.find(query, {"_id": 1, "tenant_id": 1}).sort(
            "next_attempt_at", ASCENDING).limit(limit).to_list()
        return [(str(r["_id"]), str(r.get("tenant_id"))) for r in rows]

    async def due_documents(self, now: datetime, limit: int, exclude_tenants: Sequence[str] = ()
                            ) -> list[Document]:
        """`due_candidates` as whole documents (without a claim token): what `claim` hands out when
        it gets every one of them, so the worker's claim needs no read after its update."""
        query = self._due(now)
        if exclude_tenants:
            query["tenant_id"] = {"$nin": list(exclude_tenants)}
        return await self.deliveries.find(query, {"claim": 0}).sort("next_attempt_at", ASCENDING).limit(
            limit).to_list()

    async def claim(self, now: datetime, ids: Sequence[str], lease: timedelta, owner: str = "",
                    read: Mapping[str, Document] | None = None) -> list[Document]:
        """Lease these deliveries to this caller if they are still due and not leased (1 or 2 round trips).

        One `update_many` whose filter repeats the "due and not leased" condition: the update of
        each document is atomic, so when two workers race for one delivery exactly one update
        matches it. The claim token tells which documents this caller got.

        `read`: the deliveries as `due_documents` read them at `now`. When the update changed every
        one of `ids` and none was read under an ended lease (`claimed_until` past, not `EPOCH`), this
        caller got them all, still as read (only a claim holder changes a pending delivery, and none
        held these), so they are returned without reading them again; otherwise (another worker got
        some, or the holder of an ended lease may have recorded its attempt since the read: a retry
        is recorded by the claim token, whatever the lease) which ones this caller got is read by the token.
        """
        if not ids:
            return []
        due = self._due(now)
        token = uuid.uuid4().hex
        lease_fields = {"claimed_until": now + lease, "claim": token, "claimed_by": owner}
        res = await self.deliveries.update_many({**due, "_id": {"$in": list(ids)}}, {"$set": lease_fields})
        if read is not None and res.modified_count == len(set(ids)) and all(
                i in read and read[i].get("claimed_until") == EPOCH for i in ids):
            return [{**read[i], **lease_fields} for i in ids]
        # By `_id` (the claim token has no index): which of them this caller got.
        return await self.deliveries.find({"_id": {"$in": list(ids)}, "claim": token, "status": "pending"}).to_list()

    async def claim_due(self, now: datetime, limit: int, lease: timedelta, owner: str = "") -> list[Document]:
        """Lease up to `limit` due deliveries, oldest due first, whatever their tenant (the
        worker shares its slots with `due_candidates` + `rules.fair_pick` + `claim` instead)."""
        return await self.claim(now, [i for i, _ in await self.due_candidates(now, limit)], lease, owner)

    async def record(self, results: Sequence[AttemptResult]) -> datetime | None:
        """Write attempt outcomes in one round trip.

        Success is recorded whoever holds the lease (it is true regardless); a retry or failure
        only by the holder of the claim, so a worker whose lease ran out cannot overwrite a newer
        attempt's state.

        An outcome that owes a status (`AttemptResult.tells_status`, delivered or failed) owes it by
        an entry in `delivery_outbox` (`finished_at` = the outcome's), written BEFORE the outcome:
        the entries, then the outcomes, as ONE ordered cross-collection command (`ClientBulk`), or
        as two writes in that order when the store has no such command or the command stopped (a
        concurrent upsert of the same entry: E11000), repeating nothing that matters (an entry's
        upsert sets the same time; an outcome already written no longer matches). So no outcome is
        ever stored without its entry; an entry may be stored without its outcome (a crash between
        the two writes, an update that did not match: another worker recorded it, the lease ran
        out), which the status teller's sweep drops once it is older than `status_sweep_seconds`
        (`owed_statuses`): the delivery's next recorded outcome writes its entry again.

        Returns the time written as `finished_at` / `delivered_at` when every outcome was written
        (then each document holds exactly what the caller knows of it plus this write), None when
        some were not (recorded by another worker first): the caller must read what is stored.
        """
        if not results:
            return None
        now = utcnow()
        owed = [r.delivery_id for r in results if r.tells_status and r.outcome in ("delivered", "failed")]
        if owed:
            together = await self._client_bulk.ordered(
                [*(_entry_op(i, now, namespace_of(self.outbox)) for i in owed),
                 *(_outcome_op(r, now, namespace_of(self.deliveries)) for r in results)])
            if together is not None:
                # Each entry matched or upserted (one each); every outcome matched when the rest add up.
                return now if together.matched_count + together.upserted_count == len(owed) + len(results) else None
            await self.outbox.bulk_write([_entry_op(i, now) for i in owed], ordered=False)
        ops = [_outcome_op(r, now) for r in results]
        res = await self.deliveries.bulk_write(ops, ordered=False)
        return now if res.matched_count == len(ops) else None

    # ---- the statuses owed for clinicians' deliveries (the outbox, see statuses.py) ----------

    async def owed_statuses(self, delivery_ids: Sequence[str] = (), finished_before: datetime | None = None,
                            limit: int = 500) -> list[Document]:
        """Deliveries whose `delivered` / `failed` is still to be published (an entry in
        `delivery_outbox`; each with the entry's `finished_at` as `OWED_AT`): of `delivery_ids`, or
        (the sweep) any whose entry is older than `finished_before`, at most `limit` entries read
        (in no particular order: the entries have no other index, and every one read is settled).

        The entries are read before their deliveries, so a delivery re-queued and finished again
        after the read has a newer entry than the `OWED_AT` told, and keeps its debt. The sweep
        drops the entries it read whose delivery owes nothing (not finished, or gone): left by a
        crash between an entry and its outcome or by an outcome that did not match (see
        `record`). The delete is conditional on the entry as read, which is older than
        `finished_before`: an entry written since (the delivery recorded again) is newer and stays.
        """
        query: Document = {}
        if delivery_ids:
            query["_id"] = {"$in": list(delivery_ids)}
        if finished_before is not None:
            query["finished_at"] = {"$lt": finished_before}
        entries = {e["_id"]: e["finished_at"] for e in await self.outbox.find(query).limit(limit).to_list()}
        if not entries:
            return []
        docs = await self.deliveries.find({"_id": {"$in": list(entries)}, "status": {"$in": ["delivered", "failed"]}},
                                          {"claim": 0}).to_list()
        if finished_before is not None and (stale := entries.keys() - {d["_id"] for d in docs}):
            await self.outbox.bulk_write([DeleteOne({"_id": i, "finished_at": entries[i]}) for i in sorted(stale)],
                                         ordered=False)
        return [{**d, OWED_AT: entries[d["_id"]]} for d in sorted(docs, key=lambda d: entries[d["_id"]])]

    async def clinician_deliveries(self, alert_ids: Iterable[str]) -> list[Document]:
        """The clinicians' deliveries of these alerts recorded `delivered` (which of them was the
        first of its revision: `rules.first_deliveries`), in one round trip."""
        wanted = sorted(set(alert_ids))
        if not wanted:
            return []
        docs = await self.deliveries.find({"alert_id": {"$in": wanted}, "kind": "alert", "status": "delivered"},
                                          {"_id": 1, "kind": 1, "recipient": 1, "subject_id": 1,
                                           "delivered_at": 1}).to_list()
        return [d for d in docs if tells_status(d.get("kind"), d.get("recipient"))]

    async def person_deliveries(self, revisions: Iterable[tuple[str, str]]) -> list[Document]:
        """Every delivery to a person (`rules.to_person`) of these raised revisions ((alert id,
        `subject_id`)), whatever its status, in one round trip (by the alert id's index): whether a
        revision reached nobody."""
        wanted = set(revisions)
        if not wanted:
            return []
        docs = await self.deliveries.find({"alert_id": {"$in": sorted({a for a, _ in wanted})},
                                           "subject_id": {"$in": sorted({s for _, s in wanted})}, "kind": "alert"},
                                          {"_id": 1, "kind": 1, "recipient": 1, "subject_id": 1, "status": 1,
                                           "finished_at": 1, "routed_reason": 1}).to_list()
        return [d for d in docs if to_person(d.get("kind"), d.get("recipient"))]

    async def record_unreached(self, revisions: Sequence[tuple[str, int]]) -> set[str]:
        """Record that these (alert id, revision) reached nobody after all (routing `none`, reason
        `undelivered`; the fallbacks it was sent to stay listed), in one round trip, on an alert whose
        routed revision is still that one and not already recorded so. Returns the alert ids it
        changed: news, counted once."""
        changed: set[str] = set()
        for alert_id, revision in revisions:  # rare (every attempt of every channel failed): no batching
            res = await self.alerts.update_one(
                {"_id": alert_id, "rrev": revision, "routing_reason": {"$ne": "undelivered"}},
                {"$set": {"routing": "none", "routing_reason": "undelivered"}})
            if res.modified_count:
                changed.add(alert_id)
        return changed

    async def record_fell_back(self, revisions: Sequence[tuple[str, int, UnroutedReason]]) -> set[str]:
        """Record that these (alert id, revision, reason), rerouted to their clinician, reached only
        the site's fallback after all (routing `fallback` again, with the reason it had gone there;
        `rerouted_at` and `rerouted_from` stay), on an alert whose routed revision is still that one
        and still recorded `clinician`. Returns the alert ids it changed."""
        changed: set[str] = set()
        for alert_id, revision, reason in revisions:  # rare (a reroute whose every attempt failed): no batching
            res = await self.alerts.update_one({"_id": alert_id, "rrev": revision, "routing": "clinician"},
                                               {"$set": {"routing": "fallback", "routing_reason": reason}})
            if res.modified_count:
                changed.add(alert_id)
        return changed

    async def clinician_tries(self, alert_ids: Iterable[str], recipient: str) -> dict[str, tuple[str, str]]:
        """{delivery id: (status, target)} of `recipient`'s deliveries of these alerts' raised
        revisions, in one round trip (by the alert id's index)."""
        wanted = sorted(set(alert_ids))
        if not wanted:
            return {}
        docs = await self.deliveries.find({"alert_id": {"$in": wanted}, "kind": "alert", "recipient": recipient},
                                          {"_id": 1, "status": 1, "target": 1}).to_list()
        return {str(d["_id"]): (str(d["status"]), str(d["target"])) for d in docs}

    async def retarget_failed(self, retargets: Sequence[tuple[str, str]]) -> None:
        """Put failed deliveries — (delivery id, new target) — back on the schedule at the new
        target with a fresh attempt budget (as `requeue_failed`); one that is no longer failed is left."""
        now = utcnow()
        for delivery_id, target in retargets:
            await self.deliveries.update_one({"_id": delivery_id, "status": "failed"},
                                             {"$set": {**_requeued(now), "target": target}})

    async def reschedule_cancelled(self, delivery_ids: Sequence[str]) -> int:
        """Put deliveries a reroute cancelled (`cancel_fallback_deliveries`) back on the schedule with
        a fresh attempt budget (as `requeue_failed`); one no longer cancelled is left, so a second
        call (a crash, another process, a late sweep) schedules nothing twice. Returns how many."""
        if not delivery_ids:
            return 0
        res = await self.deliveries.update_many({"_id": {"$in": sorted(set(delivery_ids))}, "status": "cancelled"},
                                                {"$set": _requeued(utcnow())})
        return res.modified_count

    async def cancel_fallback_deliveries(self, revisions: Sequence[tuple[str, str]]) -> None:
        """Cancel the fallbacks' deliveries of these raised revisions ((alert id, `subject_id`)) that
        are still pending and not being attempted: the clinician has it now (should every delivery
        to them use up its attempts, the status teller schedules these again: `reschedule_cancelled`)."""
        if not revisions:
            return
        now = utcnow()
        await self.deliveries.update_many(
            {"alert_id": {"$in": sorted({a for a, _ in revisions})},
             "subject_id": {"$in": sorted({s for _, s in revisions})}, "kind": "alert",
             "recipient": {"$regex": "^fallback:"}, "status": "pending", "claimed_until": {"$lte": now}},
            {"$set": {"status": "cancelled", "last_error": "rerouted to the alert's clinician", "finished_at": now}})

    async def statuses_told(self, told: Sequence[tuple[str, datetime | None]]) -> None:
        """Delete the outbox entries of (delivery id, `OWED_AT` told) in one round trip; conditional
        on that time, so a delivery re-queued and finished again since keeps its new debt."""
        if told:
            await self.outbox.bulk_write([DeleteOne({"_id": i, "finished_at": at}) for i, at in told], ordered=False)

    async def list_deliveries(self, tenant_id: str, site_id: str | None, status: str | None,
                              alert_id: str | None, limit: int) -> list[Delivery]:
        query = {"tenant_id": tenant_id, **given(site_id=site_id, status=status, alert_id=alert_id)}
        return await self._newest_deliveries(query, limit)

    async def operator_deliveries(self, tenant_id: str | None, status: str, outcome: str | None,
                                  limit: int) -> list[Delivery]:
        """Deliveries for an operator (the CLI): of one tenant or of every tenant, by status and
        last outcome, newest first."""
        return await self._newest_deliveries({"status": status, **given(tenant_id=tenant_id, last_outcome=outcome)},
                                             limit)

    async def _newest_deliveries(self, query: Document, limit: int) -> list[Delivery]:
        docs = await self.deliveries.find(query, {"body": 0, "claim": 0}).sort("created_at", DESCENDING).limit(
            limit).to_list()
        return [Delivery.from_doc(d) for d in docs]

    async def get_delivery(self, tenant_id: str, delivery_id: str) -> Delivery | None:
        doc = await self.deliveries.find_one({"_id": delivery_id, "tenant_id": tenant_id}, {"body": 0, "claim": 0})
        return None if doc is None else Delivery.from_doc(doc)

    async def count_pending(self) -> tuple[int, int]:
        """(pending deliveries, of which waiting for a retry)."""
        pending = await self.deliveries.count_documents({"status": "pending"})
        retrying = await self.deliveries.count_documents({"status": "pending", "attempts": {"$gt": 0}})
        return pending, retrying

    async def requeue_failed(self, tenant_id: str | None, delivery_ids: Sequence[str] | None = None) -> int:
        """Put failed deliveries back on the schedule (operator action), with a fresh attempt budget."""
        query: Document = {"status": "failed"}
        if tenant_id is not None:
            query["tenant_id"] = tenant_id
        if delivery_ids:
            query["_id"] = {"$in": list(delivery_ids)}
        res = await self.deliveries.update_many(query, {"$set": _requeued(utcnow())})
        return res.modified_count
