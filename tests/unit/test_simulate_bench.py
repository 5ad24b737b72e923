"""Pure parts of the end-to-end bench: its submission plan and its percentiles."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from services.intake.models import check_submission
from tests.unit.test_simulate_plan import issue3_errors
from tools.bench.common import histogram_quantile, percentile
from tools.bench.system import (
    DETERIORATING,
    HEALTHY,
    ORS_DETERIORATING,
    ORS_IMPROVED,
    ORS_INTAKE,
    after_scoring,
    bench_plan,
)

NOW = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)


def test_bench_plan_deteriorates_exactly_every_nth_submission() -> None:
    planned = bench_plan(1000, 199, "r", 10, NOW)
    bad = [p.seq for p in planned if p.body["items"] == DETERIORATING]
    assert bad == list(range(9, 1000, 10))
    assert all(p.body["items"] == HEALTHY for p in planned if p.seq not in set(bad))


def test_bench_plan_healthy_sessions_trigger_nothing_and_deteriorating_ones_fall_below_cutoff() -> None:
    assert sum(HEALTHY.values()) >= 36.0 and sum(DETERIORATING.values()) < 36.0


def test_bench_plan_posts_each_clients_sessions_in_order_and_valid() -> None:
    planned = bench_plan(1000, 37, "r", 10, NOW)
    last: dict[str, int] = {}
    for p in planned:
        assert issue3_errors(p.body, NOW) == []
        c = p.body["client_id"]
        assert p.body["session_number"] == last.get(c, 0) + 1
        last[c] = p.body["session_number"]


def test_the_part_of_b_after_scoring_counts_the_sampled_submissions_the_scored_topic_showed() -> None:
    visible = {"s1": 10.5, "s2": 11.0, "s3": 12.0}
    scored = {"s1": 10.25, "s2": 11.25, "s4": 9.0}  # s2 seen on the topic late: no negative time
    assert after_scoring(visible, scored) == [0.25, 0.0]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 95) == 3.0
    assert math.isnan(percentile([], 50))


def test_the_ors_plan_starts_every_client_at_intake_and_deteriorates_only_later_sessions() -> None:
    planned = bench_plan(1000, 37, "r", 10, NOW, ors=True)
    for p in planned:
        first = p.body["session_number"] == 1
        assert p.body["instrument"] == "ORS"
        assert (p.body["items"] == ORS_INTAKE) is first
        bad = p.seq % 10 == 9 and not first
        assert p.body["items"] == (ORS_DETERIORATING if bad else ORS_INTAKE if first else ORS_IMPROVED)


def test_the_ors_plan_deteriorates_reliably_from_intake_and_improves_reliably_across_the_cutoff() -> None:
    intake, improved, bad = (sum(x.values()) for x in (ORS_INTAKE, ORS_IMPROVED, ORS_DETERIORATING))
    assert intake < 25.0 <= improved and improved - intake >= 5 and intake - bad >= 5  # docs/outcome.md


def test_every_ors_of_the_plan_passes_intakes_rules() -> None:
    for p in bench_plan(200, 37, "r", 10, NOW, ors=True):
        assert check_submission(p.body, NOW)[1] == []


def test_the_srs_plan_carries_no_field_of_the_ors() -> None:
    for p in bench_plan(50, 7, "r", 10, NOW):
        assert p.body["instrument"] == "SRS" and "client_age" not in p.body
        assert list(p.body) == ["submission_id", "instrument", "client_id", "clinician_id", "site_id",
                                "session_number", "administered_at", "items"]


LAG_PAGE = """# HELP alliance_event_loop_lag_seconds lag
# TYPE alliance_event_loop_lag_seconds histogram
alliance_event_loop_lag_seconds_bucket{le="0.01",service="reporting"} 50.0
alliance_event_loop_lag_seconds_bucket{le="0.1",service="reporting"} 90.0
alliance_event_loop_lag_seconds_bucket{le="1.0",service="reporting"} 100.0
alliance_event_loop_lag_seconds_bucket{le="+Inf",service="reporting"} 100.0
alliance_event_loop_lag_seconds_count{service="reporting"} 100.0
alliance_event_loop_lag_seconds_sum{service="reporting"} 7.0
alliance_event_loop_lag_seconds_bucket{le="0.01",service="scoring"} 10.0
alliance_event_loop_lag_seconds_bucket{le="0.1",service="scoring"} 10.0
alliance_event_loop_lag_seconds_bucket{le="1.0",service="scoring"} 10.0
alliance_event_loop_lag_seconds_bucket{le="+Inf",service="scoring"} 20.0
alliance_event_loop_lag_seconds_count{service="scoring"} 20.0
alliance_event_loop_lag_seconds_sum{service="scoring"} 100.0
"""


@pytest.mark.parametrize(("q", "expected"), [(0.5, 0.01), (0.9, 0.1), (0.99, 0.91), (0.25, 0.005)])
def test_a_histogram_quantile_is_estimated_as_prometheus_does_within_the_bucket(q: float, expected: float) -> None:
    assert histogram_quantile(LAG_PAGE, "alliance_event_loop_lag_seconds", q,
                              service="reporting") == pytest.approx(expected)


def test_a_quantile_in_the_open_bucket_is_its_lower_bound() -> None:
    assert histogram_quantile(LAG_PAGE, "alliance_event_loop_lag_seconds", 0.99, service="scoring") == 1.0


def test_a_histogram_the_page_does_not_hold_has_no_quantile() -> None:
    assert math.isnan(histogram_quantile(LAG_PAGE, "alliance_event_loop_lag_seconds", 0.5, service="alerts"))
