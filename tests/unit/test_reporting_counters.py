"""What one record contributes to the incremental indices (rules.contribution) and how a change
moves them (rules.diff): pure functions, no store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from services.reporting import rules
from shared.events import SrsScored
from tools.demo import BASE, revised, scored, transferred

T = "acme"


def record(*events: SrsScored, existing: rules.Doc | None = None) -> rules.Doc:
    doc = rules.merge(existing, list(events)).doc
    assert doc is not None
    return doc


def current(share: rules.Counters) -> dict[rules.CounterKey, dict[str, int]]:
    return {k: v for k, v in share.items() if k[4] == rules.CURRENT}


def test_a_record_counts_its_current_episode_under_its_site_clinician_and_instrument() -> None:
    doc = record(scored(T, "a", 1, 30.0), scored(T, "a", 2, 37.5, administered_at=BASE + timedelta(days=7)))
    assert current(rules.contribution(doc)) == {(T, "north", "c-1", "SRS", rules.CURRENT): {
        "records": 1, "sessions": 2, "below": 1, "first": 3000, "latest": 3750, "at_risk": 0}}


def test_an_empty_record_contributes_nothing() -> None:
    assert rules.contribution({}) == {}


def test_sessions_count_in_the_utc_month_they_were_administered() -> None:
    doc = record(scored(T, "a", 1, 30.0, administered_at=BASE.replace(month=3, day=31, hour=23)),
                 scored(T, "a", 2, 38.0, administered_at=BASE.replace(month=4, day=2)))
    months = {k[4]: v for k, v in rules.contribution(doc).items() if k[4]}
    y = BASE.year
    assert months[f"{y}-03"] == {"sessions": 1, "below": 1, "clients": 1}
    assert months[f"{y}-04"] == {"sessions": 1, "below": 0, "clients": 1, "episodes": 1, "change": 800}


def test_a_session_given_with_an_offset_counts_in_its_utc_month_also_at_a_year_end() -> None:
    # 00:30 on 1 December in Paris is still November in UTC; 20:00 on 31 December in New York is
    # already January of the next year.
    paris, new_york = timezone(timedelta(hours=1)), timezone(timedelta(hours=-5))
    doc = record(scored(T, "a", 1, 30.0, administered_at=datetime(2026, 12, 1, 0, 30, tzinfo=paris)),
                 scored(T, "a", 2, 38.0, administered_at=datetime(2026, 12, 31, 20, 0, tzinfo=new_york)))
    months = {k[4]: v["sessions"] for k, v in rules.contribution(doc).items() if k[4]}
    assert months == {"2026-11": 1, "2027-01": 1}
    assert rules.month_of(datetime(2027, 1, 1, 0, 0, tzinfo=UTC)) == "2027-01"


def test_a_correction_moves_only_what_it_changed() -> None:
    first = scored(T, "a", 1, 38.0)
    old = record(first)
    new = record(revised(first, total=30.0), existing=old)
    moves = current(rules.diff(rules.contribution(old), rules.contribution(new)))
    assert moves == {(T, "north", "c-1", "SRS", rules.CURRENT): {
        "below": 1, "first": -800, "latest": -800, "at_risk": 1}}


def test_a_transfer_takes_the_whole_share_from_the_old_site_to_the_new() -> None:
    sessions = [scored(T, "a", 1, 38.0), scored(T, "a", 2, 39.0, administered_at=BASE + timedelta(days=7))]
    old = record(*sessions)
    new = record(*transferred(sessions, "south"), existing=old)
    moves = current(rules.diff(rules.contribution(old), rules.contribution(new)))
    assert moves[(T, "north", "c-1", "SRS", rules.CURRENT)]["records"] == -1
    assert moves[(T, "south", "c-1", "SRS", rules.CURRENT)]["records"] == 1


def test_an_episode_restart_counts_only_the_new_episode_as_current() -> None:
    old = record(scored(T, "a", 1, 30.0, episode_id="e1"), scored(T, "a", 2, 32.0, episode_id="e1",
                                                                 administered_at=BASE + timedelta(days=7)))
    new = record(scored(T, "a", 1, 39.0, episode_id="e2", administered_at=BASE + timedelta(days=60)), existing=old)
    (share,) = current(rules.contribution(new)).values()
    assert (share["sessions"], share["first"], share["at_risk"]) == (1, 3900, 0)


totals = st.lists(st.sampled_from([30.0, 35.5, 36.0, 38.0, 39.9]), min_size=0, max_size=4)


@given(a=totals, b=totals)
def test_applying_the_diff_to_the_old_share_gives_the_new_share(a: list[float], b: list[float]) -> None:
    def share(ts: list[float]) -> rules.Counters:
        if not ts:
            return {}
        return rules.contribution(record(*[scored(T, "a", n + 1, t, administered_at=BASE + timedelta(days=9 * n))
                                           for n, t in enumerate(ts)]))
    old, new = share(a), share(b)
    assert rules.total_counters([old, rules.diff(old, new)]) == rules.total_counters([new])


def test_months_between_spans_year_ends() -> None:
    assert rules.months_between("2025-11", "2026-02") == ["2025-11", "2025-12", "2026-01", "2026-02"]
    assert rules.months_between("2026-02", "2026-01") == []
