"""The PCOMS alliance rules, one behaviour per test, boundaries included."""

from __future__ import annotations

import math

import pytest

from services.scoring import rules as R
from services.scoring.rules import InstrumentOverride, TenantRules, Unscorable
from shared.events import Instrument, Items

DEFAULT = TenantRules()


def items(relationship: float, goals: float, approach: float, overall: float) -> Items:
    return Items(relationship=relationship, goals=goals, approach=approach, overall=overall)


# --- total -------------------------------------------------------------------------------------


def test_total_is_the_sum_of_the_items() -> None:
    assert R.total_of(items(9.0, 9.5, 8.0, 10.0), None) == 36.5


def test_total_of_items_is_rounded_to_one_decimal_so_float_sums_hit_the_boundary() -> None:
    # 9.1 + 9.1 + 9.1 + 8.6 is 35.900000000000006 in binary floating point
    assert R.total_of(items(9.1, 9.1, 9.1, 8.6), None) == 35.9
    assert R.total_of(items(9.1, 9.1, 9.1, 8.7), None) == 36.0


def test_total_only_entry_uses_the_given_total() -> None:
    assert R.total_of(None, 35.95) == 36.0
    assert R.total_of(None, 28.0) == 28.0


def test_items_win_over_a_given_total() -> None:
    assert R.total_of(items(10, 10, 10, 10), 12.0) == 40.0


def test_no_items_and_no_total_is_unscorable() -> None:
    with pytest.raises(Unscorable, match="neither"):
        R.total_of(None, None)


@pytest.mark.parametrize("bad", [-0.1, 10.1, math.nan, math.inf])
def test_item_out_of_range_is_unscorable(bad: float) -> None:
    with pytest.raises(Unscorable, match=r"items\.goals"):
        R.total_of(items(9, bad, 9, 9), None)


@pytest.mark.parametrize("bad", [-1.0, 40.1, math.nan])
def test_total_out_of_range_is_unscorable(bad: float) -> None:
    with pytest.raises(Unscorable, match="total"):
        R.total_of(None, bad)


def test_extreme_totals_are_scorable() -> None:
    assert R.total_of(None, 0.0) == 0.0
    assert R.total_of(items(10, 10, 10, 10), None) == 40.0


# --- below_cutoff ------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "below"), [(35.9, True), (36.0, False), (36.1, False)])
def test_below_cutoff_default_is_strictly_under_36(total: float, below: bool) -> None:
    assert R.below_cutoff(total, 36.0, "<") is below


@pytest.mark.parametrize(("total", "below"), [(35.9, True), (36.0, True), (36.1, False)])
def test_below_cutoff_with_at_or_under_operator_includes_the_cutoff(total: float, below: bool) -> None:
    assert R.below_cutoff(total, 36.0, "<=") is below


def test_below_cutoff_compares_one_decimal_values() -> None:
    assert R.below_cutoff(35.1 + 0.9, 36.0) is False  # 35.99999999999999... is 36.0 on the form


# --- drop_from_previous -------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "previous", "drop"), [
    (37.0, 38.0, True),    # exactly 1.0
    (37.1, 38.0, False),   # 0.9
    (36.9, 38.0, True),    # 1.1
    (36.1, 37.1, True),    # 1.0 that float subtraction makes 1.0000000000000014
    (35.0, 35.0, False),   # equal totals
    (39.0, 38.0, False),   # a rise
])
def test_drop_from_previous_is_a_fall_of_one_point_or_more(total: float, previous: float, drop: bool) -> None:
    assert R.drop_from_previous(R.change_from_previous(total, previous), 1.0) is drop


def test_first_session_has_no_previous_and_no_drop() -> None:
    assert R.change_from_previous(30.0, None) is None
    assert R.drop_from_previous(None, 1.0) is False


def test_change_is_rounded_and_never_negative_zero() -> None:
    assert R.change_from_previous(36.1, 37.1) == -1.0
    change = R.change_from_previous(35.0, 35.0)
    assert change == 0.0 and math.copysign(1.0, change or 1.0) == 1.0


# --- low_not_improving --------------------------------------------------------------------------


def test_low_not_improving_holds_for_two_low_sessions_with_no_gain() -> None:
    assert R.low_not_improving(34.0, 34.5, 36.0) is True


def test_low_not_improving_holds_for_equal_low_totals() -> None:
    assert R.low_not_improving(33.0, 33.0, 36.0) is True


def test_low_but_improving_is_not_low_not_improving() -> None:
    assert R.low_not_improving(34.1, 34.0, 36.0) is False


def test_low_after_a_session_at_cutoff_is_not_low_not_improving() -> None:
    assert R.low_not_improving(35.0, 36.0, 36.0) is False


def test_low_not_improving_follows_the_operator_for_both_sessions() -> None:
    assert R.low_not_improving(36.0, 36.0, 36.0, "<=") is True
    assert R.low_not_improving(36.0, 36.0, 36.0, "<") is False


def test_first_session_is_never_low_not_improving() -> None:
    assert R.low_not_improving(20.0, None, 36.0) is False


# --- item_below_threshold -----------------------------------------------------------------------


def test_low_items_are_the_items_under_the_threshold() -> None:
    assert R.low_items(items(10, 8.9, 9.0, 3.0), 9.0) == ("goals", "overall")
    assert R.low_items(items(10, 10, 10, 10), 9.0) == ()
    assert R.low_items(None, 9.0) == ()


def test_low_items_follow_a_tenants_item_threshold() -> None:
    assert R.low_items(items(8.0, 8.5, 9.0, 10.0), 8.5) == ("relationship",)


@pytest.mark.parametrize(("low", "flag"), [(8.9, True), (9.0, False), (9.1, False)])
def test_item_below_threshold_is_any_item_strictly_under_9(low: float, flag: bool) -> None:
    assert R.item_below_threshold(items(10, 10, low, 10), 9.0) is flag


def test_total_only_entry_never_has_an_item_below_threshold() -> None:
    assert R.item_below_threshold(None, 9.0) is False


# --- alert decision and severity ----------------------------------------------------------------


def test_single_trigger_on_latest_session_is_a_warning() -> None:
    alert = R.alert_decision([R.BELOW_CUTOFF], None, True, DEFAULT)
    assert alert == R.Alert((R.BELOW_CUTOFF,), "warning")


def test_below_the_cutoff_and_dropped_is_critical() -> None:
    alert = R.alert_decision([R.DROP_FROM_PREVIOUS, R.BELOW_CUTOFF], -1.0, True, DEFAULT)
    assert alert == R.Alert((R.BELOW_CUTOFF, R.DROP_FROM_PREVIOUS), "critical")


def test_two_triggers_alone_are_not_critical_low_and_not_improving_once_is_a_warning() -> None:
    alert = R.alert_decision([R.BELOW_CUTOFF, R.LOW_NOT_IMPROVING], 0.0, True, DEFAULT)
    assert alert == R.Alert((R.BELOW_CUTOFF, R.LOW_NOT_IMPROVING), "warning")


def test_low_and_not_improving_in_this_and_the_previous_session_is_critical() -> None:
    alert = R.alert_decision([R.BELOW_CUTOFF, R.LOW_NOT_IMPROVING], 0.0, True, DEFAULT,
                             previous_low_not_improving=True)
    assert alert is not None and alert.severity == "critical"


def test_previous_low_not_improving_alone_does_not_make_a_rise_critical() -> None:
    alert = R.alert_decision([R.BELOW_CUTOFF], 1.0, True, DEFAULT, previous_low_not_improving=True)
    assert alert == R.Alert((R.BELOW_CUTOFF,), "warning")


@pytest.mark.parametrize(("previous", "total", "severity"), [
    (30.0, 30.0, "warning"), (36.5, 35.4, "critical"), (40.0, 36.5, "critical"), (39.9, 37.0, "warning")])
def test_the_documented_severity_examples(previous: float, total: float, severity: str) -> None:
    s = R.score(total, None, previous, True, DEFAULT)
    assert s.alert is not None and s.alert.severity == severity and s.severity == severity


def test_a_tenants_critical_drop_applies() -> None:
    assert R.alert_decision([R.DROP_FROM_PREVIOUS], -2.0, True, TenantRules(critical_drop=2.0)) == R.Alert(
        (R.DROP_FROM_PREVIOUS,), "critical")


@pytest.mark.parametrize(("change", "severity"), [(-2.9, "warning"), (-3.0, "critical"), (-3.1, "critical")])
def test_a_drop_of_three_or_more_alone_is_critical(change: float, severity: str) -> None:
    alert = R.alert_decision([R.DROP_FROM_PREVIOUS], change, True, DEFAULT)
    assert alert is not None and alert.severity == severity


def test_no_alert_for_a_session_that_is_not_the_latest() -> None:
    assert R.alert_decision([R.BELOW_CUTOFF, R.DROP_FROM_PREVIOUS], -5.0, False, DEFAULT) is None


def test_item_below_threshold_alone_raises_no_alert_by_default() -> None:
    assert R.alert_decision([R.ITEM_BELOW_THRESHOLD], None, True, DEFAULT) is None


def test_item_below_threshold_raises_an_alert_when_a_tenant_makes_it_a_trigger() -> None:
    rules = TenantRules(triggers=frozenset({R.BELOW_CUTOFF, R.ITEM_BELOW_THRESHOLD}))
    assert R.alert_decision([R.ITEM_BELOW_THRESHOLD], None, True, rules) == R.Alert(
        (R.ITEM_BELOW_THRESHOLD,), "warning")


def test_no_flags_no_alert() -> None:
    assert R.alert_decision([], 0.0, True, DEFAULT) is None


# --- score: the rules together ------------------------------------------------------------------


def test_score_of_a_first_high_session_has_no_flags_and_no_alert() -> None:
    s = R.score(38.0, None, None, True, DEFAULT)
    assert (s.flags, s.alert, s.previous_total, s.change_from_previous, s.cutoff) == ((), None, None, None, 36.0)


def test_score_of_a_first_low_session_alerts_on_below_cutoff() -> None:
    s = R.score(35.9, None, None, True, DEFAULT)
    assert s.flags == (R.BELOW_CUTOFF,) and s.alert == R.Alert((R.BELOW_CUTOFF,), "warning")


def test_score_at_exactly_the_cutoff_with_a_drop_of_exactly_one_is_a_drop_warning() -> None:
    s = R.score(36.0, None, 37.0, True, DEFAULT)
    assert s.flags == (R.DROP_FROM_PREVIOUS,) and s.change_from_previous == -1.0
    assert s.alert == R.Alert((R.DROP_FROM_PREVIOUS,), "warning")


def test_score_low_and_not_improving_once_is_a_warning() -> None:
    s = R.score(34.0, None, 34.0, True, DEFAULT)
    assert s.flags == (R.BELOW_CUTOFF, R.LOW_NOT_IMPROVING)
    assert s.alert is not None and s.alert.severity == "warning"


def test_score_low_and_not_improving_after_a_session_where_it_held_is_critical() -> None:
    s = R.score(34.0, None, 34.0, True, DEFAULT, previous_low_not_improving=True)
    assert s.alert is not None and s.alert.severity == "critical"


def test_score_flags_item_below_threshold_without_alerting() -> None:
    s = R.score(37.0, items(10, 10, 8.5, 8.5), 37.0, True, DEFAULT)
    assert s.flags == (R.ITEM_BELOW_THRESHOLD,) and s.alert is None


def test_score_of_an_older_session_keeps_its_flags_but_raises_no_alert() -> None:
    s = R.score(30.0, None, 38.0, False, DEFAULT)
    assert s.flags == (R.BELOW_CUTOFF, R.DROP_FROM_PREVIOUS) and not s.latest and s.alert is None


def test_score_of_an_older_session_shows_the_triggers_and_severity_an_alert_would_have() -> None:
    s = R.score(30.0, None, 38.0, False, DEFAULT)
    assert s.triggers == (R.BELOW_CUTOFF, R.DROP_FROM_PREVIOUS) and s.severity == "critical"


def test_score_names_the_low_items_in_form_order() -> None:
    s = R.score(35.0, items(8.0, 10.0, 8.5, 8.5), None, True, DEFAULT)
    assert s.low_items == ("relationship", "approach", "overall")


def test_score_of_a_total_only_entry_names_no_low_items() -> None:
    assert R.score(20.0, None, None, True, DEFAULT).low_items == ()


@pytest.mark.parametrize("instrument", [Instrument.SRS, Instrument.CSRS, Instrument.GSRS, Instrument.CGSRS])
def test_every_scored_instrument_uses_the_same_default_cutoff(instrument: Instrument) -> None:
    rules = DEFAULT.for_instrument(instrument)
    assert (rules.cutoff, rules.operator, rules.drop) == (36.0, "<", 1.0)


def test_instrument_override_changes_only_that_instrument() -> None:
    rules = TenantRules(cutoff=35.0, instruments={"CSRS": InstrumentOverride(cutoff=32.0, operator="<=")})
    csrs, gsrs = rules.for_instrument(Instrument.CSRS), rules.for_instrument(Instrument.GSRS)
    assert (csrs.cutoff, csrs.operator, csrs.drop) == (32.0, "<=", 1.0)
    assert (gsrs.cutoff, gsrs.operator) == (35.0, "<")
    assert R.score(32.0, None, None, True, csrs).flags == (R.BELOW_CUTOFF,)
    assert R.score(32.0, None, None, True, gsrs).flags == (R.BELOW_CUTOFF,)
    assert R.score(33.0, None, None, True, csrs).flags == ()


def test_tenant_drop_setting_changes_the_drop_rule() -> None:
    rules = TenantRules(drop=2.0)
    assert R.score(37.0, None, 38.5, True, rules).flags == ()
    assert R.score(37.0, None, 39.0, True, rules).flags == (R.DROP_FROM_PREVIOUS,)


# --- tenant rules as data -----------------------------------------------------------------------


def test_rules_document_round_trips() -> None:
    rules = TenantRules(cutoff=34.5, operator="<=", drop=1.5, critical_drop=4.0, item_threshold=8.0,
                        triggers=frozenset({R.BELOW_CUTOFF}), session_gap=5,
                        instruments={"CSRS": InstrumentOverride(cutoff=32.0)})
    assert TenantRules.from_doc(rules.to_doc()) == rules


def test_missing_rules_document_means_defaults() -> None:
    assert TenantRules.from_doc(None) == TenantRules()
    assert TenantRules.from_doc({"cutoff": 30.0}) == TenantRules(cutoff=30.0)


def test_a_rules_document_without_a_session_gap_gets_the_default_of_20() -> None:
    assert TenantRules.from_doc({"cutoff": 30.0}).session_gap == 20


@pytest.mark.parametrize("kwargs", [
    {"cutoff": 41.0}, {"cutoff": -1.0}, {"operator": ">"}, {"drop": 0.0}, {"critical_drop": -1.0},
    {"item_threshold": 11.0}, {"session_gap": 0}, {"session_gap": 100_001},
    {"triggers": frozenset()}, {"triggers": frozenset({"sad"})},
    {"instruments": {"YCSRS": InstrumentOverride(cutoff=30.0)}},
    {"instruments": {"CSRS": InstrumentOverride(operator=">")}},  # type: ignore[arg-type]
])
def test_invalid_rules_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TenantRules(**kwargs)  # type: ignore[arg-type]
