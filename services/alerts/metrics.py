"""Metrics of the alerts service (default registry). Labels are bounded enums."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.alerts.rules import ALERT_TYPES, NEEDS_OPERATOR, UNROUTED_REASONS
from shared.metrics import latency_seconds

NOTIFICATIONS = Counter(
    "alliance_notifications",
    "Notifications that reached a final state, by channel (webhook, email) and outcome "
    "(delivered, failed = dead-lettered after the last attempt, cancelled = subscription deleted).",
    ["channel", "outcome"],
)
ATTEMPTS = Counter(
    "alliance_notification_attempts",
    "Delivery attempts, by channel and outcome (ok, error).",
    ["channel", "outcome"],
)
ALERT_TO_DELIVERED = latency_seconds(
    "alliance_alert_to_delivered_seconds",
    "From the alert's origin (intake acceptance, else the event's occurred_at) to a successful "
    "delivery of the alert to its clinician or a partner (escalations and forwarded scored events are "
    "not counted).",
    ["channel"])
PENDING_RETRIES = Gauge(
    "alliance_notification_pending_retries",
    "Deliveries that failed at least once and still wait for another attempt (all processes).",
)
PENDING = Gauge(
    "alliance_notification_pending",
    "Deliveries not yet in a final state (all processes).",
)
DELIVERY_STATUSES = Counter(
    "alliance_alert_delivery_statuses",
    "delivered / failed status events published for clinicians' deliveries of alerts, by status and by "
    "path (recorded: right after the delivery was recorded; swept: owed for longer, e.g. after a crash).",
    ["status", "path"],
)
ESCALATIONS = Counter(
    "alliance_alert_escalations",
    "Alerts escalated to a supervisor, by outcome (sent, no_supervisor).",
    ["outcome"],
)
# Attempt outcomes that no retry can fix, only an operator (`rules.NEEDS_OPERATOR`).
BLOCKED_ATTEMPTS = Counter(
    "alliance_notification_blocked_attempts",
    "Delivery attempts that cannot succeed until an operator acts, by reason: no_secret (the tenant has no "
    "webhook signing secret: POST /v1/webhook-secret), blocked (the target is not a public address). "
    "Each such delivery retries until its attempts are used up.",
    ["reason"],
)
for _reason in NEEDS_OPERATOR:  # exported at zero, so that `increase()` sees the first one
    BLOCKED_ATTEMPTS.labels(_reason)

UNROUTED = Counter(
    "alliance_alerts_unrouted",
    "Raised alert revisions whose clinician could not be reached, by kind (alliance, outcome), reason and fallback. "
    "When a revision is routed: reason no_directory_entry, other_site or no_channel, with fallback yes (the "
    "fallback entries of the alert's site got it) or no (nobody did: `failed` told on the alert's status topic). "
    "Later, reason undelivered: fallback no when every delivery to a person it was routed to used up its attempts "
    "(`failed` told); fallback yes when a revision a directory fix rerouted to its clinician had every delivery to "
    "them use up its attempts and went back to its site's fallback (which had it, or whose deliveries the reroute "
    "cancelled are scheduled again). Counted each time such a routing is recorded: one revision may count under "
    "several (e.g. no_directory_entry/yes, then undelivered/yes, then undelivered/no).",
    ["kind", "reason", "fallback"],
)
for _kind in ALERT_TYPES:  # every series exported at zero (16 in all), so that `increase()` sees the first one
    for _why in UNROUTED_REASONS:
        for _fallback in ("yes", "no"):
            UNROUTED.labels(_kind, _why, _fallback)

REROUTED = Counter(
    "alliance_alerts_rerouted",
    "Stranded alerts (open, their routed revision reached a fallback or nobody) delivered to their clinician "
    "after a directory change made them reachable, counted each time one is rerouted (a revision whose deliveries "
    "to the clinician then all failed, rerouted again once the entry's target is fixed, counts again): by kind "
    "(alliance, outcome) and the reason they had not reached them (no_directory_entry, other_site, no_channel, "
    "undelivered).",
    ["kind", "reason"],
)
for _kind in ALERT_TYPES:  # every series exported at zero (8 in all)
    for _why in UNROUTED_REASONS:
        REROUTED.labels(_kind, _why)
