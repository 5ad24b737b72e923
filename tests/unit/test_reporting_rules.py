"""Pure read-model rules of reporting: merge, derived fields, views, summaries, paging."""

from __future__ import annotations

import random
from datetime import timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.reporting import rules
from services.reporting.demo import BASE, scored
from shared.events import Instrument, Items, SrsScored

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


def test_sessions_are_keyed_by_number_and_sorted_in_views() -> None:
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


def test_a_correction_supersedes_the_earlier_submission_of_the_same_session() -> None:
    original = scored(T, "c1", 2, 30.0, submission_id="s-orig")
    fix = scored(T, "c1", 2, 37.5, submission_id="s-fix", accepted_at=original.accepted_at + timedelta(hours=1))
    doc = fold([scored(T, "c1", 1, 38.0), original])
    result = rules.merge(doc, [fix])
    assert [o for _, o in result.outcomes] == ["corrected"]
    assert result.doc is not None
    assert result.doc["sessions"]["2"]["submission_id"] == "s-fix"
    assert result.doc["session_count"] == 2 and result.doc["latest_total"] == 37.5


def test_a_stale_event_replayed_after_a_correction_does_not_overwrite_it() -> None:
    original = scored(T, "c1", 2, 30.0, submission_id="s-orig")
    fix = scored(T, "c1", 2, 37.5, submission_id="s-fix", accepted_at=original.accepted_at + timedelta(hours=1))
    doc = fold([original, fix])
    # the original is re-scored later (a redelivery): newer scored_at, older acceptance
    rescored = original.model_copy(update={"scored_at": fix.scored_at + timedelta(days=1)})
    result = rules.merge(doc, [rescored])
    assert [o for _, o in result.outcomes] == ["stale"]
    assert result.doc is None


def test_revision_falls_back_to_scored_at_when_accepted_at_is_missing() -> None:
    a = scored(T, "c1", 1, 30.0, submission_id="a").model_copy(update={"accepted_at": None})
    b = scored(T, "c1", 1, 31.0, submission_id="b").model_copy(
        update={"accepted_at": None, "scored_at": a.scored_at + timedelta(seconds=5)})
    assert rules.revision(a) < rules.revision(b)
    assert fold([b, a])["sessions"]["1"]["submission_id"] == "b"


def test_revision_text_order_is_time_order_across_offsets() -> None:
    early = scored(T, "c1", 1, 30.0, submission_id="z")
    tz_shifted = early.accepted_at.astimezone(timezone(timedelta(hours=-5)))
    later = scored(T, "c1", 1, 30.0, submission_id="a", accepted_at=tz_shifted + timedelta(microseconds=1))
    assert rules.revision(early) < rules.revision(later)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[SrsScored], list[SrsScored]]:
    """A clean stream of one client's sessions (with some corrections), and a shuffled, duplicated replay."""
    n = draw(st.integers(1, 8))
    totals = draw(st.lists(st.floats(0, 40).map(lambda x: round(x, 1)), min_size=n, max_size=n))
    clean: list[SrsScored] = []
    for i, total in enumerate(totals, start=1):
        e = scored(T, "c1", i, total, submission_id=f"s{i}")
        clean.append(e)
        if draw(st.booleans()) and draw(st.booleans()):
            clean.append(scored(T, "c1", i, round(40 - total, 1), submission_id=f"s{i}-fix",
                                accepted_at=e.accepted_at + timedelta(hours=2)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    replay = clean + [rng.choice(clean) for _ in range(draw(st.integers(0, 10)))]
    rng.shuffle(replay)
    return clean, replay


@settings(max_examples=200, deadline=None)
@given(streams(), st.integers(1, 5))
def test_shuffled_duplicated_replays_give_the_clean_streams_trajectory(
        data: tuple[list[SrsScored], list[SrsScored]], batch: int) -> None:
    clean, replay = data
    assert content(fold(replay, batch)) == content(fold(clean, 1))


def test_at_risk_when_the_latest_session_is_below_cutoff() -> None:
    doc = fold([scored(T, "c1", 1, 38.0), scored(T, "c1", 2, 35.9)])
    assert doc["below_cutoff"] and doc["at_risk"]


def test_at_cutoff_is_not_below_it() -> None:
    doc = fold([scored(T, "c1", 1, 36.0, flags=[])])
    assert not doc["below_cutoff"] and not doc["at_risk"]


def test_a_drop_of_one_point_is_declining_and_at_risk() -> None:
    doc = fold([scored(T, "c1", 1, 39.5, flags=[]), scored(T, "c1", 2, 38.5, flags=[])])
    assert doc["declining"] and doc["at_risk"] and not doc["below_cutoff"]


def test_a_drop_under_the_threshold_is_not_declining() -> None:
    doc = fold([scored(T, "c1", 1, 39.5, flags=[]), scored(T, "c1", 2, 38.6, flags=[])])
    assert not doc["declining"] and not doc["at_risk"]


def test_a_scoring_decline_flag_counts_even_without_the_previous_session_on_record() -> None:
    doc = fold([scored(T, "c1", 4, 38.0, flags=["drop_from_previous"])])
    assert doc["declining"] and doc["at_risk"]


def test_only_the_latest_session_decides_at_risk() -> None:
    doc = fold([scored(T, "c1", 1, 20.0), scored(T, "c1", 2, 38.0, flags=[])])
    assert not doc["at_risk"]
    assert doc["sessions_below_cutoff"] == 1 and doc["first_total"] == 20.0


def test_trajectory_follows_the_site_and_clinician_of_its_latest_session() -> None:
    doc = fold([scored(T, "c1", 2, 38.0, site_id="south", clinician_id="c-9"),
                scored(T, "c1", 1, 38.0, site_id="north", clinician_id="c-1")])
    assert (doc["site_id"], doc["clinician_id"]) == ("south", "c-9")


def test_caseload_key_sorts_at_risk_clients_first() -> None:
    risky = rules.caseload_key(True, "zz", "SRS", None)
    fine = rules.caseload_key(False, "aa", "SRS", None)
    assert sorted([fine, risky]) == [risky, fine]


def test_episodes_and_instruments_are_separate_trajectories() -> None:
    ids = {rules.trajectory_id(T, "c1", "SRS", None), rules.trajectory_id(T, "c1", "SRS", "e2"),
           rules.trajectory_id(T, "c1", "CSRS", None), rules.trajectory_id("other", "c1", "SRS", None)}
    assert len(ids) == 4


@pytest.mark.parametrize(("instrument", "band"), [("SRS", "13+"), ("GSRS", "13+"), ("CSRS", "6-12"),
                                                  ("CGSRS", "6-12"), ("YCSRS", "<=5")])
def test_age_band_is_derived_from_the_instrument(instrument: str, band: str) -> None:
    assert rules.age_band(instrument) == band


def test_view_computes_change_from_the_previous_session_on_record() -> None:
    doc = fold([scored(T, "c1", 3, 31.0), scored(T, "c1", 1, 38.0)])
    view = rules.trajectory_view(doc)
    assert [s["change_from_previous"] for s in view["sessions"]] == [None, -7.0]


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
    assert [(a["alert_id"], a["acknowledged"]) for a in view["alerts"]] == [("a1", True)]


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
    key = rules.caseload_key(True, "c|1", "SRS", "e")
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


def test_packed_sessions_round_trip_with_aware_times() -> None:
    items = Items(relationship=9.1, goals=8.4, approach=9.0, overall=8.8)
    doc = fold([scored(T, "c1", 1, 35.3, items=items), scored(T, "c1", 2, 38.0)])
    text = rules.pack_sessions(doc["sessions"])
    assert isinstance(text, str)
    assert rules.unpack_sessions(text) == doc["sessions"]
