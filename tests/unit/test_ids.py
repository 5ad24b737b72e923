"""Every derived id keeps its value (shared/ids.py): ids are stored and published, so a recipe
that changed would duplicate events, alerts, deliveries and records. The expected values are
those the system gave before the recipes were gathered in shared/ids.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared import ids
from shared.events import AlertStatus, Instrument


def test_scored_event_ids_keep_their_values() -> None:
    assert ids.scored_event_id("acme", "sub-1") == "14ffc44d-652f-535e-8377-a0819a911d1d"
    assert ids.scored_event_id("acme", "sub-1", 2) == "b1cf4fd4-1f20-5b49-874f-329cb5899e58"


def test_submitted_event_id_keeps_its_value() -> None:
    assert ids.submitted_event_id("acme", "sub-1") == "4c6de236-f0dc-5f99-b646-e3b80b2ce758"


def test_alert_ids_keep_their_values() -> None:
    assert ids.alert_id("acme", "c-1", "SRS", "ep-1", 3) == "0528306e-f859-5cc7-aed9-108cf5d3e855"
    assert ids.alert_event_id("a-1", 1) == "a-1"
    assert ids.alert_event_id("a-1", 2) == "0a7e76f5-a5d5-5551-b992-25a0a85b7429"


def test_alert_status_event_ids_keep_their_values() -> None:
    assert ids.alert_status_event_id("acme", "a-1", "acknowledged") == "f0f17338-f5ed-56e4-9593-24619e8e75fb"
    assert ids.alert_status_event_id("acme", "a-1", "withdrawn", 2) == "41df371a-3cc1-5821-bd22-3461febf73bb"


def test_delivery_status_event_ids_keep_their_values() -> None:
    # alerts' `delivered` is one per revision, its `failed` one per revision and clinician channel
    assert ids.alert_status_event_id("acme", "a-1", "delivered", 2) == "8d4d41f8-cb3c-50e8-85bd-9c549c543e38"
    assert ids.alert_status_event_id("acme", "a-1", "failed", 2, channel="webhook") == \
        "85692f95-d410-5fbf-a2c7-15d631e4f763"
    assert ids.alert_status_event_id("acme", "a-1", "failed", 2, channel="email") == \
        "0b5ed6cb-98e8-5734-87c7-881e5dc47a84"


def test_a_status_id_names_a_channel_only_with_a_revision() -> None:
    with pytest.raises(ValueError):
        ids.alert_status_event_id("acme", "a-1", "failed", channel="webhook")


def test_client_transfer_and_delivery_ids_keep_their_values() -> None:
    assert ids.client_transfer_event_id("acme", "c-1", "north", "req-1") == "978e2469-3ba3-575f-a1bd-02be73486821"
    assert ids.delivery_id("a-1", "clinician:c-9", "webhook") == "af9cc2ee-cf66-5e4c-ace6-9d64e5272932"


def test_derived_episode_id_is_the_utc_date_and_number_of_its_first_session() -> None:
    evening_in_new_york = datetime(2026, 1, 5, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert ids.derived_episode_id(evening_in_new_york, 4) == "auto/2026-01-06/4"


def test_csv_submission_id_keeps_its_value() -> None:
    assert ids.csv_submission_id("acme", "c-1", "SRS", None, 3, "2026-01-05") == \
        "csv:3efc846f-51cd-5d6f-8591-0fa65899253b"


def test_reporting_record_and_submission_status_ids_keep_their_values() -> None:
    assert ids.client_record_id("acme", "c-1", "SRS") == "461b69cf-0883-578c-b512-0a82a3efba1f"
    assert ids.submission_status_id("acme", "sub-1") == "5df505a6-d131-5cde-8c93-a950a31df6b2"


def test_reporting_counter_ids_keep_their_values() -> None:
    # stored as counter documents' _id: a new recipe would orphan every counter until a rebuild
    assert ids.reporting_counter_id("acme", "north", "c-1", "SRS", "2026-03") == "f96cee12-46a5-5091-a779-48fb4ffed516"


def test_fhir_ids_keep_their_values() -> None:
    assert ids.fhir_session_ids("acme", "c-1", "SRS", "ep-1", 3) == (
        "b6da8d54-1b41-5a13-9dcb-1d4c99ca1add", "7e44eda9-2c7c-5f6c-a0b6-49332b70423b")
    assert ids.fhir_session_ids("acme", "c-1", "SRS", None, 3) == (
        "f8bdc904-16f6-59aa-8821-624f37e3a480", "9d274529-0f0d-55d6-9420-81b338c34e22")
    assert ids.fhir_bundle_id("acme", "rec-1", "ep-1") == "af957b36-ad49-5811-ab71-86fb4efebe59"
    assert ids.fhir_bundle_id("acme", "rec-1", None) == "bec627de-ca94-52e1-b30a-7b5a81817a32"


def test_consumer_side_ids_keep_their_values() -> None:
    assert ids.dead_letter_event_id("scoring", "srs.submitted.v1", 2, 41, "invalid") == \
        "951c1f67-cd58-5b6d-b2a9-c351961ae687"
    assert ids.delivery_dead_letter_event_id("alerts", "delivery_failed", "d-1") == \
        "801261ad-461b-52e1-ad94-d16ca27a4d57"
    assert ids.record_correlation_id("srs.submitted.v1", 2, 41) == "c0bdee7d-5673-5280-9aa5-e5e1ddeb00a3"


def test_store_keys_keep_their_parts_apart() -> None:
    assert ids.store_key("acme", "c-1") == '["acme","c-1"]'
    assert ids.store_key("t", "x:c1") != ids.store_key("t:x", "c1")


def test_an_enum_part_derives_the_same_id_as_its_string() -> None:
    assert ids.alert_status_event_id("acme", "a-1", AlertStatus.ACKNOWLEDGED) == \
        ids.alert_status_event_id("acme", "a-1", "acknowledged")
    assert ids.client_record_id("acme", "c-1", Instrument.SRS) == ids.client_record_id("acme", "c-1", "SRS")


@pytest.mark.parametrize(("alliance", "outcome", "one_episode"), [
    ("ep-1", "ep-1", True),                                  # a submitter's id: the same id only
    ("ep-1", "ep-2", False),
    ("auto/2026-11-04/1", "auto/2026-11-03/1", True),        # a session across midnight UTC
    ("auto/2026-11-03/1", "auto/2026-11-04/1", True),
    ("auto/2027-01-01/1", "auto/2026-12-31/1", True),        # ... also at a year end
    ("auto/2026-11-05/1", "auto/2026-11-03/1", False),       # two days apart: another episode
    ("auto/2026-11-04/1", "auto/2026-11-03/2", False),       # begun at another session number
    ("auto/2026-11-04/1", "ep-1", False),
    ("auto/not-a-date/1", "auto/2026-11-03/1", False),
])
def test_the_two_scales_share_an_episode_by_id_or_by_derived_ids_a_day_apart(alliance: str, outcome: str,
                                                                              one_episode: bool) -> None:
    assert ids.same_episode_of_both_scales(alliance, outcome) is one_episode


MORNING = datetime(2026, 11, 3, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(("alliance", "outcome", "one_session"), [
    (("ep-1", 3, MORNING), ("ep-1", 3, MORNING + timedelta(days=5)), True),   # one given episode: its number
    (("ep-1", 3, MORNING), ("ep-1", 2, MORNING), False),
    (("ep-1", 3, MORNING), ("ep-2", 3, MORNING), False),
    # derived ids a day apart from one first session number: a session across midnight UTC
    (("auto/2026-11-04/1", 3, MORNING), ("auto/2026-11-03/1", 3, MORNING - timedelta(hours=1)), True),
    # derived ids from two first session numbers: a form missing at the episode's first session
    (("auto/2026-10-27/1", 3, MORNING), ("auto/2026-11-03/2", 3, MORNING - timedelta(minutes=50)), True),
    (("auto/2026-11-03/2", 3, MORNING), ("auto/2026-10-27/1", 3, MORNING + timedelta(hours=14)), True),
    (("auto/2026-10-27/1", 3, MORNING), ("auto/2026-11-03/2", 3, MORNING + timedelta(days=2)), False),
    (("auto/2026-10-27/1", 3, MORNING), ("auto/2026-11-03/2", 2, MORNING), False),
    (("ep-1", 3, MORNING), ("auto/2026-11-03/2", 3, MORNING), False),          # a given id pairs only with itself
])
def test_a_session_of_both_scales_is_one_by_its_number_in_one_episode_or_in_derived_ones_a_day_apart(
        alliance: tuple[str, int, datetime], outcome: tuple[str, int, datetime], one_session: bool) -> None:
    assert ids.same_session_of_both_scales(alliance, outcome) is one_session
