"""Pure read-model rules of reporting: merge, derived fields, views, summaries, paging."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from datetime import UTC, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.reporting import rules
from shared.events import AlertStatus, AlertStatusChanged, AllianceDeterioration, Instrument, Items, SrsScored
from tools.demo import (
    BASE,
    acknowledgement,
    deterioration_for,
    lifecycle,
    revised,
    scored,
    status_changed,
    transferred,
)

T = "tenant-a"


def fold(events: list[SrsScored], batch: int = 3) -> dict[str, Any]:
    """Apply events in batches the way the store does (re-reading the document each time)."""
    doc: dict[str, Any] | None = None
    for i in range(0, len(events), batch):
        result = rules.merge(doc, events[i:i + batch])
        if result.doc is not None:
            doc = result.doc
    assert doc is not None
    return doc


def content(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("v", "updated_at")}


def test_sessions_are_sorted_by_number_in_views() -> None:
    doc = fold([scored(T, "c1", 3, 30.0), scored(T, "c1", 1, 38.0), scored(T, "c1", 2, 37.0)])
    view = rules.trajectory_view(doc)
    assert [s["session_number"] for s in view["sessions"]] == [1, 2, 3]
    assert doc["latest_session_number"] == 3 and doc["latest_total"] == 30.0


def test_a_duplicated_event_never_adds_a_second_point() -> None:
    e = scored(T, "c1", 1, 38.0)
    first = rules.merge(None, [e])
    assert first.doc is not None
    again = rules.merge(first.doc, [e, e])
    assert again.doc is None
    assert [o for _, o in again.outcomes] == ["duplicate", "duplicate"]
    assert first.doc["session_count"] == 1


def test_a_correction_under_a_new_id_supersedes_the_earlier_submission_of_the_same_session() -> None:
    original = scored(T, "c1", 2, 30.0, submission_id="s-orig", previous_total=38.0)
    fix = revised(original, submission_id="s-fix", total=37.5, accepted_at=original.accepted_at + timedelta(hours=1))
    doc = fold([scored(T, "c1", 1, 38.0), original])
    result = rules.merge(doc, [fix])
    assert [o for _, o in result.outcomes] == ["corrected"]
    assert result.doc is not None
    assert result.doc["entries"]["s-orig"] == {"kind": "superseded", "submission_id": "s-orig", "revision": 2,
                                               "superseded_by": "s-fix", "key": result.doc["entries"]["s-orig"]["key"]}
    view = rules.trajectory_view(result.doc)
    assert [(s["submission_id"], s["revision"], s["total"]) for s in view["sessions"]][1] == ("s-fix", 2, 37.5)
    assert result.doc["session_count"] == 2 and result.doc["latest_total"] == 37.5


def test_a_correction_under_the_same_id_replaces_its_entry() -> None:
    original = scored(T, "c1", 1, 30.0, items=Items(relationship=7.5, goals=7.5, approach=7.5, overall=7.5))
    fix = revised(original, total=36.0, items=Items(relationship=9.0, goals=9.0, approach=9.0, overall=9.0))
    doc = fold([original, fix])
    (s,) = rules.trajectory_view(doc)["sessions"]
    assert (s["revision"], s["total"], sum(s["items"].values())) == (2, 36.0, 36.0)
    assert rules.merge(doc, [original]).outcomes[0][1] == "stale"


def test_an_older_producers_correction_without_supersedes_still_shows_the_later_accepted_version() -> None:
    original = scored(T, "c1", 2, 30.0, submission_id="s-orig")
    fix = scored(T, "c1", 2, 37.5, submission_id="s-fix", accepted_at=original.accepted_at + timedelta(hours=1))
    for order in ([original, fix], [fix, original]):
        doc = fold(order)
        assert [s["submission_id"] for s in rules.trajectory_view(doc)["sessions"]] == ["s-fix"]


def test_a_stale_event_replayed_after_a_correction_does_not_overwrite_it() -> None:
    original = scored(T, "c1", 2, 30.0, submission_id="s-orig")
    fix = revised(original, submission_id="s-fix", total=37.5, accepted_at=original.accepted_at + timedelta(hours=1))
    doc = fold([original, fix])
    # the original is delivered again later (a replay): it is older than its tombstone
    result = rules.merge(doc, [original])
    assert [o for _, o in result.outcomes] == ["stale"]
    assert result.doc is None


def test_a_tombstone_is_revived_by_a_higher_revision_of_its_submission() -> None:
    a = scored(T, "c1", 1, 30.0, submission_id="a")
    b = revised(a, submission_id="b", total=31.0)  # revision 2 supersedes a
    a_again = revised(b, submission_id="a", total=32.0)  # revision 3 supersedes b
    for order in itertools.permutations([a, b, a_again]):
        doc = fold(list(order), 1)
        assert doc["entries"]["b"]["kind"] == "superseded" and doc["entries"]["a"]["revision"] == 3
        assert [s["total"] for s in rules.trajectory_view(doc)["sessions"]] == [32.0]


def retracted(event: SrsScored) -> SrsScored:
    """The revision scoring publishes when the session moved to another client."""
    return revised(event).model_copy(update={"retracted": "moved"})


def test_a_retracted_session_leaves_the_clients_trajectory_in_any_order() -> None:
    first, moved = scored(T, "c1", 1, 38.0, submission_id="a1"), scored(T, "c1", 2, 30.0, submission_id="m")
    for order in itertools.permutations([first, moved, retracted(moved)]):
        doc = fold(list(order), 1)
        assert [s["submission_id"] for s in rules.trajectory_view(doc)["sessions"]] == ["a1"]
        assert doc["entries"]["m"]["kind"] == "retracted" and doc["latest_total"] == 38.0


def test_a_record_whose_only_session_was_retracted_shows_nothing() -> None:
    moved = scored(T, "c1", 1, 30.0, submission_id="m")
    doc = fold([moved, retracted(moved)])
    assert doc["session_count"] == 0 and doc["site_id"] is None


def test_a_session_that_moved_back_is_shown_again() -> None:
    moved = scored(T, "c1", 1, 30.0, submission_id="m")
    gone = retracted(moved)
    back = revised(gone, total=31.0).model_copy(update={"retracted": None})  # revision 3
    for order in itertools.permutations([moved, gone, back]):
        assert [s["total"] for s in rules.trajectory_view(fold(list(order), 1))["sessions"]] == [31.0]


def test_superseding_takes_a_strictly_higher_revision() -> None:
    a = scored(T, "c1", 1, 30.0, submission_id="a", revision=2)
    b = scored(T, "c1", 1, 31.0, submission_id="b", revision=2, supersedes="a")
    for order in ([a, b], [b, a]):
        assert fold(order)["entries"]["a"]["kind"] == "scored"


def test_when_a_session_shares_its_slot_the_later_accepted_one_shows_whatever_accepted_at_is() -> None:
    a = scored(T, "c1", 1, 30.0, submission_id="a").model_copy(update={"accepted_at": None})
    b = scored(T, "c1", 1, 31.0, submission_id="b").model_copy(
        update={"accepted_at": None, "scored_at": a.scored_at + timedelta(seconds=5)})
    assert [s["submission_id"] for s in rules.trajectory_view(fold([b, a]))["sessions"]] == ["b"]
    early = scored(T, "c1", 2, 30.0, submission_id="z")
    shifted = early.accepted_at.astimezone(timezone(timedelta(hours=-5)))
    later = scored(T, "c1", 2, 30.0, submission_id="a", accepted_at=shifted + timedelta(microseconds=1))
    assert [s["submission_id"] for s in rules.trajectory_view(fold([later, early]))["sessions"]] == ["a"]


# ---------------------------------------------------------------------------------------------
# The merge algebra: a simulated scoring publishes a history of one client's record (new
# sessions in several episodes, corrections under the same and under new ids, moves between
# episodes, transfers between sites); any shuffle with duplicates, in any batches, must give
# the document of the ordered stream.


@dataclass
class History:
    clean: list[SrsScored]
    current: dict[str, SrsScored]  # submission id -> its current event
    site: str
    clashes: bool


@st.composite
def histories(draw: st.DrawFn) -> History:
    ops = draw(st.lists(st.sampled_from(["new", "new", "new", "fix_same", "fix_new", "move", "transfer"]),
                        min_size=1, max_size=14))
    allow_clash = draw(st.booleans())
    clean: list[SrsScored] = []
    current: dict[str, SrsScored] = {}
    site, site_version, n_sids, clashes = "north", 0, 0, False
    episodes = ["auto/2026-01-05/1"]

    def total() -> float:
        return round(draw(st.floats(20, 40)), 1)

    def taken(episode: str | None, number: int) -> bool:
        return any(e.episode_id == episode and e.session_number == number for e in current.values())

    for op in ops:
        if op == "new" or not current:
            if draw(st.integers(0, 4)) == 0:
                episodes.append(f"ep-{len(episodes)}")
            k = draw(st.integers(0, len(episodes) - 1))
            number = draw(st.integers(1, 6))
            if taken(episodes[k], number):
                if not allow_clash:
                    continue
                clashes = True
            n_sids += 1
            event = scored(T, "c1", number, total(), episode_id=episodes[k], submission_id=f"s{n_sids}",
                           site_id=site, site_version=site_version, clinician_id=f"doc-{k}",
                           administered_at=BASE + timedelta(days=100 * k + 7 * number),
                           accepted_at=BASE + timedelta(days=1000, minutes=len(clean)))
            clean.append(event)
            current[event.submission_id] = event
            continue
        sid = draw(st.sampled_from(sorted(current)))
        old = current[sid]
        if op == "fix_same":
            event = revised(old, total=total())
            clean.append(event)
            current[sid] = event
        elif op == "fix_new":
            n_sids += 1
            event = revised(old, submission_id=f"s{n_sids}", total=total(),
                            accepted_at=BASE + timedelta(days=1000, minutes=len(clean)))
            clean.append(event)
            del current[sid]
            current[event.submission_id] = event
        elif op == "move":
            target = draw(st.sampled_from(episodes))
            if target == old.episode_id or taken(target, old.session_number):
                continue
            event = revised(old, episode_id=target)
            clean.append(event)
            current[sid] = event
        else:  # transfer: every current session again, with the new site
            site = "south" if site == "north" else "north"
            site_version += 1
            moved = transferred(sorted(current.values(), key=lambda e: e.submission_id), site)
            clean.extend(moved)
            current.update({e.submission_id: e for e in moved})
    return History(clean, current, site, clashes)


@st.composite
def replays(draw: st.DrawFn) -> tuple[History, list[SrsScored], int]:
    history = draw(histories())
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    replay = history.clean + [rng.choice(history.clean) for _ in range(draw(st.integers(0, 12)))]
    rng.shuffle(replay)
    return history, replay, draw(st.integers(1, 5))


@settings(max_examples=300, deadline=None)
@given(replays())
def test_any_permutation_with_duplicates_gives_the_ordered_streams_document(
        data: tuple[History, list[SrsScored], int]) -> None:
    history, replay, batch = data
    ordered = fold(history.clean, 1)
    assert content(fold(replay, batch)) == content(ordered)
    assert rules.merge(ordered, replay).doc is None  # idempotent: nothing left to change


@settings(max_examples=200, deadline=None)
@given(histories())
def test_the_ordered_stream_shows_exactly_the_current_sessions(history: History) -> None:
    doc = fold(history.clean, 1)
    assert doc["site_id"] == history.site
    if history.clashes:
        return
    shown = {s["submission_id"]: (ep, s) for ep, sessions in rules.sessions_by_episode(doc["entries"]).items()
             for s in sessions}
    assert set(shown) == set(history.current)
    for sid, (ep, s) in shown.items():
        e = history.current[sid]
        assert (ep, s["session_number"], s["total"], s["revision"]) == (
            e.episode_id, e.session_number, e.total, e.revision)
    # the current episode is that of the most recently administered session
    newest = max(history.current.values(), key=lambda e: (e.administered_at, e.session_number, e.episode_id or ""))
    assert doc["episode_id"] == newest.episode_id
    assert rules.episodes_view(doc)[0]["episode_id"] == newest.episode_id


def test_at_risk_when_the_latest_session_is_below_cutoff() -> None:
    doc = fold([scored(T, "c1", 1, 38.0), scored(T, "c1", 2, 35.9)])
    assert doc["below_cutoff"] and doc["at_risk"]


def test_at_cutoff_is_not_below_it() -> None:
    doc = fold([scored(T, "c1", 1, 36.0, flags=[])])
    assert not doc["below_cutoff"] and not doc["at_risk"]


def test_below_cutoff_is_scoring_s_flag_never_a_comparison_here() -> None:
    # a tenant whose rule is `total <= 36`: scoring flagged 36.0; a total under 36 it did not flag stays fine
    at = fold([scored(T, "c1", 1, 36.0, flags=["below_cutoff"])])
    assert at["below_cutoff"] and at["at_risk"] and rules.trajectory_view(at)["sessions"][0]["below_cutoff"]
    under = fold([scored(T, "c2", 1, 34.0, flags=[], cutoff=34.0)])
    assert not under["below_cutoff"] and not rules.trajectory_view(under)["sessions"][0]["below_cutoff"]


def test_declining_comes_only_from_scoring_s_flags() -> None:
    # a one-point drop scoring did not flag (the tenant's drop rule is bigger) is not declining
    quiet = fold([scored(T, "c1", 1, 39.5, flags=[]), scored(T, "c1", 2, 38.5, flags=[], previous_total=39.5)])
    assert not quiet["declining"] and not quiet["at_risk"]
    for flag in ("drop_from_previous", "low_not_improving"):
        doc = fold([scored(T, "c1", 4, 38.0, flags=[flag])])
        assert doc["declining"] and doc["at_risk"]


def test_only_the_latest_session_decides_at_risk() -> None:
    doc = fold([scored(T, "c1", 1, 20.0), scored(T, "c1", 2, 38.0, flags=[])])
    assert not doc["at_risk"]
    assert doc["sessions_below_cutoff"] == 1 and doc["first_total"] == 20.0


def test_the_owning_site_is_that_of_the_highest_site_version() -> None:
    first = [scored(T, "c1", 1, 38.0, site_id="north"), scored(T, "c1", 2, 38.0, site_id="north")]
    moved = transferred(first, "south")
    # a straggler of the old site (site_version 0) administered later does not take the client back
    straggler = scored(T, "c1", 3, 38.0, site_id="north", clinician_id="c-3")
    for order in ([*first, *moved, straggler], [straggler, *moved, *first]):
        doc = fold(order)
        assert (doc["site_id"], doc["site_version"], doc["clinician_id"]) == ("south", 1, "c-3")


def test_without_site_versions_the_record_follows_the_latest_session() -> None:
    doc = fold([scored(T, "c1", 2, 38.0, site_id="south", clinician_id="c-9"),
                scored(T, "c1", 1, 38.0, site_id="north", clinician_id="c-1")])
    assert (doc["site_id"], doc["clinician_id"]) == ("south", "c-9")


def test_caseload_key_sorts_at_risk_clients_first() -> None:
    risky = rules.caseload_key(True, "zz", "SRS")
    fine = rules.caseload_key(False, "aa", "SRS")
    assert sorted([fine, risky]) == [risky, fine]


def test_one_record_per_client_and_instrument_holds_every_episode() -> None:
    ids = {rules.record_id(T, "c1", "SRS"), rules.record_id(T, "c1", "CSRS"), rules.record_id("other", "c1", "SRS")}
    assert len(ids) == 3
    old = scored(T, "c1", 1, 30.0, episode_id="e1", administered_at=BASE - timedelta(days=90))
    new = [scored(T, "c1", 1, 38.0, episode_id="e2"), scored(T, "c1", 2, 38.5, episode_id="e2", previous_total=38.0)]
    doc = fold([*new, old])
    assert doc["episode_id"] == "e2" and doc["session_count"] == 2 and not doc["at_risk"]
    assert [(e["episode_id"], e["session_count"]) for e in rules.episodes_view(doc)] == [("e2", 2), ("e1", 1)]
    older = rules.trajectory_view(doc, episode_id="e1")
    assert (older["episode_id"], older["latest_total"], older["at_risk"]) == ("e1", 30.0, True)
    with pytest.raises(rules.UnknownEpisode):
        rules.trajectory_view(doc, episode_id="e3")


def test_the_current_episode_is_that_of_the_most_recently_administered_session() -> None:
    # a backfilled older episode with higher session numbers does not become current
    current = scored(T, "c1", 1, 38.0, episode_id="new")
    backfill = scored(T, "c1", 9, 20.0, episode_id="old", administered_at=current.administered_at - timedelta(days=1))
    doc = fold([current, backfill])
    assert (doc["episode_id"], doc["latest_total"]) == ("new", 38.0)


@pytest.mark.parametrize(("instrument", "band"), [("SRS", "13+"), ("GSRS", "13+"), ("CSRS", "6-12"),
                                                  ("CGSRS", "6-12"), ("YCSRS", "<=5")])
def test_age_band_is_derived_from_the_instrument(instrument: str, band: str) -> None:
    assert rules.age_band(instrument) == band


def test_view_shows_scoring_s_change_from_previous() -> None:
    # scoring compared session 3 with session 2, which reporting never received
    doc = fold([scored(T, "c1", 3, 31.0, previous_total=33.0), scored(T, "c1", 1, 38.0)])
    view = rules.trajectory_view(doc)
    assert [s["change_from_previous"] for s in view["sessions"]] == [None, -2.0]


def test_view_shows_revision_severity_triggers_and_low_items_per_session() -> None:
    items = Items(relationship=9.5, goals=8.0, approach=9.0, overall=8.5)
    first = scored(T, "c1", 1, 38.0)
    second = scored(T, "c1", 2, 35.0, items=items, previous_total=38.0)
    s = rules.trajectory_view(fold([first, revised(second, clinician_id="c-2")]))["sessions"][1]
    assert (s["revision"], s["severity"], s["submission_id"]) == (2, "critical", second.submission_id)
    assert s["triggers"] == ["below_cutoff", "drop_from_previous"] and s["low_items"] == ["goals", "overall"]


def test_view_has_the_documented_fields() -> None:
    items = Items(relationship=9.0, goals=9.0, approach=9.0, overall=9.5)
    doc = fold([scored(T, "c1", 1, 36.5, items=items)])
    view = rules.trajectory_view(doc)
    assert {"client_id", "instrument", "sessions", "latest_total", "at_risk"} <= set(view)
    s = view["sessions"][0]
    assert {"session_number", "administered_at", "total", "items", "change_from_previous", "flags"} <= set(s)
    assert s["items"] == items.model_dump()
    assert s["administered_at"] == BASE.isoformat()


def test_view_marks_only_raised_alerts() -> None:
    doc = fold([scored(T, "c1", 1, 30.0)])
    alerts = [{"_id": "a1", "session_number": 1, "severity": "warning", "raised": True, "acknowledged": True},
              {"_id": "a2", "acknowledged": True, "raised": False}]
    view = rules.trajectory_view(doc, alerts)
    assert [(a["alert_id"], a["acknowledged"], a["status"]) for a in view["alerts"]] == [("a1", True, "acknowledged")]


def test_view_shows_only_the_alerts_of_the_shown_episode() -> None:
    old = scored(T, "c1", 1, 30.0, episode_id="e1", administered_at=BASE - timedelta(days=90))
    new = scored(T, "c1", 1, 31.0, episode_id="e2")
    doc = fold([old, new])
    alerts = [{"_id": "a-old", "episode_id": "e1", "session_number": 1, "raised": True, "life": 4},
              {"_id": "a-new", "episode_id": "e2", "session_number": 1, "raised": True, "life": 4}]
    assert [a["alert_id"] for a in rules.trajectory_view(doc, alerts)["alerts"]] == ["a-new"]
    assert [a["alert_id"] for a in rules.trajectory_view(doc, alerts, "e1")["alerts"]] == ["a-old"]


FACTS = [("raised", 1), ("superseded", 1), ("raised", 2), ("withdrawn", 2), ("raised", 3)]


@pytest.mark.parametrize("facts", [FACTS[:2], FACTS[:3], FACTS[:4], FACTS])
def test_the_alert_lifecycle_is_the_greatest_revision_then_rank_in_any_order(facts: list[tuple[str, int]]) -> None:
    expected = {2: ("superseded", 1), 3: ("open", 2), 4: ("withdrawn", 2), 5: ("open", 3)}[len(facts)]
    for order in itertools.permutations(facts):
        life = max(rules.life_key(rev, status) for status, rev in order)
        assert rules.alert_status({"life": life}) == expected
        # an acknowledgement is a separate flag: kept by a revision, hidden by an end
        acked = rules.alert_status({"life": life, "acknowledged": True})
        assert acked == (("acknowledged", expected[1]) if expected[0] == "open" else expected)


def test_an_alert_shows_its_highest_revision_s_raise() -> None:
    alert = {"_id": "a", "raised": True, "life": rules.life_key(2, "raised"), "session_number": 2,
             "raises": {"1": {"severity": "warning", "triggers": ["below_cutoff"], "low_items": []},
                        "2": {"severity": "critical", "triggers": ["below_cutoff", "drop_from_previous"],
                              "low_items": ["goals"]}}}
    view = rules.alert_view(alert)
    assert (view["severity"], view["low_items"], view["status"], view["revision"]) == (
        "critical", ["goals"], "open", 2)


def _alert_events() -> list[AllianceDeterioration | AlertStatusChanged]:
    """One alert's events: a raise at a non-UTC offset with microseconds, its revision, an
    acknowledgement, a delivery, an end of each revision."""
    alert = deterioration_for(scored(T, "c1", 2, 28.0, previous_total=36.0, episode_id="e1"))
    assert alert is not None
    alert = alert.model_copy(update={"occurred_at": BASE.astimezone(timezone(timedelta(hours=-5))).replace(
        microsecond=123456)})
    again = alert.model_copy(update={"revision": 2, "total": 26.5,
                                     "occurred_at": alert.occurred_at + timedelta(hours=1)})
    return [alert, again, acknowledgement(alert, alert.occurred_at + timedelta(minutes=20, microseconds=999)),
            acknowledgement(alert, alert.occurred_at + timedelta(hours=5)),
            status_changed(T, alert.alert_id, alert.site_id, alert.clinician_id, AlertStatus.DELIVERED,
                           alert.occurred_at + timedelta(seconds=3), alert.client_id),
            lifecycle(alert, AlertStatus.SUPERSEDED), lifecycle(again, AlertStatus.WITHDRAWN)]


def _update_of(e: AllianceDeterioration | AlertStatusChanged) -> rules.AlertUpdate:
    return rules.raise_update(e) if isinstance(e, AllianceDeterioration) else rules.status_update(e)


@settings(max_examples=60, deadline=None)
@given(order=st.permutations(range(7)), repeats=st.lists(st.integers(0, 6), max_size=3), cut=st.integers(0, 10))
def test_an_alerts_updates_folded_into_one_make_the_document_they_make_one_by_one(
        order: list[int], repeats: list[int], cut: int) -> None:
    """A rebuild inserts the document of the one update its events fold into; the store applies
    each event's update in turn, to a document that exists from the first one on - the same
    document, whatever the order, the duplicates, and where the fold starts."""
    events = _alert_events()
    stream = [events[i] for i in [*order, *repeats]]
    one_by_one: dict[str, Any] | None = None
    for e in stream:
        one_by_one = rules.updated(one_by_one, _update_of(e), e.alert_id)
    folded: rules.AlertUpdate | None = None
    for e in stream[cut:]:
        folded = rules.combine_updates(folded, _update_of(e))
    start: dict[str, Any] | None = None
    for e in stream[:cut]:
        start = rules.updated(start, _update_of(e), e.alert_id)
    assert folded is None or rules.updated(start, folded, stream[0].alert_id) == one_by_one


def test_an_alert_document_made_in_memory_holds_what_the_store_gives_back() -> None:
    raised = _alert_events()[0]
    doc = rules.updated(None, rules.raise_update(raised), raised.alert_id)
    assert doc["raised_at"] == raised.occurred_at.replace(microsecond=123000)  # BSON dates: milliseconds
    assert doc["raised_at"].tzinfo == UTC and type(doc["raises"]["1"]["severity"]) is str
    assert doc["acknowledged"] is False and doc["raised"] is True


def test_summary_indices() -> None:
    totals = [rules.GroupTotals("SRS", trajectories=2, sessions=6, sessions_below_cutoff=3, first_total_sum=60.0,
                                latest_total_sum=70.0, trajectories_at_risk=1),
              rules.GroupTotals("CSRS", trajectories=1, sessions=2, sessions_below_cutoff=0, first_total_sum=38.0,
                                latest_total_sum=39.0, trajectories_at_risk=0)]
    s = rules.summarize(totals, clients=3, clients_at_risk=1, clients_by_instrument={"SRS": 2, "CSRS": 1},
                        clients_by_band={"13+": 2, "6-12": 1}, alerts_raised=4, alerts_acknowledged=1)
    assert s["clients"] == 3 and s["sessions"] == 8
    assert s["mean_sessions_per_client"] == pytest.approx(8 / 3, abs=0.01)
    assert s["mean_first_session_total"] == pytest.approx(98 / 3, abs=0.01)
    assert s["mean_latest_total"] == pytest.approx(109 / 3, abs=0.01)
    assert s["pct_sessions_below_cutoff"] == 37.5
    assert s["clients_at_risk"] == 1 and s["alerts"] == {"raised": 4, "acknowledged": 1}
    assert [b["instrument"] for b in s["by_instrument"]] == ["SRS", "CSRS"]
    assert [(b["age_band"], b["clients"], b["sessions"]) for b in s["by_age_band"]] == [("13+", 2, 6), ("6-12", 1, 2)]


def test_summary_of_nothing_has_no_means() -> None:
    s = rules.summarize([], 0, 0, {}, {}, 0, 0)
    assert s["clients"] == 0 and s["mean_latest_total"] is None and s["pct_sessions_below_cutoff"] is None


def test_cursor_round_trips_and_rejects_foreign_text() -> None:
    key = rules.caseload_key(True, "c|1", "SRS")
    assert rules.decode_cursor(rules.encode_cursor(key)) == key
    for bad in ("not-base64!!", "eyJ4IjoxfQ", "bnVsbA"):
        with pytest.raises(rules.BadCursor):
            rules.decode_cursor(bad)


def test_etag_matching_follows_if_none_match_rules() -> None:
    tag = rules.etag(b"{}")
    assert rules.etag_matches(tag, tag)
    assert rules.etag_matches(f'"other", W/{tag}', tag)
    assert rules.etag_matches("*", tag)
    assert not rules.etag_matches('"other"', tag)
    assert not rules.etag_matches(None, tag)


def test_instrument_enum_covers_every_age_band() -> None:
    assert set(rules.AGE_BANDS) == set(Instrument)


def test_packed_entries_round_trip_with_aware_times() -> None:
    items = Items(relationship=9.1, goals=8.4, approach=9.0, overall=8.8)
    first = scored(T, "c1", 1, 35.3, items=items)
    doc = fold([first, scored(T, "c1", 2, 38.0), revised(first, submission_id="fix", total=36.0)])
    text = rules.pack_entries(doc["entries"])
    assert isinstance(text, str)
    assert rules.unpack_entries(text) == doc["entries"]


def test_merge_refuses_events_of_another_record() -> None:
    with pytest.raises(ValueError, match="one record"):
        rules.merge(None, [scored(T, "c1", 1, 38.0), scored(T, "c2", 1, 38.0)])
    with pytest.raises(ValueError, match="one record"):
        rules.merge(None, [scored(T, "c1", 1, 38.0), scored(T, "c1", 1, 38.0, instrument=Instrument.CSRS)])
