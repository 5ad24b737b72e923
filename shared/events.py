"""Event contracts (schema_version 1), serialized as UTF-8 JSON.

Consumers ignore unknown fields so that producers can add optional fields within v1; a
breaking change gets a new topic (`*.v2`), see docs/events.md.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class Instrument(StrEnum):
    """The SRS family: which form the client filled in."""

    SRS = "SRS"  # adults and adolescents, 13+
    CSRS = "CSRS"  # children 6-12
    GSRS = "GSRS"  # group, 13+
    CGSRS = "CGSRS"  # child group
    YCSRS = "YCSRS"  # 5 and under: stored, never scored


SCORED_INSTRUMENTS = frozenset({Instrument.SRS, Instrument.CSRS, Instrument.GSRS, Instrument.CGSRS})

ITEM_NAMES: tuple[str, ...] = ("relationship", "goals", "approach", "overall")


class ItemSet(BaseModel):
    """The four items of a rating form (SRS or ORS family), each 0.0-10.0 to one decimal; a
    subclass declares them as fields, and `NAMES` in their canonical order."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    NAMES: ClassVar[tuple[str, ...]]

    def values(self) -> tuple[float, float, float, float]:
        """The items in their canonical order."""
        first, second, third, fourth = (getattr(self, name) for name in self.NAMES)
        return (first, second, third, fourth)


class Items(ItemSet):
    """The four SRS items, each 0.0-10.0 to one decimal."""

    NAMES = ITEM_NAMES

    relationship: float
    goals: float
    approach: float
    overall: float


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


class Flag(StrEnum):
    """A rule that holds for a scored session (`SrsScored.flags`; the alert triggers are among
    them). Declared in the canonical order flags are listed in, so equal inputs give byte-equal
    events. `flags` and `triggers` stay lists of strings on the wire: new flags may appear within
    v1, and a reader treats a value it does not know as "something else" (docs/events.md)."""

    BELOW_CUTOFF = "below_cutoff"
    DROP_FROM_PREVIOUS = "drop_from_previous"
    LOW_NOT_IMPROVING = "low_not_improving"
    ITEM_BELOW_THRESHOLD = "item_below_threshold"  # informational: not an alert trigger by default


class Severity(StrEnum):
    """How urgent an alert is (the rule: docs/clinical-records.md, "Severity")."""

    WARNING = "warning"
    CRITICAL = "critical"


Operator = Literal["<", "<="]


class SrsScore(BaseModel):
    """A scored SRS-family session's items and what the alliance rules make of them, as
    `srs.scored.v1` carries it."""

    model_config = ConfigDict(extra="ignore")

    items: Items | None = None
    total: float
    cutoff: float
    operator: Operator = "<"
    previous_total: float | None = None
    change_from_previous: float | None = None
    flags: list[str] = Field(default_factory=list)
    triggers: list[str] = Field(default_factory=list)
    severity: Severity | None = None
    low_items: list[str] = Field(default_factory=list)


class ScoredRevision(BaseModel):
    """Where one published version of a scored session (SRS or ORS family) stands among the
    session's versions; `SrsScored` says what each field means."""

    model_config = ConfigDict(extra="ignore")

    latest: bool = True
    scored_at: datetime
    accepted_at: datetime | None = None
    revision: int = Field(default=1, ge=1)
    supersedes: str | None = None
    episode_derived: bool = False
    site_version: int = Field(default=0, ge=0)
    # Set ("moved") on the revision that retracts the session from this client's record: a newer
    # version of the submission names another client (docs/clinical-records.md). Added within v1;
    # absent (read as null) on every other event, whose bytes stay what they were.
    retracted: str | None = None

    @model_serializer(mode="wrap")
    def _retracted_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("retracted") is None:
            data.pop("retracted", None)
        return data


# pydantic orders fields base by base along the reversed MRO, so the bases of the scored events are
# listed last-first to keep the v1 order on the wire: identity, event, (items,) the score, then the
# revision bookkeeping.
class SrsScored(ScoredRevision, SrsScore, Event, SubmissionIdentity):
    """One version of a scored session (topic `srs.scored.v1`); see docs/clinical-records.md.

    A session is (tenant, client, instrument, episode_id, session_number). Scoring publishes a
    new event for a session, with `revision` + 1, whenever what it shows changes: a correction
    (then `supersedes` names the submission whose version it replaces, when that was another
    submission id), a recomputation after an earlier session of the episode was corrected, a
    move to another (derived) episode, or a transfer of the client to another site. The event
    with the highest `revision` for a submission id is the current one. `episode_id` is always
    set: the submitter's, or a derived one (`episode_derived`). `latest` is what held when it
    was scored (false for a backfilled older session); later sessions make it stale.
    """


class AlertContent(BaseModel):
    """What a raised revision of an alert, alliance or outcome, says first: which alert (derived
    from its session), what triggered it, how urgent it is, and the session's total."""

    model_config = ConfigDict(extra="ignore")

    alert_id: str
    triggers: list[str]
    severity: Severity
    total: float


class AllianceDeterioration(AlertContent, Event, SubmissionIdentity):  # bases last-first: see SrsScored
    """The alliance is at risk in the latest session of a client's current episode (topic
    `alliance.deterioration.v1`): an alert raised (`revision` 1) or revised by a correction
    (`revision` + 1, same `alert_id`).

    This document is also the body of clinician and partner webhooks. `alert_id` is derived
    from the session (tenant, client, instrument, episode, session number), so it is stable
    across redeliveries and corrections.
    """

    previous_total: float | None = None
    change_from_previous: float | None = None
    cutoff: float
    accepted_at: datetime | None = None
    revision: int = Field(default=1, ge=1)
    low_items: list[str] = Field(default_factory=list)
    # The ORS of the same session triggers an outcome alert (superseded since by a later session's
    # or not, docs/outcome.md): then the alert is critical whatever its own triggers say. Added
    # within v1 (optional, default false).
    outcome_at_risk: bool = False


class AlertStatus(StrEnum):
    """What happened to an alert (`AlertStatusChanged.status`)."""

    # What alerts did with it.
    ACKNOWLEDGED = "acknowledged"
    ESCALATED = "escalated"
    DELIVERED = "delivered"
    FAILED = "failed"
    # Decided by scoring: the alert's lifecycle ended (see `Lifecycle`).
    SUPERSEDED = "superseded"
    WITHDRAWN = "withdrawn"


# The statuses scoring decides (the alert's lifecycle); the others are what alerts did with it.
LIFECYCLE_STATUSES: frozenset[AlertStatus] = frozenset({AlertStatus.SUPERSEDED, AlertStatus.WITHDRAWN})


class Lifecycle(StrEnum):
    """Where scoring has an alert: raised (by an `AllianceDeterioration` revision), then ended by a
    `superseded` or `withdrawn` status. Declared in rank order: at one revision a later member
    wins over an earlier one (docs/clinical-records.md, "The alert lifecycle")."""

    RAISED = "raised"
    SUPERSEDED = "superseded"
    WITHDRAWN = "withdrawn"


class AlertState(StrEnum):
    """An alert's `status` as the alerts and reporting APIs show it: an ended alert says so (its
    lifecycle), a raised one is `acknowledged` once a clinician acknowledged it, else `open`."""

    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    SUPERSEDED = "superseded"
    WITHDRAWN = "withdrawn"


class AlertStatusChanged(Event):
    """What happened to an alert (topic `alliance.alert-status.v1`).

    `superseded` (a later session of the episode, or a later episode, was scored) and
    `withdrawn` (a correction cleared the alert's triggers, or moved its session; or the
    tenant's changed rules cleared those of the latest session) come from scoring and name the
    `revision` they end; `acknowledged`, `escalated`, `delivered` and `failed` come from alerts.
    `delivered` (the revision reached its clinician) and `failed` (a clinician channel used up its
    attempts on the revision) name the `revision` and the `channel` (webhook, email); they are not
    part of the lifecycle. A `failed` without a `channel` says that the revision reached no person
    at all: neither its clinician nor a fallback entry of its site (`routing_reason`: why not the
    clinician, `undelivered` when every delivery to a person it was routed to used up its attempts;
    docs/partners.md, "Alerts that reach no clinician").
    """

    alert_id: str
    site_id: str
    clinician_id: str
    status: AlertStatus
    revision: int | None = Field(default=None, ge=1)
    client_id: str | None = None
    instrument: Instrument | None = None
    episode_id: str | None = None
    session_number: int | None = None
    channel: Literal["webhook", "email"] | None = None
    # Only on a `failed` that reached nobody: why the alert's clinician could not be reached.
    routing_reason: Literal["no_directory_entry", "other_site", "no_channel", "undelivered"] | None = None

    @model_serializer(mode="wrap")
    def _channel_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # `channel` came with `delivered`/`failed`, `routing_reason` with the `failed` of a revision that
        # reached nobody; the statuses that have neither (every status scoring publishes) stay
        # byte-for-byte what they were before they existed (a consumer reads a missing field as its
        # default, null).
        data: dict[str, Any] = handler(self)
        for optional in ("channel", "routing_reason"):
            if data.get(optional) is None:
                data.pop(optional, None)
        return data


# --- the Outcome Rating Scale (ORS): the other half of PCOMS (docs/outcome.md) -------------------


class OutcomeInstrument(StrEnum):
    """The ORS family: how the client has been doing, given at the START of a session. Its own
    enum (not members of `Instrument`) so that the SRS contracts stay exactly as they were."""

    ORS = "ORS"  # 13 and over (adolescents 13-17 and adults have different cutoffs)
    CORS = "CORS"  # children 6-12
    YCORS = "YCORS"  # 5 and under: stored and shown, never scored


SCORED_OUTCOME_INSTRUMENTS = frozenset({OutcomeInstrument.ORS, OutcomeInstrument.CORS})

ORS_ITEM_NAMES: tuple[str, ...] = ("individually", "interpersonally", "socially", "overall")

# Which outcome instrument is given in the same sessions as each alliance instrument: an alliance
# alert and an outcome alert "hold for the same session" when they share (client, episode,
# session_number) and their instruments pair up here.
OUTCOME_OF: dict[Instrument, OutcomeInstrument] = {
    Instrument.SRS: OutcomeInstrument.ORS,
    Instrument.GSRS: OutcomeInstrument.ORS,
    Instrument.CSRS: OutcomeInstrument.CORS,
    Instrument.CGSRS: OutcomeInstrument.CORS,
    Instrument.YCSRS: OutcomeInstrument.YCORS,
}


class OrsItems(ItemSet):
    """The four ORS items (individually, interpersonally, socially, overall), each 0.0-10.0 to
    one decimal; the total is 0.0-40.0."""

    NAMES = ORS_ITEM_NAMES

    individually: float
    interpersonally: float
    socially: float
    overall: float


class AgeBand(StrEnum):
    """Whose norms an ORS total is read against (the clinical cutoff differs)."""

    ADULT = "adult"  # ORS, 18 and over, or age not given
    ADOLESCENT = "adolescent"  # ORS, 13-17
    CHILD = "child"  # CORS, 6-12
    YOUNG_CHILD = "young_child"  # YCORS, 5 and under


class OutcomeIdentity(SubmissionIdentity):
    """The identity of an ORS-family session: like an SRS session's, with an outcome instrument.
    An ORS and an SRS of the same session share (client, episode, session_number).
    `client_age` (whole years when the form was given) picks the ORS cutoff: 13-17 adolescent,
    otherwise (or when not given) adult."""

    instrument: OutcomeInstrument = OutcomeInstrument.ORS  # type: ignore[assignment]
    client_age: int | None = Field(default=None, ge=0, le=130)


class OrsSubmitted(Event, OutcomeIdentity):
    """A validated ORS-family submission accepted by intake (topic `ors.submitted.v1`, keyed like
    `srs.submitted.v1`; the topic also carries a copy of each `ClientTransfer`). Exactly one of
    `items` and `total` is set."""

    items: OrsItems | None = None
    total: float | None = None
    accepted_at: datetime


class OutcomeChange(StrEnum):
    """Where a session stands against the first session of its episode (the intake score), by
    the reliable change index: a change of at least the index either way is reliable."""

    RELIABLE_IMPROVEMENT = "reliable_improvement"
    RELIABLE_DETERIORATION = "reliable_deterioration"
    NO_RELIABLE_CHANGE = "no_reliable_change"


class OutcomeFlag(StrEnum):
    """What holds for a scored ORS session (`OrsScored.flags`, canonical order); the alert
    triggers are among them. Lists of strings on the wire, like `Flag`."""

    IN_CLINICAL_RANGE = "in_clinical_range"  # total below the cutoff of the client's age band
    RELIABLE_IMPROVEMENT = "reliable_improvement"
    RELIABLE_DETERIORATION = "reliable_deterioration"  # alert trigger (critical)
    NO_RELIABLE_CHANGE = "no_reliable_change"
    CLINICALLY_SIGNIFICANT_IMPROVEMENT = "clinically_significant_improvement"
    NOT_ON_TRACK = "not_on_track"  # alert trigger: no reliable improvement by the tenant's session


class OutcomeScore(BaseModel):
    """What the outcome rules say about one ORS-family session (scoring's `score_outcome`), as
    `ors.scored.v1` carries it. A YCORS session has its `total` and band only."""

    model_config = ConfigDict(extra="ignore")

    total: float
    age_band: AgeBand
    cutoff: float | None = None
    reliable_change_index: float | None = None
    intake_total: float | None = None  # the total of the episode's first session
    change_from_intake: float | None = None
    previous_total: float | None = None
    change_from_previous: float | None = None
    change: OutcomeChange | None = None
    clinically_significant_improvement: bool = False
    in_clinical_range: bool | None = None
    flags: list[str] = Field(default_factory=list)
    triggers: list[str] = Field(default_factory=list)
    severity: Severity | None = None


class _OrsItemsField(BaseModel):
    items: OrsItems | None = None


class OrsScored(ScoredRevision, OutcomeScore, _OrsItemsField, Event, OutcomeIdentity):  # bases: see SrsScored
    """One version of a scored ORS-family session (topic `ors.scored.v1`). Revisions, `supersedes`,
    `episode_id`/`episode_derived`, `latest` and `site_version` mean what they mean on
    `srs.scored.v1` (docs/clinical-records.md). YCORS sessions are published with `total` only:
    no cutoff, no change, no flags."""


class _OutcomeAlertType(BaseModel):
    alert_type: Literal["outcome"] = "outcome"


class OutcomeAlert(AlertContent, _OutcomeAlertType, Event, OutcomeIdentity):  # bases last-first: see SrsScored
    """The client is off track in the latest ORS session of their current episode (topic
    `outcome.alert.v1`): raised (`revision` 1) or revised (`revision` + 1, same `alert_id`), with
    the same lifecycle as an alliance alert. Also the body of outcome webhooks.
    `triggers`: `reliable_deterioration` (critical) and/or `not_on_track` (warning from the
    tenant's first not-on-track session, critical from its second)."""

    cutoff: float | None = None
    intake_total: float | None = None
    change_from_intake: float | None = None
    previous_total: float | None = None
    change_from_previous: float | None = None
    advice: str = ""
    accepted_at: datetime | None = None
    revision: int = Field(default=1, ge=1)


class OutcomeAlertStatusChanged(AlertStatusChanged):
    """What happened to an outcome alert (topic `outcome.alert-status.v1`): the same statuses, from
    the same services, as `alliance.alert-status.v1` carries for alliance alerts."""

    instrument: OutcomeInstrument | None = None  # type: ignore[assignment]


RECORD_TYPE_HEADER = "record-type"
CLIENT_TRANSFER = "client-transfer"


class ClientTransfer(Event):
    """An admin moved a client to another site (written by intake to `srs.submitted.v1` and, the
    same record, to `ors.submitted.v1`, keyed like the client's submissions so that each topic
    holds it in order with them; the record carries the header `record-type: client-transfer`).
    Scoring applies the copy it reads first; the other changes nothing."""

    record_type: Literal["client-transfer"] = "client-transfer"
    client_id: str
    site_id: str
    accepted_at: datetime
    requested_by: str | None = None


SUBMISSION_RETRACTION = "submission-retraction"
RETRACTED_MOVED = "moved"


class SubmissionRetraction(Event):
    """Scoring's control record: a newer version of a submission names another client, so the
    session leaves this client's record (docs/clinical-records.md, "The same id for another client
    moves the session"). Written by scoring to `srs.submitted.v1` (both scales), keyed by the
    client that loses it, so that it is applied in order with that client's own records; header
    `record-type: submission-retraction`. Applying it again, or one older than what the client's
    record remembers, changes nothing."""

    record_type: Literal["submission-retraction"] = "submission-retraction"
    client_id: str  # the client whose record loses the submission
    submission_id: str
    scale: Literal["alliance", "outcome"]
    # The newest version's order ("retracted as of"): its acceptance time and content digest, and
    # the client it names (which holds the submission now).
    accepted_at: datetime
    digest: str
    moved_to_client_id: str


class DeadLetterReason(StrEnum):
    """Why a record went to `srs.deadletter.v1` (`DeadLetter.reason`): every reason any service
    writes. The values are the wire format (docs/events.md lists them); readers treat a value
    they do not know as "something else"."""

    # A consumer could not read the record (`shared.kafka.decode_batch`).
    UNDECODABLE = "undecodable"  # not UTF-8 JSON
    INVALID = "invalid"  # JSON, but not the event the topic carries
    INVALID_EVENT = "invalid_event"  # alerts' name for both (and for a status breaking the contract)
    # Scoring refused a submission (services/scoring/series.py).
    UNSCORABLE = "unscorable"
    SITE_CONFLICT = "site_conflict"
    SESSION_GAP = "session_gap"
    DUPLICATE = "duplicate"
    SERIES_FULL = "series_full"
    # Alerts gave up on a delivery.
    DELIVERY_FAILED = "delivery_failed"
    # Reporting refused a session: the client's record is at its size cap.
    RECORD_TOO_LARGE = "record_too_large"
    # A poison record, set aside by the shared subscriber (`shared.kafka.classify`).
    DOCUMENT_TOO_LARGE = "document_too_large"
    INVALID_DOCUMENT = "invalid_document"
    VALIDATION_ERROR = "validation_error"
    PERMANENT_ERROR = "permanent_error"


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
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="the original record's headers (correlation id, record type), so that a replay to "
                    "`source_topic` is read like the original; empty in dead letters written before they were kept")
    judgement: int = Field(
        default=0,
        description="which judgement of the submitted version this refusal is: 0 when scoring read it (every "
                    "dead letter but one kind), 1 when a client transfer re-judged a `site_conflict` refusal of it "
                    "and refused it for another reason; of two dead letters of one submission and `accepted_at`, the "
                    "higher judgement is the last word (docs/clinical-records.md, \"Site ownership\")")
