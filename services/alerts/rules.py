"""Pure rules of the alerts service: who gets what, when to retry, what an email says.

No I/O here: the handlers and the worker feed these functions with documents they loaded and
write back what these functions decide.

Alerts that reach no clinician (`routing`, `route_alert`): a raised revision whose clinician has
no directory entry of the alert's tenant (an unregistered clinician, an id the EHR spelled
differently and not made an alias of their entry: `Clinician.alias`), whose entry is of another
site, or whose entry has no usable channel (no webhook, and no email or SMTP off) goes to the
directory entries of the alert's tenant AND site marked `fallback` (a site's duty clinician or
clinical lead) instead, each delivery saying why (`reason`: `no_directory_entry`, `other_site`,
`no_channel`). When the site has no reachable
fallback either, the revision reaches nobody: the handlers record `routing: none` and tell
`failed` on the alert's status topic (`unrouted_status`). A fallback is never another site's
entry: site ownership holds for fallbacks exactly as for clinicians. Once a directory change makes
the clinician reachable, an alert of theirs still open whose routed revision reached only fallbacks
or nobody is sent to them after all (`plan_reroute`, "rerouting" below); should that not get through
either, who it reached in the end is settled by its deliveries (`revision_reached`), the fallbacks'
deliveries the reroute cancelled going out again.
"""

from __future__ import annotations

import ipaddress
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from urllib.parse import urlencode, urlsplit

from shared import ids
from shared.events import (
    LIFECYCLE_STATUSES,
    AlertState,
    AlertStatus,
    AlertStatusChanged,
    AllianceDeterioration,
    Lifecycle,
    OutcomeAlert,
    OutcomeAlertStatusChanged,
)
from shared.topics import (
    ALERT_STATUS,
    DETERIORATION,
    ORS_SCORED,
    OUTCOME_ALERT,
    OUTCOME_ALERT_STATUS,
    SCORED,
    Topics,
)

Channel = Literal["webhook", "email"]
# Why an alert reached no clinician (docs/partners.md, "Alerts that reach no clinician").
# Why a revision did not reach its clinician: the first three are known when it is routed (it goes
# to the site's fallbacks, or to nobody); `undelivered`, when every delivery to a person it was
# routed to (clinician or fallbacks) used up its attempts (`revision_reached`): it reached nobody.
UnroutedReason = Literal["no_directory_entry", "other_site", "no_channel", "undelivered"]
UNROUTED_REASONS: tuple[UnroutedReason, ...] = ("no_directory_entry", "other_site", "no_channel", "undelivered")
# Who a raised revision reached: its clinician, the site's fallback entries, or no person at all.
RoutedTo = Literal["clinician", "fallback", "none"]
# alert: a raised revision; escalation: its supervisor's copy; withdrawal: the clinician told that
# an alert they may have been sent is withdrawn; event: a topic event forwarded to a partner.
Kind = Literal["alert", "event", "escalation", "withdrawal"]
WEBHOOK: Channel = "webhook"
EMAIL: Channel = "email"

# Topics a partner may subscribe to (logical names, as in the contract).
SUBSCRIBABLE: tuple[str, ...] = (DETERIORATION, SCORED, ALERT_STATUS, ORS_SCORED, OUTCOME_ALERT, OUTCOME_ALERT_STATUS)

# ---- alert types: alliance (the SRS) and outcome (the ORS, docs/outcome.md) --------------------
#
# Both go through one lifecycle, one store and one set of deliveries; what differs is the topic
# pair each is told on (raises, statuses), so that an SRS partner never notices the ORS: nothing
# about an outcome alert is ever published on, or sent as, an alliance topic. The two never end
# each other: an alert's lifecycle is moved only by the statuses of its own type's topic (scoring
# supersedes an alert by a later session *of the same instrument*, and an outcome alert's id is
# derived from the outcome instrument), so a clinician has at most one open alert per client and
# episode per type - an alliance alert and an outcome alert of the same session stand side by side.

AlertType = Literal["alliance", "outcome"]
ALLIANCE: AlertType = "alliance"
OUTCOME: AlertType = "outcome"
ALERT_TYPES: tuple[AlertType, ...] = (ALLIANCE, OUTCOME)
# A raised revision of either type (both carry alert_id, revision, tenant, site, clinician, client).
RaisedAlert = AllianceDeterioration | OutcomeAlert


@dataclass(frozen=True)
class AlertKind:
    """What one alert type is told on, and how its emails name it."""

    alert_type: AlertType
    raised: str  # logical topic of its raised and revised revisions (and their webhooks)
    status: str  # logical topic of its status events (and their webhooks)
    noun: str  # "alliance alert" / "outcome alert", in emails

    def status_topic(self, topics: Topics) -> str:
        """The concrete topic this type's status events are published on."""
        return topics.outcome_alert_status if self.alert_type == OUTCOME else topics.alert_status

    def status_model(self) -> type[AlertStatusChanged]:
        """The event class of this type's status events (an outcome alert names an outcome instrument)."""
        return OutcomeAlertStatusChanged if self.alert_type == OUTCOME else AlertStatusChanged

    def raised_model(self) -> type[RaisedAlert]:
        """The event class of this type's raised revisions (the body of its alert webhooks)."""
        return OutcomeAlert if self.alert_type == OUTCOME else AllianceDeterioration


ALLIANCE_KIND = AlertKind(ALLIANCE, DETERIORATION, ALERT_STATUS, "alliance alert")
OUTCOME_KIND = AlertKind(OUTCOME, OUTCOME_ALERT, OUTCOME_ALERT_STATUS, "outcome alert")


def kind_of(alert_type: str | None) -> AlertKind:
    """The kind of a stored alert: one stored before alerts had types (no `alert_type`) is an alliance alert."""
    return OUTCOME_KIND if alert_type == OUTCOME else ALLIANCE_KIND


def alert_kind(alert: RaisedAlert) -> AlertKind:
    """The kind of a raised revision, by its event class."""
    return OUTCOME_KIND if isinstance(alert, OutcomeAlert) else ALLIANCE_KIND


def kind_of_topic(topic: str) -> AlertKind:
    """The kind whose raises or statuses travel on `topic` (logical name); alliance for any other."""
    return OUTCOME_KIND if topic in (OUTCOME_ALERT, OUTCOME_ALERT_STATUS) else ALLIANCE_KIND

# ---- the alert lifecycle (docs/clinical-records.md, "The alert lifecycle") ----------------------
#
# Scoring decides an alert's lifecycle and tells it in events that may arrive in any order, on two
# topics. Every event names the revision it is about; ordering them by (revision, rank) with
# raised < superseded < withdrawn and keeping the greatest gives the same final state whatever the
# arrival order, so no consumer ever has to wait for "the previous" event.

# `Lifecycle` is declared in rank order; `open` is what the API calls a raised alert.
_RANK: dict[str, int] = {**{status: rank for rank, status in enumerate(Lifecycle)}, AlertState.OPEN: 0}
_BY_RANK: tuple[AlertState, ...] = (AlertState.OPEN, AlertState.SUPERSEDED, AlertState.WITHDRAWN)
_MAX_REVISION = 10**8 - 1  # lifecycle_order() spends 8 digits on it


def lifecycle_key(status: str, revision: int) -> tuple[int, int]:
    """Where an event stands in its alert's lifecycle: (revision, rank), compared as a tuple.

    `status` is `raised` (or `open`) for an AllianceDeterioration, else the lifecycle status of an
    AlertStatusChanged (`superseded`, `withdrawn`); anything else is not part of the lifecycle.
    """
    if status not in _RANK:
        raise ValueError(f"{status!r} is not a lifecycle status")
    if not 1 <= revision <= _MAX_REVISION:
        raise ValueError(f"revision {revision} is out of range")
    return (revision, _RANK[status])


def lifecycle_order(status: str, revision: int) -> str:
    """`lifecycle_key` as a string that sorts the same way, so the store can compare it in a filter."""
    revision, rank = lifecycle_key(status, revision)
    return f"{revision:08d}{rank}"


def lifecycle_status(order: str) -> AlertState:
    """The status a stored `lifecycle_order` string stands for."""
    return _BY_RANK[int(order[-1])]


def event_lifecycle_key(event: RaisedAlert | AlertStatusChanged) -> tuple[int, int] | None:
    """The lifecycle key of an event, or None for an event that does not move the lifecycle (what
    alerts itself reports: acknowledged, escalated, ...; or a lifecycle status naming no revision,
    which the contract does not allow and the consumer dead-letters)."""
    if isinstance(event, AllianceDeterioration | OutcomeAlert):
        return lifecycle_key(Lifecycle.RAISED, event.revision)
    if event.status in LIFECYCLE_STATUSES and event.revision is not None:
        return lifecycle_key(event.status, event.revision)
    return None


def merge_lifecycle(events: Iterable[RaisedAlert | AlertStatusChanged]) -> dict[str, str]:
    """{alert id: final lifecycle status (`open`, `superseded`, `withdrawn`)} after all `events`,
    in any order. Acknowledgement is not part of it (see `api_status`). The alerts store applies
    the same rule one conditional update at a time."""
    best: dict[str, tuple[int, int]] = {}
    for event in events:
        key = event_lifecycle_key(event)
        if key is not None and key > best.get(event.alert_id, (0, -1)):
            best[event.alert_id] = key
    return {alert: _BY_RANK[key[1]] for alert, key in best.items()}


def api_status(lifecycle: str, acknowledged: bool) -> AlertState:
    """What the API shows: an ended alert (superseded, withdrawn) says so, whether or not it was
    acknowledged; a raised one is acknowledged once a clinician acknowledged any of its revisions."""
    if lifecycle == Lifecycle.SUPERSEDED:
        return AlertState.SUPERSEDED
    if lifecycle == Lifecycle.WITHDRAWN:
        return AlertState.WITHDRAWN
    return AlertState.ACKNOWLEDGED if acknowledged else AlertState.OPEN


@dataclass(frozen=True)
class Clinician:
    """A directory entry: where one clinician of one tenant is notified."""

    tenant_id: str
    clinician_id: str
    site_id: str
    email: str | None = None
    webhook_url: str | None = None
    supervisor_id: str | None = None
    # Receives the alerts of its site that reach no clinician (see the module docstring).
    fallback: bool = False
    # The other id this entry was looked up under: an alias of it (the id an EHR spells differently;
    # `AlertsStore.put_alias`), so an alert naming that id is this clinician's.
    alias: str | None = None


@dataclass(frozen=True)
class Subscription:
    """A partner's webhook for some topics of one tenant."""

    id: str
    tenant_id: str
    url: str
    events: frozenset[str]


@dataclass(frozen=True)
class PlannedDelivery:
    """One notification to make: (subject, recipient, channel) is unique and names it for ever."""

    delivery_id: str
    kind: Kind
    tenant_id: str
    site_id: str
    subject_id: str  # the alert id, or the event id of a forwarded event
    alert_id: str | None
    topic: str  # logical topic name of the body, e.g. alliance.deterioration.v1
    recipient: str  # "clinician:<id>", "supervisor:<id>", "subscription:<id>"
    channel: Channel
    target: str  # URL or email address
    subscription_id: str | None = None
    # Set on a delivery to a site's fallback entry: why the alert's clinician was not reached.
    routed_reason: UnroutedReason | None = None


def recipient(role: str, ident: str) -> str:
    """The recipient part of a delivery's identity."""
    return f"{role}:{ident}"


def _plan(kind: Kind, tenant_id: str, site_id: str, subject_id: str, alert_id: str | None, topic: str,
          who: str, channel: Channel, target: str, subscription_id: str | None = None,
          routed_reason: UnroutedReason | None = None) -> PlannedDelivery:
    return PlannedDelivery(ids.delivery_id(subject_id, who, channel), kind, tenant_id, site_id, subject_id,
                           alert_id, topic, who, channel, target, subscription_id, routed_reason)


def partner_deliveries(kind: Kind, tenant_id: str, site_id: str, subject_id: str, alert_id: str | None,
                       topic: str, subscriptions: Iterable[Subscription]) -> list[PlannedDelivery]:
    """One webhook per subscription of THIS tenant that asked for `topic` (never another tenant's)."""
    out = []
    for sub in sorted(subscriptions, key=lambda s: s.id):
        if sub.tenant_id == tenant_id and topic in sub.events:
            out.append(_plan(kind, tenant_id, site_id, subject_id, alert_id, topic,
                             recipient("subscription", sub.id), WEBHOOK, sub.url, sub.id))
    return out


def reaches(person: Clinician | None, tenant_id: str, site_id: str) -> bool:
    """Site ownership: a person hears of an alert only through a directory entry of the alert's
    tenant AND site. A clinician id is only unique within a site's records, so an entry of the
    same id at another site is somebody else (or a stale entry) and gets nothing."""
    return person is not None and person.tenant_id == tenant_id and person.site_id == site_id


def person_deliveries(kind: Kind, role: str, person: Clinician | None, email_enabled: bool, *, tenant_id: str,
                      site_id: str, subject_id: str, alert_id: str, topic: str,
                      routed_reason: UnroutedReason | None = None) -> list[PlannedDelivery]:
    """A person's webhook (if they have one) and email (if they have one and SMTP is configured),
    provided the person belongs to the subject's tenant and site."""
    if person is None or not reaches(person, tenant_id, site_id):
        return []
    who = recipient(role, person.clinician_id)
    out = []
    if person.webhook_url:
        out.append(_plan(kind, tenant_id, site_id, subject_id, alert_id, topic, who, WEBHOOK, person.webhook_url,
                         routed_reason=routed_reason))
    if email_enabled and person.email:
        out.append(_plan(kind, tenant_id, site_id, subject_id, alert_id, topic, who, EMAIL, person.email,
                         routed_reason=routed_reason))
    return out


# ---- alerts that reach no clinician: the site's fallback ------------------------------------


@dataclass(frozen=True)
class Routing:
    """Who one raised revision (or a withdrawal) reaches: `to` its clinician, the site's
    `fallback` entries (`fallback_ids`), or `none`; `reason` says why not the clinician (None
    exactly when `to` is `clinician`)."""

    to: RoutedTo
    reason: UnroutedReason | None = None
    fallback_ids: tuple[str, ...] = ()


def unrouted_reason(clinician: Clinician | None, tenant_id: str, site_id: str, clinician_id: str,
                    email_enabled: bool) -> UnroutedReason | None:
    """Why the alert's clinician cannot be reached, or None when they can: no entry of this tenant
    under this id or an alias of it (`no_directory_entry`), an entry of another site (`other_site`:
    somebody else, or a stale entry), or an entry with no usable channel (`no_channel`: no webhook,
    and no email or SMTP off)."""
    if (clinician is None or clinician.tenant_id != tenant_id
            or clinician_id not in (clinician.clinician_id, clinician.alias)):
        return "no_directory_entry"
    if clinician.site_id != site_id:
        return "other_site"
    if not clinician.webhook_url and not (email_enabled and clinician.email):
        return "no_channel"
    return None


def site_fallbacks(entries: Iterable[Clinician], tenant_id: str, site_id: str) -> list[Clinician]:
    """The fallback entries of the alert's tenant AND site, by id (never another site's or tenant's)."""
    return sorted((e for e in entries if e.fallback and reaches(e, tenant_id, site_id)), key=lambda e: e.clinician_id)


def _fallback_deliveries(kind: Kind, reason: UnroutedReason, fallbacks: Iterable[Clinician], email_enabled: bool,
                         *, tenant_id: str, site_id: str, subject_id: str, alert_id: str,
                         topic: str) -> list[PlannedDelivery]:
    """Each fallback entry's webhook and email (recipient `fallback:<id>`: distinct from the same
    person's deliveries as a clinician, and deterministic), marked with `reason`."""
    return [p for f in site_fallbacks(fallbacks, tenant_id, site_id)
            for p in person_deliveries(kind, "fallback", f, email_enabled, tenant_id=tenant_id, site_id=site_id,
                                       subject_id=subject_id, alert_id=alert_id, topic=topic, routed_reason=reason)]


def _people(kind: Kind, clinician: Clinician | None, fallbacks: Iterable[Clinician], email_enabled: bool, *,
            tenant_id: str, site_id: str, clinician_id: str, subject_id: str, alert_id: str,
            topic: str) -> tuple[Routing, list[PlannedDelivery]]:
    """The clinician's deliveries, or, when the clinician cannot be reached, the site's fallbacks'."""
    reason = unrouted_reason(clinician, tenant_id, site_id, clinician_id, email_enabled)
    if reason is None:
        return Routing("clinician"), person_deliveries(kind, "clinician", clinician, email_enabled,
                                                       tenant_id=tenant_id, site_id=site_id,
                                                       subject_id=subject_id, alert_id=alert_id, topic=topic)
    planned = _fallback_deliveries(kind, reason, fallbacks, email_enabled, tenant_id=tenant_id, site_id=site_id,
                                   subject_id=subject_id, alert_id=alert_id, topic=topic)
    told = tuple(dict.fromkeys(p.recipient.partition(":")[2] for p in planned))
    return Routing("fallback" if planned else "none", reason, told), planned


def raise_subject(alert: RaisedAlert) -> str:
    """The subject of a raised revision's deliveries: one set of deliveries per revision, and
    revision 1 keeps the delivery ids this service gave before alerts had revisions."""
    return ids.alert_event_id(alert.alert_id, alert.revision)


def route_alert(alert: RaisedAlert, clinician: Clinician | None, subscriptions: Iterable[Subscription],
                email_enabled: bool, fallbacks: Iterable[Clinician] = ()) -> list[PlannedDelivery]:
    """Everyone a raised revision goes to: `plan_alert`'s deliveries."""
    return plan_alert(alert, clinician, subscriptions, email_enabled, fallbacks)[1]


def plan_alert(alert: RaisedAlert, clinician: Clinician | None, subscriptions: Iterable[Subscription],
               email_enabled: bool, fallbacks: Iterable[Clinician] = ()) -> tuple[Routing, list[PlannedDelivery]]:
    """Who a raised revision reaches, and its deliveries: its clinician (webhook, email; same site
    only) or, when the clinician cannot be reached, the site's `fallbacks` (see the module
    docstring); and the tenant's partners subscribed to its type's topic (`alliance.deterioration.v1`,
    `outcome.alert.v1`), whoever the people are. A partner is not a person: an alert that reaches
    only partners is routed `none`."""
    subject = raise_subject(alert)
    topic = alert_kind(alert).raised
    routing, people = _people("alert", clinician, fallbacks, email_enabled, tenant_id=alert.tenant_id,
                              site_id=alert.site_id, clinician_id=alert.clinician_id, subject_id=subject,
                              alert_id=alert.alert_id, topic=topic)
    return routing, [
        *people,
        *partner_deliveries("alert", alert.tenant_id, alert.site_id, subject, alert.alert_id, topic, subscriptions),
    ]


# ---- rerouting: a directory fix delivers what it stranded (docs/operations.md) -----------------
#
# A revision routed to the site's fallbacks or to nobody stays so while its clinician cannot be
# reached. Once a directory change makes them reachable (registered, moved to the alert's site, given
# a channel), the revision is sent to them after all: the clinician deliveries `plan_alert` would plan
# today, under the same derived ids, so each channel goes at most once per revision whoever decides it
# and however often. A channel the revision already tried to the SAME target and failed for good is
# not tried again (nothing changed for it); one tried to another target is retried at the new one.


@dataclass(frozen=True)
class StrandedAlert:
    """What rerouting needs of a stored alert: the revision its content and routing are of, where its
    lifecycle stands (`status` as the API shows it), and who that revision reached."""

    alert: RaisedAlert  # the stored body of its highest raised revision
    status: str  # open, acknowledged, superseded, withdrawn
    routed_revision: int  # the revision `routing` is of (`rrev`; 0: not routed yet)
    routing: RoutedTo | None
    routing_reason: UnroutedReason | None


@dataclass(frozen=True)
class Reroute:
    """A stranded revision sent to its clinician: deliveries to insert (`new`), failed ones to put
    back on the schedule at the entry's current target (`retry`), and why it had not reached them."""

    alert_id: str
    revision: int
    reason: UnroutedReason
    new: tuple[PlannedDelivery, ...] = ()
    retry: tuple[PlannedDelivery, ...] = ()


def plan_reroute(stranded: StrandedAlert, entry: Clinician | None, email_enabled: bool,
                 tried: Mapping[str, tuple[str, str]]) -> Reroute | None:
    """Whether (and how) a stranded revision now goes to its clinician, or None.

    None unless the alert is still `open` (an acknowledged, superseded or withdrawn one is not sent),
    its recorded routing is of this very revision and says it did not reach the clinician (`fallback`
    or `none`), and the clinician can now be reached by the routing rule (`unrouted_reason`: an entry
    of the alert's tenant AND site with a usable channel; never another site's). `tried`: {delivery
    id: (status, target)} of the clinician deliveries of this revision that exist. A channel never
    planned is new; one `failed` at another target is retried at the entry's; one failed at the same
    target, or pending, delivered or cancelled, is left. Rerouted when something is sent, or when a
    clinician delivery is already pending or delivered (a reroute that stopped between its two
    writes); not when every channel already failed at the target it has now (still undelivered)."""
    alert = stranded.alert
    if (stranded.status != AlertState.OPEN or stranded.routed_revision != alert.revision
            or stranded.routing not in ("fallback", "none") or stranded.routing_reason is None):
        return None
    if unrouted_reason(entry, alert.tenant_id, alert.site_id, alert.clinician_id, email_enabled) is not None:
        return None
    planned = person_deliveries("alert", "clinician", entry, email_enabled, tenant_id=alert.tenant_id,
                                site_id=alert.site_id, subject_id=raise_subject(alert), alert_id=alert.alert_id,
                                topic=alert_kind(alert).raised)
    new = tuple(p for p in planned if p.delivery_id not in tried)
    retry = tuple(p for p in planned if tried.get(p.delivery_id, ("", p.target))[0] == "failed"
                  and tried[p.delivery_id][1] != p.target)
    live = any(tried.get(p.delivery_id, ("",))[0] in ("pending", "delivered") for p in planned)
    if not (new or retry or live):
        return None
    return Reroute(alert.alert_id, alert.revision, stranded.routing_reason, new, retry)


def route_status(event: AlertStatusChanged, clinician: Clinician | None, subscriptions: Iterable[Subscription],
                 email_enabled: bool, kind: AlertKind = ALLIANCE_KIND,
                 fallbacks: Iterable[Clinician] = ()) -> list[PlannedDelivery]:
    """Who hears of an alert-status event of `kind`'s status topic: partners subscribed to it
    (`alliance.alert-status.v1`, `outcome.alert-status.v1`) get every one (the topic's whole story
    of the alert), and a withdrawal also goes to the clinician (webhook, email; same site only),
    who may have acted on the alert; when the clinician cannot be reached, to the site's
    `fallbacks` instead, by the same rule as the raise (they are who was told of it, unless the
    directory changed in between). A supersession is not sent to the clinician: the later
    session that superseded it speaks for itself.

    The caller drops lifecycle events that are already stale (see the handlers)."""
    people: list[PlannedDelivery] = []
    if event.status == AlertStatus.WITHDRAWN:
        _, people = _people("withdrawal", clinician, fallbacks, email_enabled, tenant_id=event.tenant_id,
                            site_id=event.site_id, clinician_id=event.clinician_id, subject_id=event.event_id,
                            alert_id=event.alert_id, topic=kind.status)
    return [*people, *partner_deliveries("event", event.tenant_id, event.site_id, event.event_id, event.alert_id,
                                         kind.status, subscriptions)]


def escalation_supervisor(clinician: Clinician | None, fallbacks: Sequence[Clinician]) -> str | None:
    """Whose supervisor an unacknowledged alert escalates to: the clinician's entry's supervisor
    when the entry exists (as before; `route_escalation` still requires the supervisor to be of
    the alert's site), else that of the first of the fallback entries told of the alert (by id)
    that names one; None: nobody to escalate to."""
    if clinician is not None:
        return clinician.supervisor_id
    return next((f.supervisor_id for f in sorted(fallbacks, key=lambda f: f.clinician_id) if f.supervisor_id), None)


def route_escalation(alert: RaisedAlert, supervisor: Clinician | None,
                     email_enabled: bool) -> list[PlannedDelivery]:
    """The supervisor's copy of an alert nobody acknowledged in time (once per alert, whatever its
    revision; the supervisor must belong to the alert's site), as its type's alert webhook."""
    topic = alert_kind(alert).raised
    return person_deliveries("escalation", "supervisor", supervisor, email_enabled, tenant_id=alert.tenant_id,
                             site_id=alert.site_id, subject_id=alert.alert_id, alert_id=alert.alert_id,
                             topic=topic)


def backoff_seconds(failed_attempts: int, first: float, cap: float, jitter: float) -> float:
    """Delay after the `failed_attempts`-th failure: exponential, capped, with "equal jitter".

    `jitter` in [0, 1) picks a point in [d/2, d), so receivers that failed together do not all
    come back at the same instant, while the delay still grows.
    """
    if failed_attempts < 1:
        raise ValueError("failed_attempts starts at 1")
    exponent = min(failed_attempts - 1, 64)  # 2**64 * anything positive is past any cap
    base = min(cap, first * math.pow(2, exponent))
    return base / 2 + (base / 2) * min(max(jitter, 0.0), 0.999999)


def is_final(attempts_made: int, max_attempts: int) -> bool:
    """True when no attempt is left after `attempts_made`."""
    return attempts_made >= max_attempts


def trajectory_link(dashboard_url: str, client_id: str, instrument: str) -> str:
    """The reporting page of one client's trajectory."""
    return f"{dashboard_url}?{urlencode({'client': client_id, 'instrument': instrument})}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _email_prefix(noun: str, revision: int, escalation: bool) -> str:
    if escalation:
        return f"Escalated: unacknowledged {noun}"
    return noun.capitalize() if revision == 1 else f"Revised {noun}"


# What a fallback entry's email says of why the alert came to them.
_WHY_UNROUTED: dict[UnroutedReason, str] = {
    "no_directory_entry": "has no directory entry (not registered yet, or the id is spelled differently)",
    "other_site": "has a directory entry of another site only",
    "no_channel": "has no webhook or email that alerts can use",
    "undelivered": "could not be reached: every delivery used up its attempts",  # never routed to a fallback
}


def routed_note(clinician_id: str, reason: UnroutedReason) -> str:
    """The line a fallback entry's email starts with: whose alert it is and why it came to them."""
    return (f"You receive this as your site's fallback: clinician {clinician_id} {_WHY_UNROUTED[reason]} "
            f"(reason: {reason}). Please see that it reaches the right clinician, and fix the directory.")


def email_text(alert: RaisedAlert, dashboard_url: str, escalation: bool = False,
               routed_reason: UnroutedReason | None = None) -> tuple[str, str]:
    """Subject and plain-text body: pseudonymous client id, totals, triggers, link; nothing else
    identifying. An outcome alert says where the client stands against intake, and its advice.
    A fallback entry's copy (`routed_reason`) says whose alert it is and why it came to them."""
    prefix = _email_prefix(alert_kind(alert).noun, alert.revision, escalation)
    subject = f"{prefix} ({alert.severity}) for client {alert.client_id}"
    lines = [
        f"{prefix} ({alert.severity}).",
        "",
        f"Client: {alert.client_id}",
        f"Instrument: {alert.instrument.value}, session {alert.session_number}",
        f"Total: {_num(alert.total)} (cutoff {_num(alert.cutoff)})",
    ]
    if isinstance(alert, OutcomeAlert):
        lines.append(f"Intake total: {_num(alert.intake_total)}; change from intake: {_num(alert.change_from_intake)}")
    lines += [
        f"Previous total: {_num(alert.previous_total)}; change: {_num(alert.change_from_previous)}",
        f"Triggers: {', '.join(alert.triggers) or '-'}",
    ]
    if isinstance(alert, OutcomeAlert) and alert.advice:
        lines += ["", alert.advice]
    lines += [
        "",
        f"Trajectory: {trajectory_link(dashboard_url, alert.client_id, alert.instrument.value)}",
        "",
        f"Alert id: {alert.alert_id}",
    ]
    if alert.revision > 1:
        lines.insert(2, f"A correction changed this alert (revision {alert.revision}); it replaces the earlier one.")
    if escalation:
        lines.insert(2, f"It was sent to clinician {alert.clinician_id} and has not been acknowledged.")
    if routed_reason is not None:
        lines.insert(2, routed_note(alert.clinician_id, routed_reason))
    return subject, "\n".join(lines) + "\n"


def withdrawal_email_text(event: AlertStatusChanged, dashboard_url: str, kind: AlertKind = ALLIANCE_KIND,
                          routed_reason: UnroutedReason | None = None) -> tuple[str, str]:
    """Subject and plain-text body telling the clinician (or a fallback entry: `routed_reason`) an
    alert of `kind` is withdrawn (same privacy rule as `email_text`: pseudonymous client id, no
    site, no submission id)."""
    noun = kind.noun.capitalize()
    subject = f"{noun} withdrawn for client {event.client_id or '-'}"
    lines = [
        f"{noun} withdrawn.",
        "",
        "A correction of the session's record cleared this alert; nothing is needed for it any more.",
        "",
        f"Client: {event.client_id or '-'}",
    ]
    if event.instrument is not None and event.session_number is not None:
        lines.append(f"Instrument: {event.instrument.value}, session {event.session_number}")
    if event.client_id and event.instrument is not None:
        lines += ["", f"Trajectory: {trajectory_link(dashboard_url, event.client_id, event.instrument.value)}"]
    lines += ["", f"Alert id: {event.alert_id}"]
    if routed_reason is not None:
        lines.insert(2, routed_note(event.clinician_id, routed_reason))
    return subject, "\n".join(lines) + "\n"


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook target (syntax only), or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "only http and https URLs are allowed"
    if not parts.hostname:
        return "the URL has no host"
    if parts.username or parts.password:
        return "credentials in the URL are not allowed"
    if port == 0:
        return "port 0 is not allowed"
    return None


# ---- egress: which addresses a webhook may connect to ------------------------------------------
#
# A webhook target is reached only at a globally routable unicast address. Anything that is, or
# embeds, or maps to a loopback, private, link-local, shared or otherwise special address is
# refused: an IPv6 form that carries an IPv4 address (IPv4-mapped, NAT64, 6to4) is judged by the
# IPv4 address it carries, because a translator or relay on the way delivers the packet there.
# IANA's special-purpose registries are the source; Python's `is_global` is consulted as well,
# so an address either table calls special is refused.

_V4_BLOCKED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_V6_BLOCKED: tuple[tuple[str, str], ...] = (
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments (Teredo, benchmarking, ORCHID)"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "SRv6 segment identifiers"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
_V4_NETS = tuple((ipaddress.IPv4Network(n), why) for n, why in _V4_BLOCKED)
_V6_NETS = tuple((ipaddress.IPv6Network(n), why) for n, why in _V6_BLOCKED)
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def _v4_block_reason(ip: ipaddress.IPv4Address) -> str | None:
    for net, why in _V4_NETS:
        if ip in net:
            return why
    return None if ip.is_global else "not globally routable"


def address_block_reason(address: str) -> str | None:
    """Why a webhook must not connect to `address` (an IP literal), or None when it may.

    Raises ValueError when `address` is not an IP address."""
    text = address.strip("[]")
    if "%" in text:
        # A zone index only means something for link-local and multicast addresses.
        return "scoped (zone index)"
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_block_reason(ip)
    embedded: ipaddress.IPv4Address | None = None
    kind = ""
    if ip.ipv4_mapped is not None:
        embedded, kind = ip.ipv4_mapped, "IPv4-mapped"
    elif ip in _NAT64:
        embedded, kind = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    elif ip in _SIX_TO_FOUR:
        embedded, kind = ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF), "6to4"
    if embedded is not None:
        why = _v4_block_reason(embedded)
        return None if why is None else f"{kind} address of a {why} IPv4 address"
    if ip not in _V6_GLOBAL_UNICAST:
        # Outside 2000::/3: unspecified, loopback, IPv4-compatible, discard, unique/link/site-local,
        # multicast, and everything IANA has not assigned.
        if ip.is_loopback:
            return "loopback"
        if ip.is_unspecified:
            return "unspecified"
        if int(ip) >> 32 == 0:
            return "IPv4-compatible (deprecated)"
        for net, why in _V6_NETS:
            if ip in net:
                return why
        return "not global unicast (outside 2000::/3)"
    for net, why in _V6_NETS:
        if ip in net:
            return why
    return None if ip.is_global else "not globally routable"


def is_public_address(address: str) -> bool:
    """True when a webhook may connect to `address` (see `address_block_reason`)."""
    return address_block_reason(address) is None


# What a tenant sees of a delivery attempt: a class, never the status code or error text, which
# would tell a tenant how an internal or third-party address answered.
Outcome = Literal["2xx", "3xx", "4xx", "5xx", "timeout", "refused", "blocked", "no_secret", "error"]
OUTCOMES: tuple[Outcome, ...] = ("2xx", "3xx", "4xx", "5xx", "timeout", "refused", "blocked", "no_secret", "error")
# Outcomes no retry can change, only an operator: a signing secret to create, a target to fix.
NEEDS_OPERATOR: tuple[Outcome, ...] = ("no_secret", "blocked")


def status_outcome(status: int) -> Outcome:
    """The outcome class of an HTTP (or SMTP) status code; a non-standard code above 599 counts as 5xx."""
    if 200 <= status < 300:
        return "2xx"
    if 300 <= status < 400:
        return "3xx"
    if 400 <= status < 500:
        return "4xx"
    return "5xx"


# ---- fair delivery: how the worker's slots are shared between tenants --------------------------


def tenant_share(active_tenants: int, concurrency: int, tenant_cap: int) -> int:
    """How many attempts one tenant may have in flight in one worker: an equal split of the
    slots between the tenants with work, never more than `tenant_cap` (so one tenant alone can
    never take every slot, and a newcomer finds one free), never less than one."""
    return max(1, min(tenant_cap, concurrency // max(1, active_tenants)))


def fair_pick(candidates: Sequence[tuple[str, str]], inflight: Mapping[str, int], free: int, concurrency: int,
              tenant_cap: int) -> list[str]:
    """Which due deliveries to claim now: `candidates` are (delivery id, tenant) oldest due first;
    tenants take turns, one slot at a time, in the order of their oldest candidate, each up to its
    `tenant_share` minus what it already has in flight, at most `free` in all.

    A tenant with thousands of due deliveries therefore gets its share and no more, and every
    other tenant among the candidates gets a turn in the same claim."""
    order = list(dict.fromkeys(t for _, t in candidates))
    if not order or free <= 0:
        return []
    active = set(order) | {t for t, n in inflight.items() if n > 0}
    share = tenant_share(len(active), concurrency, tenant_cap)
    queues: dict[str, deque[str]] = {t: deque() for t in order}
    for delivery_id, tenant in candidates:
        queues[tenant].append(delivery_id)
    room = {t: max(0, share - inflight.get(t, 0)) for t in order}
    out: list[str] = []
    while len(out) < free and any(room[t] > 0 and queues[t] for t in order):
        for t in order:
            if len(out) >= free:
                break
            if room[t] > 0 and queues[t]:
                out.append(queues[t].popleft())
                room[t] -= 1
    return out


def tenants_at_share(inflight: Mapping[str, int], concurrency: int, tenant_cap: int) -> list[str]:
    """Tenants that already hold their share (as far as the tenants in flight tell): the claim's
    query leaves their deliveries out, so their backlog does not fill the candidates."""
    busy = {t: n for t, n in inflight.items() if n > 0}
    share = tenant_share(len(busy), concurrency, tenant_cap)
    return sorted(t for t, n in busy.items() if n >= share)


def due_for_escalation_filter(now_epoch: float, default_seconds: float,
                              overrides: dict[str, float]) -> list[tuple[str | None, float]]:
    """(tenant or None for "every other tenant", created-before epoch) pairs that are due now."""
    pairs: list[tuple[str | None, float]] = [(t, now_epoch - s) for t, s in sorted(overrides.items())]
    pairs.append((None, now_epoch - default_seconds))
    return pairs


def status_changed(tenant_id: str, alert_id: str, site_id: str, clinician_id: str,
                   status: Literal[AlertStatus.ACKNOWLEDGED, AlertStatus.ESCALATED],
                   occurred_at: datetime, client_id: str | None = None,
                   kind: AlertKind = ALLIANCE_KIND) -> AlertStatusChanged:
    """The event telling reporting what happened to an alert; its id is stable per (alert, status).
    Of `kind`'s status class: an `OutcomeAlertStatusChanged` for an outcome alert.

    It names no revision: what alerts did with an alert holds for all of its revisions, and
    consumers of the lifecycle ignore it. (`delivered` and `failed` are per revision: see
    `delivery_status`.)"""
    return kind.status_model()(event_id=ids.alert_status_event_id(tenant_id, alert_id, status), tenant_id=tenant_id,
                               occurred_at=occurred_at, alert_id=alert_id, site_id=site_id,
                               clinician_id=clinician_id, status=status, client_id=client_id)


# ---- delivered / failed: what alerts tells of a clinician's delivery of an alert ---------------
#
# Only the clinician's own deliveries of a raised revision tell anything (kind `alert`, recipient
# `clinician:<id>`, webhook or email): a partner's subscription, a supervisor's escalation copy and a
# withdrawal notice say nothing about whether the clinician was reached. `delivered` is once per
# revision, whichever channel got there first; `failed` once per revision and channel whose
# delivery used up its attempts (so a revision may be both `failed` by webhook and `delivered` by
# email). Both are on the alert's type's status topic (`AlertKind.status_topic`).

DeliveryStatus = Literal[AlertStatus.DELIVERED, AlertStatus.FAILED]


def tells_status(kind: str | None, recipient_: str | None) -> bool:
    """Whether a delivery's final outcome is told as `delivered` / `failed`: only a clinician's
    delivery of a raised revision (see above)."""
    return kind == "alert" and str(recipient_ or "").startswith("clinician:")


def to_person(kind: str | None, recipient_: str | None) -> bool:
    """Whether a delivery is one of a raised revision to a person it was routed to: its clinician or
    a fallback entry of its site (not a partner, a supervisor's escalation copy or a withdrawal
    notice). Recording its final outcome owes the status teller a look (its `delivery_outbox` entry): a
    clinician's tells `delivered` / `failed` (`tells_status`), and any may settle who its revision
    reached in the end (`revision_reached`)."""
    return kind == "alert" and str(recipient_ or "").startswith(("clinician:", "fallback:"))


@dataclass(frozen=True)
class Reached:
    """Who a raised revision reached in the end (`revision_reached`), and the ids of the fallbacks'
    deliveries of it a reroute cancelled that are to be scheduled again (`again`: then it is theirs)."""

    to: RoutedTo
    again: tuple[str, ...] = ()


def revision_reached(people: Iterable[tuple[str, str, str]]) -> Reached | None:
    """Who a raised revision reached in the end, from (delivery id, recipient, status) of its
    deliveries to persons (`to_person`), or None while that is not settled (one still pending could
    change it, or none failed):

    - `clinician`: a delivery to its clinician got through;
    - `fallback`: none to the clinician did (each used up its attempts), one to a fallback entry did:
      a revision a directory fix rerouted to its clinician (`plan_reroute`) after its fallback had it;
    - `fallback` with `again`: nothing got through, and fallbacks' deliveries of it were cancelled.
      A person's delivery is cancelled only by a reroute (a fallback's, not sent yet when the alert
      went to its clinician instead): without the reroute the fallback would still be trying, so
      once the clinician's have all failed those are scheduled again, and the fallback is who it goes to;
    - `none`: every one used up its attempts (none cancelled): it reached nobody."""
    seen = list(people)
    statuses = {s for _, _, s in seen}
    if any(r.startswith("clinician:") and s == "delivered" for _, r, s in seen):
        return Reached("clinician")
    if "pending" in statuses:
        return None
    if "delivered" in statuses:
        return Reached("fallback")
    if "failed" not in statuses:
        return None
    stopped = tuple(sorted(i for i, r, s in seen if s == "cancelled" and r.startswith("fallback:")))
    if stopped:
        return Reached("fallback", stopped)
    return Reached("none") if statuses == {"failed"} else None


def delivery_status(alert: RaisedAlert, status: DeliveryStatus, channel: Channel,
                    occurred_at: datetime) -> AlertStatusChanged:
    """The `delivered` / `failed` event of one clinician delivery of `alert` (a raised revision), of
    its type's status class. Its id is derived from (alert, revision, status), and the channel for
    `failed`: telling the same outcome again (a retry, the sweep after a crash, the other channel
    also delivering) is a duplicate a consumer drops by `event_id`. It names the revision and the
    session like scoring's statuses, and the channel."""
    failed = status == AlertStatus.FAILED
    return alert_kind(alert).status_model()(
        event_id=ids.alert_status_event_id(alert.tenant_id, alert.alert_id, status, alert.revision,
                                           channel=channel if failed else None),
        tenant_id=alert.tenant_id, occurred_at=occurred_at, alert_id=alert.alert_id, site_id=alert.site_id,
        clinician_id=alert.clinician_id, status=status, revision=alert.revision, client_id=alert.client_id,
        instrument=alert.instrument, episode_id=alert.episode_id, session_number=alert.session_number,
        channel=channel)


def unrouted_status(alert: RaisedAlert, reason: UnroutedReason, occurred_at: datetime) -> AlertStatusChanged:
    """The `failed` of a revision that reached no person at all (routing `none`): no channel, the
    `reason` the clinician was not reached (`undelivered`: every delivery to a person failed).
    Its id is derived from (alert, revision, failed) with no channel, so it differs from every
    per-channel `failed` and a redelivered raise tells the same event again (a duplicate a
    consumer drops by `event_id`)."""
    return alert_kind(alert).status_model()(
        event_id=ids.alert_status_event_id(alert.tenant_id, alert.alert_id, AlertStatus.FAILED, alert.revision),
        tenant_id=alert.tenant_id, occurred_at=occurred_at, alert_id=alert.alert_id, site_id=alert.site_id,
        clinician_id=alert.clinician_id, status=AlertStatus.FAILED, revision=alert.revision,
        client_id=alert.client_id, instrument=alert.instrument, episode_id=alert.episode_id,
        session_number=alert.session_number, routing_reason=reason)


def first_deliveries(delivered: Iterable[tuple[str, str, datetime]]) -> set[str]:
    """Of clinician deliveries recorded `delivered` — (delivery id, subject: the revision, when
    recorded) — the first of each subject, the one whose `delivered` is told: the earliest, ties
    broken by id, so that every process that looks picks the same one."""
    first: dict[str, tuple[datetime, str]] = {}
    for delivery_id, subject, at in delivered:
        if subject not in first or (at, delivery_id) < first[subject]:
            first[subject] = (at, delivery_id)
    return {delivery_id for _, delivery_id in first.values()}
