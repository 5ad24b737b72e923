"""One client's clinical record as scoring keeps it: pure, in memory, no I/O, no clock.

`store.py` maps a `ClientState` to one MongoDB document per (tenant, client). The contract this
implements is docs/clinical-records.md; the shape of the algorithm is:

    what was submitted (inputs)  --derive-->  what the record shows (a View)
    what the record showed       --diff---->  the events that tell everyone the difference

1. **Inputs.** For every submission id, its newest accepted version (`Version`), with its
   earliest for this client (`Version.origin`, which names a derived episode when a correction
   changed only the time of its first session; kept across a move to another client and back by
   the tombstone, `Moved.earliest`), and the client's owning site. Nothing else is an input: in
   particular no earlier *decision* is (not even a name published before).
2. **View** (`derive`). Versions naming the same session are grouped; the newest accepted is
   current. Sessions without an episode id are put in episodes by the order they were
   administered (a restart of the numbering begins a new episode), each named by the date of its
   first session as first accepted (`_named_runs`). Every session of every episode
   is scored against its previous session with the tenant's rules, and the latest session of the
   current episode is the one that may hold an alert. The view is a function of the set of
   current versions and the rules alone, so it does not depend on the order the versions arrived
   in, nor on duplicates.
3. **Diff** (`_publish`). What was published last is kept per session slot (revision, digest of
   what it showed) and per alert (revision, lifecycle). A slot whose digest changed gets a new
   scored event with `revision` + 1; an alert whose content changed is raised again with
   `revision` + 1; an alert that is no longer the latest's is `superseded`, or `withdrawn` when a
   correction cleared its triggers or its session left the episode. Consumers keep the greatest
   revision per key, so they converge on the view whatever they receive in between.

Decisions that depend on the state at arrival (a `session_gap` or `site_conflict` rejection, an
identical resend under a new id rejected as `duplicate`) are stored with the version they
rejected, so a redelivery of that record gets the same answer even after later records changed
the state. One refusal is not final: a `site_conflict` is decided by the site that owned the client
when the version was accepted (`owner_at`, over the transfers applied so far), and an ORS-family
form refused so keeps its content (`keeps_content`, bounded) so that a transfer accepted earlier
than it, read after it, re-judges it (`to_rejudge`) and takes it as if it had just arrived; refused
again for another reason, that refusal replaces the `site_conflict`, as the next judgement
(`Rejection.judgement`), and the step names it (`Step.refused`) for its dead letter.
Transfers are placed in the ownership timeline by acceptance, whatever order they are read in
(`placed`): the client's owner is the destination of the transfer accepted last (ties: the greater
event id). A transfer comes twice, once per submitted topic: the copy read first applies it, the
other changes nothing (`ClientState.transfer`). A record seen before (same submission, same
accepted time, same content) is a *redelivery*: the step changes nothing and returns
`redelivered=True`, and the handler re-emits everything the record currently shows
(`current_outputs`), because the first attempt's events may not have reached the broker before a
crash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from itertools import pairwise
from typing import Literal, NamedTuple

from services.scoring import outcome as O
from services.scoring import rules as R
from shared import ids
from shared.events import (
    ITEM_NAMES,
    ORS_ITEM_NAMES,
    OUTCOME_OF,
    SCORED_INSTRUMENTS,
    AlertStatus,
    Instrument,
    Items,
    Lifecycle,
    Operator,
    OrsItems,
    OutcomeInstrument,
    Severity,
)

DERIVED_PREFIX = ids.DERIVED_EPISODE_PREFIX
MAX_TRANSFER_IDS = 32

RejectReason = Literal["site_conflict", "session_gap", "duplicate", "unscorable", "series_full"]  # duplicate: kept


def _utc(ts: datetime) -> datetime:
    return ts.astimezone(UTC) if ts.tzinfo else ts.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Version:
    """One accepted version of a submission: everything the submitter said about the session."""

    submission_id: str
    instrument: str
    episode_id: str | None
    session_number: int
    administered_at: datetime
    site_id: str
    clinician_id: str
    items: tuple[float, float, float, float] | None
    total: float | None
    accepted_at: datetime
    digest: str = ""
    client_age: int | None = None  # ORS family only: picks the ORS cutoff (docs/outcome.md)
    # The earliest accepted version of this submission, once a later one replaced it (a
    # correction): a derived episode this session begins is named by that version's date when the
    # correction changed only the time (`named_at`). Kept whatever the correction changed, so that
    # it is the earliest whatever order the versions arrive in. None: this version is its
    # submission's first (or was stored before the rule: then the names it published are its own).
    origin: Origin | None = None
    # Derived once here (not as cached properties: those take a lock on every read in 3.11, and
    # these are read many times per step).
    accepted_utc: datetime = field(init=False, repr=False, compare=False)
    administered_key: tuple[datetime, int, str] = field(init=False, repr=False, compare=False)
    session_key: tuple[str, ...] = field(init=False, repr=False, compare=False)
    # What the record keys the submission by: its id on its scale (`record_key`).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", content_digest(self))
        object.__setattr__(self, "key", record_key(self.submission_id, self.instrument))
        administered = _utc(self.administered_at)
        object.__setattr__(self, "accepted_utc", _utc(self.accepted_at))
        object.__setattr__(self, "administered_key", (administered, self.session_number, self.submission_id))
        # Which session the version names (see the contract: without an episode id, the UTC date
        # of administration is part of the identity).
        object.__setattr__(self, "session_key", (self.instrument, "e", self.episode_id, str(self.session_number))
                           if self.episode_id is not None else
                           (self.instrument, "d", administered.date().isoformat(), str(self.session_number)))

    def order(self) -> tuple[datetime, str]:
        """Which of two versions is newer: later accepted, then (a tie) the larger digest."""
        return (self.accepted_utc, self.digest)

    @property
    def named_at(self) -> datetime:
        """The administered time a derived episode this session begins is named by: that of the
        submission's earliest accepted version (docs/clinical-records.md, "Episodes"), so a
        corrected time does not rename the episode, nor its alerts."""
        o = self.origin
        return o.administered_at if o is not None and o.names(self) else self.administered_at

    def first(self) -> Origin:
        """The earliest accepted version of this submission that the record has seen."""
        return self.origin if self.origin is not None else Origin(
            self.accepted_at, self.digest, self.administered_at, self.instrument, self.session_number,
            self.episode_id is None)

    def named_from(self, first: Origin) -> Version:
        """This version with `first` as its submission's earliest accepted version: a correction
        inherits it from the version it replaces, and the kept version takes a version accepted
        earlier still that arrives late."""
        return replace(self, origin=first)

    def items_model(self) -> Items | None:
        """The items as the event model carries them (built only when an event is)."""
        if self.items is None:
            return None
        r, g, a, o = self.items
        return Items.model_construct(relationship=r, goals=g, approach=a, overall=o)

    def ors_items_model(self) -> OrsItems | None:
        """The items of an ORS-family version as the event model carries them."""
        if self.items is None:
            return None
        i, p, s, o = self.items
        return OrsItems.model_construct(individually=i, interpersonally=p, socially=s, overall=o)

    @property
    def outcome(self) -> bool:
        """An ORS-family version (scored by the outcome rules, published on the ORS topics)."""
        return self.instrument in _OUTCOME

    def ratings(self) -> Ratings | None:
        """The items for the rules: a plain tuple, cheap enough to build on every derivation."""
        return None if self.items is None else Ratings(self.items)


@dataclass(frozen=True)
class Origin:
    """The earliest accepted version of a submission, as much of it as naming needs: when it was
    accepted (and its digest: the order of versions, `Version.order`), the time it said, and
    which session it named without its date (instrument, number, whether without episode id)."""

    accepted_at: datetime
    digest: str
    administered_at: datetime
    instrument: str
    session_number: int
    derived: bool  # it had no episode id

    def order(self) -> tuple[datetime, str]:
        return (_utc(self.accepted_at), self.digest)

    def names(self, v: Version) -> bool:
        """Whether a derived episode `v` begins is named by this version's date: `v` corrects
        only the time of the session this version named (the same instrument and number, neither
        with an episode id). A correction of anything else that says which session it is names a
        session afresh, so its episodes are named by its own date."""
        return (self.derived and v.episode_id is None and self.instrument == v.instrument
                and self.session_number == v.session_number)


# A submission id names one submission of one scale (docs/clinical-records.md, "Session identity"):
# the same id may be used once on the alliance scale (SRS family) and once on the outcome scale
# (ORS family), independently. The record keys every submission by its id on its scale: an
# alliance submission by its id alone (so the stored state of SRS-only clients is what it always
# was), an outcome one by its id behind this prefix (a character no submission id may hold).
OUTCOME_KEY_PREFIX = "ors\x1f"


def record_key(submission_id: str, instrument: str) -> str:
    """The key of a submission in the record: its id on the scale of `instrument`."""
    return OUTCOME_KEY_PREFIX + submission_id if instrument in _OUTCOME else submission_id


def is_outcome_key(key: str) -> bool:
    """The key names a submission on the outcome scale."""
    return key.startswith(OUTCOME_KEY_PREFIX)


def submission_of(key: str) -> str:
    """The submission id a record key names (the inverse of `record_key`, scale dropped)."""
    return key.removeprefix(OUTCOME_KEY_PREFIX)


def _digest(parts: tuple[object, ...]) -> str:
    """A short, stable digest of plain values (`repr` of str, int, float, None and tuples of them
    is the same in every process, unlike `hash`); stored in the state, so it must not change.
    Enum members are not plain: their `repr` names the class (pass `_text(member)`)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=10).hexdigest()


def _text(value: str | None) -> str | None:
    """A `StrEnum` member (e.g. a `Severity`) as the plain string it stands for, for `_digest`."""
    return None if value is None else str(value)


def content_digest(v: Version) -> str:
    """A digest of what the submitter said (not of when it was accepted, nor its id). The age is
    part of an ORS-family version only: the digests of SRS versions are stored, and stay as they were."""
    parts = (v.instrument, v.episode_id, v.session_number, _utc(v.administered_at).isoformat(), v.site_id,
             v.clinician_id, v.items, v.total)
    return _digest((*parts, v.client_age) if v.instrument in _OUTCOME else parts)


class Ratings(NamedTuple):
    """The four items in form order (`shared.events.ITEM_NAMES`), as the rules read them
    (`rules.ItemRatings`): lighter than the event model's `Items`."""

    items: tuple[float, float, float, float]

    def values(self) -> tuple[float, float, float, float]:
        return self.items


@dataclass(frozen=True)
class Rejection:
    """A version scoring refused, kept so that a redelivery gets the same answer. `version`: the
    refused content itself, kept only for a `site_conflict` refusal a later transfer may still
    re-judge (`keeps_content`), None otherwise (the refusal is final)."""

    accepted_at: datetime
    digest: str
    reason: RejectReason
    detail: str
    version: Version | None = None
    # Which judgement of the version this is: 0 when it was read, 1 when a transfer re-judged its
    # `site_conflict` and refused it for another reason. Its dead letter carries it
    # (`DeadLetter.judgement`), so that a reader keeps the last word whatever order it reads them in.
    judgement: int = 0


class Refusal(NamedTuple):
    """A version a transfer's re-judging refused for another reason than `site_conflict`, with that
    refusal and when it was decided: the transfer's timeline entry keeps it, so that a redelivery of
    the transfer publishes its dead letter again, byte-equal (docs/clinical-records.md)."""

    version: Version
    rejection: Rejection
    at: datetime


# --- who owned the client when a version was accepted (docs/clinical-records.md) ------------

# How many site_conflict refusals a client's record keeps the content of, to re-judge them when a
# transfer accepted before them is applied after them (docs/clinical-records.md, "Site ownership"):
# past it, the oldest accepted loses its content and its refusal is final, as every refusal was before.
MAX_KEPT_REFUSALS = 16


class Handover(NamedTuple):
    """A transfer as the ownership timeline keeps it: from `accepted_at` on (inclusive) the client
    is `to_site`'s, before it `from_site`'s (None: no site yet, the first accepted session's); the
    two are one site for a transfer to the site that owned the client at its place (`placed`).
    `event_id`: the transfer's; `taken`: the record keys of the refusals it re-judged and took
    (re-registered in the index when the transfer is redelivered); `refused`: those its re-judging
    refused for another reason (their dead letters are published again when it is redelivered)."""

    accepted_at: datetime
    from_site: str | None
    to_site: str
    event_id: str
    taken: tuple[str, ...] = ()
    refused: tuple[Refusal, ...] = ()


def owner_at(handovers: Sequence[Handover], owner: str | None, at: datetime) -> str | None:
    """The site that owned the client when a version accepted `at` was accepted, by acceptance time
    alone: the site the earliest transfer accepted after `at` moved it from, else `owner` (the
    site now). A transfer takes effect at its acceptance instant: a version accepted at the very
    same time is the new site's. `handovers` in acceptance order; a time before every one kept is
    judged as of the oldest kept (its `from_site`), the older ones being forgotten."""
    t = _utc(at)
    for h in handovers:
        if h.accepted_at > t:
            return h.from_site
    return owner


def placed(handovers: Sequence[Handover], owner: str | None, new: Handover) -> list[Handover]:
    """The timeline with the transfer `new` (its `from_site` ignored) at its place: in acceptance
    order, two accepted at the same instant by event id, so the order never depends on the order
    they were read in. Every entry's `from_site` is then the site the one before it moved the
    client to (the first's: the owner before every transfer kept, `owner` when none is); a
    transfer to the site that owned the client at its place is kept too (from and to alike), so an
    earlier transfer read after it cannot outlast it. The last MAX_TRANSFER_IDS are kept."""
    ordered = sorted([*handovers, new], key=lambda h: (h.accepted_at, h.event_id))
    site = handovers[0].from_site if handovers else owner
    chained = []
    for h in ordered:
        chained.append(h._replace(from_site=site))
        site = h.to_site
    return chained[-MAX_TRANSFER_IDS:]


def site_allowed(site_id: str, owner: str | None) -> bool:
    """Whether a version of `site_id` may change the record of a client `owner` owned when it was
    accepted (None: nobody yet, so the version's site will)."""
    return owner is None or owner == site_id


def keeps_content(v: Version, reason: RejectReason) -> bool:
    """Whether a refusal of `v` keeps its content to be re-judged: a `site_conflict` of an
    outcome-family version (on `ors.submitted.v1`, which a transfer written to `srs.submitted.v1`
    alone, as intake did before it wrote a copy on each topic, may be read before or after; an SRS
    shares that copy's partition, so it is judged in acceptance order but for the moment a transfer
    is being published). Whatever its acceptance: a transfer accepted before the newest one applied
    may still be read after it (`placed`) and change who owned the client then."""
    return reason == "site_conflict" and v.outcome


def to_rejudge(rejected: Mapping[str, Rejection], handovers: Sequence[Handover], owner: str | None) -> list[Version]:
    """The kept refusals that the ownership timeline now allows (their site owned the client when
    they were accepted), oldest accepted first: what a transfer takes into the record."""
    found = [r.version for r in rejected.values() if r.version is not None
             and site_allowed(r.version.site_id, owner_at(handovers, owner, r.version.accepted_at))]
    return sorted(found, key=Version.order)


def contents_to_drop(rejected: Mapping[str, Rejection], bound: int = MAX_KEPT_REFUSALS) -> list[str]:
    """The keys of the kept refusals whose content is no longer kept: past `bound`, the oldest
    accepted (their refusals are final)."""
    kept = sorted(((_utc(r.accepted_at), r.digest, k) for k, r in rejected.items() if r.version is not None),
                  reverse=True)
    return sorted(k for _, _, k in kept[bound:])


# --- which client holds a submission id (docs/clinical-records.md) ---------------------------

# How new a client's version of a submission is, tenant-wide: its acceptance time, its content
# digest (the order of versions, `Version.order`), then the client's id (two clients' versions
# accepted at the same instant with the same content are still ordered, the same way everywhere).
Holding = tuple[datetime, str, str]


def holding(accepted_at: datetime, digest: str, client_id: str) -> Holding:
    return (_utc(accepted_at), digest, client_id)


def holder(held: Mapping[str, tuple[datetime, str]]) -> Holding | None:
    """Of the newest accepted version each client holds of one submission id (client ->
    (accepted_at, digest)), the newest: the client that holds the submission. None: no client."""
    return max((holding(at, d, c) for c, (at, d) in held.items()), default=None)


def newer_elsewhere(held: Mapping[str, tuple[datetime, str]], client_id: str, accepted_at: datetime,
                    digest: str) -> Holding | None:
    """Whether another client holds a newer version than this client's (`accepted_at`, `digest`):
    then that version (with its client), before which this one changes nothing; else None."""
    newest = holder({c: o for c, o in held.items() if c != client_id})
    return newest if newest is not None and newest > holding(accepted_at, digest, client_id) else None


def retractions(held: Mapping[str, tuple[datetime, str]]) -> list[tuple[str, Holding]]:
    """Every client that must lose the submission, with the version it loses it to: each client
    but the holder (all of them hold older versions)."""
    newest = holder(held)
    if newest is None:
        return []
    return [(c, newest) for c in sorted(held) if c != newest[2]]


# How many former holders of a submission id the index keeps beside its holder (docs/clinical-
# records.md, "Records are bounded"). A real move involves two or three clients; the bound is for an
# integration that re-sends one id for thousands, which would otherwise grow one index document
# without end (MongoDB refuses documents over 16 MiB).
INDEX_FORMER_HOLDERS = 8


def forgettable(held: Mapping[str, tuple[datetime, str]], keep: int = INDEX_FORMER_HOLDERS) -> list[str]:
    """The clients the index may forget of one submission id, once their retractions are
    published: every former holder but the `keep` newest. Nothing decides by them any more: which
    version is newest is decided by the holder's, which is kept (so a forgotten client's older
    version, arriving again, is still refused), and their retraction is on its way, durable in the
    broker, so they stop showing the session without the index listing them."""
    newest = holder(held)
    if newest is None:
        return []
    former = sorted((holding(at, d, c) for c, (at, d) in held.items() if c != newest[2]), reverse=True)
    return sorted(c for _, _, c in former[keep:])


@dataclass(frozen=True)
class Moved:
    """A submission retracted from this client's record (a tombstone): another client holds a
    version at least as new as `accepted_at`/`digest` of `to_client`. `shown`: the version the
    record showed when it was retracted (its retracted event is built from it), None when it showed
    none; `revision` and `at`: that event's (0 when none). `first`: the earliest version of the
    submission this client's record has seen (`earliest`), when that is not `shown`'s: a version
    that brings the submission back is named by it, as if it had never left (docs/clinical-
    records.md, "Episodes")."""

    accepted_at: datetime
    digest: str
    to_client: str
    shown: Version | None = None
    episode_id: str = ""
    episode_derived: bool = False
    revision: int = 0
    at: datetime | None = None
    first: Origin | None = None

    def as_of(self) -> Holding:
        return holding(self.accepted_at, self.digest, self.to_client)

    def earliest(self) -> Origin | None:
        """The earliest version of the submission this client's record has seen, held or not
        (None: none, the record only heard of the move)."""
        if self.first is not None:
            return self.first
        return self.shown.first() if self.shown is not None else None

    def seen(self, v: Version) -> Moved:
        """This tombstone having seen `v` too (a version of this client older than the move)."""
        known = self.earliest()
        return self if known is not None and known.order() <= v.order() else replace(self, first=v.first())


# --- the view -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Session:
    """What every session shows, whichever scale: the version shown, where it is, its total."""

    version: Version
    episode_id: str
    episode_derived: bool
    site_id: str
    site_version: int
    total: float

    @property
    def slot(self) -> str:
        return slot_key(self.version.instrument, self.episode_id, self.version.session_number)


@dataclass(frozen=True)
class SessionView(_Session):
    """What the record shows for one SRS-family session (a slot: instrument, episode, number)."""

    cutoff: float
    operator: Operator
    previous_total: float | None
    change_from_previous: float | None
    flags: tuple[str, ...]
    triggers: tuple[str, ...]
    severity: Severity | None
    low_items: tuple[str, ...]
    latest: bool

    def not_latest(self) -> SessionView:
        """The same session once a later one is the latest (its digest, which leaves `latest`
        out, carried over rather than computed again)."""
        out = SessionView(self.version, self.episode_id, self.episode_derived, self.site_id, self.site_version,
                          self.total, self.cutoff, self.operator, self.previous_total, self.change_from_previous,
                          self.flags, self.triggers, self.severity, self.low_items, False)
        out.__dict__["digest"] = self.digest  # frozen: the cached property's slot is written directly
        return out

    @cached_property
    def digest(self) -> str:
        """Everything a scored event shows except `latest` (a point-in-time fact: a new session
        would otherwise re-publish its predecessor) and the revision bookkeeping."""
        v = self.version
        return _digest((v.submission_id, v.digest, self.episode_id, self.site_id, self.site_version, self.total,
                        self.cutoff, self.operator, self.previous_total, self.change_from_previous, self.flags,
                        self.triggers, _text(self.severity), self.low_items))


@dataclass(frozen=True)
class OutcomeView(_Session):
    """What the record shows for one ORS-family session (docs/outcome.md). Plain strings for the
    band and the change (they enter the digest). YCORS: total only."""

    band: str
    cutoff: float | None
    reliable_change: float | None
    intake_total: float | None
    change_from_intake: float | None
    previous_total: float | None
    change_from_previous: float | None
    change: str | None
    clinically_significant_improvement: bool
    in_clinical_range: bool | None
    flags: tuple[str, ...]
    triggers: tuple[str, ...]
    severity: Severity | None
    latest: bool

    def not_latest(self) -> OutcomeView:
        """As `SessionView.not_latest`."""
        out = replace(self, latest=False)
        out.__dict__["digest"] = self.digest
        return out

    @cached_property
    def digest(self) -> str:
        """Everything an OrsScored event shows except `latest` and the revision bookkeeping."""
        v = self.version
        return _digest(("outcome", v.submission_id, v.digest, self.episode_id, self.site_id, self.site_version,
                        self.total, self.band, self.cutoff, self.reliable_change, self.intake_total,
                        self.change_from_intake, self.previous_total, self.change_from_previous, self.change,
                        self.clinically_significant_improvement, self.in_clinical_range, self.flags,
                        self.triggers, _text(self.severity)))


AnyView = SessionView | OutcomeView


@dataclass(frozen=True)
class AlertView:
    """The alert the latest session of a current episode holds: an alliance alert (its session a
    `SessionView`) or an outcome alert (an `OutcomeView`). `severity` is what the session's own
    rules say; an alliance alert whose session's outcome form triggers an outcome alert (superseded
    by a later session's or not) is `outcome_at_risk`, and then critical (`shown_severity`)."""

    alert_id: str
    session: AnyView
    triggers: tuple[str, ...]
    severity: Severity
    site_id: str  # the site it was last raised for (`revision_site`: a transfer does not move an open alert)
    outcome_at_risk: bool = False

    @property
    def shown_severity(self) -> Severity:
        return Severity.CRITICAL if self.outcome_at_risk else self.severity

    @cached_property
    def digest(self) -> str:
        s, v = self.session, self.session.version
        if isinstance(s, OutcomeView):
            return _digest(("outcome", v.submission_id, v.digest, self.triggers, _text(self.severity), s.total,
                            s.cutoff, s.intake_total, s.change_from_intake, s.previous_total,
                            s.change_from_previous, self.site_id))
        parts = (v.submission_id, v.digest, self.triggers, _text(self.severity), s.total, s.previous_total,
                 s.change_from_previous, s.cutoff, s.low_items, self.site_id)
        # Only when it holds: the digests of alerts raised before the ORS existed are stored.
        return _digest((*parts, "outcome_at_risk") if self.outcome_at_risk else parts)


@dataclass(frozen=True)
class Tail:
    """Where one instrument's sessions end: what `extend` needs to add a session after them."""

    newest: Version  # the most recently administered session
    latest_slot: str  # the session that is `latest` (the last of the newest's episode)
    latest_alert: str | None  # the alert it holds
    last_derived: tuple[str, Version] | None  # the last session without an episode id, and its episode
    last_given: Mapping[str, Version]  # each given episode id -> its highest-numbered session
    episode_ids: frozenset[str]
    sizes: Mapping[tuple[str, bool], int]  # sessions per (episode id, derived?)


@dataclass(frozen=True)
class View:
    sessions: dict[str, AnyView]  # by slot
    alerts: dict[str, AlertView]  # by alert id
    current: frozenset[str]  # record keys (`record_key`) of the versions that represent their session
    members: frozenset[str]  # ... and of the identical resends of those (not superseded)
    slot_of_key: dict[tuple[str, ...], str]  # session key of each current version -> its slot
    tails: dict[str, Tail] = field(default_factory=dict)  # by instrument


def slot_key(instrument: str, episode_id: str, session_number: int) -> str:
    return "\x1f".join((instrument, episode_id, str(session_number)))


def derived_episode_id(first: Version) -> str:
    """`auto/<UTC date of the episode's first session>/<its number>` (see the contract), the date
    that of the first session's earliest accepted version (`Version.named_at`): a correction of
    its time keeps the name. `episodes_of` decides when that name is another episode's."""
    return ids.derived_episode_id(first.named_at, first.session_number)


def _named_runs(runs: list[list[Version]]) -> list[tuple[str, bool, list[Version]]]:
    """The derived episodes of one instrument's runs (in order of administration), each named by
    `derived_episode_id`, unless that name is taken: a run's own name (the date its first session
    is administered on now) is never another's, as two sessions of one date and number are one
    session; a name kept from a corrected date may be. Then the run whose first session is
    administered on that date keeps it, and so does the earlier of two runs keeping the same name;
    the other is named by its own date. Decided by the versions alone, as everything in a view."""
    if all(r[0].origin is None for r in runs):
        return [(derived_episode_id(r[0]), True, r) for r in runs]
    own = [ids.derived_episode_id(r[0].administered_at, r[0].session_number) for r in runs]
    taken = set(own)
    out: list[tuple[str, bool, list[Version]]] = []
    for run, mine in zip(runs, own, strict=True):
        kept = derived_episode_id(run[0])
        if kept != mine and kept not in taken:
            taken.add(kept)
            mine = kept
        out.append((mine, True, run))
    return out


def _administered(v: Version) -> tuple[datetime, int, str]:
    return v.administered_key


def current_versions(versions: Iterable[Version]) -> tuple[dict[tuple[str, ...], Version], set[str]]:
    """The current version of each session, and the ids whose version is the session's content.

    Versions of one session are grouped by content: the content accepted last wins, and it is
    represented by the version of it accepted FIRST (ties: the smaller id). So an identical resend
    under a new id changes nothing, whatever order the two arrive in; the resend's id is a member
    of the winning group (the second value), not superseded.
    """
    groups: dict[tuple[str, ...], dict[str, list[Version]]] = {}
    for v in versions:
        groups.setdefault(v.session_key, {}).setdefault(v.digest, []).append(v)
    by_key: dict[tuple[str, ...], Version] = {}
    members: set[str] = set()
    for key, contents in groups.items():
        winner = max(contents.values(), key=lambda g: (max(v.accepted_utc for v in g), g[0].digest))
        by_key[key] = min(winner, key=lambda v: (v.accepted_utc, v.submission_id))
        members.update(v.key for v in winner)
    return by_key, members


def episodes_of(current: Iterable[Version]) -> dict[str, list[tuple[str, bool, list[Version]]]]:
    """Per instrument, its episodes: (episode id, derived?, sessions by number). Sessions without
    an episode id form runs in order of administration (a restart of the numbering begins one),
    named by `_named_runs`."""
    by_instrument: dict[str, list[Version]] = {}
    for v in current:
        by_instrument.setdefault(v.instrument, []).append(v)
    out: dict[str, list[tuple[str, bool, list[Version]]]] = {}
    for instrument, vs in by_instrument.items():
        episodes: list[tuple[str, bool, list[Version]]] = []
        given: dict[str, list[Version]] = {}
        for v in vs:
            if v.episode_id is not None:
                given.setdefault(v.episode_id, []).append(v)
        for eid, members in sorted(given.items()):
            episodes.append((eid, False, sorted(members, key=lambda x: x.session_number)))
        runs: list[list[Version]] = []
        for v in sorted((v for v in vs if v.episode_id is None), key=_administered):
            if not runs or v.session_number <= runs[-1][-1].session_number:
                runs.append([])  # a restart of the numbering begins a new episode
            runs[-1].append(v)
        episodes.extend(_named_runs(runs))
        out[instrument] = episodes
    return out


def derive(versions: Iterable[Version], owner: str | None, site_version: int, rules: R.TenantRules,
           tenant_id: str, client_id: str, alert_sites: Mapping[str, str] | None = None) -> View:
    """What the record shows: every current session scored, and the alerts (see module docs)."""
    by_key, resends = current_versions(v for v in versions if v.instrument in _SCORED)
    sessions: dict[str, AnyView] = {}
    alerts: dict[str, AlertView] = {}
    slot_of: dict[tuple[str, ...], str] = {}
    tails: dict[str, Tail] = {}
    for instrument, episodes in episodes_of(by_key.values()).items():
        resolved = _resolved(rules, instrument)
        newest = max((v for _, _, vs in episodes for v in vs), key=_administered)
        latest_slot, latest_alert = "", None
        last_derived: tuple[str, Version] | None = None
        last_given: dict[str, Version] = {}
        for eid, derived, members in episodes:
            is_current = any(v is newest for v in members)
            prev: AnyView | None = None
            for i, v in enumerate(members):
                view, alert = _scored_view(v, eid, derived, prev, is_current and i == len(members) - 1, resolved,
                                           owner, site_version, tenant_id, client_id, alert_sites)
                sessions[view.slot] = view
                slot_of[v.session_key] = view.slot
                if alert is not None:
                    alerts[alert.alert_id] = alert
                if view.latest:
                    latest_slot, latest_alert = view.slot, alert.alert_id if alert is not None else None
                prev = view
            if derived:  # derived runs come in order of administration: the last one wins
                last_derived = (eid, members[-1])
            else:
                last_given[eid] = members[-1]
        tails[instrument] = Tail(newest, latest_slot, latest_alert, last_derived, last_given,
                                 frozenset(e for e, _, _ in episodes),
                                 {(e, d): len(ms) for e, d, ms in episodes})
    _mark_outcome_at_risk(alerts, sessions, tails)
    return View(sessions, alerts, frozenset(v.key for v in by_key.values()), frozenset(resends), slot_of,
                tails)


def _resolved(rules: R.TenantRules, instrument: str) -> R.TenantRules | R.OutcomeRules:
    """The rules one instrument is scored by: the alliance rules (with its override) for the SRS
    family, its outcome rules for the ORS family."""
    return rules.outcome_for(instrument) if instrument in _OUTCOME else rules.for_instrument(instrument)


def _scored_view(v: Version, eid: str, derived: bool, prev: AnyView | None, latest: bool,
                 resolved: R.TenantRules | R.OutcomeRules, owner: str | None, site_version: int, tenant_id: str,
                 client_id: str, alert_sites: Mapping[str, str] | None) -> tuple[AnyView, AlertView | None]:
    """One session scored against the previous session of its episode (which is of the same
    instrument, so of the same kind), and the alert it holds."""
    if isinstance(resolved, R.OutcomeRules):
        assert prev is None or isinstance(prev, OutcomeView)
        return _outcome_view(v, eid, derived, prev, latest, resolved, owner, site_version, tenant_id, client_id,
                             alert_sites)
    assert prev is None or isinstance(prev, SessionView)
    return _session_view(v, eid, derived, prev, latest, resolved, owner, site_version, tenant_id, client_id,
                         alert_sites)


def _outcome_view(v: Version, eid: str, derived: bool, prev: OutcomeView | None, latest: bool,
                  resolved: R.OutcomeRules, owner: str | None, site_version: int, tenant_id: str, client_id: str,
                  alert_sites: Mapping[str, str] | None) -> tuple[OutcomeView, AlertView | None]:
    """One ORS-family session scored against its episode's intake and previous session."""
    total = R.total_of(v.ratings(), v.total, ORS_ITEM_NAMES)
    intake, prev_total = (prev.intake_total, prev.total) if prev is not None else (None, None)
    s = O.score_outcome(v.instrument, v.client_age, total, intake, prev_total, v.session_number, latest, resolved)
    view = OutcomeView(v, eid, derived, owner or v.site_id, site_version, s.total, s.age_band.value, s.cutoff,
                       s.reliable_change_index, s.intake_total, s.change_from_intake, s.previous_total,
                       s.change_from_previous, None if s.change is None else s.change.value,
                       s.clinically_significant_improvement, s.in_clinical_range, tuple(s.flags), tuple(s.triggers),
                       s.severity, latest)
    if not s.alert or s.severity is None:
        return view, None
    aid = ids.alert_id(tenant_id, client_id, v.instrument, eid, v.session_number)
    site = (alert_sites or {}).get(aid, view.site_id)  # the site it was last raised for
    return view, AlertView(aid, view, view.triggers, s.severity, site)


def revision_site(owner: str | None, raised_for: str) -> str:
    """The site a raised revision of an alert goes to (its clinician, that site's fallbacks, the
    supervisor it escalates to, the site-bound keys that list it): the site that owns the client
    when it is raised. An alert that does not change keeps the site it was last raised for
    (`raised_for`: a transfer does not move an open alert, nor raise it again), but anything
    raised after a transfer - a correction from the new site, the new site's ORS making it
    `outcome_at_risk`, the tenant's changed rules - goes to the new site, never back to the old
    one, which no longer owns the client (docs/clinical-records.md, "Site ownership")."""
    return owner if owner is not None else raised_for


def _mark_outcome_at_risk(alerts: dict[str, AlertView], sessions: Mapping[str, AnyView],
                          tails: Mapping[str, Tail]) -> None:
    """Mark the alliance alerts whose session's outcome form triggers an outcome alert
    (`_outcome_triggers`) `outcome_at_risk`, and unmark the others. In place; an alert that does
    not change stays the same object (so `_grown` can tell which alerts an `extend` changed).
    There are at most a few alerts: one per instrument."""
    for aid, a in list(alerts.items()):
        at_risk = _outcome_triggers(a.session, sessions, tails)
        if at_risk != a.outcome_at_risk:
            alerts[aid] = replace(a, outcome_at_risk=at_risk)


def _outcome_triggers(s: AnyView, sessions: Mapping[str, AnyView], tails: Mapping[str, Tail]) -> bool:
    """Whether the same session of the paired outcome instrument (`OUTCOME_OF`;
    `ids.same_session_of_both_scales`: the same session number in one episode, or in derived
    episodes, whose ids differ for a session across midnight UTC or a form missing at the
    episode's first session) triggers an outcome alert by its own triggers under the tenant's
    rules - whether or not it is still the latest. A later session's outcome alert supersedes
    that session's, and that is a lifecycle status, not a fact about the earlier session: its
    alliance alert stays at risk (docs/outcome.md). Only a change of that ORS itself (a
    correction, a regrouping) changes the answer."""
    paired = _PAIRED.get(s.version.instrument)
    tail = tails.get(paired) if paired is not None else None
    if paired is None or tail is None:
        return False  # an outcome alert, or a client without the paired outcome form
    number = s.version.session_number
    here = (s.episode_id, number, s.version.administered_at)
    # The same episode id first (given ids pair only so); derived ids may differ, so the other
    # derived outcome episodes are looked up by slot: a few episodes, not every session.
    derived = s.episode_id.startswith(DERIVED_PREFIX)
    others = [e for e in tail.episode_ids if e != s.episode_id and e.startswith(DERIVED_PREFIX)] if derived else []
    for eid in (s.episode_id, *others):
        o = sessions.get(slot_key(paired, eid, number))
        if o is not None and o.triggers and ids.same_session_of_both_scales(
                here, (o.episode_id, number, o.version.administered_at)):
            return True
    return False


def _session_view(v: Version, eid: str, derived: bool, prev: SessionView | None, latest: bool,
                  resolved: R.TenantRules, owner: str | None, site_version: int, tenant_id: str, client_id: str,
                  alert_sites: Mapping[str, str] | None) -> tuple[SessionView, AlertView | None]:
    """One session scored against the previous session of its episode, and the alert it holds."""
    ratings = v.ratings()
    total = R.total_of(ratings, v.total)
    prev_total = prev.total if prev is not None else None
    prev_lni = prev is not None and R.LOW_NOT_IMPROVING in prev.flags
    s = R.score(total, ratings, prev_total, latest, resolved, prev_lni)
    view = SessionView(v, eid, derived, owner or v.site_id, site_version, s.total, s.cutoff, resolved.operator,
                       s.previous_total, s.change_from_previous, s.flags, s.triggers, s.severity, s.low_items, latest)
    if s.alert is None:
        return view, None
    aid = ids.alert_id(tenant_id, client_id, v.instrument, eid, v.session_number)
    site = (alert_sites or {}).get(aid, view.site_id)  # the site it was last raised for
    return view, AlertView(aid, view, s.alert.triggers, s.alert.severity, site)


def extend(view: View, v: Version, owner: str | None, site_version: int, rules: R.TenantRules, tenant_id: str,
           client_id: str, alert_sites: Mapping[str, str] | None = None) -> View | None:
    """`derive` of the view's versions plus `v`, computed from the view in time independent of
    the record's length - when `v` is a new session administered after every other session of
    its instrument, that ends an episode or begins a new one (a record growing one session at a
    time, the common case); None when it is anything else (then `derive`).

    Why the result equals `derive`'s (the unit tests check it on random records): `v` is the
    only version of its session, so it is current and a member; it is the newest of its
    instrument, so its episode becomes current and `v`, its last session, the latest - the
    previous latest session stops being latest and loses its alert (nothing else about a session
    depends on `latest`); `v` is scored against the session before it in its episode, which is
    the episode's last (and, for the ORS family, against the episode's intake, which that session
    carries); no other session's previous session changes, and no session's triggers. The only
    effect across instruments is `outcome_at_risk`, a function of the alerts (at most one per
    instrument), the sessions and the episode ids, which both `derive` and `extend` compute last
    from what they hold (`_mark_outcome_at_risk`).
    """
    tail = view.tails.get(v.instrument)
    if v.instrument not in _SCORED or v.session_key in view.slot_of_key or v.key in view.members:
        return None
    if tail is not None and _administered(v) <= _administered(tail.newest):
        return None  # not the newest: it may fall inside an episode, or split one
    if v.origin is not None:
        return None  # back from another client, named by an earlier version: `_named_runs` decides
    derived = v.episode_id is None
    before: Version | None = None  # the session before `v` in its episode
    if v.episode_id is None:
        last = tail.last_derived if tail is not None else None
        if last is not None and v.session_number > last[1].session_number:
            eid, before = last
        else:
            eid = derived_episode_id(v)  # a restart of the numbering (or the first): a new episode
    elif v.episode_id.startswith(DERIVED_PREFIX):
        return None  # cannot come through intake (its ids have no '/'): left to `derive` as it is
    else:
        eid = v.episode_id
        before = tail.last_given.get(eid) if tail is not None else None
        if before is not None and v.session_number <= before.session_number:
            return None  # numbered inside its episode
    if before is None and tail is not None and eid in tail.episode_ids:
        return None  # a new episode whose id another one has (a given id that looks derived)
    sessions = dict(view.sessions)
    alerts = dict(view.alerts)
    if tail is not None:
        sessions[tail.latest_slot] = sessions[tail.latest_slot].not_latest()
        if tail.latest_alert is not None:
            del alerts[tail.latest_alert]
    prev = sessions[view.slot_of_key[before.session_key]] if before is not None else None
    sv, alert = _scored_view(v, eid, derived, prev, True, _resolved(rules, v.instrument), owner, site_version,
                             tenant_id, client_id, alert_sites)
    sessions[sv.slot] = sv
    if alert is not None:
        alerts[alert.alert_id] = alert
    slot_of = dict(view.slot_of_key)
    slot_of[v.session_key] = sv.slot
    last_derived = tail.last_derived if tail is not None else None
    last_given = dict(tail.last_given) if tail is not None else {}
    if derived:
        last_derived = (eid, v)
    else:
        last_given[eid] = v
    sizes = dict(tail.sizes) if tail is not None else {}
    sizes[(eid, derived)] = sizes.get((eid, derived), 0) + 1
    tails = dict(view.tails)
    tails[v.instrument] = Tail(v, sv.slot, alert.alert_id if alert is not None else None, last_derived, last_given,
                               (tail.episode_ids if tail is not None else frozenset()) | {eid}, sizes)
    _mark_outcome_at_risk(alerts, sessions, tails)
    return View(sessions, alerts, view.current | {v.key}, view.members | {v.key}, slot_of, tails)


_OUTCOME = frozenset(i.value for i in OutcomeInstrument)  # YCORS too: published with its total only
_SCORED = frozenset(i.value for i in SCORED_INSTRUMENTS) | _OUTCOME
# Each alliance instrument's outcome instrument, as plain strings.
_PAIRED: dict[str, str] = {a.value: o.value for a, o in OUTCOME_OF.items() if a in SCORED_INSTRUMENTS}


# --- what was published ---------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """The last scored event of a slot. `vacant`: no session holds the slot any more (its
    revision is kept so that a session coming back continues the count)."""

    revision: int
    submission_id: str  # the record key (`record_key`) of the submission shown, as `supersedes`
    digest: str
    at: datetime
    supersedes: str | None = None
    latest: bool = False
    vacant: bool = False


def _still_named(p: Published | None, sid: str, view: View) -> str | None:
    """The submission a slot's last event named in `supersedes`, while the slot still shows the same
    submission and that one is still not current: a slot published again (a transfer, a correction
    under the same id, a recomputed change from the previous session) names it again. Why: the
    revision that named it first may be lost in a crash before the broker acknowledged it - the
    redelivery re-emits only what the record shows now, the latest revision - and consumers drop a
    submission only when a higher revision names it: without this they would keep it for ever
    beside its replacement."""
    if p is None or p.vacant or p.submission_id != sid or p.supersedes is None or p.supersedes in view.current:
        return None
    return p.supersedes


@dataclass(frozen=True)
class AlertRecord:
    """The last thing published about an alert, and enough to publish a status change."""

    revision: int
    state: Lifecycle
    digest: str
    at: datetime
    site_id: str
    clinician_id: str
    instrument: str
    episode_id: str
    session_number: int
    slot: str
    # When its last revision was raised, kept once it ended (`at` is then the end's time): what
    # re-emitting that raise needs (`current_outputs`). None for a record ended before it was kept.
    raised_at: datetime | None = None
    # That raise itself, kept with a withdrawn end only: its session left its slot (a regrouping
    # into another episode, a move to another client) or no longer triggers, so the record can no
    # longer recompute it (`ClientState._raised`). None for every other record, and for one
    # withdrawn before it was kept.
    raised: AlertView | None = None


# --- outputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredOut:
    session: AnyView
    revision: int
    supersedes: str | None
    at: datetime
    latest: bool
    retracted: bool = False  # the revision that retracts a session that moved to another client


@dataclass(frozen=True)
class AlertOut:
    alert: AlertView
    revision: int
    at: datetime


@dataclass(frozen=True)
class StatusOut:
    alert_id: str
    record: AlertRecord
    status: AlertStatus  # a lifecycle status: superseded or withdrawn


Output = ScoredOut | AlertOut | StatusOut


@dataclass
class Step:
    """What applying one input did."""

    outputs: list[Output] = field(default_factory=list)
    rejection: Rejection | None = None
    redelivered: bool = False
    changed: bool = False
    audited: bool = False  # stored, never scored (YCSRS)
    # Versions a transfer took into the record (refusals it re-judged): registered in the index.
    taken: tuple[Version, ...] = ()
    # Refusals a transfer re-judged and refused for another reason: each gets a dead letter.
    refused: tuple[Refusal, ...] = ()


# --- the state ------------------------------------------------------------------------------

# What the tenant-wide index says of a version a transfer re-judges: a newer version another client
# holds (`newer_elsewhere`), and whether this client was the first to hold the id (`submit`).
Judge = Callable[["Version"], tuple[Holding | None, bool]]



@dataclass
class ClientState:
    """Inputs and what was published, for one (tenant, client); `version` guards writers."""

    tenant_id: str
    client_id: str
    owner: str | None = None
    site_version: int = 0
    transfers: list[str] = field(default_factory=list)
    versions: dict[str, Version] = field(default_factory=dict)
    # `versions`, `rejected`, `submission_revision` and `resent` are keyed by `record_key`.
    rejected: dict[str, Rejection] = field(default_factory=dict)
    published: dict[str, Published] = field(default_factory=dict)
    submission_revision: dict[str, int] = field(default_factory=dict)
    alerts: dict[str, AlertRecord] = field(default_factory=dict)
    version: int = 0
    # The last view and what it was derived under; not stored, not compared. Views are never
    # mutated (`extend` builds a new one), so a copy may share it.
    cached: _Cached | None = field(default=None, repr=False, compare=False)
    # A submission's content sent again under its id, accepted later than the version kept (which
    # stays: its events were published): when it was. A version of that submission accepted
    # before then is older than the content the record shows, and changes nothing.
    resent: dict[str, datetime] = field(default_factory=dict)
    # Submissions retracted from this record because another client holds them (by record key).
    moved: dict[str, Moved] = field(default_factory=dict)
    # Submissions this client was not the first to hold (by record key): their events' ids name
    # the client (`ids.moved_scored_event_id`). Decided when the client first takes one.
    foreign: set[str] = field(default_factory=set)
    # The ownership timeline: the transfers applied, in acceptance order (then event id) whatever
    # order they were read in (`placed`; the last MAX_TRANSFER_IDS), by which a version is judged
    # against the site that owned the client when it was accepted (`owner_at`); the owner is the
    # last one's `to_site`. Before 2026-11-27 it held only the transfers that changed the site, in
    # the order applied; such a record reads the same.
    handovers: list[Handover] = field(default_factory=list)
    # The transfers of `transfers` whose copy on `ors.submitted.v1` was read first (intake
    # publishes each transfer on both submitted topics; the rest were applied from
    # `srs.submitted.v1`): the other copy of a transfer changes nothing, a redelivery of the
    # copy that applied it re-emits the record (`transfer`).
    outcome_copies: list[str] = field(default_factory=list)

    def copy(self) -> ClientState:
        """An independent copy (the values are immutable, so copying the containers suffices)."""
        # Built field by field (not `dataclasses.replace`, which re-reads the class's fields on every
        # call): the state cache copies every client twice per batch.
        return ClientState(self.tenant_id, self.client_id, self.owner, self.site_version, list(self.transfers),
                           dict(self.versions), dict(self.rejected), dict(self.published),
                           dict(self.submission_revision), dict(self.alerts), self.version, self.cached,
                           dict(self.resent), dict(self.moved), set(self.foreign), list(self.handovers),
                           list(self.outcome_copies))

    def mark_foreign(self, key: str) -> bool:
        """Record that this client was not the first to hold the submission `key` (its events' ids
        name the client from now on); whether that is news."""
        if key in self.foreign:
            return False
        self.foreign.add(key)
        return True

    def newest(self, key: str) -> tuple[datetime, str] | None:
        """The order (accepted_at, digest) of the version of `key` the record holds, counting a
        later identical resend; None when it holds none (refused, retracted, never sent)."""
        known = self.versions.get(key)
        return None if known is None else self._order(known)

    def view(self, rules: R.TenantRules) -> View:
        """What the record shows under `rules` (derived once per change of the record)."""
        c = self._cached(rules)
        if c is not None:
            return c.view
        view = derive(self.versions.values(), self.owner, self.site_version, rules, self.tenant_id, self.client_id,
                      _AlertSites(self.alerts))
        self.cached = _Cached(rules, self.owner, self.site_version, view)
        return view

    def _cached(self, rules: R.TenantRules) -> _Cached | None:
        c = self.cached
        if c is None or c.owner != self.owner or c.site_version != self.site_version:
            return None
        return c if c.rules is rules or c.rules == rules else None

    def _grown(self, v: Version, rules: R.TenantRules) -> tuple[View, _Scope | None]:
        """The view after `v` was added to the versions: `extend`ed from the last one when it can
        be, else derived; and, when the last view was published, the only slots and alerts the
        extension can have changed (the new session, the previous latest, and their alerts)."""
        c = self._cached(rules)
        view = None if c is None else extend(c.view, v, self.owner, self.site_version, rules, self.tenant_id,
                                              self.client_id, _AlertSites(self.alerts))
        if c is None or view is None:
            self.cached = None
            return self.view(rules), None
        self.cached = _Cached(rules, self.owner, self.site_version, view)
        if not c.published:
            return view, None
        before, after = c.view.tails.get(v.instrument), view.tails[v.instrument]
        slots = {after.latest_slot} | ({before.latest_slot} if before is not None else set())
        # The alerts that changed: those of the two sessions, and an alliance alert of another
        # instrument whose `outcome_at_risk` the new session changed (the views hold a few alerts,
        # and `extend` keeps an unchanged one the same object).
        was, now_ = c.view.alerts, view.alerts
        alerts = {a for a in was.keys() | now_.keys() if was.get(a) is not now_.get(a)}
        return view, _Scope(frozenset(slots), frozenset(alerts))

    # ---- inputs -----------------------------------------------------------------------------

    def submit(self, v: Version, rules: R.TenantRules, now: datetime, elsewhere: Holding | None = None,
               first: bool = True) -> Step:
        """Apply one submitted version (see module docs); the state changes only when accepted.

        `elsewhere`: a newer version of this submission another client holds (`newer_elsewhere`
        of the tenant-wide index); then this one is not taken, and the submission is retracted
        from this record as of that version. `first`: this client was the first to hold the
        submission id (else its events' ids name the client)."""
        key = v.key
        known = self.versions.get(key)
        same_rejection = self._same_rejection(v)
        if known is not None and known.accepted_at == v.accepted_at and known.digest == v.digest:
            return self._redelivered(rules, now, same_rejection)
        if same_rejection is not None:
            return Step(rejection=same_rejection)
        gone = self.moved.get(key)
        mine = holding(v.accepted_at, v.digest, self.client_id)
        if gone is not None and mine < gone.as_of():
            # Older than the version the submission moved with: shows nothing, but may be the
            # client's earliest version, which names the episode should the submission come back.
            return Step(changed=self._seen_moved(key, v))
        if elsewhere is not None and mine < elsewhere and (
                known is None or holding(*self._order(known), self.client_id) < elsewhere):
            step = self.retract(key, elsewhere, rules, now)
            step.changed = self._seen_moved(key, v) or step.changed
            return step
        if known is not None and (self._order(known) >= v.order() or known.digest == v.digest):
            if known.digest == v.digest and v.order() > self._order(known):
                self.resent[key] = v.accepted_at  # newer: an older version arriving later loses
                return Step(changed=True)
            if v.order() < known.first().order() and self._site_ok(v):
                return self._named_earlier(known, v, rules, now)
            return Step()  # an older version arriving late, or an identical resend: nothing changes
        if known is None and key not in self.rejected and key not in self.moved and \
                self._holds() >= rules.max_client_submissions:
            # A submission coming back is not new: its tombstone already counts. Not remembered
            # (that would grow the record the cap bounds): a redelivery is judged again, and as
            # the record never shrinks, it is refused again unless the cap was raised.
            return Step(rejection=Rejection(v.accepted_at, v.digest, "series_full", (
                f"the client's record already holds {self._holds()} submissions, the most one client may hold "
                f"(max_client_submissions {rules.max_client_submissions})")))
        if known is not None:
            v = v.named_from(known.first())  # a correction: the episode keeps the name it has
        elif gone is not None and (o := gone.earliest()) is not None and o.order() < v.order():
            v = v.named_from(o)  # back from another client: named as if it had never left
        before = self._before(key, known, rules)
        if v.instrument not in _SCORED and self._site_ok(v):  # another site's: refused below
            self.versions[key] = v
            self.resent.pop(key, None)
            self.cached = None
            self.owner = self.owner or v.site_id
            # A scored submission corrected into an unscored form leaves its session: say so now.
            outputs = self._publish(self.view(rules), now, before=before) if known is not None else []
            return Step(outputs=outputs, changed=True, audited=True)
        refusal = self._refusal(v, rules)
        if refusal is not None:
            reason, detail = refusal
            rej = Rejection(v.accepted_at, v.digest, reason, detail,
                            v if keeps_content(v, reason) else None)
            self.rejected[key] = rej
            self._drop_final_contents()
            return Step(rejection=rej, changed=True)
        if not first and known is None and key not in self.submission_revision:
            self.foreign.add(key)
        self.versions[key] = v
        self.resent.pop(key, None)
        self.moved.pop(key, None)  # newer than where it had moved: it is back
        self.owner = self.owner or v.site_id
        scope = None
        if known is None:
            view, scope = self._grown(v, rules)
        else:
            self.cached = None
            view = self.view(rules)
        outputs = self._publish(view, now, scope, before)
        # A version whose content another submission already shows (an identical resend under a
        # new id, or a correction back to content an older submission holds) is kept - so that the
        # record does not depend on which arrived first - but changes nothing; its submitter is
        # told `duplicate`, naming the submission that shows it.
        notice = None
        if key in view.members and key not in view.current:
            holder = view.slot_of_key.get(v.session_key)
            shown = view.sessions[holder].version.submission_id if holder is not None else "another submission"
            notice = Rejection(v.accepted_at, v.digest, "duplicate",
                               f"identical to submission '{shown}', which is already recorded")
            self.rejected[key] = notice
        return Step(outputs=outputs, rejection=notice, changed=True)

    def _seen_moved(self, key: str, v: Version) -> bool:
        """Remember `v`, a version of a submission that moved away, as the earliest this record has
        seen of it when it is (and of the site that owned the client when it was accepted, as for
        `_named_earlier`); whether it was."""
        gone = self.moved.get(key)
        if gone is None or not self._site_ok(v):
            return False
        seen = gone.seen(v)
        self.moved[key] = seen
        return seen is not gone

    def _named_earlier(self, known: Version, older: Version, rules: R.TenantRules, now: datetime) -> Step:
        """A version of `known`'s submission accepted before every version the record has seen
        arrives late (the correction came first): the kept version stays, and the episode its
        session begins takes the older version's name, as it would have had in arrival order
        (docs/clinical-records.md, "Episodes"). Whatever that renames is published (nothing when
        both versions name the same date)."""
        before = self._before(known.key, known, rules)
        self.versions[known.key] = known.named_from(older.first())
        self.cached = None
        outputs = self._publish(self.view(rules), now, before=before)
        return Step(outputs=outputs, changed=True)

    def retract(self, key: str, as_of: Holding, rules: R.TenantRules, now: datetime) -> Step:
        """Retract the submission `key` from this record: `as_of` (accepted_at, digest, client) is
        a newer version another client holds. The version kept here leaves the record (unless it
        is newer), the later sessions are scored again without it, its alert is withdrawn, and the
        session it showed is published once more with `retracted` (`revision` + 1). Remembered as
        a tombstone: a retraction as old or older, or a version accepted before `as_of`, arriving
        later, changes nothing; a redelivered one re-emits what the record shows."""
        gone = self.moved.get(key)
        if gone is not None and gone.as_of() >= as_of:
            return self._redelivered(rules, now)
        known = self.versions.get(key)
        if known is not None and (*self._order(known), self.client_id) > as_of:
            return Step()  # newer here: its own registration retracts the other client's
        at, digest, to_client = as_of
        if known is None:  # nothing here (never taken, or refused): remember, so that it never is
            self.moved[key] = Moved(at, digest, to_client) if gone is None else replace(
                gone, accepted_at=at, digest=digest, to_client=to_client)
            return Step(changed=True)
        before = self.view(rules)
        slot = before.slot_of_key.get(known.session_key) if key in before.current else None
        p = self.published.get(slot) if slot is not None else None
        shown = before.sessions[slot] if slot is not None and p is not None and not p.vacant \
            and p.submission_id == key else None
        del self.versions[key]
        self.resent.pop(key, None)
        self.cached = None
        outputs: list[Output] = []
        tomb = Moved(at, digest, to_client, first=known.first())  # the earliest it saw: names its return
        if shown is not None and slot is not None and p is not None:
            rev = 1 + max(p.revision, self.submission_revision.get(key, 0))
            self.submission_revision[key] = rev
            self.published[slot] = replace(p, vacant=True)  # nothing names it: no `supersedes` below
            tomb = Moved(at, digest, to_client, known, shown.episode_id, shown.episode_derived, rev, now)
            outputs.append(self._retracted_out(tomb, rules))
        self.moved[key] = tomb
        outputs.extend(self._publish(self.view(rules), now, before=lambda: before))
        return Step(outputs=outputs, changed=True)

    def _retracted_out(self, m: Moved, rules: R.TenantRules) -> ScoredOut:
        """The retracted event of a tombstone's session: its version scored alone (no previous
        session: what it showed in the episode it left is not the point), `retracted` set."""
        v = m.shown
        assert v is not None and m.at is not None
        view, _ = _scored_view(v, m.episode_id, m.episode_derived, None, False, _resolved(rules, v.instrument),
                               self.owner, self.site_version, self.tenant_id, self.client_id, None)
        return ScoredOut(view, m.revision, None, m.at, False, retracted=True)

    def transfer(self, event_id: str, site_id: str, rules: R.TenantRules, now: datetime,
                 accepted_at: datetime | None = None, index: Judge | None = None,
                 outcome_copy: bool = False) -> Step:
        """Apply an admin's transfer accepted at `accepted_at` (None: `now`), `event_id` (a
        redelivery of which changes nothing): place it in the ownership timeline by acceptance
        (`placed`), so the client's owner is the destination of the transfer accepted last,
        whatever order they are read in. When that changes the owner, `site_version` + 1 and every
        current session is re-published with it; a transfer read after one accepted later (the
        owner stays) re-publishes nothing. The kept `site_conflict` refusals the new timeline
        allows (the new site's, accepted at or after the transfer, read before it; or accepted
        before a later transfer read first, when this one gave the site they name) are taken as if
        they had just arrived (`submit`; `index` says, per version, what `submit`'s `elsewhere`
        and `first` are), and their versions returned in `taken`, named by this transfer's entry;
        those it refuses again for another reason in `refused`, kept by that entry too.

        Intake publishes each transfer on both submitted topics (`outcome_copy`: this is the copy
        read on `ors.submitted.v1`), so that each topic's partition holds it in order with the
        client's submissions of that topic. The copy read first applies it; the other changes
        nothing and re-emits nothing (an empty step, not a redelivery): until the first copy's
        offsets are committed, its own redelivery re-emits the record and re-registers what the
        transfer took, so the second copy has nothing left to make good."""
        if event_id in self.transfers:
            if outcome_copy != (event_id in self.outcome_copies):
                return Step()  # the other copy of a transfer already applied
            step = self._redelivered(rules, now)
            done = next((h for h in self.handovers if h.event_id == event_id), None)
            step.taken = tuple(self.versions[k] for k in (done.taken if done else ()) if k in self.versions)
            step.refused = done.refused if done else ()
            return step
        self.transfers = [*self.transfers, event_id][-MAX_TRANSFER_IDS:]
        copies = [*self.outcome_copies, event_id] if outcome_copy else self.outcome_copies
        self.outcome_copies = [t for t in copies if t in self.transfers]  # bounded like `transfers`
        # At its place by acceptance, wherever that is: one accepted before a transfer read earlier
        # (intake stamps the time before it publishes) goes before it, and the last accepted decides.
        self.handovers = placed(self.handovers, self.owner,
                                Handover(_utc(accepted_at or now), None, site_id, event_id))
        owner = self.handovers[-1].to_site
        if owner != self.owner:  # a transfer read late that leaves the owner as it is re-publishes nothing
            self.owner = owner
            self.site_version += 1
        outputs: list[Output] = []
        taken: list[Version] = []
        refusals: list[Refusal] = []
        for v in to_rejudge(self.rejected, self.handovers, self.owner):
            refused = self.rejected.pop(v.key)
            elsewhere, first = index(v) if index is not None else (None, True)
            judged = self.submit(v, rules, now, elsewhere, first)
            outputs.extend(judged.outputs)
            if judged.rejection is not None:
                # Refused for another reason (a session gap, a duplicate, a full record): that is its
                # refusal now, final, and its submitter is told (a dead letter of the next judgement).
                # Kept in place of the site_conflict (a full client record's `series_full` too, which
                # `submit` does not remember: this takes no more room than the refusal it replaces).
                again = replace(judged.rejection, judgement=refused.judgement + 1)
                self.rejected[v.key] = again
                refusals.append(Refusal(v, again, now))
            taken.append(v)
        if taken:
            self.handovers = [h._replace(taken=tuple(v.key for v in taken), refused=tuple(refusals))
                              if h.event_id == event_id else h for h in self.handovers]
        self._drop_final_contents()
        outputs.extend(self._publish(self.view(rules), now))
        return Step(outputs=outputs, changed=True, taken=tuple(taken), refused=tuple(refusals))

    def _site_ok(self, v: Version) -> bool:
        """Whether `v`'s site owned the client when `v` was accepted (`owner_at`)."""
        return site_allowed(v.site_id, owner_at(self.handovers, self.owner, v.accepted_at))

    def _drop_final_contents(self) -> None:
        """Keep the content of refusals only while a transfer may re-judge them, and of at most
        MAX_KEPT_REFUSALS (`contents_to_drop`): the record stays bounded."""
        for key in contents_to_drop(self.rejected):
            self.rejected[key] = replace(self.rejected[key], version=None)

    def _same_rejection(self, v: Version) -> Rejection | None:
        """The rejection of this very record (same accepted time, same content), if it was refused.
        An outcome submission refused before its scale was part of its key was kept under its id
        alone: the content digest names the instrument, so a match there is the same record."""
        for key in (v.key, v.submission_id) if v.key != v.submission_id else (v.key,):
            r = self.rejected.get(key)
            if r is not None and r.accepted_at == v.accepted_at and r.digest == v.digest:
                return r
        return None

    def _order(self, known: Version) -> tuple[datetime, str]:
        """How new the content of a kept version is: when it was last accepted (`resent`)."""
        again = self.resent.get(known.key)
        return known.order() if again is None else max(known.order(), (_utc(again), known.digest))

    def _redelivered(self, rules: R.TenantRules, now: datetime, rejection: Rejection | None = None) -> Step:
        """A record seen before changes nothing - unless the tenant's rules changed since it was
        applied: then the record is published anew under them (as any new record would do). The
        first attempt's events may never have reached the broker, and `current_outputs` can only
        re-emit what still matches what was decided, so without this they would be lost until the
        client's next record."""
        outputs = self._publish(self.view(rules), now)
        return Step(outputs=outputs, rejection=rejection, redelivered=True, changed=bool(outputs))

    def _refusal(self, v: Version, rules: R.TenantRules) -> tuple[RejectReason, str] | None:
        owner = owner_at(self.handovers, self.owner, v.accepted_at)
        if not site_allowed(v.site_id, owner):
            return "site_conflict", (f"client belongs to site '{owner}', not '{v.site_id}'; an admin can "
                                     "transfer it (POST /v1/clients/{client_id}/transfer)")
        try:
            R.total_of(v.ratings(), v.total, ORS_ITEM_NAMES if v.outcome else ITEM_NAMES)
        except R.Unscorable as exc:
            return "unscorable", str(exc)
        eid, held, highest = self._joins(v, rules) or self._joins_derived(v, rules)
        cap, gap = rules.max_episode_sessions, rules.session_gap
        if held >= cap:
            return "series_full", (f"episode '{eid}' already holds {held} sessions, the most one episode may hold "
                                   f"(max_episode_sessions {cap}); a new course of treatment is a new episode (an "
                                   "episode_id, or numbering from 1)")
        if highest is not None and v.session_number > highest + gap:
            return "session_gap", (f"session_number {v.session_number} is more than {gap} above the highest session "
                                   f"of episode '{eid}' ({highest}); a typo?")
        return None

    def _joins(self, v: Version, rules: R.TenantRules) -> tuple[str, int, int | None] | None:
        """For a new session `v`: (the episode it would join, how many sessions that holds, their
        highest number), read from the kept view in constant time; None when that cannot tell
        (then `_joins_derived`). An existing session (a correction, a resend) joins nothing that
        could refuse it: `_EXISTING`."""
        c = self._cached(rules)
        if c is None or v.key in self.versions:
            return None
        view = c.view
        if v.session_key in view.slot_of_key:
            return _EXISTING
        tail = view.tails.get(v.instrument)
        if v.episode_id is not None:
            if v.episode_id.startswith(DERIVED_PREFIX):
                return None
            last = tail.last_given.get(v.episode_id) if tail is not None else None
            held = tail.sizes.get((v.episode_id, False), 0) if tail is not None else 0
            return v.episode_id, held, last.session_number if last is not None else None
        if tail is None:
            return derived_episode_id(v), 0, None
        if v.administered_key <= tail.newest.administered_key:
            return None  # it may fall inside a run of the numbering, or split one
        run = tail.last_derived
        if run is not None and v.session_number > run[1].session_number:
            return run[0], tail.sizes[(run[0], True)], run[1].session_number
        return derived_episode_id(v), 0, None

    def _joins_derived(self, v: Version, rules: R.TenantRules) -> tuple[str, int, int | None]:
        """`_joins` from the versions themselves."""
        # Skipped when neither check can refuse (the usual case): every episode's highest number
        # is at least 1, and an episode holds at most the instrument's versions.
        cap = rules.max_episode_sessions
        gap_possible = v.session_number > rules.session_gap + 1
        may_fill = len(self.versions) >= cap and sum(1 for o in self.versions.values()
                                                     if o.instrument == v.instrument) >= cap
        if not (gap_possible or may_fill):
            return _EXISTING
        others = [o for key, o in self.versions.items() if key != v.key]
        by_key, _ = current_versions(others)
        if v.session_key in by_key:
            return _EXISTING
        tentative = dict(by_key)
        tentative[v.session_key] = v
        for eid, _derived, members in episodes_of(tentative.values()).get(v.instrument, []):
            if any(m is v for m in members):
                rest = [m.session_number for m in members if m is not v]
                return eid, len(rest), max(rest) if rest else None
        return _EXISTING  # unreachable: `v` is in one of its instrument's episodes

    def _holds(self) -> int:
        """How many submissions the record keeps (accepted, refused and moved to another client):
        what the client cap bounds. A tombstone stays in the record, so an integration that keeps
        moving new ids away from one client would otherwise grow its document without end."""
        # an id in two of them counts twice: errs on the safe side
        return len(self.versions) + len(self.rejected) + len(self.moved)

    # ---- outputs ----------------------------------------------------------------------------

    def _before(self, key: str, known: Version | None, rules: R.TenantRules) -> Callable[[], View]:
        """What the record showed before a step changes the version of `key` (`known`, None when
        it held none), derived only when asked (an alert withdrawn: rare): the view last published
        when it is still cached, else derived from the versions with `known` put back. Call it
        before the step changes anything."""
        c = self._cached(rules)
        shown = c.view if c is not None and c.published else None

        def before() -> View:
            if shown is not None:
                return shown
            versions = dict(self.versions)
            if known is None:
                versions.pop(key, None)
            else:
                versions[key] = known
            return derive(versions.values(), self.owner, self.site_version, rules, self.tenant_id, self.client_id,
                          _AlertSites(self.alerts))
        return before

    def _publish(self, view: View, now: datetime, scope: _Scope | None = None,
                 before: Callable[[], View] | None = None) -> list[Output]:
        """Diff the view against what was published; record and return what must be published now.

        `scope`: the view grew by one session from a view that was published, and only these
        slots and alerts can differ (what `extend` changes; the tests check the outputs equal the
        full diff's): the diff looks at them alone, in time independent of the record's length.
        `before`: what the record showed before the step (`_before`), which a withdrawn alert's
        raise is kept from.

        A revision always exceeds every revision published before for the submissions it names
        (its own, and the one it supersedes), so "keep the highest revision per submission" is
        right for consumers even when a submission moves between slots.
        """
        out: list[Output] = []
        if scope is not None:
            for slot in sorted(scope.slots):
                sv = view.sessions[slot]
                p = self.published.get(slot)
                if p is None or p.vacant or p.submission_id != sv.version.key or p.digest != sv.digest:
                    out.append(self._scored(slot, sv, _still_named(p, sv.version.key, view), now))
            out.extend(self._alerts(view, now, scope.alerts, before))
            self._mark_published(view)
            return out
        shown_before = {p.submission_id for p in self.published.values() if not p.vacant}
        named: set[str] = set()
        for slot in sorted(view.sessions):
            sv = view.sessions[slot]
            sid = sv.version.key
            p = self.published.get(slot)
            if p is not None and not p.vacant and p.submission_id == sid and p.digest == sv.digest:
                continue
            sup = p.submission_id if (p is not None and not p.vacant and p.submission_id != sid
                                      and p.submission_id not in view.current) else _still_named(p, sid, view)
            if sup is not None:
                named.add(sup)
            out.append(self._scored(slot, sv, sup, now))
        for slot, p in list(self.published.items()):
            if slot not in view.sessions and not p.vacant:
                self.published[slot] = replace(p, vacant=True)
        # A submission no longer current that no event of this step names: it was shown and lost
        # its session (to a correction, or by moving onto a session a newer version holds), or it
        # lost before anything was said about it (it arrived late). The session's current event
        # is published again naming it, so every consumer drops it and its submitter learns.
        for sid, v in sorted(self.versions.items()):
            if v.instrument not in _SCORED or sid in view.current or sid in named:
                continue
            said = sid in self.submission_revision
            if sid not in shown_before and (said or sid in view.members):
                continue  # already said superseded, or an identical resend never shown
            holder = view.slot_of_key.get(v.session_key)
            if holder is not None:
                out.append(self._scored(holder, view.sessions[holder], sid, now))
        out.extend(self._alerts(view, now, before=before))
        self._mark_published(view)
        return out

    def _mark_published(self, view: View) -> None:
        c = self.cached
        if c is not None and c.view is view:
            self.cached = replace(c, published=True)

    def _scored(self, slot: str, sv: AnyView, supersedes: str | None, now: datetime) -> ScoredOut:
        sid = sv.version.key
        p = self.published.get(slot)
        rev = 1 + max(p.revision if p is not None else 0, self.submission_revision.get(sid, 0),
                      self.submission_revision.get(supersedes, 0) if supersedes is not None else 0)
        self.published[slot] = Published(rev, sid, sv.digest, now, supersedes, sv.latest)
        self.submission_revision[sid] = rev
        if supersedes is not None:
            self.submission_revision[supersedes] = rev
        return ScoredOut(sv, rev, None if supersedes is None else submission_of(supersedes), now, sv.latest)

    def _alerts(self, view: View, now: datetime, only: frozenset[str] | None = None,
                before: Callable[[], View] | None = None) -> list[Output]:
        out: list[Output] = []
        shown: View | None = None  # `before()`, derived at most once
        for aid in sorted(view.alerts if only is None else only & view.alerts.keys()):
            av = view.alerts[aid]
            rec = self.alerts.get(aid)
            digest = av.digest
            if rec is not None and rec.state == Lifecycle.RAISED and rec.digest == digest:
                continue
            site = revision_site(self.owner, av.site_id)
            if site != av.site_id:
                # Raised after a transfer: for the new site. The view is the one kept, and must
                # be what `derive` makes of the record now (that reads the site from `self.alerts`).
                av = view.alerts[aid] = replace(av, site_id=site)
                digest = av.digest
            rev = rec.revision + 1 if rec is not None else 1
            s = av.session
            self.alerts[aid] = AlertRecord(rev, Lifecycle.RAISED, digest, now, av.site_id, s.version.clinician_id,
                                           s.version.instrument, s.episode_id, s.version.session_number, s.slot)
            out.append(AlertOut(av, rev, now))
        ended_before = self.alerts.items() if only is None else ((a, self.alerts[a]) for a in only if a in self.alerts)
        for aid, rec in sorted(ended_before):
            if aid in view.alerts or rec.state != Lifecycle.RAISED:
                continue
            session = view.sessions.get(rec.slot)
            # Withdrawn only when nothing later speaks for the session: it left its slot, or it is
            # still the latest and no longer triggers. One a later session follows is superseded
            # even when its own triggers changed too (the tenant's rules changed: the later
            # session is scored with the whole record under the new ones).
            cleared = session is None or (session.latest and not session.triggers)
            status = AlertStatus.WITHDRAWN if cleared else AlertStatus.SUPERSEDED
            # A withdrawn alert keeps its raise as the record showed it (`current_outputs`): the
            # batch that raised it may have withdrawn it too, and its session is gone from where
            # a redelivery could score it again. A superseded one is scored again from its slot.
            kept = None
            if cleared and before is not None:
                if shown is None:
                    shown = before()
                was = shown.alerts.get(aid)
                kept = was if was is not None and was.digest == rec.digest else None
            ended = replace(rec, state=Lifecycle(status), at=now, raised_at=rec.at, raised=kept)
            self.alerts[aid] = ended
            out.append(StatusOut(aid, ended, status))
        return out

    def current_outputs(self, rules: R.TenantRules) -> list[Output]:
        """Everything the record shows now, as it was published (same revisions, same times):
        what a redelivered input re-emits."""
        view = self.view(rules)
        out: list[Output] = []
        for slot, p in sorted(self.published.items()):
            sv = view.sessions.get(slot)
            if p.vacant or sv is None or sv.digest != p.digest:
                continue  # cannot happen after a completed step; never publish what was not decided
            sup = None if p.supersedes is None else submission_of(p.supersedes)
            out.append(ScoredOut(sv, p.revision, sup, p.at, p.latest))
        for _key, m in sorted(self.moved.items()):
            if m.shown is not None and m.revision:
                out.append(self._retracted_out(m, rules))
        previous = _previous_sessions(view.sessions.values())
        for aid, rec in sorted(self.alerts.items()):
            if rec.state == Lifecycle.RAISED:
                av = view.alerts.get(aid)
                if av is not None and av.digest == rec.digest:
                    out.append(AlertOut(av, rec.revision, rec.at))
                continue
            # An ended alert's last raise too: the batch that raised it may also have ended it (a
            # later session in the same batch, a move of its session), and a crash before the
            # broker acknowledged the raise leaves only what the record shows now - the end.
            # Without the raise, the alert would be ended without anyone (its clinician, partners,
            # reporting) hearing it raised. Kept with a withdrawn end, else scored again.
            kept = rec.raised
            raised = kept if kept is not None and kept.digest == rec.digest else self._raised(aid, rec, view,
                                                                                               previous, rules)
            if raised is not None and rec.raised_at is not None:
                out.append(AlertOut(raised, rec.revision, rec.raised_at))
            out.append(StatusOut(aid, rec, AlertStatus(rec.state)))
        return out

    def _raised(self, aid: str, rec: AlertRecord, view: View, previous: Mapping[str, AnyView],
                rules: R.TenantRules) -> AlertView | None:
        """The alert an ended record last raised, as decided then: its session scored as the latest
        against the same previous session (what it was when raised), or None when the record no
        longer shows that (the session left its slot, or a correction or changed rules changed
        it since: the digest differs). Never publishes what was not decided."""
        sv = view.sessions.get(rec.slot)
        if sv is None:
            return None
        _, av = _scored_view(sv.version, sv.episode_id, sv.episode_derived, previous.get(rec.slot), True,
                             _resolved(rules, sv.version.instrument), self.owner, self.site_version, self.tenant_id,
                             self.client_id, {aid: rec.site_id})
        if av is None or av.alert_id != aid:
            return None
        if not isinstance(av.session, OutcomeView) and _outcome_triggers(av.session, view.sessions, view.tails):
            av = replace(av, outcome_at_risk=True)
        return av if av.digest == rec.digest else None


def _previous_sessions(sessions: Iterable[AnyView]) -> dict[str, AnyView]:
    """Each session's previous session of its episode (same instrument), by slot: what it was
    scored against."""
    runs: dict[tuple[str, str], list[AnyView]] = {}
    for sv in sessions:
        runs.setdefault((sv.version.instrument, sv.episode_id), []).append(sv)
    out: dict[str, AnyView] = {}
    for run in runs.values():
        run.sort(key=lambda sv: sv.version.session_number)
        for before, sv in pairwise(run):
            out[sv.slot] = before
    return out


_EXISTING: tuple[str, int, int | None] = ("", 0, None)  # joins nothing that could refuse it


@dataclass(frozen=True)
class _Cached:
    rules: R.TenantRules
    owner: str | None
    site_version: int
    view: View
    published: bool = False  # what was published is this view (a `_publish` of it completed)


@dataclass(frozen=True)
class _Scope:
    """What one `extend` can have changed: these slots and these alerts."""

    slots: frozenset[str]
    alerts: frozenset[str]


class _AlertSites(Mapping[str, str]):
    """The site each known alert was last raised for (read by `derive`; a view, not a copy)."""

    def __init__(self, alerts: Mapping[str, AlertRecord]) -> None:
        self._alerts = alerts

    def __getitem__(self, alert_id: str) -> str:
        return self._alerts[alert_id].site_id

    def __iter__(self) -> Iterator[str]:
        return iter(self._alerts)

    def __len__(self) -> int:
        return len(self._alerts)


def version_of(submission_id: str, instrument: Instrument | str, episode_id: str | None, session_number: int,
               administered_at: datetime, site_id: str, clinician_id: str, items: Items | OrsItems | None,
               total: float | None, accepted_at: datetime, client_age: int | None = None) -> Version:
    """A `Version` from the fields of a submitted event."""
    return Version(submission_id, str(instrument), episode_id, session_number, administered_at, site_id,
                   clinician_id, None if items is None else items.values(), None if items is not None else total,
                   accepted_at, client_age=client_age)
