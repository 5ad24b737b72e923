"""The submission rules as pure functions: every rule names its field, and a valid submission
becomes exactly the `srs.submitted.v1` event the contract describes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.intake.models import check_submission, claimed_submission_id, outgoing, to_event
from shared import ids
from shared.events import OrsSubmitted, SrsSubmitted
from tests.support.bodies import changed

NOW = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)
ITEMS = {"relationship": 9.1, "goals": 8.4, "approach": 9.0, "overall": 8.8}


def sub(**over: Any) -> dict[str, Any]:
    return changed({"client_id": "p-1", "clinician_id": "c-17", "site_id": "north", "session_number": 3,
                    "administered_at": "2026-11-25T14:05:00+01:00", "items": dict(ITEMS)}, **over)


def fields(data: Any, **kw: Any) -> set[str | None]:
    model, errors = check_submission(data, NOW, **kw)
    assert model is None
    return {f for f, _ in errors}


def test_a_valid_submission_passes_with_defaults() -> None:
    model, errors = check_submission(sub(), NOW)
    assert errors == [] and model is not None
    assert model.instrument == "SRS" and model.submission_id is None and model.episode_id is None


@pytest.mark.parametrize("value", [0, 0.0, 10, 10.0, 5.5, 0.1, 9.9])
def test_items_on_the_scale_to_one_decimal_pass(value: float) -> None:
    assert check_submission(sub(items={**ITEMS, "goals": value}), NOW)[1] == []


@pytest.mark.parametrize("value", [-0.1, 10.1, 100, 8.45, 0.05, "8", None, True, [8], float("inf")])
def test_items_off_the_scale_or_with_more_decimals_fail_on_that_item(value: Any) -> None:
    assert fields(sub(items={**ITEMS, "goals": value})) == {"items.goals"}


@pytest.mark.parametrize(("value", "ok"), [(0, True), (40, True), (36.5, True), (40.1, False), (-1, False),
                                           (30.25, False), ("30", False)])
def test_total_is_0_to_40_with_one_decimal(value: Any, ok: bool) -> None:
    model, errors = check_submission(sub(items=..., total=value), NOW)
    assert (model is not None) is ok
    if not ok:
        assert {f for f, _ in errors} == {"total"}


def test_items_and_total_together_fail_on_total() -> None:
    _, errors = check_submission(sub(total=35.0), NOW)
    assert errors == [("total", "give either all four items or a total, not both")]


@pytest.mark.parametrize("instrument", [{"ORS": 1}, ["ORS"], 3, True])
def test_an_instrument_that_is_not_a_string_fails_on_instrument(instrument: Any) -> None:
    model, errors = check_submission(sub(instrument=instrument), NOW)
    assert model is None and [field for field, _ in errors] == ["instrument"]


def test_neither_items_nor_total_fails_on_items() -> None:
    _, errors = check_submission(sub(items=...), NOW)
    assert errors == [("items", "either items (all four) or a total is required")]


def test_null_total_counts_as_absent() -> None:
    assert check_submission(sub(total=None), NOW)[1] == []


def test_partial_items_name_each_missing_item() -> None:
    _, errors = check_submission(sub(items={"relationship": 9.0, "goals": 8.0}), NOW)
    partial = "partial items: all four of relationship, goals, approach, overall are required"
    assert errors == [("items.approach", partial), ("items.overall", partial)]


def test_unknown_fields_fail_at_any_level() -> None:
    assert fields(sub(tenant_id="x", items={**ITEMS, "mood": 3})) == {"tenant_id", "items.mood"}


@pytest.mark.parametrize("instrument", ["SRS", "CSRS", "GSRS", "CGSRS", "YCSRS"])
def test_every_instrument_of_the_family_is_accepted(instrument: str) -> None:
    assert check_submission(sub(instrument=instrument), NOW)[1] == []


@pytest.mark.parametrize("instrument", ["XRS", "srs", "ors", "", 1])
def test_unknown_instruments_fail(instrument: Any) -> None:
    assert fields(sub(instrument=instrument)) == {"instrument"}


def test_an_unknown_instrument_is_told_every_instrument_of_both_scales() -> None:
    _, errors = check_submission(sub(instrument="XRS"), NOW)
    assert errors == [("instrument", "Input should be one of 'SRS', 'CSRS', 'GSRS', 'CGSRS', 'YCSRS', 'ORS', "
                                     "'CORS', 'YCORS'")]


@pytest.mark.parametrize(("value", "ok"), [(1, True), (100_000, True), (0, False), (-3, False), (100_001, False),
                                           (2.0, False), ("3", False), (True, False)])
def test_session_number_is_an_integer_of_at_least_1(value: Any, ok: bool) -> None:
    assert (check_submission(sub(session_number=value), NOW)[0] is not None) is ok


@pytest.mark.parametrize(("value", "ok"), [
    ("2026-11-25T14:05:00+00:00", True),
    ("2026-11-25T14:05:00Z", True),
    ("2026-11-26T14:59:59+00:00", True),   # 23:59:59 ahead: clock skew is tolerated
    ("2026-11-26T15:00:01+00:00", False),  # more than a day ahead
    ("2026-11-26T23:00:00+09:00", True),   # = 14:00 UTC the next day
    ("2026-11-25T14:05:00", False),        # no offset
    ("2026-11-25", False),
    ("1969-12-31T23:59:59+00:00", False),
    ("0001-01-01T00:00:00+05:00", False),
    ("9999-12-31T23:59:59-05:00", False),
    (1764079500, False),                   # a number is not a timestamp with an offset
    ("now", False),
])
def test_administered_at_needs_an_offset_and_at_most_a_day_ahead(value: Any, ok: bool) -> None:
    model, errors = check_submission(sub(administered_at=value), NOW)
    assert (model is not None) is ok, errors
    if not ok:
        assert {f for f, _ in errors} == {"administered_at"}


def test_the_future_bound_is_configurable() -> None:
    late = (NOW + timedelta(hours=2)).isoformat()
    assert check_submission(sub(administered_at=late), NOW, max_future=timedelta(hours=3))[1] == []
    _, errors = check_submission(sub(administered_at=late), NOW, max_future=timedelta(hours=1))
    assert errors == [("administered_at", "must not be more than 3600 seconds in the future")]


@pytest.mark.parametrize("name", ["submission_id", "client_id", "clinician_id", "site_id", "episode_id"])
@pytest.mark.parametrize("value", ["", "x" * 129, "a b", "a/b", "é", "a\nb", 12])
def test_ids_must_be_1_to_128_plain_characters(name: str, value: Any) -> None:
    assert fields(sub(**{name: value})) == {name}


@pytest.mark.parametrize("value", ["a", "x" * 128, "North-2026.11:25_a"])
def test_plain_ids_up_to_128_characters_pass(value: str) -> None:
    assert check_submission(sub(submission_id=value, client_id=value), NOW)[1] == []


@pytest.mark.parametrize("data", [None, [], "x", 3])
def test_a_body_that_is_not_an_object_fails_on_body(data: Any) -> None:
    assert check_submission(data, NOW)[1] == [("body", "must be a JSON object")]


def test_all_violations_are_reported_together() -> None:
    assert fields(sub(session_number=0, site_id="", total=3.0)) == {"session_number", "site_id", "total"}


def test_claimed_submission_id_is_echoed_only_when_well_formed() -> None:
    assert claimed_submission_id({"submission_id": "s-1"}) == "s-1"
    assert claimed_submission_id({"submission_id": "bad id"}) is None
    assert claimed_submission_id({"submission_id": 5}) is None
    assert claimed_submission_id("s-1") is None


def test_event_carries_tenant_from_the_key_and_deterministic_ids() -> None:
    model, _ = check_submission(sub(submission_id="s-9", episode_id="e-1", instrument="CSRS"), NOW)
    assert model is not None
    ev = to_event(model, "acme", NOW)
    again = SrsSubmitted.model_validate_json(ev.model_dump_json())
    assert again == ev
    assert ev.event_id == ids.submitted_event_id("acme", "s-9")
    assert (ev.tenant_id, ev.submission_id, ev.episode_id, ev.instrument) == ("acme", "s-9", "e-1", "CSRS")
    assert ev.accepted_at == ev.occurred_at == NOW
    assert ev.administered_at == datetime(2026, 11, 25, 13, 5, tzinfo=UTC)
    assert ev.items is not None and ev.items.values() == (9.1, 8.4, 9.0, 8.8) and ev.total is None


def test_record_key_is_tenant_and_client_and_value_is_the_event_json() -> None:
    model, _ = check_submission(sub(items=..., total=36.5), NOW)
    assert model is not None
    rec = outgoing(model, "acme", NOW)
    assert rec.key == b"acme:p-1"
    ev = SrsSubmitted.model_validate_json(rec.value)
    assert ev.submission_id == rec.submission_id and ev.total == 36.5 and ev.items is None
    assert ev.event_id == ids.submitted_event_id("acme", rec.submission_id)


def test_a_generated_submission_id_differs_per_submission() -> None:
    model, _ = check_submission(sub(), NOW)
    assert model is not None
    assert outgoing(model, "acme", NOW).submission_id != outgoing(model, "acme", NOW).submission_id


@pytest.mark.parametrize("over", [{}, {"items": ..., "total": 30.0, "episode_id": "e-1", "instrument": "YCSRS"},
                                  {"administered_at": "2026-11-25T14:05:00.123456-07:30"}])
def test_the_fast_record_value_is_the_contract_json_of_the_event(over: dict[str, Any]) -> None:
    import json

    model, _ = check_submission(sub(submission_id="s-5", **over), NOW)
    assert model is not None
    assert json.loads(outgoing(model, "acme", NOW).value) == json.loads(to_event(model, "acme", NOW).model_dump_json())


# --- the Outcome Rating Scale (docs/outcome.md): the same rules, its own items, an optional age ---

ORS_ITEMS = {"individually": 5.2, "interpersonally": 6.0, "socially": 5.8, "overall": 5.5}


def ors(**over: Any) -> dict[str, Any]:
    return sub(**{"instrument": "ORS", "items": dict(ORS_ITEMS), **over})


@pytest.mark.parametrize("instrument", ["ORS", "CORS", "YCORS"])
def test_every_instrument_of_the_outcome_family_is_accepted_as_an_outcome_rating(instrument: str) -> None:
    model, errors = check_submission(ors(instrument=instrument), NOW)
    assert errors == [] and model is not None
    assert outgoing(model, "acme", NOW).outcome is True


def test_an_srs_submission_is_not_an_outcome_rating() -> None:
    model, _ = check_submission(sub(), NOW)
    assert model is not None and outgoing(model, "acme", NOW).outcome is False


@pytest.mark.parametrize(("value", "ok"), [(0, True), (10, True), (5.5, True), (10.1, False), (-0.1, False),
                                           (4.25, False), ("5", False), (True, False)])
def test_ors_items_are_0_to_10_with_one_decimal(value: Any, ok: bool) -> None:
    model, errors = check_submission(ors(items={**ORS_ITEMS, "socially": value}), NOW)
    assert (model is not None) is ok
    if not ok:
        assert {f for f, _ in errors} == {"items.socially"}


@pytest.mark.parametrize(("value", "ok"), [(0, True), (40, True), (18.5, True), (40.1, False), (18.25, False)])
def test_an_ors_total_is_0_to_40_with_one_decimal(value: Any, ok: bool) -> None:
    model, errors = check_submission(ors(items=..., total=value), NOW)
    assert (model is not None) is ok
    if not ok:
        assert {f for f, _ in errors} == {"total"}


def test_srs_item_names_on_an_ors_are_refused_naming_each_as_an_srs_item() -> None:
    _, errors = check_submission(ors(items={**ORS_ITEMS, "relationship": 9.0}), NOW)
    assert errors == [("items.relationship", "'relationship' is an SRS item; the items of an ORS, CORS or YCORS "
                                             "are individually, interpersonally, socially, overall")]


def test_ors_item_names_on_an_srs_are_refused_pointing_at_the_instrument() -> None:
    _, errors = check_submission(sub(items={**ITEMS, "socially": 5.0}), NOW)
    [(field, message)] = errors
    assert field == "items.socially" and message.startswith("'socially' is an ORS item; give `instrument` ORS")


def test_partial_ors_items_name_each_missing_ors_item() -> None:
    _, errors = check_submission(ors(items={"individually": 5.0, "overall": 6.0}), NOW)
    partial = "partial items: all four of individually, interpersonally, socially, overall are required"
    assert errors == [("items.interpersonally", partial), ("items.socially", partial)]


@pytest.mark.parametrize(("over", "field"), [({"total": 20.0}, "total"), ({"items": ...}, "items")])
def test_an_ors_gives_items_or_a_total_exactly_as_an_srs(over: dict[str, Any], field: str) -> None:
    assert fields(ors(**over)) == {field}


@pytest.mark.parametrize(("value", "ok"), [(0, True), (13, True), (17, True), (130, True), (None, True),
                                           (-1, False), (131, False), (15.0, False), ("15", False), (True, False)])
def test_client_age_is_a_whole_number_of_years_0_to_130(value: Any, ok: bool) -> None:
    model, errors = check_submission(ors(client_age=value), NOW)
    assert (model is not None) is ok
    if not ok:
        assert {f for f, _ in errors} == {"client_age"}


def test_client_age_on_an_srs_is_refused_naming_the_outcome_instruments() -> None:
    _, errors = check_submission(sub(client_age=34), NOW)
    assert errors == [("client_age", "client_age is given with an outcome rating only (instrument ORS, CORS or "
                                     "YCORS)")]


def test_an_ors_breaks_the_shared_rules_like_an_srs() -> None:
    assert fields(ors(session_number=0, site_id="", administered_at="2026-11-25T14:05:00", mood=1)) == {
        "session_number", "site_id", "administered_at", "mood"}


def test_an_ors_becomes_the_ors_submitted_event_with_its_age() -> None:
    model, _ = check_submission(ors(submission_id="o-1", instrument="CORS", client_age=9, episode_id="e-1"), NOW)
    assert model is not None
    ev = to_event(model, "acme", NOW)
    assert isinstance(ev, OrsSubmitted) and OrsSubmitted.model_validate_json(ev.model_dump_json()) == ev
    assert (ev.instrument, ev.client_age, ev.episode_id) == ("CORS", 9, "e-1")
    assert ev.event_id == ids.submitted_event_id("acme", "o-1")
    assert ev.items is not None and ev.items.values() == (5.2, 6.0, 5.8, 5.5) and ev.total is None


def test_an_ors_record_is_keyed_by_tenant_and_client_like_an_srs() -> None:
    model, _ = check_submission(ors(), NOW)
    assert model is not None and outgoing(model, "acme", NOW).key == b"acme:p-1"


@pytest.mark.parametrize("over", [{}, {"items": ..., "total": 18.0, "instrument": "YCORS"}, {"client_age": 15},
                                  {"episode_id": "e-2", "administered_at": "2026-11-25T14:05:00.5-03:00"}])
def test_the_fast_record_value_of_an_ors_is_the_contract_json_of_its_event(over: dict[str, Any]) -> None:
    import json

    model, _ = check_submission(ors(submission_id="o-5", **over), NOW)
    assert model is not None
    value = json.loads(outgoing(model, "acme", NOW).value)
    assert value == json.loads(to_event(model, "acme", NOW).model_dump_json())
    assert OrsSubmitted.model_validate(value).instrument == over.get("instrument", "ORS")
