"""The outcome rules (docs/outcome.md) at every boundary, against an oracle written here.

The oracle counts in whole tenths of a point (as the form is read: one decimal), shares no code
with services/scoring/outcome.py, and states each rule the way the contract does.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scoring import outcome as O
from services.scoring.cli import change_outcome_rules
from services.scoring.rules import OutcomeRules, TenantRules, Unscorable, total_of
from shared.events import ORS_ITEM_NAMES, AgeBand, OrsItems, Severity

DEFAULTS = OutcomeRules()


# --- the oracle --------------------------------------------------------------------------------


def tenths(x: float) -> int:
    return round(x * 10)


@dataclass(frozen=True)
class Expected:
    band: str
    cutoff: float | None
    change_from_intake: float | None
    change: str | None
    significant: bool
    in_range: bool | None
    flags: tuple[str, ...]
    alert: str | None  # the severity of the alert the session holds when latest


def oracle(instrument: str, age: int | None, total: float, intake: float | None, number: int,
           warn_at: int = 3, critical_at: int = 6, rci: float = 5.0,
           cutoffs: tuple[float, float, float] = (25.0, 28.0, 32.0)) -> Expected:
    if instrument == "YCORS":
        return Expected("young_child", None, None, None, False, None, (), None)
    if instrument == "CORS":
        band, cutoff = "child", cutoffs[2]
    elif age is not None and 13 <= age <= 17:
        band, cutoff = "adolescent", cutoffs[1]
    else:
        band, cutoff = "adult", cutoffs[0]
    t, c = tenths(total), tenths(cutoff)
    i = t if intake is None else tenths(intake)
    delta = t - i
    if delta >= tenths(rci):
        change = "reliable_improvement"
    elif delta <= -tenths(rci):
        change = "reliable_deterioration"
    else:
        change = "no_reliable_change"
    significant = change == "reliable_improvement" and i < c <= t
    off_track = change != "reliable_improvement" and number >= warn_at
    flags = tuple(f for f, holds in (("in_clinical_range", t < c), (change, True),
                                     ("clinically_significant_improvement", significant),
                                     ("not_on_track", off_track)) if holds)
    alert = None
    if change == "reliable_deterioration" or (off_track and number >= critical_at):
        alert = "critical"
    elif off_track:
        alert = "warning"
    return Expected(band, cutoff, delta / 10, change, significant, t < c, flags, alert)


def actual(instrument: str, age: int | None, total: float, intake: float | None, number: int,
           rules: OutcomeRules = DEFAULTS, previous: float | None = None) -> Expected:
    s = O.score_outcome(instrument, age, total, intake, previous, number, True, rules)
    return Expected(s.age_band.value, s.cutoff, s.change_from_intake, None if s.change is None else s.change.value,
                    s.clinically_significant_improvement, s.in_clinical_range, tuple(s.flags),
                    None if s.severity is None else s.severity.value)


def check(instrument: str, age: int | None, total: float, intake: float | None, number: int = 1) -> Expected:
    got = actual(instrument, age, total, intake, number)
    assert got == oracle(instrument, age, total, intake, number)
    return got


# --- age bands and cutoffs ----------------------------------------------------------------------


@pytest.mark.parametrize(("instrument", "age", "band"), [
    ("ORS", None, AgeBand.ADULT), ("ORS", 18, AgeBand.ADULT), ("ORS", 17, AgeBand.ADOLESCENT),
    ("ORS", 13, AgeBand.ADOLESCENT), ("ORS", 12, AgeBand.ADULT), ("CORS", 9, AgeBand.CHILD),
    ("CORS", None, AgeBand.CHILD), ("YCORS", 4, AgeBand.YOUNG_CHILD),
])
def test_the_age_band_comes_from_the_instrument_and_for_the_ors_from_the_age(instrument: str, age: int | None,
                                                                             band: AgeBand) -> None:
    assert O.age_band(instrument, age) is band


@pytest.mark.parametrize(("instrument", "age", "cutoff"), [("ORS", 40, 25.0), ("ORS", 15, 28.0), ("CORS", 8, 32.0)])
def test_a_total_just_under_the_bands_cutoff_is_in_the_clinical_range(instrument: str, age: int,
                                                                      cutoff: float) -> None:
    assert check(instrument, age, cutoff - 0.1, None).in_range is True


@pytest.mark.parametrize(("instrument", "age", "cutoff"), [("ORS", 40, 25.0), ("ORS", 15, 28.0), ("CORS", 8, 32.0)])
def test_a_total_at_the_bands_cutoff_is_not_in_the_clinical_range(instrument: str, age: int, cutoff: float) -> None:
    got = check(instrument, age, cutoff, None)
    assert got.in_range is False and got.cutoff == cutoff


def test_an_adolescents_26_is_in_the_clinical_range_an_adults_is_not() -> None:
    assert check("ORS", 16, 26.0, None).in_range is True
    assert check("ORS", 30, 26.0, None).in_range is False


def test_a_total_that_rounds_to_the_cutoff_is_at_it() -> None:
    assert check("ORS", None, 24.96, None).in_range is False


def test_a_ycors_is_not_scored() -> None:
    s = O.score_outcome("YCORS", 4, 12.0, 30.0, 25.0, 8, True, DEFAULTS)
    assert (s.cutoff, s.change, s.flags, s.triggers, s.alert, s.in_clinical_range) == (None, None, [], [], False, None)


# --- reliable change ------------------------------------------------------------------------------


def test_the_first_session_is_its_own_intake_no_change_and_no_reliable_change() -> None:
    got = check("ORS", None, 12.0, None)
    assert (got.change_from_intake, got.change) == (0.0, "no_reliable_change")


def test_a_rise_of_exactly_five_from_intake_is_a_reliable_improvement() -> None:
    assert check("ORS", None, 30.0, 25.0, 2).change == "reliable_improvement"


def test_a_rise_of_4_9_is_no_reliable_change() -> None:
    assert check("ORS", None, 29.9, 25.0, 2).change == "no_reliable_change"


def test_a_fall_of_exactly_five_from_intake_is_a_reliable_deterioration_and_critical() -> None:
    got = check("ORS", None, 15.0, 20.0, 2)
    assert (got.change, got.alert) == ("reliable_deterioration", "critical")


def test_a_fall_of_4_9_is_no_reliable_change_and_no_alert_before_session_3() -> None:
    got = check("ORS", None, 15.1, 20.0, 2)
    assert (got.change, got.alert) == ("no_reliable_change", None)


def test_float_noise_does_not_move_a_change_across_the_index() -> None:
    # 20.3 - 15.3 is 4.999999999999998 in binary floating point: read as the form reads it, 5.0.
    assert check("ORS", None, 20.3, 15.3, 2).change == "reliable_improvement"


def test_the_change_from_intake_and_from_the_previous_session_are_both_given() -> None:
    s = O.score_outcome("ORS", None, 22.0, 15.0, 24.5, 3, True, DEFAULTS)
    assert (s.intake_total, s.change_from_intake, s.previous_total, s.change_from_previous) == (15.0, 7.0, 24.5, -2.5)


# --- clinically significant improvement --------------------------------------------------------


def test_a_reliable_improvement_crossing_the_cutoff_from_below_is_clinically_significant() -> None:
    assert check("ORS", None, 25.0, 20.0, 2).significant is True


def test_a_reliable_improvement_ending_just_under_the_cutoff_is_not_clinically_significant() -> None:
    assert check("ORS", None, 24.9, 19.9, 2).significant is False


def test_a_reliable_improvement_from_an_intake_at_the_cutoff_is_not_clinically_significant() -> None:
    assert check("ORS", None, 30.0, 25.0, 2).significant is False


def test_crossing_the_cutoff_by_less_than_the_index_is_not_clinically_significant() -> None:
    assert check("ORS", None, 26.0, 24.0, 2).significant is False


def test_the_adolescent_cutoff_decides_an_adolescents_clinical_significance() -> None:
    assert check("ORS", 15, 27.0, 20.0, 2).significant is False  # an adult's 27 would cross 25
    assert check("ORS", 15, 28.0, 20.0, 2).significant is True


# --- not on track ------------------------------------------------------------------------------------


def test_no_reliable_improvement_at_session_2_is_on_track() -> None:
    assert check("ORS", None, 20.0, 20.0, 2).alert is None


def test_no_reliable_improvement_at_session_3_is_a_not_on_track_warning() -> None:
    got = check("ORS", None, 20.0, 20.0, 3)
    assert "not_on_track" in got.flags and got.alert == "warning"


def test_no_reliable_improvement_at_session_5_is_still_a_warning_at_6_critical() -> None:
    assert check("ORS", None, 22.0, 20.0, 5).alert == "warning"
    assert check("ORS", None, 22.0, 20.0, 6).alert == "critical"


def test_a_reliable_improvement_at_session_6_is_on_track() -> None:
    got = check("ORS", None, 25.0, 20.0, 6)
    assert "not_on_track" not in got.flags and got.alert is None


def test_a_reliable_deterioration_at_session_3_is_both_triggers_and_critical() -> None:
    s = O.score_outcome("ORS", None, 14.0, 20.0, 18.0, 3, True, DEFAULTS)
    assert s.triggers == ["reliable_deterioration", "not_on_track"] and s.severity is Severity.CRITICAL


def test_a_session_that_is_not_the_latest_keeps_its_flags_but_holds_no_alert() -> None:
    s = O.score_outcome("ORS", None, 14.0, 20.0, 18.0, 3, False, DEFAULTS)
    assert s.triggers and s.severity is Severity.CRITICAL and s.alert is False


def test_flags_come_in_the_contracts_order() -> None:
    s = O.score_outcome("ORS", None, 14.0, 20.0, 18.0, 3, True, DEFAULTS)
    assert s.flags == ["in_clinical_range", "reliable_deterioration", "not_on_track"]


def test_the_advice_for_a_deterioration_and_for_a_late_not_on_track_asks_to_consider_a_change() -> None:
    assert "consider changing the approach or a referral" in O.advice(["reliable_deterioration"], "critical")
    assert "consider changing the approach or a referral" in O.advice(["not_on_track"], Severity.CRITICAL)
    assert "consider changing" not in O.advice(["not_on_track"], Severity.WARNING)


# --- the tenant's settings -------------------------------------------------------------------------


def test_a_tenants_own_index_and_sessions_apply() -> None:
    rules = OutcomeRules(reliable_change=3.0, not_on_track_warning_session=2, not_on_track_critical_session=4)
    got = actual("ORS", None, 23.0, 20.0, 2, rules)
    assert got == oracle("ORS", None, 23.0, 20.0, 2, warn_at=2, critical_at=4, rci=3.0)
    assert got.change == "reliable_improvement"
    assert actual("ORS", None, 22.0, 20.0, 4, rules).alert == "critical"


def test_a_tenants_own_cutoffs_apply_per_band() -> None:
    rules = OutcomeRules(adult_cutoff=20.0, adolescent_cutoff=22.0, child_cutoff=24.0)
    for instrument, age in (("ORS", 30), ("ORS", 14), ("CORS", 8)):
        assert actual(instrument, age, 21.0, None, 1, rules) == oracle(instrument, age, 21.0, None, 1,
                                                                       cutoffs=(20.0, 22.0, 24.0))


def test_the_outcome_rules_are_kept_per_instrument_and_survive_the_store() -> None:
    rules = TenantRules(outcome={"CORS": OutcomeRules(child_cutoff=30.0)})
    assert rules.outcome_for("ORS") == OutcomeRules() and rules.outcome_for("CORS").child_cutoff == 30.0
    assert TenantRules.from_doc(rules.to_doc()) == rules


def test_rules_stored_before_the_ors_existed_read_as_the_defaults() -> None:
    old = {"cutoff": 34.0, "operator": "<", "drop": 1.0, "instruments": {}}
    assert TenantRules.from_doc(old).outcome == TenantRules().outcome


def test_a_critical_session_before_the_warning_session_is_refused() -> None:
    with pytest.raises(ValueError, match="not_on_track_critical_session"):
        OutcomeRules(not_on_track_warning_session=5, not_on_track_critical_session=4)


def test_an_index_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="reliable_change"):
        OutcomeRules(reliable_change=0.0)


def test_outcome_rules_for_an_unscored_instrument_are_refused() -> None:
    with pytest.raises(ValueError, match="YCORS"):
        TenantRules(outcome={"YCORS": OutcomeRules()})


def test_set_rules_changes_one_outcome_instrument_or_both() -> None:
    one = change_outcome_rules(TenantRules(), "CORS", child_cutoff=30.0)
    assert one.outcome_for("CORS").child_cutoff == 30.0 and one.outcome_for("ORS") == OutcomeRules()
    both = change_outcome_rules(one, reliable_change=6.0)
    assert {both.outcome_for(i).reliable_change for i in ("ORS", "CORS")} == {6.0}
    assert both.outcome_for("CORS").child_cutoff == 30.0
    assert change_outcome_rules(both, "CORS", reset=True).outcome_for("CORS") == OutcomeRules()


def test_set_rules_refuses_outcome_rules_for_the_ycors() -> None:
    with pytest.raises(ValueError, match="YCORS"):
        change_outcome_rules(TenantRules(), "YCORS", reliable_change=6.0)


# --- totals ---------------------------------------------------------------------------------------


def test_the_total_is_the_sum_of_the_ors_items() -> None:
    items = OrsItems(individually=5.1, interpersonally=6.2, socially=7.3, overall=8.4)
    assert total_of(items, None, ORS_ITEM_NAMES) == 27.0


def test_an_ors_item_out_of_range_is_named_by_its_ors_name() -> None:
    items = OrsItems(individually=5.0, interpersonally=11.0, socially=7.0, overall=8.0)
    with pytest.raises(Unscorable, match=r"items\.interpersonally"):
        total_of(items, None, ORS_ITEM_NAMES)


# --- every combination, against the oracle ------------------------------------------------------------


@given(instrument=st.sampled_from(["ORS", "CORS", "YCORS"]), age=st.none() | st.integers(0, 90),
       total=st.integers(0, 400), intake=st.none() | st.integers(0, 400), number=st.integers(1, 12))
def test_every_session_scores_as_the_oracle_says(instrument: str, age: int | None, total: int, intake: int | None,
                                                 number: int) -> None:
    t, i = total / 10, None if intake is None else intake / 10
    assert actual(instrument, age, t, i, number) == oracle(instrument, age, t, i, number)

