"""Pure read-model rules of reporting: no I/O.

**The record.** Reporting keeps one document per (tenant, client, instrument): the client's
*record* on that instrument, holding every episode. Its state is one map, `entries`, keyed by
submission id; everything else in the document is derived from that map.

**Facts and their order.** Every scored event contributes one or two facts to the map:

- its own *scored entry* under its `submission_id`, ranked by the key
  `(revision, 1, digest of the entry)`;
- when it names another submission in `supersedes`, a *tombstone* under that submission id,
  `{revision, superseded_by}` with the event's revision, ranked by `(revision, 0, superseded_by)`;
- an event with `retracted` set (the session moved to another client, docs/clinical-records.md)
  contributes a *retracted* entry instead of its scored entry, ranked by `(revision, 0,
  "retracted")`: like a tombstone, it is not shown, and a scored event of a higher revision (the
  session moved back) revives the submission.

The map keeps, per submission id, the fact with the greatest key (the keys are stored as
fixed-width text, so text order is that order). So:

- a redelivered or duplicated event changes nothing (same key);
- a newer revision of a submission replaces the older one, and a stale one replayed later never
  overwrites it (lower key);
- a submission named in `supersedes` of an event whose revision is higher than its own entry's
  becomes a tombstone; a scored event of that submission with a higher revision than the
  tombstone's revives it. At an equal revision the scored entry wins (rank 1 > 0), so
  superseding takes a strictly higher revision, as docs/clinical-records.md says;
- the digest only orders two different contents under one (submission, revision), which
  scoring never publishes; it makes the order total, so even that never depends on arrival.

A per-key max is commutative, associative and idempotent, so any shuffle, duplication or
batching of a record's events yields the same map as the clean ordered stream.

**Derived fields** are functions of the map alone, so they inherit that property:

- the *shown sessions* are the scored entries, one per session `(episode_id, session_number)`;
  should two current submissions ever name one session (an older producer that corrected without
  `supersedes`), the one with the greatest `(revision, accepted_at, scored_at, submission_id)`
  is shown;
- sessions are grouped by `episode_id`; within an episode ordered by `session_number`. The
  *current episode* is the episode of the most recently administered session (`administered_at`,
  then `session_number`, then episode id); episodes are listed most recent first in that order;
- the *latest session* is the highest-numbered session of the current episode; `below_cutoff`,
  `declining` and `at_risk` are read from its flags (scoring decided them with the tenant's
  rules; nothing is re-derived here): below = `below_cutoff` in flags, declining =
  `drop_from_previous` or `low_not_improving` in flags, at risk = either;
- the *owning site* is the `site_id` of the shown session with the highest `site_version` (then
  the most recently administered): a transfer re-publishes every session with the new site and
  `site_version` + 1. Reads of a site-bound key are scoped by it;
- the clinician is that of the latest session (caseloads follow it); summary fields
  (`session_count`, `first_total`, ...) are of the current episode.

**Outcome records.** ORS-family sessions (`ors.scored.v1`) fold into records of their own, one
per (tenant, client, outcome instrument), by exactly the same map and merge; only the derived
fields differ (`derive_outcome_record`: scoring's change from intake, reliable and clinically
significant change of the latest session, no alliance flags). The trajectory of an alliance
instrument shows the paired outcome record's series of the same episode beside it
(`outcome_series`, `aligned_view`).

The submission-status rules ("what happened to my submission?") are at the end of this module.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from shared import ids
from shared.events import (
    LIFECYCLE_STATUSES,
    OUTCOME_OF,
    AlertState,
    AlertStatus,
    AlertStatusChanged,
    AllianceDeterioration,
    DeadLetter,
    Flag,
    Instrument,
    Lifecycle,
    OrsScored,
    OrsSubmitted,
    OutcomeAlert,
    OutcomeChange,
    OutcomeInstrument,
    SrsScored,
    SrsSubmitted,
)

Outcome = Literal["applied", "corrected", "duplicate", "stale"]

AGE_BANDS: dict[Instrument, str] = {
    Instrument.SRS: "13+",
    Instrument.GSRS: "13+",
    Instrument.CSRS: "6-12",
    Instrument.CGSRS: "6-12",
    Instrument.YCSRS: "<=5",
}
AGE_BAND_ORDER: tuple[str, ...] = ("13+", "6-12", "<=5")

# Scoring's rule names that mean the alliance is getting worse; the tenant's thresholds reach
# reporting only through these flags.
DECLINE_FLAGS = frozenset({Flag.DROP_FROM_PREVIOUS, Flag.LOW_NOT_IMPROVING})
BELOW_CUTOFF = Flag.BELOW_CUTOFF
SCORED = "scored"
SUPERSEDED = "superseded"
RETRACTED = "retracted"

Doc = dict[str, Any]
# Both scales' scored sessions merge the same way (one record per client and instrument); an ORS
# record holds what scoring decided about the outcome (change from intake, reliable and clinically
# significant change) instead of the alliance flags.
Scored = SrsScored | OrsScored
Submitted = SrsSubmitted | OrsSubmitted
ScoredT = TypeVar("ScoredT", SrsScored, OrsScored)
AlertRaise = AllianceDeterioration | OutcomeAlert


# The outcome instruments' bands, for their counter documents (an ORS record's own `age_band` is
# scoring's: adult or adolescent by the client's age).
OUTCOME_AGE_BANDS: dict[OutcomeInstrument, str] = {
    OutcomeInstrument.ORS: "13+", OutcomeInstrument.CORS: "6-12", OutcomeInstrument.YCORS: "<=5"}


def age_band(instrument: str) -> str:
    """The PCOMS age band an instrument is made for: SRS/GSRS/ORS 13+, CSRS/CGSRS/CORS 6-12, YCSRS/YCORS <=5."""
    if is_outcome(instrument):
        return OUTCOME_AGE_BANDS[OutcomeInstrument(instrument)]
    return AGE_BANDS[Instrument(instrument)]


def instruments_of_band(band: str) -> list[str]:
    """The instruments whose age band is `band`."""
    return [i.value for i, b in AGE_BANDS.items() if b == band]


def record_id(tenant_id: str, client_id: str, instrument: str) -> str:
    """The read model's key: one record per (tenant, client, instrument), every episode in it."""
    return ids.client_record_id(tenant_id, client_id, instrument)


# Memoised: a record's merge compares every session's times over and over (episode order, owner,
# summaries: ~27 texts per merged event), and strftime was a fifth of a merge's CPU, which runs on
# reporting's event loop ahead of its API reads (issue 11). Equal aware datetimes are the same
# instant, so they share their text; a naive one never equals an aware one.
@functools.lru_cache(maxsize=65_536)
def _utc_text(ts: datetime) -> str:
    """Fixed-width UTC text, so that comparing the text compares the instants."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rev_text(revision: int) -> str:
    return f"{revision:010d}"


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    raise TypeError(f"cannot store {type(value).__name__} in a record")


def _digest(value: Mapping[str, Any]) -> str:
    text = json.dumps(value, default=_encode, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _ors_fields(event: OrsScored) -> Doc:
    """What an ORS entry keeps besides the common fields: scoring's decisions, as published."""
    return {
        "age_band": event.age_band,
        "reliable_change_index": event.reliable_change_index,
        "intake_total": event.intake_total,
        "change_from_intake": event.change_from_intake,
        "change": event.change,
        "clinically_significant_improvement": event.clinically_significant_improvement,
        "in_clinical_range": event.in_clinical_range,
    }


def session_entry(event: Scored) -> Doc:
    """The scored entry of one event (the map's value under its submission id); the retracted
    entry of a revision that retracts its session (it moved to another client)."""
    if event.retracted:
        return {"kind": RETRACTED, "submission_id": event.submission_id, "revision": event.revision,
                "key": f"{_rev_text(event.revision)}|0|{RETRACTED}"}
    entry: Doc = {
        "kind": SCORED,
        "submission_id": event.submission_id,
        "event_id": event.event_id,
        "revision": event.revision,
        "episode_id": event.episode_id,
        "episode_derived": event.episode_derived,
        "session_number": event.session_number,
        "administered_at": event.administered_at,
        "total": event.total,
        "items": event.items.model_dump() if event.items is not None else None,
        "flags": list(event.flags),
        "triggers": list(event.triggers),
        "severity": event.severity,
        "cutoff": event.cutoff,
        "previous_total": event.previous_total,
        "change_from_previous": event.change_from_previous,
        "site_id": event.site_id,
        "site_version": event.site_version,
        "clinician_id": event.clinician_id,
        "scored_at": event.scored_at,
        "accepted_at": event.accepted_at,
    }
    if isinstance(event, OrsScored):
        entry.update(_ors_fields(event))
    else:
        entry.update(low_items=list(event.low_items), operator=event.operator)
    # times normalized to UTC text, so the digest does not depend on the offset a producer used
    normal = {k: _utc_text(v) if isinstance(v, datetime) else v for k, v in entry.items()}
    entry["key"] = f"{_rev_text(event.revision)}|1|{_digest(normal)}"
    return entry


def tombstone(submission_id: str, revision: int, superseded_by: str) -> Doc:
    """The entry of a submission superseded by `superseded_by` at `revision`."""
    return {"kind": SUPERSEDED, "submission_id": submission_id, "revision": revision,
            "superseded_by": superseded_by, "key": f"{_rev_text(revision)}|0|{superseded_by}"}


_ENTRY_TIMES = ("administered_at", "scored_at", "accepted_at")


def pack_entries(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """The stored form of a record's entries: one compact JSON text.

    Nothing queries inside entries on the server (the query fields are top-level), and a text
    field costs a store a fraction of a nested map to scan past: summaries aggregate over every
    record of a scope.
    """
    return json.dumps(entries, default=_encode, separators=(",", ":"), sort_keys=True)


def unpack_entries(text: str) -> dict[str, Doc]:
    """Entries as `pack_entries` stored them, times back as aware datetimes."""
    entries: dict[str, Doc] = json.loads(text)
    for e in entries.values():
        for name in _ENTRY_TIMES:
            if isinstance(e.get(name), str):
                e[name] = datetime.fromisoformat(e[name])
    return entries


def below_cutoff(session: Mapping[str, Any]) -> bool:
    """Scoring found the session below its cutoff (the `below_cutoff` flag)."""
    return BELOW_CUTOFF in (session.get("flags") or ())


def is_declining(session: Mapping[str, Any]) -> bool:
    """Scoring flagged the session with a deterioration rule (`drop_from_previous` or `low_not_improving`)."""
    return bool(DECLINE_FLAGS.intersection(session.get("flags") or ()))


def _slot_rank(e: Mapping[str, Any]) -> tuple[int, str, str, str]:
    accepted = e.get("accepted_at") or e["scored_at"]
    return (int(e["revision"]), _utc_text(accepted), _utc_text(e["scored_at"]), e["submission_id"])


def _recency(e: Mapping[str, Any]) -> tuple[str, int, str]:
    return (_utc_text(e["administered_at"]), int(e["session_number"]), e.get("episode_id") or "")


def sessions_by_episode(entries: Mapping[str, Mapping[str, Any]]) -> dict[str | None, list[Doc]]:
    """The shown sessions grouped by episode, episodes most recent first, sessions by number."""
    slots: dict[tuple[str | None, int], Doc] = {}
    for e in entries.values():
        if e.get("kind") != SCORED:
            continue
        slot = (e.get("episode_id"), int(e["session_number"]))
        held = slots.get(slot)
        if held is None or _slot_rank(e) > _slot_rank(held):
            slots[slot] = dict(e)
    groups: dict[str | None, list[Doc]] = {}
    for (episode, _), e in slots.items():
        groups.setdefault(episode, []).append(e)
    for sessions in groups.values():
        sessions.sort(key=lambda s: int(s["session_number"]))
    order = sorted(groups, key=lambda ep: max(_recency(s) for s in groups[ep]), reverse=True)
    return {ep: groups[ep] for ep in order}


def caseload_key(at_risk: bool, client_id: str, instrument: str) -> str:
    """Sort key of a caseload: at-risk first, then by client; unique within a clinician."""
    return "\x1f".join(("0" if at_risk else "1", client_id, instrument))


def episode_summary(episode_id: str | None, sessions: Sequence[Mapping[str, Any]]) -> Doc:
    """One line of a record's episode list."""
    times = [s["administered_at"] for s in sessions]
    return {"episode_id": episode_id, "derived": any(bool(s.get("episode_derived")) for s in sessions),
            "first_administered_at": min(times, key=_utc_text), "last_administered_at": max(times, key=_utc_text),
            "session_count": len(sessions)}


def _placement(groups: Mapping[str | None, list[Doc]]) -> Doc:
    """Where a record stands (non-empty `groups`): owning site, clinician, current episode, episodes."""
    shown = [s for sessions in groups.values() for s in sessions]
    owner = max(shown, key=lambda s: (int(s.get("site_version") or 0), *_recency(s), s["submission_id"]))
    episode, ordered = next(iter(groups.items()))
    return {
        "site_id": owner["site_id"],
        "site_version": int(owner.get("site_version") or 0),
        "clinician_id": ordered[-1]["clinician_id"],
        "episode_id": episode,
        "episode_derived": any(bool(s.get("episode_derived")) for s in ordered),
        "episodes": [episode_summary(ep, sessions) for ep, sessions in groups.items()],
        "session_count": len(ordered),
    }


def derive_record(identity: Mapping[str, Any], entries: Mapping[str, Doc],
                  groups: dict[str | None, list[Doc]] | None = None) -> Doc:
    """A full record document from its identity and merged entries (no version or timestamps);
    `groups` is `sessions_by_episode(entries)` when the caller has it already.

    A record whose entries are all tombstones (possible only while a superseding event is still
    on its way) has `session_count` 0 and no site or clinician: no read finds it.
    """
    if groups is None:
        groups = sessions_by_episode(entries)
    doc: Doc = {
        "_id": identity["_id"],
        "tenant_id": identity["tenant_id"],
        "client_id": identity["client_id"],
        "instrument": identity["instrument"],
        "age_band": age_band(identity["instrument"]),
        "entries": dict(entries),
    }
    if not groups:
        return {**doc, "site_id": None, "site_version": 0, "clinician_id": None, "episode_id": None,
                "episode_derived": False, "episodes": [], "session_count": 0, "sessions_below_cutoff": 0,
                "caseload_key": None, "at_risk": False, "below_cutoff": False, "declining": False}
    ordered = next(iter(groups.values()))
    latest = ordered[-1]
    below, declining = below_cutoff(latest), is_declining(latest)
    at_risk = below or declining
    return {
        **doc,
        **_placement(groups),
        "sessions_below_cutoff": sum(1 for s in ordered if below_cutoff(s)),
        "first_session_number": int(ordered[0]["session_number"]),
        "first_total": float(ordered[0]["total"]),
        "latest_session_number": int(latest["session_number"]),
        "latest_total": float(latest["total"]),
        "latest_administered_at": latest["administered_at"],
        "cutoff": float(latest["cutoff"]),
        "operator": latest.get("operator") or "<",
        "below_cutoff": below,
        "declining": declining,
        "at_risk": at_risk,
        "caseload_key": caseload_key(at_risk, identity["client_id"], identity["instrument"]),
    }


# The alliance instrument a client with outcome sessions only is listed under in a caseload (the
# first one `OUTCOME_OF` pairs with its outcome instrument: its trajectory answers for that client).
CASELOAD_INSTRUMENT: dict[OutcomeInstrument, Instrument] = {
    OutcomeInstrument.ORS: Instrument.SRS, OutcomeInstrument.CORS: Instrument.CSRS,
    OutcomeInstrument.YCORS: Instrument.YCSRS}


def paired_record_ids(outcome: Mapping[str, Any]) -> list[str]:
    """The ids of the alliance records an outcome record pairs with (`OUTCOME_OF`): when one of
    them has sessions, the client is listed by it, not by the outcome record."""
    return [record_id(outcome["tenant_id"], outcome["client_id"], a.value)
            for a, o in OUTCOME_OF.items() if o.value == outcome["instrument"]]


def is_outcome(instrument: str) -> bool:
    """The instrument is of the ORS family (its record is an outcome record)."""
    return instrument in OutcomeInstrument.__members__


def derive_outcome_record(identity: Mapping[str, Any], entries: Mapping[str, Doc],
                          groups: dict[str | None, list[Doc]] | None = None) -> Doc:
    """An outcome (ORS-family) record document: the same sessions, episodes and owning site as
    `derive_record` finds, and the latest session's outcome as scoring decided it."""
    if groups is None:
        groups = sessions_by_episode(entries)
    doc: Doc = {"_id": identity["_id"], "tenant_id": identity["tenant_id"], "client_id": identity["client_id"],
                "instrument": identity["instrument"], "entries": dict(entries)}
    if not groups:
        return {**doc, "site_id": None, "site_version": 0, "clinician_id": None, "episode_id": None,
                "episode_derived": False, "episodes": [], "session_count": 0, "caseload_key": None}
    ordered = next(iter(groups.values()))
    latest = ordered[-1]
    shown_as = CASELOAD_INSTRUMENT[OutcomeInstrument(identity["instrument"])].value
    return {
        **doc,
        **_placement(groups),
        # where the client stands in a caseload when it has no alliance record: not at risk on
        # the alliance scale (it has no session there), under the alliance instrument it is listed by
        "caseload_key": caseload_key(False, identity["client_id"], shown_as),
        "age_band": latest.get("age_band"),
        "first_total": float(ordered[0]["total"]),
        "intake_total": latest.get("intake_total"),
        "latest_session_number": int(latest["session_number"]),
        "latest_total": float(latest["total"]),
        "latest_administered_at": latest["administered_at"],
        "cutoff": latest.get("cutoff"),
        "change": latest.get("change"),
        "change_from_intake": latest.get("change_from_intake"),
        "clinically_significant_improvement": bool(latest.get("clinically_significant_improvement")),
    }


@dataclass
class MergeResult:
    """What merging a group of events into one record did."""

    doc: Doc | None  # None: nothing changed, nothing to write
    outcomes: list[tuple[Scored, Outcome]] = field(default_factory=list)
    groups: dict[str | None, list[Doc]] | None = None  # the doc's sessions_by_episode, for contribution


def _put(entries: dict[str, Doc], entry: Doc) -> Outcome:
    """Keep the greater of `entry` and what the map holds under its submission id."""
    sid = entry["submission_id"]
    held = entries.get(sid)
    if held is None:
        entries[sid] = entry
        return "applied"
    if held["key"] == entry["key"]:
        return "duplicate"
    if held["key"] > entry["key"]:
        return "stale"
    entries[sid] = entry
    revised = held.get("kind") == SCORED and int(held["revision"]) < int(entry["revision"])
    return "corrected" if revised else "applied"


def merge(existing: Mapping[str, Any] | None, events: Sequence[Scored]) -> MergeResult:
    """Merge scored events of ONE record (same tenant, client and instrument) into its document.

    The events are all `SrsScored` or all `OrsScored` (their instruments differ, so their records
    do); an outcome record's fields are `derive_outcome_record`'s.

    `existing` is the current document (None when new); `events` any batch, in any order, with
    any duplicates (ValueError if one belongs to another record). Returns the new document (`v`
    bumped; `updated_at` is left to the store) or `doc=None` when nothing changed, and per event
    its outcome: `applied` (a new submission or session), `corrected` (it replaced an older
    revision of its submission, or superseded another submission), `duplicate`, `stale` (older
    than what the record holds). Folding any permutation of a set of events, in any batches,
    gives the same document up to `v` (see the module docs for why).
    """
    if not events:
        return MergeResult(None)
    first = events[0]
    identity: Doc = {
        "_id": record_id(first.tenant_id, first.client_id, first.instrument),
        "tenant_id": first.tenant_id,
        "client_id": first.client_id,
        "instrument": str(first.instrument),
    }
    entries: dict[str, Doc] = dict(existing.get("entries", {})) if existing else {}
    result = MergeResult(None)
    changed = False
    for event in events:
        if record_id(event.tenant_id, event.client_id, event.instrument) != identity["_id"]:
            raise ValueError("merge takes the events of one record (tenant, client, instrument); "
                             "see group_by_record")
        outcome = _put(entries, session_entry(event))
        if event.supersedes and event.supersedes != event.submission_id:
            if _put(entries, tombstone(event.supersedes, event.revision, event.submission_id)) in (
                    "applied", "corrected"):
                changed = True
                if outcome in ("applied", "duplicate"):
                    outcome = "corrected"
        changed = changed or outcome in ("applied", "corrected")
        result.outcomes.append((event, outcome))
    if changed:
        result.groups = sessions_by_episode(entries)
        derive = derive_outcome_record if is_outcome(identity["instrument"]) else derive_record
        doc = derive(identity, entries, result.groups)
        doc["v"] = int(existing.get("v", 0)) + 1 if existing else 1
        result.doc = doc
    return result


def group_by_record(events: Iterable[Scored]) -> dict[str, list[Scored]]:
    """Scored events grouped by the record they belong to (input order kept)."""
    groups: dict[str, list[Scored]] = {}
    for e in events:
        groups.setdefault(record_id(e.tenant_id, e.client_id, e.instrument), []).append(e)
    return groups


def opens_record(events: Iterable[Scored]) -> bool:
    """Whether these events (of one record) look like its client's first session on the
    instrument - the first version of session 1 with no session before it - so that the record
    most likely does not exist yet. Only a guess (a new episode starts at session 1 too): a writer
    acting on it writes an insert, which fails on the `_id` if the record exists after all."""
    return all(e.session_number == 1 and e.previous_total is None and e.revision == 1 and not e.supersedes
               for e in events)


# ---------------------------------------------------------------------------------------------
# Alerts: one document per alert id, merged from raises and status events in any order.
#
# The lifecycle is a max of `(revision, rank)` with raised = 0 < superseded = 1 < withdrawn = 2,
# stored as the single number `life = 4 * revision + rank` so the store can take it with `$max`.
# What a raise says (severity, triggers, totals) is kept per revision (`raises.<revision>`, the
# same value on every delivery), and the view shows the highest. An acknowledgement is a flag
# that only turns true; a revision keeps it.

LIFECYCLE_RANK: dict[str, int] = {status: rank for rank, status in enumerate(Lifecycle)}  # in rank order


def life_key(revision: int | None, status: str) -> int:
    """The lifecycle key of a raise (`status` "raised") or a scoring status, as one number."""
    return 4 * int(revision or 1) + LIFECYCLE_RANK[status]


def alert_identity(event: AlertRaise) -> Doc:
    """The fields of an alert that never change (its session)."""
    return {
        "tenant_id": event.tenant_id,
        "site_id": event.site_id,
        "clinician_id": event.clinician_id,
        "client_id": event.client_id,
        "instrument": str(event.instrument),
        "episode_id": event.episode_id,
        "record_id": record_id(event.tenant_id, event.client_id, event.instrument),
        "session_number": event.session_number,
    }


def alert_raise(event: AlertRaise) -> Doc:
    """What one revision of a raised alert says (stored under `raises.<revision>`; its site and
    clinician place an alliance alert in the counters, see `alert_contribution`)."""
    said: Doc = {"revision": event.revision, "submission_id": event.submission_id, "severity": event.severity,
                 "triggers": list(event.triggers), "total": event.total, "raised_at": event.occurred_at,
                 "site_id": event.site_id, "clinician_id": event.clinician_id}
    if isinstance(event, OutcomeAlert):
        said.update(low_items=[], change_from_intake=event.change_from_intake, advice=event.advice)
    else:
        said.update(low_items=list(event.low_items), outcome_at_risk=event.outcome_at_risk)
    return said


def status_identity(event: AlertStatusChanged) -> Doc:
    """The session fields a scoring status event names (only those it carries); an outcome alert's
    status (`OutcomeAlertStatusChanged`) is one."""
    out: Doc = {}
    if event.client_id is not None and event.instrument is not None:
        out.update(client_id=event.client_id, instrument=str(event.instrument),
                   record_id=record_id(event.tenant_id, event.client_id, event.instrument))
    if event.episode_id is not None:
        out["episode_id"] = event.episode_id
    if event.session_number is not None:
        out["session_number"] = event.session_number
    return out


def latest_raise(alert: Mapping[str, Any]) -> Doc:
    """The highest revision's raise of an alert document (older documents kept it top-level)."""
    raises = alert.get("raises") or {}
    if raises:
        return dict(raises[max(raises, key=int)])
    return {"revision": 1, "severity": alert.get("severity"), "triggers": alert.get("triggers", []),
            "low_items": [], "total": alert.get("total"), "raised_at": alert.get("raised_at")}


def alert_status(alert: Mapping[str, Any]) -> tuple[AlertState, int]:
    """(status, revision) of an alert: the lifecycle's greatest fact, `open` shown as
    `acknowledged` once a clinician acknowledged it."""
    life = int(alert.get("life") or 0)
    if life < 4:  # raised before revisions existed
        life = 4
    revision, rank = divmod(life, 4)
    if rank == LIFECYCLE_RANK[Lifecycle.WITHDRAWN]:
        return AlertState.WITHDRAWN, revision
    if rank == LIFECYCLE_RANK[Lifecycle.SUPERSEDED]:
        return AlertState.SUPERSEDED, revision
    return (AlertState.ACKNOWLEDGED if alert.get("acknowledged") else AlertState.OPEN), revision


# An alert document is written by update operators only, each event's update a fact that
# commutes with the others (`raise_update`, `status_update`). A rebuild folds the updates of one
# alert in memory (`combine_updates`) and inserts the document they make (`updated`) once.
AlertUpdate = dict[str, dict[str, Any]]  # {"$set": {...}, "$max": {...}, "$min": {...}, "$setOnInsert": {...}}
_FACT_OPERATORS = ("$set", "$max", "$min", "$setOnInsert")


def raise_update(event: AlertRaise) -> AlertUpdate:
    """The update of an alert document by one raise (or revision): its session, the revision's
    raise under its own number, the lifecycle key with `$max`, the earliest raise with `$min`."""
    return {"$set": {**alert_identity(event), "raised": True, f"raises.{event.revision}": alert_raise(event)},
            "$max": {"life": life_key(event.revision, Lifecycle.RAISED)},
            "$min": {"raised_at": event.occurred_at},
            "$setOnInsert": {"acknowledged": False}}


def status_update(event: AlertStatusChanged) -> AlertUpdate:
    """The update of an alert document by one status event (it may come before the raise): the
    earliest time of each status with `$min`, scoring's lifecycle statuses with `$max`, the
    acknowledgement as a flag that only turns true."""
    update: AlertUpdate = {
        "$set": {"tenant_id": event.tenant_id, "site_id": event.site_id, "clinician_id": event.clinician_id,
                 **status_identity(event)},
        "$min": {f"status_at.{event.status}": event.occurred_at},
        "$setOnInsert": {"raised": False},
    }
    if event.status in LIFECYCLE_STATUSES:
        update["$max"] = {"life": life_key(event.revision, event.status)}
    if event.status == AlertStatus.ACKNOWLEDGED:
        update["$set"]["acknowledged"] = True
    else:
        update["$setOnInsert"]["acknowledged"] = False
    return update


def combine_updates(first: AlertUpdate | None, then: AlertUpdate) -> AlertUpdate:
    """One update doing what `first` then `then` do to any document (stored or not): `$set` the
    later value, `$max`/`$min` the greater/smaller, `$setOnInsert` what no `$set` sets."""
    if first is None:
        return {op: dict(fields) for op, fields in then.items()}
    out: AlertUpdate = {op: dict(first.get(op) or {}) for op in _FACT_OPERATORS}
    out["$set"].update(then.get("$set") or {})
    for op, pick in (("$max", max), ("$min", min)):
        for name, value in (then.get(op) or {}).items():
            held = out[op].get(name)
            out[op][name] = value if held is None else pick(held, value)
    for name, value in (then.get("$setOnInsert") or {}).items():
        out["$setOnInsert"].setdefault(name, value)
    # the store refuses an update naming one field in two operators: a `$set` wins on insert too
    for name in out["$set"].keys() & out["$setOnInsert"].keys():
        del out["$setOnInsert"][name]
    return {op: fields for op, fields in out.items() if fields}


def _as_stored(value: Any) -> Any:
    """A value as the store gives it back: instants in UTC to the millisecond (BSON dates), arrays
    as lists, string enums as strings."""
    if isinstance(value, datetime):
        value = (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
    if isinstance(value, Mapping):
        return {k: _as_stored(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_stored(v) for v in value]
    if isinstance(value, str) and type(value) is not str:
        return str(value)
    return value


def updated(doc: Mapping[str, Any] | None, update: AlertUpdate, doc_id: str) -> Doc:
    """The document `update` makes of `doc` (None: inserts it, `_id` `doc_id`), as the store would
    make and return it (`_as_stored`). For the operators `raise_update` and `status_update` use."""
    out: Doc = _as_stored(dict(doc)) if doc is not None else {"_id": doc_id}
    ops = [("$set", None), ("$max", max), ("$min", min)]
    if doc is None:
        ops.append(("$setOnInsert", None))
    for op, pick in ops:
        for name, value in (update.get(op) or {}).items():
            *path, leaf = name.split(".")
            at = out
            for part in path:
                at = at.setdefault(part, {})
            value = _as_stored(value)
            held = at.get(leaf)
            at[leaf] = value if pick is None or held is None else pick(held, value)
    return out


# ---------------------------------------------------------------------------------------------
# Views


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat()
    return value


class UnknownEpisode(KeyError):
    """The record has no such episode."""


def alert_view(alert: Mapping[str, Any]) -> Doc:
    """One alert as the API shows it."""
    raised = latest_raise(alert)
    status, revision = alert_status(alert)
    return {
        "alert_id": alert["_id"],
        "session_number": alert.get("session_number"),
        "severity": raised.get("severity"),
        "triggers": list(raised.get("triggers") or []),
        "low_items": list(raised.get("low_items") or []),
        "raised_at": _iso(alert.get("raised_at") or raised.get("raised_at")),
        "acknowledged": bool(alert.get("acknowledged", False)),
        "status": status,
        "revision": revision,
    }


def _episode_alerts(alerts: Sequence[Mapping[str, Any]], episode: str | None) -> list[Mapping[str, Any]]:
    return [a for a in alerts if a.get("raised") and a.get("episode_id") == episode]


def _session_head(s: Mapping[str, Any]) -> Doc:
    """The fields every session view starts with (either scale)."""
    return {
        "session_number": int(s["session_number"]),
        "submission_id": s["submission_id"],
        "revision": int(s["revision"]),
        "administered_at": _iso(s["administered_at"]),
        "total": float(s["total"]),
        "items": s.get("items"),
    }


def session_view(s: Mapping[str, Any]) -> Doc:
    """One session as the API shows it: scoring's values, as scored."""
    return {
        **_session_head(s),
        "change_from_previous": s.get("change_from_previous"),
        "flags": list(s.get("flags") or []),
        "below_cutoff": below_cutoff(s),
        "triggers": list(s.get("triggers") or []),
        "severity": s.get("severity"),
        "low_items": list(s.get("low_items") or []),
    }


def episodes_view(doc: Mapping[str, Any]) -> list[Doc]:
    """The record's episodes, most recent first (from the entries: their times keep microseconds,
    which the store's top-level dates do not)."""
    return [{**e, "first_administered_at": _iso(e["first_administered_at"]),
             "last_administered_at": _iso(e["last_administered_at"])}
            for e in (episode_summary(ep, sessions)
                      for ep, sessions in sessions_by_episode(doc.get("entries", {})).items())]


def episode_of(doc: Mapping[str, Any], episode_id: str | None = None) -> tuple[str | None, list[Doc]]:
    """(episode id, its shown sessions by number): the current episode, or the one named.

    UnknownEpisode when the record has no such episode (or no session at all).
    """
    groups = sessions_by_episode(doc.get("entries", {}))
    episode = doc.get("episode_id") if episode_id is None else episode_id
    if episode not in groups:
        raise UnknownEpisode(episode_id)
    return episode, groups[episode]


def alert_mark(alert: Mapping[str, Any]) -> Doc:
    """An alert as marked on one session of a series (the aligned view and the ORS series)."""
    view = alert_view(alert)
    mark = {k: view[k] for k in ("alert_id", "severity", "triggers", "status", "acknowledged", "revision")}
    raised = latest_raise(alert)
    if "outcome_at_risk" in raised:  # an alliance alert: does an outcome alert hold for its session?
        mark["outcome_at_risk"] = bool(raised["outcome_at_risk"])
    return mark


def _marks_by_session(alerts: Sequence[Mapping[str, Any]], episode: str | None) -> dict[int, Doc]:
    """The alert of each session of an episode, as a mark (one alert per session: its id is the session's)."""
    out: dict[int, Doc] = {}
    for a in sorted(_episode_alerts(alerts, episode), key=lambda a: str(a["_id"])):
        if a.get("session_number") is not None:
            out.setdefault(int(a["session_number"]), alert_mark(a))
    return out


def outcome_session_view(s: Mapping[str, Any], mark: Doc | None = None) -> Doc:
    """One ORS session as the API shows it: scoring's values (change, clinical significance,
    clinical range, severity), never re-derived, and its outcome alert mark (if any)."""
    return {
        **_session_head(s),
        "cutoff": s.get("cutoff"),
        "intake_total": s.get("intake_total"),
        "change_from_intake": s.get("change_from_intake"),
        "change_from_previous": s.get("change_from_previous"),
        "change": s.get("change"),
        "clinically_significant_improvement": bool(s.get("clinically_significant_improvement")),
        "in_clinical_range": s.get("in_clinical_range"),
        "flags": list(s.get("flags") or []),
        "triggers": list(s.get("triggers") or []),
        "severity": s.get("severity"),
        "alert": mark,
    }


def outcome_alert_view(alert: Mapping[str, Any]) -> Doc:
    """One outcome alert of the shown episode as the API shows it."""
    view = alert_view(alert)
    view.pop("low_items")
    view["advice"] = latest_raise(alert).get("advice") or ""
    return view


def outcome_episode(outcome: Mapping[str, Any], episode_id: str | None,
                    sessions: Sequence[Mapping[str, Any]] = ()) -> str | None:
    """The episode of an outcome record shown beside the alliance episode `episode_id` (whose
    sessions are `sessions`): the same id, else the record's derived episode that is the same
    episode of care (`ids.same_episode_of_both_scales`: the ORS and SRS of a session across
    midnight UTC got derived ids of two dates), else the most recent derived episode that holds
    one of `sessions` (`ids.same_session_of_both_scales`: a form missing at the episode's first
    session, so the two derived ids begin at two session numbers). `episode_id` itself when the
    record holds none of these."""
    groups = sessions_by_episode(outcome.get("entries", {}))
    episodes = sorted(e for e in groups if e is not None)
    if episode_id is None or episode_id in episodes:
        return episode_id
    by_id = next((e for e in episodes if ids.same_episode_of_both_scales(episode_id, e)), None)
    if by_id is not None:
        return by_id
    alliance: dict[int, list[Any]] = {}
    for a in sessions:
        alliance.setdefault(int(a["session_number"]), []).append(a["administered_at"])
    for e, held in groups.items():  # most recent first
        if e is None:
            continue
        for o in held:
            n = int(o["session_number"])
            if any(ids.same_session_of_both_scales((episode_id, n, at), (e, n, o["administered_at"]))
                   for at in alliance.get(n, ())):
                return e
    return episode_id


def outcome_series(doc: Mapping[str, Any], alerts: Sequence[Mapping[str, Any]],
                   episode_id: str | None) -> Doc:
    """The ORS series of one episode (`doc` an outcome record, `alerts` its outcome alerts): every
    session with scoring's decisions, and the band a chart draws: the episode's intake total ±
    the reliable change index (both as scoring published them). An episode the record does not
    hold gives an empty series."""
    groups = sessions_by_episode(doc.get("entries", {}))
    ordered = groups.get(episode_id, [])
    marks = _marks_by_session(alerts, episode_id)
    latest = ordered[-1] if ordered else {}
    intake = next((s.get("intake_total") for s in reversed(ordered) if s.get("intake_total") is not None),
                  None)
    rci = latest.get("reliable_change_index")
    return {
        "instrument": doc["instrument"],
        "episode_id": episode_id,
        "age_band": latest.get("age_band") or doc.get("age_band"),
        "cutoff": latest.get("cutoff"),
        "reliable_change_index": rci,
        "intake_total": intake,
        "reliable_change_band": ({"low": round(float(intake) - float(rci), 1),
                                  "high": round(float(intake) + float(rci), 1)}
                                 if intake is not None and rci is not None else None),
        "latest_total": float(latest["total"]) if ordered else None,
        "change_from_intake": latest.get("change_from_intake"),
        "change": latest.get("change"),
        "clinically_significant_improvement": bool(latest.get("clinically_significant_improvement")),
        "in_clinical_range": latest.get("in_clinical_range"),
        "sessions": [outcome_session_view(s, marks.get(int(s["session_number"]))) for s in ordered],
        "alerts": sorted((outcome_alert_view(a) for a in _episode_alerts(alerts, episode_id)),
                         key=lambda a: (a["session_number"] or 0, a["alert_id"])),
    }


def aligned_view(episode: str | None, srs: Sequence[Mapping[str, Any]], srs_alerts: Sequence[Mapping[str, Any]],
                 outcome: Mapping[str, Any] | None) -> list[Doc]:
    """Both scales of one episode side by side, one row per session number either has (ascending):
    `srs` and `ors` are that session's values on each scale (None when it has none)."""
    alliance = {int(s["session_number"]): s for s in srs}
    marks = _marks_by_session(srs_alerts, episode)
    ors = {int(s["session_number"]): s for s in (outcome or {}).get("sessions", [])}
    rows: list[Doc] = []
    for n in sorted(alliance.keys() | ors.keys()):
        a, o = alliance.get(n), ors.get(n)
        rows.append({
            "episode_id": episode,
            "session_number": n,
            "srs": None if a is None else {"submission_id": a["submission_id"], "total": float(a["total"]),
                                           "cutoff": float(a["cutoff"]), "below_cutoff": below_cutoff(a),
                                           "severity": a.get("severity"), "alert": marks.get(n)},
            "ors": None if o is None else {k: o[k] for k in (
                "submission_id", "total", "cutoff", "change_from_intake", "change",
                "clinically_significant_improvement", "in_clinical_range", "severity", "alert")},
        })
    return rows


def trajectory_view(doc: Mapping[str, Any], alerts: Sequence[Mapping[str, Any]] = (),
                    episode_id: str | None = None, outcome: Mapping[str, Any] | None = None,
                    outcome_alerts: Sequence[Mapping[str, Any]] = ()) -> Doc:
    """The API document of one record: the current episode's trajectory, or the named episode's.

    Contract: `doc` is a record as `merge` builds it (or as the store reads it back), `alerts`
    the record's alert documents (any episode; only raised alerts of the shown episode appear,
    with their lifecycle `status` and `revision`). Every value is scoring's (flags, cutoff,
    operator, severity, change_from_previous): nothing is recomputed. `at_risk`, `below_cutoff`
    and `declining` are those of the shown episode's latest session; `site_id` is the owning
    site; `episodes` lists every episode most recent first. Raises UnknownEpisode.

    `outcome` is the client's record on the paired outcome instrument (`OUTCOME_OF`; None when
    there is none) with its alerts `outcome_alerts`: its series of the same episode
    (`outcome_episode`) is `outcome`
    and both scales side by side are `aligned` (see `outcome_series`, `aligned_view`). The fields
    above them are exactly those of the alliance trajectory before the ORS existed.
    """
    episode, ordered = episode_of(doc, episode_id)
    latest = ordered[-1]
    below, declining = below_cutoff(latest), is_declining(latest)
    marks = _episode_alerts(alerts, episode)
    series = (outcome_series(outcome, outcome_alerts, outcome_episode(outcome, episode, ordered))
              if outcome is not None else None)
    return {
        "client_id": doc["client_id"],
        "instrument": doc["instrument"],
        "episode_id": episode,
        "age_band": doc.get("age_band") or age_band(doc["instrument"]),
        "site_id": doc["site_id"],
        "clinician_id": latest["clinician_id"],
        "cutoff": float(latest["cutoff"]),
        "operator": latest.get("operator") or "<",
        "sessions": [session_view(s) for s in ordered],
        "latest_total": float(latest["total"]),
        "at_risk": below or declining,
        "below_cutoff": below,
        "declining": declining,
        "alerts": sorted((alert_view(a) for a in marks), key=lambda a: (a["session_number"] or 0, a["alert_id"])),
        "episodes": episodes_view(doc),
        "outcome": series,
        "aligned": aligned_view(episode, ordered, alerts, series),
    }


def outcome_only_view(instrument: str, outcome: Mapping[str, Any], outcome_alerts: Sequence[Mapping[str, Any]] = (),
                      episode_id: str | None = None) -> Doc:
    """The trajectory document of a client with outcome sessions and no session on the alliance
    `instrument` (the ORS is given at the start of a session, so every client is here between the
    two forms, and stays here when no SRS is given). The same fields as `trajectory_view`: the
    alliance ones say there is nothing on that scale (no sessions, alerts or cutoff, `latest_total`
    null, not at risk); the episode, its list, the owning site and the clinician are the outcome
    record's (one owning site per client across instruments), and `outcome` and `aligned` are
    filled. Raises UnknownEpisode."""
    episode, ordered = episode_of(outcome, episode_id)
    series = outcome_series(outcome, outcome_alerts, episode)
    return {
        "client_id": outcome["client_id"],
        "instrument": instrument,
        "episode_id": episode,
        "age_band": age_band(instrument),
        "site_id": outcome["site_id"],
        "clinician_id": ordered[-1]["clinician_id"],
        "cutoff": None,
        "operator": None,
        "sessions": [],
        "latest_total": None,
        "at_risk": False,
        "below_cutoff": False,
        "declining": False,
        "alerts": [],
        "episodes": episodes_view(outcome),
        "outcome": series,
        "aligned": aligned_view(episode, [], [], series),
    }


def caseload_entry(doc: Mapping[str, Any], alerts: Sequence[Mapping[str, Any]] = ()) -> Doc:
    """One line of a caseload (the current episode): enough to draw its chart without another request."""
    episode, ordered = episode_of(doc)
    return {
        "client_id": doc["client_id"],
        "instrument": doc["instrument"],
        "episode_id": episode,
        "episode_count": len(doc.get("episodes", [])),
        "site_id": doc["site_id"],
        "at_risk": bool(doc["at_risk"]),
        "below_cutoff": bool(doc.get("below_cutoff", False)),
        "declining": bool(doc.get("declining", False)),
        "latest_total": float(doc["latest_total"]),
        "latest_session_number": int(ordered[-1]["session_number"]),
        "latest_administered_at": _iso(ordered[-1]["administered_at"]),
        "session_count": len(ordered),
        "cutoff": float(doc["cutoff"]),
        "points": [{"session_number": int(s["session_number"]), "total": float(s["total"]),
                    "below_cutoff": below_cutoff(s)} for s in ordered],
        "alerts": _alert_marks(alerts, episode),
        "outcome": None,
    }


def _alert_marks(alerts: Sequence[Mapping[str, Any]], episode: str | None) -> list[Doc]:
    marks = []
    for a in _episode_alerts(alerts, episode):
        view = alert_view(a)
        marks.append({k: view[k] for k in ("session_number", "severity", "acknowledged", "status")})
    return sorted(marks, key=lambda a: a["session_number"] or 0)


def caseload_outcome_entry(doc: Mapping[str, Any], alerts: Sequence[Mapping[str, Any]] = ()) -> Doc:
    """The caseload line of a client with outcome sessions and no alliance record (`doc` its
    outcome record, `alerts` its outcome alerts): the alliance fields say there is nothing on that
    scale (null totals and cutoff, no points or alerts, not at risk), listed under the alliance
    instrument its trajectory answers for (`CASELOAD_INSTRUMENT`); `outcome` holds the current
    episode's latest ORS as scoring decided it."""
    episode, ordered = episode_of(doc)
    latest = ordered[-1]
    return {
        "client_id": doc["client_id"],
        "instrument": CASELOAD_INSTRUMENT[OutcomeInstrument(doc["instrument"])].value,
        "episode_id": episode,
        "episode_count": len(doc.get("episodes", [])),
        "site_id": doc["site_id"],
        "at_risk": False,
        "below_cutoff": False,
        "declining": False,
        "latest_total": None,
        "latest_session_number": None,
        "latest_administered_at": None,
        "session_count": 0,
        "cutoff": None,
        "points": [],
        "alerts": [],
        "outcome": {
            "instrument": doc["instrument"],
            "latest_total": float(latest["total"]),
            "latest_session_number": int(latest["session_number"]),
            "latest_administered_at": _iso(latest["administered_at"]),
            "session_count": len(ordered),
            "cutoff": latest.get("cutoff"),
            "change_from_intake": latest.get("change_from_intake"),
            "change": latest.get("change"),
            "alerts": _alert_marks(alerts, episode),
        },
    }




# ---------------------------------------------------------------------------------------------
# What happened to my submission?
#
# One document per (tenant, scale, submission id), outside the rebuildable generations: a
# submission id names one submission of one scale (docs/clinical-records.md, "Session identity"),
# so the SRS and the ORS of one session may share an id and each has its own status (an alliance
# submission's document keeps the key it always had; an outcome one's is apart). Three
# independent parts, each a max of its own key (the store writes a part only when its key is
# greater than the stored one, so every part is commutative and idempotent on its own):
#
# - `scored`: the scored event of the newest accepted version, at its highest revision (key: the
#   acceptance time, then the revision; a retracted revision is not written: the client the
#   submission moved to answers for it);
# - `superseded`: the highest-revision event that named this submission in `supersedes` (key:
#   revision, then the superseding submission id);
# - `rejected`: the dead-lettered version accepted last, at its last judgement (key: its
#   `accepted_at`, then its `judgement`, then a digest of the payload). A version refused
#   `site_conflict` when read and refused again for another reason when a transfer re-judged it
#   has two dead letters with one `accepted_at`: the re-judging's (`judgement` 1) is the last word
#   whichever is read first. A first judgement's key is what it always was (`accepted|digest`);
#   a later one's is `accepted|~<judgement>|digest`, and `~` sorts after every hex digit, so it
#   outranks every first judgement of its acceptance time, those stored before this rule included.
#
# The status is decided when read, from the three parts: `rejected` when the rejected version
# was accepted after the scored one (or nothing was scored); else `superseded` when the
# superseding revision is higher than the scored revision; else `scored`.

SubmissionStatus = Literal["scored", "superseded", "rejected"]
Scale = Literal["alliance", "outcome"]


def scale_of(instrument: str) -> Scale:
    """The scale an instrument rates: the outcome (ORS family) or the alliance (SRS family)."""
    return "outcome" if is_outcome(instrument) else "alliance"


def submission_doc_id(tenant_id: str, submission_id: str, scale: Scale = "alliance") -> str:
    """The key of the status document of a submission on `scale`."""
    return ids.submission_status_id(tenant_id, submission_id, outcome=scale == "outcome")


def submission_instrument(doc: Mapping[str, Any]) -> str | None:
    """The instrument a status document is about (that of its parts; all name one scale)."""
    for name in ("scored", "rejected", "superseded"):
        instrument = (doc.get(name) or {}).get("instrument")
        if instrument:
            return str(instrument)
    return None


def submission_scale(doc: Mapping[str, Any]) -> Scale:
    """The scale of a status document (one written before parts named their instrument: alliance)."""
    instrument = submission_instrument(doc)
    return "alliance" if instrument is None else scale_of(instrument)


def scored_part(event: Scored) -> Doc:
    """What the `scored` part keeps of a scored event. Keyed by the version's acceptance time, then
    the revision: the events of one client's submission come in revisions of versions accepted no
    earlier, and when the submission moved between clients (docs/clinical-records.md), the client
    holding the newest version is the one answered for, whatever order the events arrive in. (A
    key stored before acceptance led it, the bare revision, is lower than every such key.)"""
    accepted = event.accepted_at or event.scored_at
    return {"key": f"{_utc_text(accepted)}|{_rev_text(event.revision)}", "revision": event.revision,
            "accepted": _utc_text(accepted),
            "site_id": event.site_id, "client_id": event.client_id, "instrument": str(event.instrument),
            "episode_id": event.episode_id, "session_number": event.session_number, "total": event.total,
            "flags": list(event.flags), "at": event.scored_at}


def superseded_part(event: Scored) -> Doc:
    """What the `superseded` part of `event.supersedes` keeps of the superseding event."""
    return {"key": f"{_rev_text(event.revision)}|{event.submission_id}", "revision": event.revision,
            "by": event.submission_id, "site_id": event.site_id, "at": event.scored_at,
            "instrument": str(event.instrument)}


def rejected_part(dead: DeadLetter, submitted: Submitted) -> Doc:
    """What the `rejected` part keeps of a dead-lettered submission (`sort` orders the rejections page)."""
    accepted = _utc_text(submitted.accepted_at)
    judged = f"~{dead.judgement:04d}|" if dead.judgement else ""
    return {"key": f"{accepted}|{judged}{hashlib.sha256(dead.payload.encode()).hexdigest()[:20]}",
            # The outcome one of an id shared by both scales sorts apart (a cursor names one).
            "sort": f"{_utc_text(dead.occurred_at)}|{submitted.submission_id}"
                    + ("|outcome" if is_outcome(str(submitted.instrument)) else ""),
            "accepted": accepted, "reason": dead.reason, "detail": dead.detail, "at": dead.occurred_at,
            "site_id": submitted.site_id, "client_id": submitted.client_id, "instrument": str(submitted.instrument),
            "episode_id": submitted.episode_id, "session_number": submitted.session_number,
            "total": submitted.total}


def rejection_sort_floor(since: datetime) -> str:
    """The `rejected.sort` value every rejection at or after `since` is greater than."""
    return _utc_text(since)


def submission_status(doc: Mapping[str, Any]) -> SubmissionStatus | None:
    """The status of a submission document (see above); None when it holds nothing yet."""
    scored, superseded, rejected = doc.get("scored"), doc.get("superseded"), doc.get("rejected")
    if rejected and (not scored or rejected["accepted"] > scored["accepted"]):
        return "rejected"
    if superseded and int(superseded["revision"]) > int(scored["revision"] if scored else 0):
        return "superseded"
    if scored:
        return "scored"
    return None


def seen_by_site(doc: Mapping[str, Any], site_id: str | None) -> Mapping[str, Any]:
    """The status document as a key bound to `site_id` sees it (None: a tenant-wide key, all of
    it): only the parts of that site. Each part names the site of its version, and one id may hold
    parts of two sites once the client was transferred: the new site's scored revision and the old
    site's re-export of the session, refused `site_conflict` (or a site posting an id another
    site's client holds). Each site is answered about its own: the old site learns its version
    was refused, the new site still sees its client's session scored, and neither is shown the
    other's version (docs/clinical-records.md, "What happened to my submission?")."""
    if site_id is None:
        return doc
    return {k: v for k, v in doc.items() if k not in _PARTS or (isinstance(v, Mapping) and v.get("site_id") == site_id)}


_PARTS = ("scored", "superseded", "rejected")


def submission_view(doc: Mapping[str, Any], site_id: str | None = None) -> Doc | None:
    """The API answer about one submission to a key of `site_id` (None: tenant-wide; see
    `seen_by_site`); None when nothing (of that site) is known yet."""
    doc = seen_by_site(doc, site_id)
    status = submission_status(doc)
    if status is None:
        return None
    scored, superseded, rejected = doc.get("scored") or {}, doc.get("superseded") or {}, doc.get("rejected") or {}
    about = rejected if status == "rejected" else scored
    return {
        "submission_id": doc["submission_id"],
        "status": status,
        "reason": rejected.get("reason") if status == "rejected" else None,
        "detail": rejected.get("detail") if status == "rejected" else None,
        "revision": scored.get("revision") if status != "rejected" else None,
        "superseded_by": superseded.get("by") if status == "superseded" else None,
        "client_id": about.get("client_id"),
        "episode_id": about.get("episode_id"),
        "session_number": about.get("session_number"),
        "total": about.get("total"),
        "flags": list(scored.get("flags") or []) if status != "rejected" else [],
        "rejected_at": _iso(rejected.get("at")) if rejected else None,
        "scale": submission_scale(doc),
        "instrument": submission_instrument(doc),
    }


def fold_parts(parts: Iterable[tuple[str, str, Doc]]) -> dict[tuple[str, str], Doc]:
    """Per (document id, part name), the part with the greatest key: a batch's writes, pre-folded."""
    out: dict[tuple[str, str], Doc] = {}
    for doc_id, name, part in parts:
        held = out.get((doc_id, name))
        if held is None or part["key"] > held["key"]:
            out[(doc_id, name)] = part
    return out


# ---------------------------------------------------------------------------------------------
# Summaries (the PCOMS indices that apply to the SRS)


@dataclass(frozen=True)
class GroupTotals:
    """Sums over trajectories of one group (an instrument), as the store's aggregation returns them."""

    key: str
    trajectories: int
    sessions: int
    sessions_below_cutoff: int
    first_total_sum: float
    latest_total_sum: float
    trajectories_at_risk: int


def _indices(clients: int, totals: Sequence[GroupTotals]) -> Doc:
    trajectories = sum(t.trajectories for t in totals)
    sessions = sum(t.sessions for t in totals)
    below = sum(t.sessions_below_cutoff for t in totals)
    first = sum(t.first_total_sum for t in totals)
    latest = sum(t.latest_total_sum for t in totals)
    return {
        "clients": clients,
        "trajectories": trajectories,
        "sessions": sessions,
        "mean_sessions_per_client": round(sessions / clients, 2) if clients else None,
        "mean_first_session_total": round(first / trajectories, 2) if trajectories else None,
        "mean_latest_total": round(latest / trajectories, 2) if trajectories else None,
        "pct_sessions_below_cutoff": round(100.0 * below / sessions, 1) if sessions else None,
        "trajectories_at_risk": sum(t.trajectories_at_risk for t in totals),
    }


def summarize(by_instrument: Sequence[GroupTotals], clients: int, clients_at_risk: int,
              clients_by_instrument: Mapping[str, int], clients_by_band: Mapping[str, int],
              alerts_raised: int, alerts_acknowledged: int, outcome: Doc | None = None) -> Doc:
    """The summary document of a scope (tenant or site), with its outcome indices (`outcome_indices`).

    Means of first and latest totals are per trajectory (an episode of care of one client on one
    instrument); sessions per client divides by distinct clients; the age band is derived from the
    instrument (SRS/GSRS 13+, CSRS/CGSRS 6-12, YCSRS <=5) because events carry no age.
    """
    instruments = sorted(by_instrument, key=lambda t: [i.value for i in Instrument].index(t.key))
    bands: dict[str, list[GroupTotals]] = {}
    for t in instruments:
        bands.setdefault(age_band(t.key), []).append(t)
    return {
        **_indices(clients, instruments),
        "clients_at_risk": clients_at_risk,
        "alerts": {"raised": alerts_raised, "acknowledged": alerts_acknowledged},
        "by_instrument": [{"instrument": t.key, "age_band": age_band(t.key),
                           **_indices(clients_by_instrument.get(t.key, 0), [t])} for t in instruments],
        "by_age_band": [{"age_band": b, **_indices(clients_by_band.get(b, 0), bands[b])}
                        for b in AGE_BAND_ORDER if b in bands],
        "outcome": outcome if outcome is not None else outcome_indices(()),
    }


# ---------------------------------------------------------------------------------------------
# Paging and caching


class BadCursor(ValueError):
    """A cursor this service did not issue."""


def encode_cursor(key: str) -> str:
    """An opaque cursor pointing after `key`."""
    return base64.urlsafe_b64encode(json.dumps({"k": key}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The key a cursor points after; BadCursor when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
        key = value["k"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise BadCursor("not a cursor issued by this API") from exc
    if not isinstance(key, str):
        raise BadCursor("not a cursor issued by this API")
    return key


def etag(body: bytes) -> str:
    """A strong ETag for a response body."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str | None, tag: str) -> bool:
    """RFC 9110 weak comparison of If-None-Match against our tag."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    bare = tag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == bare for t in if_none_match.split(","))


def count_outcomes(outcomes: Iterable[Outcome]) -> Counter[str]:
    """Outcome counts, for metrics."""
    return Counter(outcomes)


# ---------------------------------------------------------------------------------------------
# Incremental indices: what one record contributes to the counters
#
# Summaries and trends are sums over records, so each record's share of them is a pure function
# of the record (`contribution`), and a change of the record moves the counters by
# `diff(contribution(old), contribution(new))`. The store applies that difference with `$inc`;
# how it is applied exactly once (a per-record version marker in each counter document) is in
# the docstring of store.py. Because the difference is taken between two whole contributions,
# corrections, late sessions, a transfer (every session re-published with the new site) and an
# episode restart need no rule of their own: the record's old share leaves the buckets it was in
# and its new share enters the ones it is in now. Counters hold integers only (totals in
# hundredths), so adding and taking back always returns to exactly zero.
#
# Buckets: `(tenant, site, clinician, instrument, month)`, the record's owning site and its
# clinician (as caseloads do: a record counts where it is read); `month` "" for the record's
# current episode (the all-time summary), else "YYYY-MM" (UTC) of the sessions it counts. The age
# band is the instrument's. Counted fields:
#
# - current (`month` ""): `records` 1, `sessions` and `below` of the current episode, `first` and
#   `latest` (hundredths: its first and latest session's totals), `at_risk` 0/1;
# - monthly: `sessions` and `below` of the shown sessions of every episode administered that
#   month, `clients` 1 when the record had a session that month (a record is one client on one
#   instrument, so per instrument this is the distinct-client count), and for every episode whose
#   last session falls in that month `episodes` 1 and `change` (hundredths, latest - first total).

CounterKey = tuple[str, str, str, str, str]  # (tenant, site, clinician, instrument, month)
Counters = dict[CounterKey, dict[str, int]]
CURRENT = ""


def hundredths(total: float) -> int:
    """A total as integer hundredths: sums of these add and subtract exactly."""
    return round(float(total) * 100)


def month_of(ts: datetime) -> str:
    """The UTC calendar month of an instant, `YYYY-MM` (naive times are taken as UTC)."""
    if ts.tzinfo is not None and ts.utcoffset():
        ts = ts.astimezone(UTC)
    return f"{ts.year:04d}-{ts.month:02d}"  # not strftime: this runs for every session of every write


def _add(out: Counters, key: CounterKey, **fields: int) -> None:
    held = out.setdefault(key, {})
    for name, n in fields.items():
        held[name] = held.get(name, 0) + n


def contribution(record: Mapping[str, Any], groups: Mapping[str | None, list[Doc]] | None = None) -> Counters:
    """What one record (as `merge` builds it, or None/empty) adds to the counters (see above);
    `groups` is `sessions_by_episode` of its entries when the caller has it already. An outcome
    record adds its outcome indices instead (`outcome_contribution`)."""
    if not record or not record.get("session_count") or record.get("site_id") is None:
        return {}
    if is_outcome(str(record["instrument"])):
        return outcome_contribution(record)
    t, site, clinician, inst = (str(record["tenant_id"]), str(record["site_id"]), str(record["clinician_id"]),
                                str(record["instrument"]))
    out: Counters = {}
    _add(out, (t, site, clinician, inst, CURRENT), records=1, sessions=int(record["session_count"]),
         below=int(record["sessions_below_cutoff"]), first=hundredths(record["first_total"]),
         latest=hundredths(record["latest_total"]), at_risk=int(bool(record["at_risk"])))
    if groups is None:
        groups = sessions_by_episode(record.get("entries", {}))
    for sessions in groups.values():
        for s in sessions:
            key = (t, site, clinician, inst, month_of(s["administered_at"]))
            held = out.get(key)
            if held is None:
                held = out[key] = {"sessions": 0, "below": 0, "clients": 1}
            held["sessions"] += 1
            held["below"] += below_cutoff(s)
        _add(out, (t, site, clinician, inst, month_of(sessions[-1]["administered_at"])), episodes=1,
             change=hundredths(sessions[-1]["total"]) - hundredths(sessions[0]["total"]))
    return out


def diff(old: Counters, new: Counters) -> Counters:
    """`new - old` per bucket and field, zeros left out: what moves the counters from a record's
    old share to its new one."""
    out: Counters = {}
    for key in old.keys() | new.keys():
        was, now = old.get(key, {}), new.get(key, {})
        moved = {f: now.get(f, 0) - was.get(f, 0) for f in was.keys() | now.keys()}
        moved = {f: n for f, n in sorted(moved.items()) if n}
        if moved:
            out[key] = moved
    return out


def total_counters(shares: Iterable[Counters]) -> Counters:
    """The sum of many contributions (what the counters should hold; the checker's side)."""
    out: Counters = {}
    for share in shares:
        for key, fields in share.items():
            _add(out, key, **fields)
    return {k: {f: n for f, n in v.items() if n} for k, v in out.items() if any(v.values())}


def counter_id(key: CounterKey) -> str:
    """The `_id` of a bucket's counter document."""
    return ids.reporting_counter_id(*key)


# The current-episode counter fields a summary reads (with `instrument`): the store asks for these
# alone, as a counter document also holds its months and one marker per record that ever counted in it.
SUMMARY_FIELDS = ("records", "sessions", "below", "first", "latest", "at_risk")


def summary_from_counters(rows: Iterable[Mapping[str, Any]], alerts_raised: int, alerts_acknowledged: int) -> Doc:
    """The summary of a scope from its current-episode counter documents.

    Client counts are counts of records (one client on one instrument): exact per instrument;
    a client on two instruments counts once per instrument in the band and scope totals.
    """
    rows = list(rows)
    per: dict[str, dict[str, int]] = {}
    for r in rows:
        held = per.setdefault(str(r["instrument"]), {})
        for f in SUMMARY_FIELDS:
            held[f] = held.get(f, 0) + int(r.get(f) or 0)
    present = {i: c for i, c in per.items() if c.get("records")}
    totals = [GroupTotals(i, c["records"], c.get("sessions", 0), c.get("below", 0), c.get("first", 0) / 100,
                          c.get("latest", 0) / 100, c.get("at_risk", 0)) for i, c in present.items()]
    by_band: dict[str, int] = {}
    for i, c in present.items():
        by_band[age_band(i)] = by_band.get(age_band(i), 0) + c["records"]
    return summarize(totals, sum(t.trajectories for t in totals), sum(t.trajectories_at_risk for t in totals),
                     {t.key: t.trajectories for t in totals}, by_band, alerts_raised, alerts_acknowledged,
                     outcome_indices(rows))


# Outcome indices (issue 16): what an outcome record adds to its current bucket, by the latest
# scored session of its current episode as scoring decided it: `o_clients` 1, one of `o_improved`,
# `o_deteriorated`, `o_unchanged` 1 (its reliable change category), `o_significant` 1 for a
# clinically significant improvement, and for the pre-post effect size the change from intake
# (`o_change`) and the intake total and its square (`o_intake`, `o_intake_sq`), in hundredths
# (squares in ten-thousandths), so sums stay integers and a record's share subtracts exactly.
# A record whose latest session is not scored (YCORS) adds nothing. The names never clash with
# the alliance fields, and an outcome bucket has no `records`, so the alliance indices ignore it.
OUTCOME_FIELDS = ("o_clients", "o_improved", "o_significant", "o_deteriorated", "o_unchanged", "o_change",
                  "o_intake", "o_intake_sq")
_CHANGE_FIELD = {OutcomeChange.RELIABLE_IMPROVEMENT: "o_improved",
                 OutcomeChange.RELIABLE_DETERIORATION: "o_deteriorated",
                 OutcomeChange.NO_RELIABLE_CHANGE: "o_unchanged"}


def outcome_contribution(record: Mapping[str, Any]) -> Counters:
    """What one outcome record adds to the counters (see above)."""
    change, intake, delta = record.get("change"), record.get("intake_total"), record.get("change_from_intake")
    if change not in _CHANGE_FIELD or intake is None or delta is None or record.get("site_id") is None:
        return {}
    key = (str(record["tenant_id"]), str(record["site_id"]), str(record["clinician_id"]), str(record["instrument"]),
           CURRENT)
    i = hundredths(intake)
    fields = {"o_clients": 1, _CHANGE_FIELD[OutcomeChange(change)]: 1,
              "o_significant": int(bool(record.get("clinically_significant_improvement"))),
              "o_change": hundredths(delta), "o_intake": i, "o_intake_sq": i * i}
    return {key: {f: n for f, n in fields.items() if n}}


def _share(count: int, clients: int) -> Doc:
    return {"count": count, "pct": round(100.0 * count / clients, 1) if clients else None}


def outcome_indices(rows: Iterable[Mapping[str, Any]]) -> Doc:
    """The outcome indices of a scope from its counter documents (any instrument; only outcome
    buckets carry these fields): clients by reliable change category (count and percent of the
    clients with a scored outcome), the mean change from intake to the latest session, the sample
    SD of the intake totals, and the pre-post effect size (mean change / that SD; None below two
    clients or with no spread)."""
    sums = dict.fromkeys(OUTCOME_FIELDS, 0)
    for r in rows:
        for f in OUTCOME_FIELDS:
            sums[f] += int(r.get(f) or 0)
    n = sums["o_clients"]
    mean_change = sums["o_change"] / 100 / n if n else None
    sd: float | None = None
    if n >= 2:
        # sum of squared deviations from integer sums: exact until the last division
        ss = (sums["o_intake_sq"] * n - sums["o_intake"] ** 2) / n / 10_000
        sd = (max(ss, 0.0) / (n - 1)) ** 0.5
    return {
        "clients": n,
        "reliable_improvement": _share(sums["o_improved"], n),
        "clinically_significant_improvement": _share(sums["o_significant"], n),
        "reliable_deterioration": _share(sums["o_deteriorated"], n),
        "no_reliable_change": _share(sums["o_unchanged"], n),
        "mean_intake_total": round(sums["o_intake"] / 100 / n, 2) if n else None,
        "mean_change_from_intake": round(mean_change, 2) if mean_change is not None else None,
        "intake_sd": round(sd, 2) if sd is not None else None,
        "effect_size": round(mean_change / sd, 2) if mean_change is not None and sd else None,
    }


def months_between(first: str, last: str) -> list[str]:
    """Every `YYYY-MM` from `first` to `last` inclusive (empty when `last` is before `first`)."""
    y, m = int(first[:4]), int(first[5:7])
    out: list[str] = []
    while f"{y:04d}-{m:02d}" <= last:
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def trend_series(rows: Iterable[Mapping[str, Any]], first: str, last: str) -> list[Doc]:
    """Monthly series of a scope from its monthly counter documents, one point per month from
    `first` to `last` (months without sessions included, with empty means)."""
    per: dict[str, dict[str, int]] = {}
    for r in rows:
        held = per.setdefault(str(r["month"]), {})
        for f, n in r.items():
            if f != "month":
                held[f] = held.get(f, 0) + int(n or 0)
    out: list[Doc] = []
    for month in months_between(first, last):
        c = per.get(month, {})
        sessions, episodes = c.get("sessions", 0), c.get("episodes", 0)
        out.append({
            "month": month,
            "sessions": sessions,
            "clients_seen": c.get("clients", 0),
            "pct_sessions_below_cutoff": round(100.0 * c.get("below", 0) / sessions, 1) if sessions else None,
            "episodes_ending": episodes,
            "mean_change_first_to_latest": round(c.get("change", 0) / 100 / episodes, 2) if episodes else None,
            "alerts_raised": c.get(ALERTS_RAISED, 0),
            "alerts_acknowledged": c.get(ALERTS_ACKNOWLEDGED, 0),
            "median_seconds_to_acknowledge": median_from_histogram(ack_histogram(c)),
        })
    return out


# ---------------------------------------------------------------------------------------------
# Alert figures of the trends
#
# Each alert document (one per alert id, merged from raises and statuses, see "Alerts" above)
# contributes to ONE monthly bucket: the UTC month of its first raise (`raised_at`, the earliest
# raise heard of), under the site and clinician of its highest raised revision and its
# instrument. A month's alert figures are thus those of the alerts raised that month (a cohort:
# an acknowledgement in a later month still counts in the month the alert was raised, so
# "acknowledged" never exceeds "raised" and the delays are those of the same alerts). Fields:
#
# - `alerts_raised` 1 once any raise was heard: a revision by a correction is the same alert,
#   counted once; an alert later superseded or withdrawn was still raised (it was sent);
# - `alerts_acknowledged` 1 once an `acknowledged` status was heard. `superseded` and
#   `withdrawn` end an alert's lifecycle; they are not acknowledgements and count nothing here;
# - `ack_<k>` 1 in the histogram bin of the time to acknowledge (first acknowledgement minus
#   first raise). A median cannot be maintained with `$inc`; a histogram can, and its median is
#   within one bin: bin 0 holds delays under a minute, bin k (1..64) delays from 2^((k-1)/4) to
#   2^(k/4) minutes (four bins per doubling), the last bin 2^16 minutes (45.5 days) and more.
#   The median is read as the bin's geometric middle, so above a minute it is within 9.1%
#   (2^(1/8)) of the exact median, under a minute within 30 s, and past 45.5 days it is that
#   lower bound.
#
# An alert heard of only through statuses (its raise not yet arrived) contributes nothing. The
# contribution is a function of the alert document alone, so the store moves the counters by
# `diff(old, new)` exactly as for records (see store.py for how that is applied once).

ALERTS_RAISED = "alerts_raised"
ALERTS_ACKNOWLEDGED = "alerts_acknowledged"
ACK_BIN_PREFIX = "ack_"
ACK_FLOOR_SECONDS = 60.0
ACK_BINS_PER_DOUBLING = 4
ACK_DOUBLINGS = 16
ACK_LAST_BIN = 1 + ACK_BINS_PER_DOUBLING * ACK_DOUBLINGS


def ack_bin(seconds: float) -> int:
    """The histogram bin of a time to acknowledge (see above)."""
    if seconds < ACK_FLOOR_SECONDS:
        return 0
    k = 1 + math.floor(ACK_BINS_PER_DOUBLING * math.log2(seconds / ACK_FLOOR_SECONDS))
    return min(k, ACK_LAST_BIN)


def ack_bin_bounds(k: int) -> tuple[float, float | None]:
    """[low, high) seconds of a bin; high None for the last, open-ended one."""
    if k == 0:
        return 0.0, ACK_FLOOR_SECONDS
    low = ACK_FLOOR_SECONDS * 2 ** ((k - 1) / ACK_BINS_PER_DOUBLING)
    return low, None if k >= ACK_LAST_BIN else ACK_FLOOR_SECONDS * 2 ** (k / ACK_BINS_PER_DOUBLING)


def ack_bin_value(k: int) -> float:
    """The value a bin stands for: its geometric middle (0: 30 s; the last: its lower bound)."""
    low, high = ack_bin_bounds(k)
    if k == 0:
        return ACK_FLOOR_SECONDS / 2
    return low if high is None else math.sqrt(low * high)


def ack_field(k: int) -> str:
    return f"{ACK_BIN_PREFIX}{k:02d}"


def ack_histogram(fields: Mapping[str, int]) -> dict[int, int]:
    """The ack-delay histogram of a month's counted fields, {bin: count}."""
    return {int(f[len(ACK_BIN_PREFIX):]): int(n) for f, n in fields.items() if f.startswith(ACK_BIN_PREFIX) and n}


def median_from_histogram(counts: Mapping[int, int]) -> float | None:
    """The median of the delays a histogram counts, in seconds (one decimal), each delay read as
    its bin's value (`ack_bin_value`): the mean of the two middle ones for an even count. None
    when it counts nothing."""
    n = sum(counts.values())
    if n <= 0:
        return None
    middle = ((n - 1) // 2, n // 2)
    values: list[float] = []
    seen = 0
    for k in sorted(counts):
        values.extend(ack_bin_value(k) for rank in middle if seen <= rank < seen + counts[k])
        seen += counts[k]
    return round(sum(values) / 2, 1)


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def alert_contribution(alert: Mapping[str, Any]) -> Counters:
    """What one alert document adds to the monthly counters (see above); empty before its raise."""
    raised_at = alert.get("raised_at")
    if not alert or not alert.get("raised") or not isinstance(raised_at, datetime) or not alert.get("instrument"):
        return {}
    latest = latest_raise(alert)
    site, clinician = latest.get("site_id") or alert.get("site_id"), latest.get("clinician_id") or alert.get(
        "clinician_id")
    if site is None or clinician is None:
        return {}
    fields = {ALERTS_RAISED: 1}
    acknowledged_at = (alert.get("status_at") or {}).get(AlertStatus.ACKNOWLEDGED.value)
    if isinstance(acknowledged_at, datetime):
        delay = max(0.0, (_aware(acknowledged_at) - _aware(raised_at)).total_seconds())
        fields[ALERTS_ACKNOWLEDGED] = 1
        fields[ack_field(ack_bin(delay))] = 1
    return {(str(alert["tenant_id"]), str(site), str(clinician), str(alert["instrument"]), month_of(raised_at)):
            fields}


# What the summaries count of alerts, all-time, in the current bucket (top-level fields of the
# same counter document as the alert's monthly figures).
SUMMARY_ALERT_FIELDS = (ALERTS_RAISED, ALERTS_ACKNOWLEDGED)


def alert_share(alert: Mapping[str, Any]) -> Counters:
    """Everything one alert document adds to the counters: its monthly figures
    (`alert_contribution`) and the same alert counted raised (and acknowledged) in the current
    bucket, which the summaries read - so that a summary reads one counter document per site,
    clinician and instrument and no alert document, whatever the number of alerts."""
    out = alert_contribution(alert)
    for (tenant, site, clinician, instrument, _), fields in list(out.items()):
        _add(out, (tenant, site, clinician, instrument, CURRENT),
             **{f: n for f, n in fields.items() if f in SUMMARY_ALERT_FIELDS})
    return out
