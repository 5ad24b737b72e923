"""Deterministic identities: a redelivery of the same input always yields the same ids."""

from __future__ import annotations

import uuid

# A fixed namespace for every id this system derives; changing it would break idempotency.
NAMESPACE = uuid.UUID("5b7f3a52-6f0e-4e37-9a43-2c1f1f6f9a10")


def derive(*parts: str) -> str:
    """A UUIDv5 over the given parts, joined unambiguously."""
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(parts)))


def scored_event_id(tenant_id: str, submission_id: str) -> str:
    """Event id of the scored event of one submission."""
    return derive("scored", tenant_id, submission_id)


def alert_id(tenant_id: str, submission_id: str) -> str:
    """Alert id of the deterioration raised by one submission."""
    return derive("alert", tenant_id, submission_id)


def delivery_id(alert_or_event_id: str, recipient: str, channel: str) -> str:
    """Delivery id of one notification; receivers see it on every retry."""
    return derive("delivery", alert_or_event_id, recipient, channel)


def submitted_event_id(tenant_id: str, submission_id: str) -> str:
    """Event id of the submitted event of one submission."""
    return derive("submitted", tenant_id, submission_id)


def partition_key(tenant_id: str, client_id: str) -> bytes:
    """Kafka key that keeps one client's sessions ordered within a partition."""
    return f"{tenant_id}:{client_id}".encode()
