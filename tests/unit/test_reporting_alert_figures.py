"""The alert figures of the trends: what one alert document contributes to the monthly counters
(rules.alert_contribution) and the median time to acknowledge read from their histogram.
Pure functions, no store."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.reporting import rules
from shared.events import AlertStatus, AlertStatusChanged, AllianceDeterioration, Instrument
from tools.demo import BASE, acknowledgement, deterioration_for, lifecycle, scored

T = "acme"
RESOLUTION = 2 ** (1 / 8)  # a bin's geometric middle is within this factor of anything in the bin


def raise_of(total: float = 28.0, at: datetime = BASE, **changes: Any) -> AllianceDeterioration:
    event = scored(T, "a", 2, total, previous_total=36.0, administered_at=at, episode_id="e1", **changes)
    alert = deterioration_for(event)
    assert alert is not None
    return alert


def alert_doc(*events: AllianceDeterioration | AlertStatusChanged) -> rules.Doc:
    """The alert document the store's update operators leave after `events`, in any order."""
    doc: rules.Doc = {"raised": False, "raises": {}, "status_at": {}}
    for e in events:
        doc.update(_id=e.alert_id, tenant_id=e.tenant_id, site_id=e.site_id, clinician_id=e.clinician_id)
        if isinstance(e, AllianceDeterioration):
            doc.update(rules.alert_identity(e), raised=True)
            doc["raises"][str(e.revision)] = rules.alert_raise(e)
            doc["raised_at"] = min(doc.get("raised_at") or e.occurred_at, e.occurred_at)
        else:
            held = doc["status_at"].get(e.status.value)
            doc["status_at"][e.status.value] = min(held or e.occurred_at, e.occurred_at)
    return doc


def test_a_raised_alert_counts_once_in_the_utc_month_of_its_raise_under_its_site_clinician_and_instrument() -> None:
    alert = raise_of(at=datetime(2026, 3, 31, 23, 0, tzinfo=UTC))
    month = rules.month_of(alert.occurred_at)
    assert rules.alert_contribution(alert_doc(alert)) == {
        (T, "north", "c-1", "SRS", month): {rules.ALERTS_RAISED: 1}}


def test_an_alert_revised_by_a_correction_counts_once_as_raised_in_the_month_of_its_first_raise() -> None:
    first = raise_of(28.0)
    second = raise_of(26.0, revision=2, scored_at=first.occurred_at + timedelta(days=40))
    share = rules.alert_contribution(alert_doc(second, first))
    assert list(share.values()) == [{rules.ALERTS_RAISED: 1}]
    assert next(iter(share))[4] == rules.month_of(first.occurred_at)


def test_a_revision_raised_at_another_site_moves_the_alert_there() -> None:
    first = raise_of()
    moved = raise_of(revision=2, site_id="south", clinician_id="c-9")
    assert [k[1:3] for k in rules.alert_contribution(alert_doc(moved, first))] == [("south", "c-9")]


def test_an_acknowledgement_counts_the_alert_acknowledged_and_its_delay_in_one_histogram_bin() -> None:
    alert = raise_of()
    ack = acknowledgement(alert, alert.occurred_at + timedelta(hours=3))
    (fields,) = rules.alert_contribution(alert_doc(alert, ack)).values()
    assert fields == {rules.ALERTS_RAISED: 1, rules.ALERTS_ACKNOWLEDGED: 1,
                      rules.ack_field(rules.ack_bin(3 * 3600)): 1}


def test_an_acknowledgement_in_a_later_month_counts_in_the_month_the_alert_was_raised() -> None:
    alert = raise_of(at=datetime(2026, 1, 31, 20, 0, tzinfo=UTC))
    ack = acknowledgement(alert, datetime(2026, 2, 2, 8, 0, tzinfo=UTC))
    (key,) = rules.alert_contribution(alert_doc(alert, ack))
    assert key[4] == rules.month_of(alert.occurred_at) != "2026-02"


def test_superseded_and_withdrawn_alerts_are_not_counted_as_acknowledged() -> None:
    alert = raise_of()
    for status in (AlertStatus.SUPERSEDED, AlertStatus.WITHDRAWN):
        (fields,) = rules.alert_contribution(alert_doc(alert, lifecycle(alert, status))).values()
        assert fields == {rules.ALERTS_RAISED: 1}


def test_an_alert_known_only_from_its_statuses_counts_nothing_until_its_raise_arrives() -> None:
    alert = raise_of()
    assert rules.alert_contribution(alert_doc(acknowledgement(alert))) == {}


def test_the_order_of_an_alerts_events_does_not_change_its_contribution() -> None:
    first = raise_of()
    events: list[AllianceDeterioration | AlertStatusChanged] = [
        first, raise_of(26.0, revision=2), acknowledgement(first), lifecycle(first, AlertStatus.SUPERSEDED, 2)]
    assert rules.alert_contribution(alert_doc(*events)) == rules.alert_contribution(alert_doc(*reversed(events)))


@given(st.floats(0, 90 * 86400, allow_nan=False))
def test_every_delay_falls_in_a_bin_whose_bounds_hold_it(seconds: float) -> None:
    low, high = rules.ack_bin_bounds(rules.ack_bin(seconds))
    assert low <= seconds * (1 + 1e-12) and (high is None or seconds < high * (1 + 1e-12))


def test_bins_have_four_per_doubling_from_one_minute_and_the_last_is_open_ended() -> None:
    assert rules.ack_bin(59.9) == 0 and rules.ack_bin(60) == 1 and rules.ack_bin(120) == 5
    assert rules.ack_bin_bounds(rules.ACK_LAST_BIN) == (60.0 * 2 ** 16, None)
    assert rules.ack_bin(365 * 86400) == rules.ACK_LAST_BIN


@given(st.lists(st.floats(60, 60 * 2 ** 15, allow_nan=False), min_size=1, max_size=40))
def test_the_median_from_the_histogram_is_within_its_resolution_of_the_exact_median(delays: list[float]) -> None:
    histogram: dict[int, int] = {}
    for d in delays:
        histogram[rules.ack_bin(d)] = histogram.get(rules.ack_bin(d), 0) + 1
    estimate = rules.median_from_histogram(histogram)
    exact = statistics.median(delays)
    assert estimate is not None and exact / RESOLUTION - 0.05 <= estimate <= exact * RESOLUTION + 0.05


def test_an_empty_histogram_has_no_median() -> None:
    assert rules.median_from_histogram({}) is None


def test_trends_give_each_months_alerts_raised_acknowledged_and_median_time_to_acknowledge() -> None:
    quick, slow = rules.ack_field(rules.ack_bin(600)), rules.ack_field(rules.ack_bin(7200))
    rows = [{"month": "2026-01", rules.ALERTS_RAISED: 3, rules.ALERTS_ACKNOWLEDGED: 1, quick: 1},
            {"month": "2026-01", rules.ALERTS_RAISED: 1, rules.ALERTS_ACKNOWLEDGED: 1, slow: 1},
            {"month": "2026-02", "sessions": 4}]
    jan, feb = rules.trend_series(rows, "2026-01", "2026-02")
    assert (jan["alerts_raised"], jan["alerts_acknowledged"]) == (4, 2)
    assert jan["median_seconds_to_acknowledge"] == round(
        (rules.ack_bin_value(rules.ack_bin(600)) + rules.ack_bin_value(rules.ack_bin(7200))) / 2, 1)
    assert (feb["alerts_raised"], feb["alerts_acknowledged"], feb["median_seconds_to_acknowledge"]) == (0, 0, None)


def test_an_alert_on_another_instrument_counts_under_that_instrument() -> None:
    alert = raise_of(instrument=Instrument.CSRS)
    assert [k[3] for k in rules.alert_contribution(alert_doc(alert))] == ["CSRS"]



def test_an_alerts_share_adds_it_raised_and_acknowledged_all_time_in_the_current_bucket_for_the_summaries() -> None:
    alert = raise_of()
    share = rules.alert_share(alert_doc(alert, acknowledgement(alert, alert.occurred_at + timedelta(hours=1))))
    assert share[(T, "north", "c-1", "SRS", rules.CURRENT)] == {rules.ALERTS_RAISED: 1, rules.ALERTS_ACKNOWLEDGED: 1}
    assert {k: v for k, v in share.items() if k[4] != rules.CURRENT} == rules.alert_contribution(
        alert_doc(alert, acknowledgement(alert, alert.occurred_at + timedelta(hours=1))))


def test_an_alert_known_only_from_its_statuses_adds_nothing_to_the_summaries_either() -> None:
    assert rules.alert_share(alert_doc(acknowledgement(raise_of()))) == {}
