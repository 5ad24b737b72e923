"""Pure rules of the alerts service: who gets what, when to retry, what an email says.

No I/O here: the handlers and the worker feed these functions with documents they loaded and
write back what these functions decide.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from urllib.parse import urlencode, urlsplit

from shared import ids
from shared.events import AlertStatusChanged, AllianceDeterioration
from shared.topics import DETERIORATION, SCORED

Channel = Literal["webhook", "email"]
Kind = Literal["alert", "event", "escalation"]
WEBHOOK: Channel = "webhook"
EMAIL: Channel = "email"

# Topics a partner may subscribe to (logical names, as in the contract).
SUBSCRIBABLE: tuple[str, ...] = (DETERIORATION, SCORED)


@dataclass(frozen=True)
class Clinician:
    """A directory entry: where one clinician of one tenant is notified."""

    tenant_id: str
    clinician_id: str
    site_id: str
    email: str | None = None
    webhook_url: str | None = None
    supervisor_id: str | None = None


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


def recipient(role: str, ident: str) -> str:
    """The recipient part of a delivery's identity."""
    return f"{role}:{ident}"


def _plan(kind: Kind, tenant_id: str, site_id: str, subject_id: str, alert_id: str | None, topic: str,
          who: str, channel: Channel, target: str, subscription_id: str | None = None) -> PlannedDelivery:
    return PlannedDelivery(ids.delivery_id(subject_id, who, channel), kind, tenant_id, site_id, subject_id,
                           alert_id, topic, who, channel, target, subscription_id)


def partner_deliveries(kind: Kind, tenant_id: str, site_id: str, subject_id: str, alert_id: str | None,
                       topic: str, subscriptions: Iterable[Subscription]) -> list[PlannedDelivery]:
    """One webhook per subscription of THIS tenant that asked for `topic` (never another tenant's)."""
    out = []
    for sub in sorted(subscriptions, key=lambda s: s.id):
        if sub.tenant_id == tenant_id and topic in sub.events:
            out.append(_plan(kind, tenant_id, site_id, subject_id, alert_id, topic,
                             recipient("subscription", sub.id), WEBHOOK, sub.url, sub.id))
    return out


def person_deliveries(kind: Kind, role: str, alert: AllianceDeterioration, person: Clinician | None,
                      email_enabled: bool) -> list[PlannedDelivery]:
    """A person's webhook (if they have one) and email (if they have one and SMTP is configured)."""
    if person is None or person.tenant_id != alert.tenant_id:
        return []
    who = recipient(role, person.clinician_id)
    out = []
    if person.webhook_url:
        out.append(_plan(kind, alert.tenant_id, alert.site_id, alert.alert_id, alert.alert_id, DETERIORATION,
                         who, WEBHOOK, person.webhook_url))
    if email_enabled and person.email:
        out.append(_plan(kind, alert.tenant_id, alert.site_id, alert.alert_id, alert.alert_id, DETERIORATION,
                         who, EMAIL, person.email))
    return out


def route_alert(alert: AllianceDeterioration, clinician: Clinician | None, subscriptions: Iterable[Subscription],
                email_enabled: bool) -> list[PlannedDelivery]:
    """Everyone a deterioration goes to: its clinician (webhook, email) and the tenant's partners."""
    if clinician is not None and clinician.clinician_id != alert.clinician_id:
        clinician = None
    return [
        *person_deliveries("alert", "clinician", alert, clinician, email_enabled),
        *partner_deliveries("alert", alert.tenant_id, alert.site_id, alert.alert_id, alert.alert_id,
                            DETERIORATION, subscriptions),
    ]


def route_escalation(alert: AllianceDeterioration, supervisor: Clinician | None,
                     email_enabled: bool) -> list[PlannedDelivery]:
    """The supervisor's copy of an alert nobody acknowledged in time."""
    return person_deliveries("escalation", "supervisor", alert, supervisor, email_enabled)


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


def email_text(alert: AllianceDeterioration, dashboard_url: str, escalation: bool = False) -> tuple[str, str]:
    """Subject and plain-text body: pseudonymous client id, totals, triggers, link; nothing else identifying."""
    prefix = "Escalated: unacknowledged alliance alert" if escalation else "Alliance alert"
    subject = f"{prefix} ({alert.severity}) for client {alert.client_id}"
    lines = [
        f"{prefix} ({alert.severity}).",
        "",
        f"Client: {alert.client_id}",
        f"Instrument: {alert.instrument.value}, session {alert.session_number}",
        f"Total: {_num(alert.total)} (cutoff {_num(alert.cutoff)})",
        f"Previous total: {_num(alert.previous_total)}; change: {_num(alert.change_from_previous)}",
        f"Triggers: {', '.join(alert.triggers) or '-'}",
        "",
        f"Trajectory: {trajectory_link(dashboard_url, alert.client_id, alert.instrument.value)}",
        "",
        f"Alert id: {alert.alert_id}",
    ]
    if escalation:
        lines.insert(2, f"It was sent to clinician {alert.clinician_id} and has not been acknowledged.")
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


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local, multicast, reserved and unspecified addresses."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or not ip.is_global)


def due_for_escalation_filter(now_epoch: float, default_seconds: float,
                              overrides: dict[str, float]) -> list[tuple[str | None, float]]:
    """(tenant or None for "every other tenant", created-before epoch) pairs that are due now."""
    pairs: list[tuple[str | None, float]] = [(t, now_epoch - s) for t, s in sorted(overrides.items())]
    pairs.append((None, now_epoch - default_seconds))
    return pairs


def status_changed(tenant_id: str, alert_id: str, site_id: str, clinician_id: str,
                   status: Literal["acknowledged", "escalated", "delivered", "failed"],
                   occurred_at: datetime) -> AlertStatusChanged:
    """The event telling reporting what happened to an alert; its id is stable per (alert, status)."""
    return AlertStatusChanged(event_id=ids.derive("alert-status", tenant_id, alert_id, status), tenant_id=tenant_id,
                              occurred_at=occurred_at, alert_id=alert_id, site_id=site_id,
                              clinician_id=clinician_id, status=status)
