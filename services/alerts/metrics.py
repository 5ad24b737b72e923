"""Metrics of the alerts service (default registry). Labels are bounded enums."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
ESCALATIONS = Counter(
    "alliance_alert_escalations",
    "Alerts escalated to a supervisor, by outcome (sent, no_supervisor).",
    ["outcome"],
)
