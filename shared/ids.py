"""Deterministic identities: a redelivery of the same input always yields the same ids."""

from __future__ import annotations

import uuid

# A fixed namespace for every id this system derives; changing it would break idempotency.
NAMESPACE = uuid.UUID("5b7f3a52-6f0e-4e37-9a43-2c1f1f6f9a10")


def derive(*parts: str) -> str:
    """A UUIDv5 over the given parts, joined unambiguously."""
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(parts)))


def scored_event_id(tenant_id: str, submission_id: str, revision: int = 1) -> str:
    """Event id of one revision of the scored event of a submission (revision 1 keeps the id
    earlier versions of this system gave)."""
    if revision == 1:
        return derive("scored", tenant_id, submission_id)
    return derive("scored", tenant_id, submission_id, str(revision))


def alert_id(tenant_id: str, client_id: str, instrument: str, episode_id: str, session_number: int) -> str:
    """Alert id of a session: one alert per session, stable across corrections."""
    return derive("alert", tenant_id, client_id, str(instrument), episode_id, str(session_number))


def alert_event_id(alert_id_: str, revision: int) -> str:
    """Event id of one revision of an alert on `alliance.deterioration.v1` (revision 1: the alert id)."""
    return alert_id_ if revision == 1 else derive("alert-revision", alert_id_, str(revision))


def alert_status_event_id(tenant_id: str, alert_id_: str, status: str, revision: int | None = None) -> str:
    """Event id of an alert status change (one per alert and status, and revision for scoring's)."""
    if revision is None:
        return derive("alert-status", tenant_id, alert_id_, status)
    return derive("alert-status", tenant_id, alert_id_, status, str(revision))


def client_transfer_event_id(tenant_id: str, client_id: str, site_id: str, request_id: str) -> str:
    """Event id of a client transfer request."""
    return derive("client-transfer", tenant_id, client_id, site_id, request_id)


def delivery_id(alert_or_event_id: str, recipient: str, channel: str) -> str:
    """Delivery id of one notification; receivers see it on every retry."""
    return derive("delivery", alert_or_event_id, recipient, channel)


def submitted_event_id(tenant_id: str, submission_id: str) -> str:
    """Event id of the submitted event of one submission."""
    return derive("submitted", tenant_id, submission_id)


def partition_key(tenant_id: str, client_id: str) -> bytes:
    """Kafka key that keeps one client's sessions ordered within a partition."""
    return f"{tenant_id}:{client_id}".encode()
