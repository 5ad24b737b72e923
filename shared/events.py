"""Event contracts (schema_version 1), serialized as UTF-8 JSON.

Consumers ignore unknown fields so that producers can add optional fields within v1; a
breaking change gets a new topic (`*.v2`), see docs/events.md.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Instrument(StrEnum):
    """The SRS family: which form the client filled in."""

    SRS = "SRS"  # adults and adolescents, 13+
    CSRS = "CSRS"  # children 6-12
    GSRS = "GSRS"  # group, 13+
    CGSRS = "CGSRS"  # child group
    YCSRS = "YCSRS"  # 5 and under: stored, never scored


SCORED_INSTRUMENTS = frozenset({Instrument.SRS, Instrument.CSRS, Instrument.GSRS, Instrument.CGSRS})

ITEM_NAMES: tuple[str, ...] = ("relationship", "goals", "approach", "overall")


class Items(BaseModel):
    """The four SRS items, each 0.0-10.0 to one decimal."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    relationship: float
    goals: float
    approach: float
    overall: float

    def values(self) -> tuple[float, float, float, float]:
        """The items in their canonical order."""
        return (self.relationship, self.goals, self.approach, self.overall)


class Event(BaseModel):
    """Fields every event carries. The correlation id travels as the `correlation_id` header."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = 1
    event_id: str
    tenant_id: str
    occurred_at: datetime


class SubmissionIdentity(BaseModel):
    """Who and what a session rating is about; shared by submitted, scored and alert events."""

    model_config = ConfigDict(extra="ignore")

    submission_id: str
    tenant_id: str
    site_id: str
    clinician_id: str
    client_id: str
    episode_id: str | None = None
    instrument: Instrument = Instrument.SRS
    session_number: int = Field(ge=1)
    administered_at: datetime


class SrsSubmitted(Event, SubmissionIdentity):
    """A validated submission accepted by intake (topic `srs.submitted.v1`).

    Exactly one of `items` and `total` is set. `accepted_at` is when intake got the broker's
    acknowledgement; downstream latency metrics start there.
    """

    items: Items | None = None
    total: float | None = None
    accepted_at: datetime


class SrsScored(Event, SubmissionIdentity):
    """A scored session (topic `srs.scored.v1`). `latest` is false for a backfilled older session."""

    items: Items | None = None
    total: float
    cutoff: float
    previous_total: float | None = None
    change_from_previous: float | None = None
    flags: list[str] = Field(default_factory=list)
    latest: bool = True
    scored_at: datetime
    accepted_at: datetime | None = None


Severity = Literal["warning", "critical"]


class AllianceDeterioration(Event, SubmissionIdentity):
    """The alliance is at risk for a client's latest session (topic `alliance.deterioration.v1`).

    This document is also the body of clinician and partner webhooks. `alert_id` is derived
    from the submission, so a redelivery carries the same id.
    """

    alert_id: str
    triggers: list[str]
    severity: Severity
    total: float
    previous_total: float | None = None
    change_from_previous: float | None = None
    cutoff: float
    accepted_at: datetime | None = None


class AlertStatusChanged(Event):
    """Alerts tells reporting what happened to an alert (topic `alliance.alert-status.v1`)."""

    alert_id: str
    site_id: str
    clinician_id: str
    status: Literal["acknowledged", "escalated", "delivered", "failed"]


class DeadLetter(BaseModel):
    """A record some stage could not process (topic `srs.deadletter.v1`), kept with the reason."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = 1
    event_id: str
    tenant_id: str | None = None
    occurred_at: datetime
    service: str
    reason: str
    detail: str = ""
    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    key: str | None = None
    payload: str = Field(description="the original value, UTF-8 text or base64 when not text")
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
