"""A client's series: previous session, latest, corrections, duplicates, YCSRS, replays.

The property tests state precisely what "a shuffled, duplicated replay gives the same final state
and the same set of alerts as the clean, ordered stream" can mean, given that an alert is only
raised for a session that is the client's latest *when it is scored*:

1. Redelivery replay (what Kafka actually does: one client's records stay in order on one
   partition; a crash or rebalance makes a consumer read an already-seen suffix again): the
   final state, every scored outcome and the set of alerts are identical to the clean stream's.
2. Arbitrary shuffle with duplicates: the final state (the current version of every session
   and its total) and the view of every session scored against the full final history are
   identical to the clean stream's; every submission yields exactly one outcome however often
   it is delivered; and an alert is raised exactly for submissions that were the latest version
   of the highest session when first delivered - so a late, older session never alerts.
   The alert *set* itself cannot equal the clean stream's under reordering: the clean stream
   alerts on session 2 of (1: 35, 2: 34), the replay 2, 1 scores session 1 late (no alert).
   `test_a_late_older_session_raises_no_alert_even_though_the_ordered_stream_did` pins that.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scoring import rules as R
from services.scoring.history import History, Outcome, Submission
from services.scoring.rules import TenantRules, Unscorable
from shared.events import Instrument, Items

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 1, 6, 9, 0, tzinfo=UTC)
RULES = TenantRules()


def sub(sid: str, n: int, total: float | None, at: int = 0, instrument: Instrument = Instrument.SRS,
        items: Items | None = None) -> Submission:
    return Submission(sid, n, instrument, T0 + timedelta(seconds=at), items, total)


def feed(h: History, *subs: Submission) -> list[Outcome]:
    return [h.apply(s, RULES, NOW)[0] for s in subs]


def test_first_session_has_no_previous() -> None:
    (o,) = feed(History(), sub("a", 1, 38.0))
    assert (o.previous_total, o.change_from_previous, o.latest, o.flags, o.severity) == (None, None, True, (), None)


def test_previous_is_the_closest_earlier_session_number() -> None:
    h = History()
    *_, o = feed(h, sub("a", 1, 30.0, 1), sub("b", 3, 38.0, 2), sub("c", 5, 36.5, 3))
    assert o.previous_total == 38.0 and o.change_from_previous == -1.5
    assert o.flags == (R.DROP_FROM_PREVIOUS,) and o.severity == "warning"


def test_session_numbers_need_not_be_consecutive() -> None:
    *_, o = feed(History(), sub("a", 2, 37.0, 1), sub("b", 7, 37.0, 2))
    assert o.previous_total == 37.0 and o.latest


def test_backfilled_older_session_is_scored_not_latest_and_raises_no_alert() -> None:
    h = History()
    *_, late = feed(h, sub("a", 1, 38.0, 1), sub("c", 3, 38.0, 2), sub("b", 2, 30.0, 3))
    assert late.previous_total == 38.0 and late.flags == (R.BELOW_CUTOFF, R.DROP_FROM_PREVIOUS)
    assert late.latest is False and late.severity is None


def test_session_after_a_backfill_compares_with_the_backfilled_neighbour() -> None:
    h = History()
    *_, o = feed(h, sub("a", 1, 38.0, 1), sub("c", 3, 38.0, 2), sub("b", 2, 30.0, 3), sub("d", 4, 36.5, 4))
    assert o.previous_total == 38.0 and o.severity == "warning"  # previous of 4 is 3, not the backfilled 2
    h2 = History()
    *_, o2 = feed(h2, sub("a", 1, 38.0, 1), sub("b2", 2, 30.0, 2), sub("c2", 4, 31.0, 3), sub("d2", 3, 30.0, 4))
    assert o2.previous_total == 30.0 and not o2.latest  # late 3 compares with 2


def test_equal_totals_below_cutoff_are_low_not_improving_and_critical() -> None:
    *_, o = feed(History(), sub("a", 1, 34.0, 1), sub("b", 2, 34.0, 2))
    assert o.change_from_previous == 0.0
    assert o.flags == (R.BELOW_CUTOFF, R.LOW_NOT_IMPROVING) and o.severity == "critical"


def test_equal_totals_above_cutoff_raise_nothing() -> None:
    *_, o = feed(History(), sub("a", 1, 38.0, 1), sub("b", 2, 38.0, 2))
    assert o.flags == () and o.severity is None


def test_correction_supersedes_the_earlier_version_and_is_scored_by_the_same_rules() -> None:
    h = History()
    first, corrected = feed(h, sub("a", 1, 38.0, 1), sub("a2", 1, 35.0, 2))
    assert first.severity is None
    assert corrected.latest and corrected.flags == (R.BELOW_CUTOFF,) and corrected.severity == "warning"
    assert h.current()[1].submission_id == "a2"


def test_session_after_a_correction_compares_with_the_corrected_total() -> None:
    h = History()
    *_, o = feed(h, sub("a", 1, 38.0, 1), sub("a2", 1, 37.0, 2), sub("b", 2, 36.5, 3))
    assert o.previous_total == 37.0 and o.flags == ()


def test_stale_version_arriving_after_its_correction_does_not_supersede_it_and_does_not_alert() -> None:
    h = History()
    feed(h, sub("new", 1, 38.0, at=5))
    (stale,) = feed(h, sub("old", 1, 30.0, at=1))
    assert h.current()[1].submission_id == "new"
    assert stale.latest is False and stale.severity is None and stale.flags == (R.BELOW_CUTOFF,)


def test_correction_of_an_older_session_is_not_latest() -> None:
    h = History()
    *_, o = feed(h, sub("a", 1, 38.0, 1), sub("b", 2, 38.0, 2), sub("a2", 1, 30.0, 3))
    assert o.latest is False and o.severity is None


def test_redelivered_submission_returns_the_stored_outcome_and_changes_nothing() -> None:
    h = History()
    first, fresh = h.apply(sub("a", 1, 35.0), RULES, NOW)
    again, fresh_again = h.apply(sub("a", 1, 35.0), RULES, NOW + timedelta(hours=1))
    assert fresh and not fresh_again and again == first
    assert len(h.entries) == 1


def test_redelivery_after_a_rules_change_still_returns_the_first_outcome() -> None:
    h = History()
    first, _ = h.apply(sub("a", 1, 35.0), RULES, NOW)
    again, _ = h.apply(sub("a", 1, 35.0), TenantRules(cutoff=30.0), NOW)
    assert again == first and again.severity == "warning"


def test_total_only_entries_are_scored_without_item_flags() -> None:
    (o,) = feed(History(), sub("a", 1, 37.5))
    assert o.total == 37.5 and o.flags == ()


def test_items_entry_is_scored_from_its_items() -> None:
    it = Items(relationship=9.0, goals=8.9, approach=9.0, overall=9.0)
    (o,) = feed(History(), sub("a", 1, None, items=it))
    assert o.total == 35.9 and o.flags == (R.BELOW_CUTOFF, R.ITEM_BELOW_THRESHOLD)


@pytest.mark.parametrize("instrument", [Instrument.CSRS, Instrument.GSRS, Instrument.CGSRS])
def test_child_and_group_forms_are_scored_like_srs(instrument: Instrument) -> None:
    h = History()
    *_, o = feed(h, sub("a", 1, 38.0, 1, instrument), sub("b", 2, 35.0, 2, instrument))
    assert o.scored and o.flags == (R.BELOW_CUTOFF, R.DROP_FROM_PREVIOUS) and o.severity == "critical"


def test_csrs_override_applies_to_csrs_only() -> None:
    rules = TenantRules(instruments={"CSRS": R.InstrumentOverride(cutoff=32.0)})
    h1, h2 = History(), History()
    csrs, _ = h1.apply(sub("a", 1, 34.0, instrument=Instrument.CSRS), rules, NOW)
    srs, _ = h2.apply(sub("b", 1, 34.0, instrument=Instrument.SRS), rules, NOW)
    assert (csrs.cutoff, csrs.flags) == (32.0, ())
    assert (srs.cutoff, srs.flags) == (36.0, (R.BELOW_CUTOFF,))


def test_ycsrs_is_stored_for_audit_but_never_scored() -> None:
    h = History()
    (o,) = feed(h, sub("y", 1, 20.0, instrument=Instrument.YCSRS))
    assert o.scored is False and o.severity is None and o.flags == () and o.total == 20.0
    assert "y" in h.entries


def test_ycsrs_without_a_total_is_still_stored() -> None:
    h = History()
    (o,) = feed(h, sub("y", 1, None, instrument=Instrument.YCSRS))
    assert o.scored is False and o.total is None and "y" in h.entries


def test_unscorable_submission_is_not_stored() -> None:
    h = History()
    with pytest.raises(Unscorable):
        h.apply(sub("x", 1, None), RULES, NOW)
    assert h.entries == {} and h.outcomes == {}


def test_a_late_older_session_raises_no_alert_even_though_the_ordered_stream_did() -> None:
    ordered, shuffled = History(), History()
    one, two = sub("a", 1, 35.0, 1), sub("b", 2, 34.0, 2)
    feed(ordered, one, two)
    feed(shuffled, two, one)
    alerts = {sid for sid, o in ordered.outcomes.items() if o.severity}
    assert alerts == {"a", "b"}
    assert {sid for sid, o in shuffled.outcomes.items() if o.severity} == {"b"}
    assert ordered.current() == shuffled.current()


# --- property tests -----------------------------------------------------------------------------

TOTALS = st.integers(min_value=200, max_value=400).map(lambda x: x / 10)


@st.composite
def clean_streams(draw: st.DrawFn) -> list[Submission]:
    """A client's sessions in intake's acceptance order: numbers ascend (with gaps); some
    sessions get corrections, accepted some time after their original."""
    numbers = sorted(draw(st.sets(st.integers(min_value=1, max_value=30), min_size=1, max_size=8)))
    order: list[tuple[int, int]] = [(n, 0) for n in numbers]  # (session, version)
    for i, n in enumerate(numbers):
        for v in range(1, draw(st.integers(min_value=0, max_value=2)) + 1):
            pos = draw(st.integers(min_value=i + 1, max_value=len(order)))
            order.insert(pos, (n, v))
    # versions of one session must stay in their relative order (a correction follows its original)
    seen: dict[int, int] = {}
    fixed: list[tuple[int, int]] = []
    for n, _v in order:
        fixed.append((n, seen.get(n, 0)))
        seen[n] = seen.get(n, 0) + 1
    return [sub(f"s{n}v{v}", n, draw(TOTALS), at=i) for i, (n, v) in enumerate(fixed)]


def run(stream: list[Submission], tick: bool = True) -> tuple[History, list[tuple[str, Outcome]]]:
    h, out = History(), []
    for i, s in enumerate(stream):
        now = NOW + timedelta(seconds=i) if tick else NOW
        out.append((s.submission_id, h.apply(s, RULES, now)[0]))
    return h, out


def without_time(o: Outcome) -> Outcome:
    return replace(o, scored_at=NOW)


def one_outcome_per_submission(deliveries: list[tuple[str, Outcome]]) -> dict[str, Outcome]:
    by: dict[str, set[Outcome]] = {}
    for sid, o in deliveries:
        by.setdefault(sid, set()).add(o)
    assert all(len(v) == 1 for v in by.values()), "a submission yielded two different outcomes"
    return {sid: next(iter(v)) for sid, v in by.items()}


def alerts(outcomes: dict[str, Outcome]) -> dict[str, tuple[tuple[str, ...], str | None, float | None]]:
    return {sid: (o.triggers, o.severity, o.previous_total) for sid, o in outcomes.items() if o.severity}


@st.composite
def redelivered(draw: st.DrawFn, clean: list[Submission]) -> list[Submission]:
    """The clean stream, with already-seen suffixes read again (crash/rebalance rewinds)."""
    out: list[Submission] = []
    for i, s in enumerate(clean):
        out.append(s)
        if draw(st.booleans()):
            start = draw(st.integers(min_value=0, max_value=i))
            out.extend(clean[start : i + 1])
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_redelivery_replay_gives_the_same_state_outcomes_and_alerts_as_the_clean_stream(data: st.DataObject) -> None:
    clean = data.draw(clean_streams())
    replay = data.draw(redelivered(clean))
    h_clean, d_clean = run(clean)
    h_replay, d_replay = run(replay)
    clean_out, replay_out = one_outcome_per_submission(d_clean), one_outcome_per_submission(d_replay)
    assert h_replay.current() == h_clean.current()
    assert {k: without_time(v) for k, v in replay_out.items()} == {k: without_time(v) for k, v in clean_out.items()}
    assert alerts(replay_out) == alerts(clean_out)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_shuffled_duplicated_replay_gives_the_same_final_state_and_one_outcome_per_submission(
        data: st.DataObject) -> None:
    clean = data.draw(clean_streams())
    dups = data.draw(st.lists(st.sampled_from(clean), max_size=len(clean) * 2))
    replay = data.draw(st.permutations(clean + dups))
    h_clean, _ = run(clean)
    h_replay, d_replay = run(replay)
    outcomes = one_outcome_per_submission(d_replay)
    # the final state and the trajectory view over it do not depend on arrival order
    assert h_replay.current() == h_clean.current()
    assert h_replay.view(RULES, Instrument.SRS) == h_clean.view(RULES, Instrument.SRS)
    assert set(outcomes) == {s.submission_id for s in clean}
    # Oracle, per first delivery: the submission is scored against what had arrived before it,
    # it is latest iff it is the newest version of the highest session so far, and it alerts iff
    # it is latest and a trigger holds; later deliveries return that same outcome (checked above).
    delivered: set[str] = set()
    newest: dict[int, Submission] = {}
    for s in replay:
        if s.submission_id in delivered:
            continue
        delivered.add(s.submission_id)
        have = newest.get(s.session_number)
        is_newest = have is None or s.order() > have.order()
        latest = is_newest and all(n <= s.session_number for n in newest)
        earlier = [n for n in newest if n < s.session_number]
        prev = newest[max(earlier)].total if earlier else None
        assert s.total is not None
        expected = R.score(s.total, None, prev, latest, RULES)
        o = outcomes[s.submission_id]
        assert (o.latest, o.previous_total, o.flags) == (latest, prev, expected.flags)
        assert (o.severity, o.triggers) == ((expected.alert.severity, expected.alert.triggers)
                                            if expected.alert else (None, ()))
        if is_newest:
            newest[s.session_number] = s
