"""How `alliance tenants set-rules` options change a tenant's rules (the store round trip is in
tests/integration/test_scoring_store.py)."""

from __future__ import annotations

import pytest

from services.scoring.cli import change_rules
from services.scoring.rules import InstrumentOverride, TenantRules


def test_only_the_given_options_change() -> None:
    new = change_rules(TenantRules(drop=2.0), cutoff=35.0)
    assert (new.cutoff, new.operator, new.drop) == (35.0, "<", 2.0)


def test_operator_can_be_at_or_under() -> None:
    assert change_rules(TenantRules(), operator="<=").operator == "<="


def test_unknown_operator_is_refused() -> None:
    with pytest.raises(ValueError, match="operator"):
        change_rules(TenantRules(), operator=">")


def test_out_of_range_cutoff_is_refused() -> None:
    with pytest.raises(ValueError, match="cutoff"):
        change_rules(TenantRules(), cutoff=400.0)


def test_instrument_option_sets_an_override_and_keeps_the_tenant_default() -> None:
    new = change_rules(TenantRules(), cutoff=32.0, instrument="CSRS")
    assert new.cutoff == 36.0 and new.instruments == {"CSRS": InstrumentOverride(cutoff=32.0)}
    newer = change_rules(new, operator="<=", instrument="CSRS")
    assert newer.instruments == {"CSRS": InstrumentOverride(cutoff=32.0, operator="<=")}


def test_ycsrs_cannot_get_rules() -> None:
    with pytest.raises(ValueError, match="YCSRS"):
        change_rules(TenantRules(), cutoff=30.0, instrument="YCSRS")


def test_reset_with_instrument_removes_only_that_override() -> None:
    rules = TenantRules(cutoff=34.0, instruments={"CSRS": InstrumentOverride(cutoff=32.0),
                                                  "GSRS": InstrumentOverride(cutoff=33.0)})
    new = change_rules(rules, instrument="CSRS", reset=True)
    assert new.cutoff == 34.0 and set(new.instruments) == {"GSRS"}


def test_reset_restores_tenant_defaults_but_keeps_instrument_overrides() -> None:
    rules = TenantRules(cutoff=34.0, drop=3.0, instruments={"CSRS": InstrumentOverride(cutoff=32.0)})
    new = change_rules(rules, reset=True)
    assert (new.cutoff, new.drop) == (36.0, 1.0) and "CSRS" in new.instruments


def test_tenant_wide_settings_are_refused_with_instrument() -> None:
    with pytest.raises(ValueError, match="all instruments"):
        change_rules(TenantRules(), instrument="CSRS", critical_drop=4.0)


def test_triggers_can_include_item_below_threshold() -> None:
    new = change_rules(TenantRules(), triggers=["below_cutoff", "item_below_threshold"])
    assert new.triggers == frozenset({"below_cutoff", "item_below_threshold"})


def test_session_gap_is_a_tenant_wide_setting() -> None:
    assert change_rules(TenantRules(), session_gap=5).session_gap == 5
    with pytest.raises(ValueError, match="--session-gap"):
        change_rules(TenantRules(), session_gap=5, instrument="SRS")


def test_a_session_gap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="session_gap"):
        change_rules(TenantRules(), session_gap=0)


def test_the_record_caps_are_tenant_wide_settings() -> None:
    new = change_rules(TenantRules(), max_episode_sessions=100, max_client_submissions=1000)
    assert (new.max_episode_sessions, new.max_client_submissions) == (100, 1000)
    assert TenantRules.from_doc(new.to_doc()) == new
    with pytest.raises(ValueError, match="--max-episode-sessions"):
        change_rules(TenantRules(), max_episode_sessions=100, instrument="SRS")


def test_a_client_cap_that_would_let_a_record_near_the_document_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="max_client_submissions must be between 1 and 10000"):
        change_rules(TenantRules(), max_client_submissions=50_000)
