"""Pure read-model rules of reporting: no I/O.

A trajectory is one client's sessions for one instrument and episode. It is built by merging
scored events into a map keyed by session number, so that:

- a redelivered or duplicated event never adds a second point (same key, same revision);
- an out-of-order session lands in its place (the map has no order; views sort by number);
- a correction (same session number, another submission) supersedes the earlier one, and a
  stale event replayed later never overwrites a newer correction.

"Newer" is decided by a revision string, compared as text:
`accepted_at | scored_at | submission_id`, each time in fixed-width UTC so text order is time
order. `accepted_at` is stamped once by intake when the broker acknowledged the submission, so a
re-scored old submission (whose `scored_at` is new) still sorts before the correction that was
submitted after it. When `accepted_at` is missing the scored time stands in. The submission id
only breaks exact ties, deterministically.

The merge keeps, per session number, the entry with the greatest revision: a max is
commutative, associative and idempotent, so any shuffle or duplication of a client's events
yields the same trajectory as the clean ordered stream. Every derived field is a function of
the merged sessions alone, so it inherits that property.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from shared.events import AllianceDeterioration, Instrument, SrsScored
from shared.ids import derive

Outcome = Literal["applied", "corrected", "duplicate", "stale"]

AGE_BANDS: dict[Instrument, str] = {
    Instrument.SRS: "13+",
    Instrument.GSRS: "13+",
    Instrument.CSRS: "6-12",
    Instrument.CGSRS: "6-12",
    Instrument.YCSRS: "<=5",
}
AGE_BAND_ORDER: tuple[str, ...] = ("13+", "6-12", "<=5")

# Scoring's rule names that mean the alliance is getting worse (issue 4); a tenant's own
# thresholds reach reporting only through these flags.
DECLINE_FLAGS = frozenset({"drop_from_previous", "low_not_improving"})
DEFAULT_DECLINE_THRESHOLD = 1.0

Doc = dict[str, Any]


def age_band(instrument: str) -> str:
    """The PCOMS age band an instrument is made for: SRS/GSRS 13+, CSRS/CGSRS 6-12, YCSRS <=5."""
    return AGE_BANDS[Instrument(instrument)]


def instruments_of_band(band: str) -> list[str]:
    """The instruments whose age band is `band`."""
    return [i.value for i, b in AGE_BANDS.items() if b == band]


def trajectory_id(tenant_id: str, client_id: str, instrument: str, episode_id: str | None) -> str:
    """The read model's key: one trajectory per (tenant, client, instrument, episode)."""
    return derive("trajectory", tenant_id, client_id, str(instrument), episode_id or "")


def _utc_text(ts: datetime) -> str:
    """Fixed-width UTC text, so that comparing the text compares the instants."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def revision(event: SrsScored) -> str:
    """Which of two events for one session is newer (see module docs)."""
    accepted = event.accepted_at or event.scored_at
    return f"{_utc_text(accepted)}|{_utc_text(event.scored_at)}|{event.submission_id}"


def session_entry(event: SrsScored) -> Doc:
    """The stored form of one scored session."""
    return {
        "session_number": event.session_number,
        "submission_id": event.submission_id,
        "event_id": event.event_id,
        "administered_at": event.administered_at,
        "total": event.total,
        "items": event.items.model_dump() if event.items is not None else None,
        "flags": list(event.flags),
        "cutoff": event.cutoff,
        "site_id": event.site_id,
        "clinician_id": event.clinician_id,
        "scored_at": event.scored_at,
        "accepted_at": event.accepted_at,
        "rev": revision(event),
    }


_SESSION_TIMES = ("administered_at", "scored_at", "accepted_at")


def pack_sessions(sessions: Mapping[str, Mapping[str, Any]]) -> str:
    """The stored form of a trajectory's sessions: one compact JSON text.

    Nothing queries inside sessions on the server (the query fields are top-level), and a text
    field costs a store a fraction of a nested map to scan past: summaries aggregate over every
    trajectory of a scope.
    """
    def encode(value: Any) -> Any:
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
        raise TypeError(f"cannot store {type(value).__name__} in sessions")

    return json.dumps(sessions, default=encode, separators=(",", ":"), sort_keys=True)


def unpack_sessions(text: str) -> dict[str, Doc]:
    """Sessions as `pack_sessions` stored them, times back as aware datetimes."""
    sessions: dict[str, Doc] = json.loads(text)
    for s in sessions.values():
        for name in _SESSION_TIMES:
            if isinstance(s.get(name), str):
                s[name] = datetime.fromisoformat(s[name])
    return sessions


def below_cutoff(session: Mapping[str, Any]) -> bool:
    """The session's total is under the cutoff that scoring applied to it."""
    return float(session["total"]) < float(session["cutoff"])


def ordered_sessions(doc: Mapping[str, Any]) -> list[Doc]:
    """The sessions of a trajectory document by session number."""
    return sorted(doc.get("sessions", {}).values(), key=lambda s: int(s["session_number"]))


def is_declining(latest: Mapping[str, Any], previous: Mapping[str, Any] | None,
                 threshold: float = DEFAULT_DECLINE_THRESHOLD) -> bool:
    """The latest session dropped by `threshold` or more from the one before it, or scoring flagged
    it with a deterioration rule (which carries the tenant's own thresholds)."""
    if DECLINE_FLAGS.intersection(latest.get("flags") or ()):
        return True
    if previous is None:
        return False
    return round(float(latest["total"]) - float(previous["total"]), 1) <= -threshold


def caseload_key(at_risk: bool, client_id: str, instrument: str, episode_id: str | None) -> str:
    """Sort key of a caseload: at-risk first, then by client; unique within a clinician."""
    return "\x1f".join(("0" if at_risk else "1", client_id, instrument, episode_id or ""))


def derive_trajectory(identity: Mapping[str, Any], sessions: Mapping[str, Doc],
                      threshold: float = DEFAULT_DECLINE_THRESHOLD) -> Doc:
    """A full trajectory document from its identity and merged sessions (no version or timestamps).

    The trajectory belongs to the site and clinician of its latest session (clients move);
    `first_total` is the lowest session number on record (a client may have started before the
    site used this system).
    """
    ordered = sorted(sessions.values(), key=lambda s: int(s["session_number"]))
    latest = ordered[-1]
    previous = ordered[-2] if len(ordered) > 1 else None
    below = below_cutoff(latest)
    declining = is_declining(latest, previous, threshold)
    at_risk = below or declining
    return {
        "_id": identity["_id"],
        "tenant_id": identity["tenant_id"],
        "client_id": identity["client_id"],
        "instrument": identity["instrument"],
        "episode_id": identity.get("episode_id"),
        "age_band": age_band(identity["instrument"]),
        "site_id": latest["site_id"],
        "clinician_id": latest["clinician_id"],
        "sessions": {str(s["session_number"]): s for s in ordered},
        "session_count": len(ordered),
        "sessions_below_cutoff": sum(1 for s in ordered if below_cutoff(s)),
        "first_session_number": int(ordered[0]["session_number"]),
        "first_total": float(ordered[0]["total"]),
        "latest_session_number": int(latest["session_number"]),
        "latest_total": float(latest["total"]),
        "latest_administered_at": latest["administered_at"],
        "cutoff": float(latest["cutoff"]),
        "below_cutoff": below,
        "declining": declining,
        "at_risk": at_risk,
        "caseload_key": caseload_key(at_risk, identity["client_id"], identity["instrument"],
                                     identity.get("episode_id")),
    }


@dataclass
class MergeResult:
    """What merging a group of events into one trajectory did."""

    doc: Doc | None  # None: nothing changed, nothing to write
    outcomes: list[tuple[SrsScored, Outcome]] = field(default_factory=list)


def merge(existing: Mapping[str, Any] | None, events: Sequence[SrsScored],
          threshold: float = DEFAULT_DECLINE_THRESHOLD) -> MergeResult:
    """Merge scored events of ONE trajectory into its current document (None when new).

    Returns the new document (version bumped, `updated_at` left to the store) or None when every
    event was a duplicate or stale.
    """
    if not events:
        return MergeResult(None)
    first = events[0]
    identity: Doc = {
        "_id": trajectory_id(first.tenant_id, first.client_id, first.instrument, first.episode_id),
        "tenant_id": first.tenant_id,
        "client_id": first.client_id,
        "instrument": str(first.instrument),
        "episode_id": first.episode_id,
    }
    sessions: dict[str, Doc] = dict(existing.get("sessions", {})) if existing else {}
    result = MergeResult(None)
    changed = False
    for event in events:
        key = str(event.session_number)
        entry = session_entry(event)
        current = sessions.get(key)
        outcome: Outcome
        if current is None:
            outcome = "applied"
        elif current["rev"] == entry["rev"]:
            outcome = "duplicate"
        elif current["rev"] > entry["rev"]:
            outcome = "stale"
        else:
            outcome = "corrected" if current["submission_id"] != entry["submission_id"] else "applied"
        if outcome in ("applied", "corrected"):
            sessions[key] = entry
            changed = True
        result.outcomes.append((event, outcome))
    if changed:
        doc = derive_trajectory(identity, sessions, threshold)
        doc["v"] = int(existing.get("v", 0)) + 1 if existing else 1
        result.doc = doc
    return result


def group_by_trajectory(events: Iterable[SrsScored]) -> dict[str, list[SrsScored]]:
    """Scored events grouped by the trajectory they belong to (input order kept)."""
    groups: dict[str, list[SrsScored]] = {}
    for e in events:
        groups.setdefault(trajectory_id(e.tenant_id, e.client_id, e.instrument, e.episode_id), []).append(e)
    return groups


def alert_fields(event: AllianceDeterioration) -> Doc:
    """What reporting keeps of a raised alert (set on every delivery: the values never change)."""
    return {
        "tenant_id": event.tenant_id,
        "site_id": event.site_id,
        "clinician_id": event.clinician_id,
        "client_id": event.client_id,
        "instrument": str(event.instrument),
        "episode_id": event.episode_id,
        "trajectory_id": trajectory_id(event.tenant_id, event.client_id, event.instrument, event.episode_id),
        "session_number": event.session_number,
        "submission_id": event.submission_id,
        "severity": event.severity,
        "triggers": list(event.triggers),
        "total": event.total,
        "raised": True,
        "raised_at": event.occurred_at,
    }


# ---------------------------------------------------------------------------------------------
# Views


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat()
    return value


def _round1(x: float) -> float:
    return round(x + 0.0, 1)


def alert_view(alert: Mapping[str, Any]) -> Doc:
    """One alert as the API shows it."""
    return {
        "alert_id": alert["_id"],
        "session_number": alert.get("session_number"),
        "severity": alert.get("severity"),
        "triggers": alert.get("triggers", []),
        "raised_at": _iso(alert.get("raised_at")),
        "acknowledged": bool(alert.get("acknowledged", False)),
    }


def trajectory_view(doc: Mapping[str, Any], alerts: Sequence[Mapping[str, Any]] = ()) -> Doc:
    """The API document of one trajectory.

    `change_from_previous` is computed here from the trajectory itself (the closest earlier
    session on record), so it stays right when a session arrived out of order.
    """
    sessions = []
    previous: Mapping[str, Any] | None = None
    for s in ordered_sessions(doc):
        change = _round1(float(s["total"]) - float(previous["total"])) if previous is not None else None
        sessions.append({
            "session_number": int(s["session_number"]),
            "administered_at": _iso(s["administered_at"]),
            "total": float(s["total"]),
            "items": s.get("items"),
            "change_from_previous": change,
            "flags": list(s.get("flags") or []),
            "below_cutoff": below_cutoff(s),
        })
        previous = s
    raised = [a for a in alerts if a.get("raised")]
    return {
        "client_id": doc["client_id"],
        "instrument": doc["instrument"],
        "episode_id": doc.get("episode_id"),
        "age_band": doc.get("age_band") or age_band(doc["instrument"]),
        "site_id": doc["site_id"],
        "clinician_id": doc["clinician_id"],
        "cutoff": float(doc["cutoff"]),
        "sessions": sessions,
        "latest_total": float(doc["latest_total"]),
        "at_risk": bool(doc["at_risk"]),
        "below_cutoff": bool(doc.get("below_cutoff", False)),
        "declining": bool(doc.get("declining", False)),
        "alerts": sorted((alert_view(a) for a in raised), key=lambda a: (a["session_number"] or 0, a["alert_id"])),
    }


def caseload_entry(doc: Mapping[str, Any], alerts: Sequence[Mapping[str, Any]] = ()) -> Doc:
    """One line of a caseload: enough to draw the trajectory chart without another request."""
    raised = [a for a in alerts if a.get("raised")]
    return {
        "client_id": doc["client_id"],
        "instrument": doc["instrument"],
        "episode_id": doc.get("episode_id"),
        "site_id": doc["site_id"],
        "at_risk": bool(doc["at_risk"]),
        "below_cutoff": bool(doc.get("below_cutoff", False)),
        "declining": bool(doc.get("declining", False)),
        "latest_total": float(doc["latest_total"]),
        "latest_session_number": int(doc["latest_session_number"]),
        "latest_administered_at": _iso(doc["latest_administered_at"]),
        "session_count": int(doc["session_count"]),
        "cutoff": float(doc["cutoff"]),
        "points": [{"session_number": int(s["session_number"]), "total": float(s["total"])}
                   for s in ordered_sessions(doc)],
        "alerts": sorted(({"session_number": a.get("session_number"), "severity": a.get("severity"),
                           "acknowledged": bool(a.get("acknowledged", False))} for a in raised),
                         key=lambda a: a["session_number"] or 0),
    }


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
              alerts_raised: int, alerts_acknowledged: int) -> Doc:
    """The summary document of a scope (tenant or site).

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
