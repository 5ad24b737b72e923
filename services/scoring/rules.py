"""PCOMS alliance rules: pure functions over numbers, no I/O, no clock.

Defaults (each overridable per tenant, and cutoff/operator/drop per instrument):

- total = sum of the four items (or the given total), rounded to one decimal;
- below_cutoff: total < 36.0 (operator `<` or `<=`, value per tenant / instrument);
- drop_from_previous: total - previous_total <= -1.0, previous = the closest earlier session
  number of the same client, instrument and episode;
- low_not_improving: below cutoff in this session and in the previous one, and change <= 0;
- item_below_threshold: any item < 9.0 (informational; not an alert trigger by default; the
  items are named in `low_items`);
- an alert is raised when a trigger holds AND the session is the latest of the client's current
  episode. Severity is `critical` when the session is below the cutoff and dropped, or dropped by
  `critical_drop` (3.0) or more, or `low_not_improving` holds in this session and held in the
  previous one (three low sessions without a rise); otherwise `warning`. Two triggers alone do
  not make an alert critical: `low_not_improving` implies `below_cutoff`, so counting triggers
  would call 30 -> 30 critical while 40 -> 37.1 stays a warning;
- session_gap: a session more than 20 numbers above the highest of its episode is refused as a
  probable typo (it would otherwise be the "latest" session for ever and silence the client);
- series_full: a new session beyond 500 in one episode, or a new submission once a client holds
  5,000 (accepted, refused and moved away together), is refused. Weekly sessions for ten years are ~520; the
  caps exist so that no client's record can grow without bound (one document per client: MongoDB
  refuses documents over 16 MiB, and every step re-reads the record).

Sources (docs/clinical-records.md cites them): the SRS cutoff of 36 and "any drop" as a signal to
discuss the alliance come from Duncan & Miller's PCOMS manual and Duncan et al. (2003), "The
Session Rating Scale", Journal of Brief Therapy 3(1); the 3-point critical drop and the
three-low-sessions rule are this product's defaults, configurable per tenant.

The outcome rules (ORS, CORS) are in outcome.py; their settings (`OutcomeRules`, per tenant and per
outcome instrument) live here with the rest of a tenant's rules.

Every number is rounded to one decimal before it is compared, so `35.1 + 0.9` is 36.0 and a
change of `-0.9999999` is a drop of exactly 1.0, as a clinician reading the form would count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from shared.events import ITEM_NAMES, SCORED_INSTRUMENTS, AgeBand, Flag, Instrument, OutcomeInstrument, Severity

Operator = Literal["<", "<="]
OPERATORS: tuple[Operator, ...] = ("<", "<=")

# The flags as plain strings (`Flag` values): they enter the series digests, which `repr` them
# and are stored, so an enum member (whose repr differs) would change every stored digest.
BELOW_CUTOFF = Flag.BELOW_CUTOFF.value
DROP_FROM_PREVIOUS = Flag.DROP_FROM_PREVIOUS.value
LOW_NOT_IMPROVING = Flag.LOW_NOT_IMPROVING.value
ITEM_BELOW_THRESHOLD = Flag.ITEM_BELOW_THRESHOLD.value
# Canonical order of flags in events (`Flag`'s), so equal inputs give byte-equal outputs.
FLAG_NAMES: tuple[str, ...] = tuple(f.value for f in Flag)
DEFAULT_TRIGGERS: frozenset[str] = frozenset({BELOW_CUTOFF, DROP_FROM_PREVIOUS, LOW_NOT_IMPROVING})

MAX_ITEM = 10.0
MAX_TOTAL = 40.0
MAX_SESSION = 5_000  # the largest not-on-track session a tenant may set
# The outcome instruments that have rules (YCORS is stored and shown, never scored).
SCORED_OUTCOME: tuple[str, ...] = (OutcomeInstrument.ORS.value, OutcomeInstrument.CORS.value)


class ItemRatings(Protocol):
    """The four item ratings in form order: `shared.events.Items`, or any lighter holder of them."""

    def values(self) -> tuple[float, float, float, float]: ...


class Unscorable(ValueError):
    """A submission the rules cannot score (no total, or values out of range)."""


def r1(value: float) -> float:
    """Round to one decimal (the precision of the form); -0.0 becomes 0.0."""
    return round(value, 1) + 0.0


@dataclass(frozen=True)
class InstrumentOverride:
    """A tenant's own settings for one instrument; None means 'the tenant's default'."""

    cutoff: float | None = None
    operator: Operator | None = None
    drop: float | None = None


@dataclass(frozen=True)
class OutcomeRules:
    """One tenant's rules for one outcome instrument (ORS or CORS)."""

    adult_cutoff: float = 25.0
    adolescent_cutoff: float = 28.0
    child_cutoff: float = 32.0
    reliable_change: float = 5.0
    not_on_track_warning_session: int = 3
    not_on_track_critical_session: int = 6

    def __post_init__(self) -> None:
        check_outcome_rules(self)

    def cutoff(self, band: AgeBand | str) -> float | None:
        """The clinical cutoff of an age band; None for young children (not scored)."""
        return {AgeBand.ADULT.value: self.adult_cutoff, AgeBand.ADOLESCENT.value: self.adolescent_cutoff,
                AgeBand.CHILD.value: self.child_cutoff}.get(str(band))


    def to_doc(self) -> dict[str, Any]:
        return {"adult_cutoff": self.adult_cutoff, "adolescent_cutoff": self.adolescent_cutoff,
                "child_cutoff": self.child_cutoff, "reliable_change": self.reliable_change,
                "not_on_track_warning_session": self.not_on_track_warning_session,
                "not_on_track_critical_session": self.not_on_track_critical_session}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> OutcomeRules:
        """Rules from a stored document; missing fields take the defaults."""
        base = cls()
        d = doc or {}
        return cls(
            adult_cutoff=float(d.get("adult_cutoff", base.adult_cutoff)),
            adolescent_cutoff=float(d.get("adolescent_cutoff", base.adolescent_cutoff)),
            child_cutoff=float(d.get("child_cutoff", base.child_cutoff)),
            reliable_change=float(d.get("reliable_change", base.reliable_change)),
            not_on_track_warning_session=int(d.get("not_on_track_warning_session",
                                                   base.not_on_track_warning_session)),
            not_on_track_critical_session=int(d.get("not_on_track_critical_session",
                                                    base.not_on_track_critical_session)),
        )



def check_outcome_rules(o: OutcomeRules, where: str = "") -> None:
    """Raise ValueError when a setting is out of range (so a typo cannot silence every alert)."""
    for name in ("adult_cutoff", "adolescent_cutoff", "child_cutoff"):
        value = getattr(o, name)
        if not (0.0 <= value <= MAX_TOTAL):
            raise ValueError(f"{where}{name} must be between 0 and {MAX_TOTAL}, got {value}")
    if not (0.0 < o.reliable_change <= MAX_TOTAL):
        raise ValueError(f"{where}reliable_change must be > 0 and <= {MAX_TOTAL}, got {o.reliable_change}")
    w, c = o.not_on_track_warning_session, o.not_on_track_critical_session
    if not (1 <= w <= MAX_SESSION):
        raise ValueError(f"{where}not_on_track_warning_session must be between 1 and {MAX_SESSION}, got {w}")
    if not (w <= c <= MAX_SESSION):
        raise ValueError(f"{where}not_on_track_critical_session must be between not_on_track_warning_session "
                         f"({w}) and {MAX_SESSION}, got {c}")



@dataclass(frozen=True)
class TenantRules:
    """One tenant's rules. `instruments` overrides the alliance cutoff/operator/drop per SRS-family
    instrument; `outcome` holds the outcome rules of each scored outcome instrument (ORS, CORS: the
    defaults for any not given)."""

    cutoff: float = 36.0
    operator: Operator = "<"
    drop: float = 1.0
    critical_drop: float = 3.0
    item_threshold: float = 9.0
    triggers: frozenset[str] = DEFAULT_TRIGGERS
    instruments: Mapping[str, InstrumentOverride] = field(default_factory=dict)
    session_gap: int = 20
    max_episode_sessions: int = 500
    max_client_submissions: int = 5_000
    outcome: Mapping[str, OutcomeRules] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every scored outcome instrument gets its rules (the defaults unless given), so that equal
        # settings compare equal however they were written down.
        if set(self.outcome) != set(SCORED_OUTCOME):
            object.__setattr__(self, "outcome", {**{i: OutcomeRules() for i in SCORED_OUTCOME}, **self.outcome})
        check_rules(self)

    def outcome_for(self, instrument: OutcomeInstrument | str) -> OutcomeRules:
        """The outcome rules of one outcome instrument (YCORS: the defaults, never applied)."""
        return self.outcome.get(str(instrument)) or OutcomeRules()

    def for_instrument(self, instrument: Instrument | str) -> TenantRules:
        """The rules that apply to one instrument (its override merged over the defaults)."""
        o = self.instruments.get(str(instrument))
        if o is None:
            return self if not self.instruments else replace(self, instruments={})
        return replace(
            self,
            cutoff=self.cutoff if o.cutoff is None else o.cutoff,
            operator=self.operator if o.operator is None else o.operator,
            drop=self.drop if o.drop is None else o.drop,
            instruments={},
        )

    def to_doc(self) -> dict[str, Any]:
        """A plain document (for the store and for `show-rules`)."""
        return {
            "cutoff": self.cutoff,
            "operator": self.operator,
            "drop": self.drop,
            "critical_drop": self.critical_drop,
            "item_threshold": self.item_threshold,
            "triggers": sorted(self.triggers, key=FLAG_NAMES.index),
            "session_gap": self.session_gap,
            "max_episode_sessions": self.max_episode_sessions,
            "max_client_submissions": self.max_client_submissions,
            "instruments": {
                name: {k: v for k, v in (("cutoff", o.cutoff), ("operator", o.operator), ("drop", o.drop))
                       if v is not None}
                for name, o in sorted(self.instruments.items())
            },
            "outcome": {name: o.to_doc() for name, o in sorted(self.outcome.items())},
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> TenantRules:
        """Rules from a stored document; missing fields take the defaults."""
        if not doc:
            return cls()
        base = cls()
        instruments = {
            str(name): InstrumentOverride(
                cutoff=_opt_float(o.get("cutoff")), operator=o.get("operator"), drop=_opt_float(o.get("drop")))
            for name, o in (doc.get("instruments") or {}).items()
        }
        return cls(
            cutoff=float(doc.get("cutoff", base.cutoff)),
            operator=doc.get("operator", base.operator),
            drop=float(doc.get("drop", base.drop)),
            critical_drop=float(doc.get("critical_drop", base.critical_drop)),
            item_threshold=float(doc.get("item_threshold", base.item_threshold)),
            triggers=frozenset(doc.get("triggers", base.triggers)),
            instruments=instruments,
            session_gap=int(doc.get("session_gap", base.session_gap)),
            max_episode_sessions=int(doc.get("max_episode_sessions", base.max_episode_sessions)),
            max_client_submissions=int(doc.get("max_client_submissions", base.max_client_submissions)),
            # Rules stored before the ORS existed have no "outcome": the defaults apply.
            outcome={str(name): OutcomeRules.from_doc(o) for name, o in (doc.get("outcome") or {}).items()},
        )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _check_cutoff(cutoff: float, operator: str, drop: float, where: str) -> None:
    if not (0.0 <= cutoff <= MAX_TOTAL):
        raise ValueError(f"{where}cutoff must be between 0 and {MAX_TOTAL}, got {cutoff}")
    if operator not in OPERATORS:
        raise ValueError(f"{where}operator must be one of {', '.join(OPERATORS)}, got {operator!r}")
    if not (0.0 < drop <= MAX_TOTAL):
        raise ValueError(f"{where}drop must be > 0 and <= {MAX_TOTAL}, got {drop}")


def check_rules(rules: TenantRules) -> None:
    """Raise ValueError when a setting is out of range (so a typo cannot silence every alert)."""
    _check_cutoff(rules.cutoff, rules.operator, rules.drop, "")
    if not (0.0 < rules.critical_drop <= MAX_TOTAL):
        raise ValueError(f"critical_drop must be > 0 and <= {MAX_TOTAL}, got {rules.critical_drop}")
    if not (0.0 <= rules.item_threshold <= MAX_ITEM):
        raise ValueError(f"item_threshold must be between 0 and {MAX_ITEM}, got {rules.item_threshold}")
    if not (1 <= rules.session_gap <= 100_000):
        raise ValueError(f"session_gap must be between 1 and 100000, got {rules.session_gap}")
    # Upper bounds keep the per-client document well below MongoDB's 16 MiB (~0.7 KiB per submission:
    # 10,000 is ~7 MiB).
    if not (1 <= rules.max_episode_sessions <= 5_000):
        raise ValueError(f"max_episode_sessions must be between 1 and 5000, got {rules.max_episode_sessions}")
    if not (1 <= rules.max_client_submissions <= 10_000):
        raise ValueError(f"max_client_submissions must be between 1 and 10000, got {rules.max_client_submissions}")
    unknown = set(rules.triggers) - set(FLAG_NAMES)
    if unknown or not rules.triggers:
        raise ValueError(f"triggers must be a non-empty subset of {', '.join(FLAG_NAMES)}")
    for name, o in rules.instruments.items():
        if name not in {i.value for i in SCORED_INSTRUMENTS}:
            raise ValueError(f"no rules for instrument {name!r}: one of SRS, CSRS, GSRS, CGSRS")
        _check_cutoff(rules.cutoff if o.cutoff is None else o.cutoff,
                      rules.operator if o.operator is None else o.operator,
                      rules.drop if o.drop is None else o.drop, f"{name}: ")
    for name, oc in rules.outcome.items():
        if name not in SCORED_OUTCOME:
            raise ValueError(f"no outcome rules for instrument {name!r}: one of {', '.join(SCORED_OUTCOME)}")
        check_outcome_rules(oc, f"{name}: ")


# --- the rules ---------------------------------------------------------------------------------


def total_of(items: ItemRatings | None, total: float | None, names: tuple[str, ...] = ITEM_NAMES) -> float:
    """The session total: the sum of the items when given, else the given total; one decimal.
    `names`: the items' names, for the message (`shared.events.ORS_ITEM_NAMES` for the ORS)."""
    if items is not None:
        values = items.values()
        for name, v in zip(names, values, strict=True):
            if not (math.isfinite(v) and 0.0 <= v <= MAX_ITEM):
                raise Unscorable(f"items.{name} must be between 0 and {MAX_ITEM}, got {v}")
        return r1(sum(values))
    if total is None:
        raise Unscorable("neither items nor total given")
    if not (math.isfinite(total) and 0.0 <= total <= MAX_TOTAL):
        raise Unscorable(f"total must be between 0 and {MAX_TOTAL}, got {total}")
    return r1(total)


def below_cutoff(total: float, cutoff: float, operator: Operator = "<") -> bool:
    """The total is under the clinical cutoff (`<`), or at or under it (`<=`)."""
    t, c = r1(total), r1(cutoff)
    return t < c if operator == "<" else t <= c


def change_from_previous(total: float, previous_total: float | None) -> float | None:
    """total - previous_total to one decimal; None for a first session."""
    return None if previous_total is None else r1(total - previous_total)


def drop_from_previous(change: float | None, drop: float = 1.0) -> bool:
    """The total fell by `drop` or more since the previous session."""
    return change is not None and r1(change) <= -r1(drop)


def low_not_improving(total: float, previous_total: float | None, cutoff: float, operator: Operator = "<") -> bool:
    """Below cutoff now and in the previous session, and not improving (change <= 0)."""
    if previous_total is None:
        return False
    change = change_from_previous(total, previous_total)
    return (below_cutoff(total, cutoff, operator) and below_cutoff(previous_total, cutoff, operator)
            and change is not None and change <= 0.0)


def item_below_threshold(items: ItemRatings | None, threshold: float = 9.0) -> bool:
    """Any item under the threshold; false for total-only entries (no items to look at)."""
    return items is not None and any(r1(v) < r1(threshold) for v in items.values())


def low_items(items: ItemRatings | None, threshold: float = 9.0) -> tuple[str, ...]:
    """The items under the threshold, in form order (what the clinician should ask about)."""
    if items is None:
        return ()
    return tuple(name for name, v in zip(ITEM_NAMES, items.values(), strict=True) if r1(v) < r1(threshold))


def severity(flags: Iterable[str], change: float | None, previous_low_not_improving: bool,
             rules: TenantRules) -> Severity:
    """How urgent an alert with these flags is (see module docs)."""
    holds = set(flags)
    dropped_below = BELOW_CUTOFF in holds and DROP_FROM_PREVIOUS in holds
    big_drop = change is not None and r1(change) <= -r1(rules.critical_drop)
    persistent = LOW_NOT_IMPROVING in holds and previous_low_not_improving
    return Severity.CRITICAL if dropped_below or big_drop or persistent else Severity.WARNING


@dataclass(frozen=True)
class Alert:
    """Why an alert is raised, and how urgent it is."""

    triggers: tuple[str, ...]
    severity: Severity


def alert_decision(flags: Iterable[str], change: float | None, latest: bool, rules: TenantRules,
                   previous_low_not_improving: bool = False) -> Alert | None:
    """An alert when a trigger flag holds and the session is the latest; None otherwise."""
    if not latest:
        return None
    flags = tuple(flags)
    triggers = tuple(f for f in FLAG_NAMES if f in set(flags) and f in rules.triggers)
    if not triggers:
        return None
    return Alert(triggers, severity(flags, change, previous_low_not_improving, rules))


@dataclass(frozen=True)
class Scoring:
    """Everything the rules say about one session. `triggers` and `severity` are what an alert
    would carry if the session were the latest (`alert` is set only when it is)."""

    total: float
    cutoff: float
    previous_total: float | None
    change_from_previous: float | None
    flags: tuple[str, ...]
    latest: bool
    alert: Alert | None
    triggers: tuple[str, ...] = ()
    severity: Severity | None = None
    low_items: tuple[str, ...] = ()


def score(total: float, items: ItemRatings | None, previous_total: float | None, latest: bool,
          rules: TenantRules, previous_low_not_improving: bool = False) -> Scoring:
    """Apply every rule to one session. `rules` must already be resolved for the instrument;
    `previous_low_not_improving` is whether `low_not_improving` held in the previous session."""
    total = r1(total)
    prev = None if previous_total is None else r1(previous_total)
    change = change_from_previous(total, prev)
    holds = {
        BELOW_CUTOFF: below_cutoff(total, rules.cutoff, rules.operator),
        DROP_FROM_PREVIOUS: drop_from_previous(change, rules.drop),
        LOW_NOT_IMPROVING: low_not_improving(total, prev, rules.cutoff, rules.operator),
        ITEM_BELOW_THRESHOLD: item_below_threshold(items, rules.item_threshold),
    }
    flags = tuple(f for f in FLAG_NAMES if holds[f])
    would = alert_decision(flags, change, True, rules, previous_low_not_improving)
    return Scoring(total, r1(rules.cutoff), prev, change, flags, latest, would if latest else None,
                   would.triggers if would else (), would.severity if would else None,
                   low_items(items, rules.item_threshold))
