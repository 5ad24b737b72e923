"""What intake accepts and answers, and the validation rules of a submission (pure, no I/O).

Rules (each violation is reported as `{"field": ..., "message": ...}`):
- unknown fields are rejected (also inside `items`);
- ids (`submission_id`, `client_id`, `clinician_id`, `site_id`, `episode_id`) are 1-128 characters
  of `A-Za-z0-9._:-`; `submission_id` and `episode_id` are optional;
- `instrument` is one of SRS, CSRS, GSRS, CGSRS, YCSRS (the alliance scales, default SRS) or ORS,
  CORS, YCORS (the outcome scales, docs/outcome.md); the instrument decides the item names: SRS
  `relationship`, `goals`, `approach`, `overall`; ORS `individually`, `interpersonally`,
  `socially`, `overall` (an item of the other scale is named as such);
- `client_age` (optional, whole years 0-130, a JSON integer) only with an outcome instrument;
- `session_number` is a JSON integer, 1..100000;
- `administered_at` is an ISO-8601 string with a UTC offset, not before 1970 and at most one day
  (configurable) in the future;
- a submission carries either all four `items` or a `total`, never both, never neither, never a
  partial set of items; each item is a JSON number 0.0-10.0 with at most one decimal, `total`
  0.0-40.0 with at most one decimal.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import to_json

from shared import ids
from shared.events import (
    CLIENT_TRANSFER,
    ITEM_NAMES,
    ORS_ITEM_NAMES,
    RECORD_TYPE_HEADER,
    ClientTransfer,
    Instrument,
    Items,
    OrsItems,
    OrsSubmitted,
    OutcomeInstrument,
    SrsSubmitted,
)
from shared.http import validation_errors

ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
MAX_SESSION_NUMBER = 100_000
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_MAX_FUTURE = timedelta(days=1)

FieldError = tuple[str | None, str]


def _one_decimal(value: float) -> float:
    # Ratings are marks on a 10 cm line read to the millimetre: one decimal, no more.
    scaled = value * 10
    if not math.isfinite(value) or abs(scaled - round(scaled)) > 1e-6:
        raise ValueError("must have at most one decimal")
    return round(value, 1)


def _json_string(value: Any) -> Any:
    # pydantic would turn a number into a UTC timestamp; a time without an explicit offset is
    # exactly what the API refuses, so only strings are accepted.
    if not isinstance(value, str):
        raise ValueError("must be an ISO-8601 string with a UTC offset, e.g. 2026-11-25T14:05:00+00:00")
    return value


Id = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=ID_PATTERN)]
Rating = Annotated[float, Field(strict=True, ge=0, le=10, description="0.0-10.0, one decimal"),
                   AfterValidator(_one_decimal)]
Total = Annotated[float, Field(strict=True, ge=0, le=40, description="0.0-40.0, one decimal"),
                  AfterValidator(_one_decimal)]
Timestamp = Annotated[AwareDatetime, BeforeValidator(_json_string)]


class ItemsIn(BaseModel):
    """The four SRS items, all required."""

    model_config = ConfigDict(extra="forbid")

    relationship: Rating
    goals: Rating
    approach: Rating
    overall: Rating


class OrsItemsIn(BaseModel):
    """The four ORS items, all required."""

    model_config = ConfigDict(extra="forbid")

    individually: Rating
    interpersonally: Rating
    socially: Rating
    overall: Rating


class SubmissionIn(BaseModel):
    """One SRS submission as a site posts it. Exactly one of `items` and `total` is given."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{
                "submission_id": "north-2026-11-25-0001", "instrument": "SRS", "client_id": "p-8812",
                "clinician_id": "c-17", "site_id": "north", "session_number": 3,
                "administered_at": "2026-11-25T14:05:00+00:00",
                "items": {"relationship": 9.1, "goals": 8.4, "approach": 9.0, "overall": 8.8},
            }],
        },
    )

    submission_id: Id | None = Field(default=None, description="idempotency key; generated when absent")
    instrument: Instrument = Instrument.SRS
    client_id: Id = Field(description="pseudonymous client id")
    clinician_id: Id
    site_id: Id
    episode_id: Id | None = None
    session_number: int = Field(strict=True, ge=1, le=MAX_SESSION_NUMBER)
    administered_at: Timestamp
    items: ItemsIn | None = Field(default=None, description="all four items, or none and a total")
    total: Total | None = Field(default=None, description="only for sites that record just the total")

    @field_validator("administered_at")
    @classmethod
    def _not_in_future(cls, value: datetime, info: ValidationInfo) -> datetime:
        ctx: Mapping[str, Any] = info.context or {}
        now: datetime = ctx.get("now") or datetime.now(UTC)
        max_future: timedelta = ctx.get("max_future", DEFAULT_MAX_FUTURE)
        if value < EARLIEST:
            raise ValueError("must not be before 1970-01-01T00:00:00+00:00")
        if value > now + max_future:
            raise ValueError(f"must not be more than {_human(max_future)} in the future")
        return value


class OrsSubmissionIn(SubmissionIn):
    """One ORS-family submission (ORS, CORS, YCORS; docs/outcome.md), given at the start of the
    session: the same fields and rules as an SRS submission, the ORS items, and the client's age."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{
                "submission_id": "north-2026-11-25-0001-ors", "instrument": "ORS", "client_id": "p-8812",
                "clinician_id": "c-17", "site_id": "north", "session_number": 3, "client_age": 34,
                "administered_at": "2026-11-25T13:10:00+00:00",
                "items": {"individually": 5.2, "interpersonally": 6.0, "socially": 5.8, "overall": 5.5},
            }],
        },
    )

    instrument: OutcomeInstrument = Field(  # type: ignore[assignment]
        description="required: without it a submission is an SRS")
    items: OrsItemsIn | None = Field(  # type: ignore[assignment]
        default=None, description="all four items, or none and a total")
    client_age: int | None = Field(default=None, strict=True, ge=0, le=130,
                                   description="whole years when the form was given: 13-17 reads an ORS against "
                                               "the adolescent cutoff; absent, the adult one")


AnySubmissionIn = SubmissionIn | OrsSubmissionIn
OUTCOME_INSTRUMENTS: frozenset[str] = frozenset(OutcomeInstrument)


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 86_400 == 0:
        days = seconds // 86_400
        return f"{days} day" + ("s" if days != 1 else "")
    return f"{seconds} seconds"


class BatchIn(BaseModel):
    """A batch of submissions (documentation model: items are validated one by one)."""

    model_config = ConfigDict(extra="forbid")

    submissions: list[SubmissionIn | OrsSubmissionIn] = Field(min_length=1, max_length=1000)


class FieldErrorOut(BaseModel):
    field: str | None
    message: str


class ErrorBody(BaseModel):
    """Every error answer."""

    errors: list[FieldErrorOut]


class Accepted(BaseModel):
    """The broker has acknowledged the submission."""

    submission_id: str
    status: Literal["accepted"] = "accepted"


class TransferIn(BaseModel):
    """Move a client to another site (`POST /v1/clients/{client_id}/transfer`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"site_id": "south"}]})

    site_id: Id = Field(description="the site that owns the client from now on")


class TransferAccepted(BaseModel):
    """The broker has acknowledged the transfer; scoring applies it in order with the client's submissions."""

    client_id: str
    site_id: str
    status: Literal["accepted"] = "accepted"


class ItemResult(BaseModel):
    """The fate of one item of a batch (or one row of a CSV import)."""

    index: int
    row: int | None = Field(default=None, description="CSV line number (CSV imports only)")
    submission_id: str | None
    status: Literal["accepted", "rejected"]
    errors: list[FieldErrorOut] = Field(default_factory=list)


class BatchOut(BaseModel):
    results: list[ItemResult]


_BOTH = "give either all four items or a total, not both"
_NEITHER = "either items (all four) or a total is required"
_ALL_INSTRUMENTS = ", ".join(f"'{i}'" for i in (*Instrument, *OutcomeInstrument))
_OTHER_SCALE = {
    **{name: f"'{name}' is an SRS item; the items of an ORS, CORS or YCORS are {', '.join(ORS_ITEM_NAMES)}"
       for name in ITEM_NAMES if name not in ORS_ITEM_NAMES},
    **{name: f"'{name}' is an ORS item; give `instrument` ORS, CORS or YCORS for an outcome rating "
             f"(the items of an SRS are {', '.join(ITEM_NAMES)})"
       for name in ORS_ITEM_NAMES if name not in ITEM_NAMES},
}
_AGE_ONLY_OUTCOME = "client_age is given with an outcome rating only (instrument ORS, CORS or YCORS)"


def _rewrite(errors: list[Any], item_names: tuple[str, ...]) -> list[FieldError]:
    out = validation_errors(errors)
    for i, e in enumerate(errors):
        loc, kind = e.get("loc", ()), e.get("type")
        if kind == "missing" and len(loc) == 2 and loc[0] == "items":
            out[i] = (out[i][0], f"partial items: all four of {', '.join(item_names)} are required")
        elif kind == "extra_forbidden" and len(loc) == 2 and loc[0] == "items" and loc[1] in _OTHER_SCALE:
            out[i] = (out[i][0], _OTHER_SCALE[loc[1]])
        elif kind == "extra_forbidden" and loc == ("client_age",):
            out[i] = (out[i][0], _AGE_ONLY_OUTCOME)
        elif kind == "enum" and loc == ("instrument",):
            out[i] = (out[i][0], f"Input should be one of {_ALL_INSTRUMENTS}")
        elif kind == "model_type":
            out[i] = (out[i][0], "must be a JSON object")
    return out


def check_submission(data: Any, now: datetime | None = None,
                     max_future: timedelta = DEFAULT_MAX_FUTURE) -> tuple[AnySubmissionIn | None, list[FieldError]]:
    """Validate one submission (a decoded JSON value): the model, or every rule it breaks. Its
    `instrument` picks the scale (an `OrsSubmissionIn` for ORS, CORS, YCORS), so every other rule
    is that scale's."""
    errors: list[FieldError] = []
    if isinstance(data, dict):
        has_items, has_total = data.get("items") is not None, data.get("total") is not None
        if has_items and has_total:
            errors.append(("total", _BOTH))
        elif not has_items and not has_total:
            errors.append(("items", _NEITHER))
    # Only a string can name a scale: any other JSON value (an object or a list is unhashable) is
    # left to the model, which rejects it on `instrument` (422), never a TypeError here (500).
    instrument = data.get("instrument") if isinstance(data, dict) else None
    outcome = isinstance(instrument, str) and instrument in OUTCOME_INSTRUMENTS
    kind: type[AnySubmissionIn] = OrsSubmissionIn if outcome else SubmissionIn
    try:
        model = kind.model_validate(data, context={"now": now or datetime.now(UTC), "max_future": max_future})
    except ValidationError as exc:
        return None, errors + _rewrite(exc.errors(include_url=False, include_input=False),
                                       ORS_ITEM_NAMES if outcome else ITEM_NAMES)
    return (None, errors) if errors else (model, [])


_ID_ADAPTER: TypeAdapter[str] = TypeAdapter(Id)


def check_id(name: str, value: Any) -> list[FieldError]:
    """The id rules (as for the fields of a submission) applied to one value, e.g. a path parameter."""
    try:
        _ID_ADAPTER.validate_python(value)
    except ValidationError as exc:
        return [(name, msg) for _, msg in validation_errors(exc.errors(include_url=False, include_input=False))]
    return []


def check_transfer(data: Any) -> tuple[TransferIn | None, list[FieldError]]:
    """Validate a transfer body (a decoded JSON value): the model, or every rule it breaks."""
    try:
        return TransferIn.model_validate(data), []
    except ValidationError as exc:
        return None, _rewrite(exc.errors(include_url=False, include_input=False), ITEM_NAMES)


def claimed_submission_id(data: Any) -> str | None:
    """The submission id an item names, if it is a well-formed one (for per-item reports)."""
    if isinstance(data, dict):
        sid = data.get("submission_id")
        if isinstance(sid, str) and 0 < len(sid) <= 128 and all(c.isascii() and (c.isalnum() or c in "._:-")
                                                                for c in sid):
            return sid
    return None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A submission ready to publish."""

    submission_id: str
    key: bytes
    value: bytes
    headers: Mapping[str, str] | None = None  # besides content-type and correlation_id
    outcome: bool = False  # an outcome rating (ORS family): published to `ors.submitted.v1`


def new_submission_id() -> str:
    """A server-generated submission id (when the site gives none)."""
    return str(uuid.uuid4())


def to_event(sub: SubmissionIn, tenant_id: str, now: datetime,
             submission_id: str | None = None) -> SrsSubmitted | OrsSubmitted:
    """The event of a validated submission (tenant from the API key): `srs.submitted.v1`'s, or
    `ors.submitted.v1`'s for an outcome rating."""
    # Built without re-validation: every field was validated on the way in.
    return (OrsSubmitted if isinstance(sub, OrsSubmissionIn) else SrsSubmitted).model_construct(
        **_document(sub, tenant_id, now, submission_id or sub.submission_id or new_submission_id(), typed=True))


def _document(sub: SubmissionIn, tenant_id: str, now: datetime, sid: str, typed: bool = False) -> dict[str, Any]:
    """The event's fields; `typed`: items as the event's model (for `model_construct`), else a dict (for JSON)."""
    items: dict[str, float] | None = None if sub.items is None else sub.items.__dict__
    doc: dict[str, Any] = {
        "schema_version": 1, "event_id": ids.submitted_event_id(tenant_id, sid), "tenant_id": tenant_id,
        "occurred_at": now, "submission_id": sid, "site_id": sub.site_id, "clinician_id": sub.clinician_id,
        "client_id": sub.client_id, "episode_id": sub.episode_id, "instrument": sub.instrument,
        "session_number": sub.session_number, "administered_at": sub.administered_at, "items": items,
        "total": sub.total, "accepted_at": now,
    }
    if isinstance(sub, OrsSubmissionIn):
        doc["client_age"] = sub.client_age
    if typed and items is not None:
        doc["items"] = (OrsItems if isinstance(sub, OrsSubmissionIn) else Items).model_construct(None, **items)
    return doc


def outgoing(sub: SubmissionIn, tenant_id: str, now: datetime, submission_id: str | None = None) -> Outgoing:
    """The Kafka record of a validated submission: key `tenant:client`, value the event's JSON; an
    outcome rating's record goes to `ors.submitted.v1` (`outcome`). `submission_id` is used when the
    submission names none (else a random one is generated).

    The hot path of every batch: the document is serialized straight from a dict (the same JSON
    as `to_event(...).model_dump_json()`, which a unit test checks), skipping model construction.
    """
    sid = sub.submission_id or submission_id or new_submission_id()
    return Outgoing(sid, ids.partition_key(tenant_id, sub.client_id), to_json(_document(sub, tenant_id, now, sid)),
                    outcome=isinstance(sub, OrsSubmissionIn))


TRANSFER_HEADERS: Mapping[str, str] = {RECORD_TYPE_HEADER: CLIENT_TRANSFER}


def transfer_event(tenant_id: str, client_id: str, site_id: str, requested_by: str | None, now: datetime,
                   request_id: str | None = None) -> ClientTransfer:
    """The `ClientTransfer` of one transfer request (ids already validated); a fresh request id
    per request unless given."""
    request_id = request_id or str(uuid.uuid4())
    return ClientTransfer(
        event_id=ids.client_transfer_event_id(tenant_id, client_id, site_id, request_id), tenant_id=tenant_id,
        occurred_at=now, client_id=client_id, site_id=site_id, accepted_at=now, requested_by=requested_by)


def transfer_records(event: ClientTransfer) -> tuple[Outgoing, Outgoing]:
    """The Kafka records of a transfer: the same record (the client's key, the header `record-type:
    client-transfer`, the same event) on `srs.submitted.v1` and on `ors.submitted.v1`, so that each
    topic's partition holds it in order with the client's submissions of that topic (scoring applies
    the copy it reads first; docs/clinical-records.md, "Site ownership"). Published together, the
    transfer accepted once both are acknowledged."""
    key, value = ids.partition_key(event.tenant_id, event.client_id), event.model_dump_json().encode()
    return (Outgoing(event.event_id, key, value, TRANSFER_HEADERS),
            Outgoing(event.event_id, key, value, TRANSFER_HEADERS, outcome=True))


__all__ = ["ITEM_NAMES", "check_submission", "outgoing", "to_event"]
