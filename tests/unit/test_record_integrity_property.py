"""The property the clinical-record contract rests on (docs/clinical-records.md): whatever order a
client's submissions arrive in, with corrections under the same and new ids, identical resends,
late sessions, episode restarts and redeliveries, the record clinicians see — the trajectories
reporting merges from scoring's events, their flags, and the set of open alerts the lifecycle
events leave — equals what an independent oracle computes from the final version of each session.

The pipeline runs through the real pure code: scoring's `ClientState` (submit, and on a
redelivery what the handler re-emits), the event builders of scoring's handler, reporting's merge
and view, and the alerts service's lifecycle merge; scoring's output is shuffled and duplicated
again before reporting and alerts see it. The oracle below shares no code with any of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from services.alerts.rules import merge_lifecycle
from services.reporting import rules as reporting
from services.scoring.handlers import alert_event, scored_event, status_event
from services.scoring.rules import TenantRules
from services.scoring.series import AlertOut, ClientState, Output, ScoredOut, version_of
from shared import ids
from shared.events import AlertStatusChanged, AllianceDeterioration, SrsScored

TENANT, CLIENT = "acme", "client-1"
Event = SrsScored | AllianceDeterioration | AlertStatusChanged
DAY0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
RULES = TenantRules()


@dataclass(frozen=True)
class Sub:
    """One posted version: what the submitter said, and when intake accepted it."""

    sid: str
    episode: str | None
    number: int
    day: int
    total: float
    accepted: int  # seconds after DAY0; distinct per version
    minute: int = 0  # of the day: sessions of two courses on one day are never at the same time

    @property
    def administered(self) -> datetime:
        return DAY0 + timedelta(days=self.day, hours=1, minutes=self.minute)


# --- the oracle -------------------------------------------------------------------------------


def _r1(x: float) -> float:
    return round(x, 1) + 0.0


def oracle(subs: list[Sub]) -> tuple[dict[str, list[tuple[int, float, tuple[str, ...]]]], dict[str, str]]:
    """Per episode, its sessions (number, total, flags) in number order; and the open alerts
    {alert_id: severity}. Straight from the contract, sharing no code with the services."""
    final: dict[str, Sub] = {}
    for s in subs:
        if s.sid not in final or s.accepted > final[s.sid].accepted:
            final[s.sid] = s
    sessions: dict[tuple[Any, ...], Sub] = {}
    for s in final.values():
        key = ("e", s.episode, s.number) if s.episode is not None else ("d", s.day, s.number)
        if key not in sessions or s.accepted > sessions[key].accepted:
            sessions[key] = s
    episodes: dict[str, list[Sub]] = {}
    for s in sessions.values():
        if s.episode is not None:
            episodes.setdefault(s.episode, []).append(s)
    run: list[Sub] = []
    derived = sorted((s for s in sessions.values() if s.episode is None), key=lambda s: (s.administered, s.number))
    for s in derived:
        if run and s.number <= run[-1].number:
            episodes[f"auto/{(DAY0 + timedelta(days=run[0].day)).date().isoformat()}/{run[0].number}"] = run
            run = []
        run.append(s)
    if run:
        episodes[f"auto/{(DAY0 + timedelta(days=run[0].day)).date().isoformat()}/{run[0].number}"] = run
    out: dict[str, list[tuple[int, float, tuple[str, ...]]]] = {}
    alerts: dict[str, str] = {}
    newest = max(sessions.values(), key=lambda s: (s.administered, s.number, s.sid)) if sessions else None
    for eid, members in episodes.items():
        members.sort(key=lambda s: s.number)
        rows = []
        prev: float | None = None
        prev_lni = False
        severity = None
        for s in members:
            total = _r1(s.total)
            change = None if prev is None else _r1(total - prev)
            below = total < 36.0
            drop = change is not None and change <= -1.0
            lni = below and prev is not None and prev < 36.0 and change is not None and change <= 0.0
            flags = tuple(f for f, holds in (("below_cutoff", below), ("drop_from_previous", drop),
                                             ("low_not_improving", lni)) if holds)
            critical = (below and drop) or (change is not None and change <= -3.0) or (lni and prev_lni)
            severity = ("critical" if critical else "warning") if flags else None
            rows.append((s.number, total, flags))
            prev, prev_lni = total, lni
        out[eid] = rows
        last = members[-1]
        if newest is not None and newest in members and severity is not None:
            alerts[ids.alert_id(TENANT, CLIENT, "SRS", eid, last.number)] = severity
    return out, alerts


# --- the pipeline -------------------------------------------------------------------------------


def _events(outputs: list[Output]) -> list[Event]:
    events: list[Event] = []
    for o in outputs:
        if isinstance(o, ScoredOut):
            events.append(scored_event(TENANT, CLIENT, o))
        elif isinstance(o, AlertOut):
            events.append(alert_event(TENANT, CLIENT, o))
        else:
            events.append(status_event(TENANT, CLIENT, o))
    return events


def score(deliveries: list[Sub]) -> list[Event]:
    """Scoring's events for the deliveries, in the order it would publish them."""
    state = ClientState(TENANT, CLIENT)
    published: list[Output] = []
    for i, s in enumerate(deliveries):
        step = state.submit(version_of(s.sid, "SRS", s.episode, s.number, s.administered, "north", "c-1", None,
                                       s.total, DAY0 + timedelta(seconds=s.accepted)), RULES,
                            DAY0 + timedelta(days=400, seconds=i))
        assert step.rejection is None or step.rejection.reason == "duplicate", step.rejection
        published += state.current_outputs(RULES) if step.redelivered else step.outputs
    return _events(published)


def report(events: list[Event], rng: random.Random) -> dict[str, Any]:
    """Reporting's document after the scored events arrive shuffled, duplicated, in random batches."""
    scored = [e for e in events if isinstance(e, SrsScored)]
    scored = scored + rng.sample(scored, k=len(scored) // 3)
    rng.shuffle(scored)
    doc: dict[str, Any] | None = None
    i = 0
    while i < len(scored):
        size = rng.randint(1, 5)
        result = reporting.merge(doc, scored[i : i + size])
        if result.doc is not None:
            doc = result.doc
        i += size
    assert doc is not None
    return doc


def open_alerts(events: list[Event], rng: random.Random) -> dict[str, str]:
    """{alert_id: severity} of the alerts whose lifecycle ends open, from shuffled, duplicated events."""
    lifecycle = [e for e in events if isinstance(e, AllianceDeterioration | AlertStatusChanged)]
    lifecycle = lifecycle + rng.sample(lifecycle, k=len(lifecycle) // 3)
    rng.shuffle(lifecycle)
    final = merge_lifecycle(lifecycle)
    severity: dict[str, tuple[int, str]] = {}
    for e in lifecycle:
        if isinstance(e, AllianceDeterioration) and e.revision >= severity.get(e.alert_id, (0, ""))[0]:
            severity[e.alert_id] = (e.revision, e.severity)
    return {aid: severity[aid][1] for aid, status in final.items() if status == "open"}


def shown(doc: dict[str, Any], episode: str) -> list[tuple[int, float, tuple[str, ...]]]:
    view = reporting.trajectory_view(doc, [], episode)
    return [(s["session_number"], s["total"], tuple(s["flags"])) for s in view["sessions"]]


# --- histories ----------------------------------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[Sub]:
    """A client's sessions over two or three courses of care, some with an episode id, each
    session posted in one to three versions (corrections under the same or a new id, identical
    resends under the same or a new id, a date corrected under the same id)."""
    subs: list[Sub] = []
    clock = iter(range(1, 10_000))
    day = 0
    courses = draw(st.integers(1, 3))
    for course in range(courses):
        episode = draw(st.sampled_from([None, None, f"E{course}"]))
        for number in range(1, draw(st.integers(1, 4)) + 1):
            day += draw(st.integers(1, 10))
            sid = f"s{course}-{number}"
            total = draw(st.sampled_from([20.0, 30.0, 34.5, 35.4, 36.5, 38.0, 39.9, 40.0]))
            subs.append(Sub(sid, episode, number, day, total, next(clock), 10 * course + number))
            for _ in range(draw(st.integers(0, 2))):
                kind = draw(st.sampled_from(["same-id", "new-id", "resend-same", "resend-new", "move"]))
                last = subs[-1]
                fresh = draw(st.sampled_from([28.0, 37.0, 39.0]))
                if kind == "same-id":
                    subs.append(Sub(last.sid, episode, number, last.day, fresh, next(clock), last.minute))
                elif kind == "new-id":
                    subs.append(Sub(f"{sid}-fix{len(subs)}", episode, number, last.day, fresh, next(clock),
                                    last.minute))
                elif kind == "resend-same":
                    subs.append(Sub(last.sid, episode, number, last.day, last.total, next(clock), last.minute))
                elif kind == "resend-new":
                    subs.append(Sub(f"{sid}-again{len(subs)}", episode, number, last.day, last.total, next(clock),
                                    last.minute))
                elif episode is None:
                    subs.append(Sub(last.sid, None, number, last.day + 1, last.total, next(clock), last.minute))
    return subs


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subs=histories(), seed=st.integers(0, 2**32 - 1))
def test_final_record_depends_only_on_the_final_version_of_each_session(subs: list[Sub], seed: int) -> None:
    note(f"history: {subs!r}")
    rng = random.Random(seed)
    deliveries = subs + rng.sample(subs, k=len(subs) // 2)  # redeliveries and duplicates
    rng.shuffle(deliveries)
    events = score(deliveries)
    episodes, alerts = oracle(subs)

    doc = report(events, rng)
    listed = {e["episode_id"] for e in reporting.trajectory_view(doc, [], None)["episodes"]}
    assert listed == set(episodes)
    for eid, rows in episodes.items():
        assert shown(doc, eid) == rows, eid
    assert open_alerts(events, rng) == alerts
