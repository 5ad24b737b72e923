"""Pure parts of the end-to-end bench: its submission plan and its percentiles."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from tests.unit.test_simulate_plan import issue3_errors
from tools.bench.common import percentile
from tools.bench.system import DETERIORATING, HEALTHY, bench_plan

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


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 95) == 3.0
    assert math.isnan(percentile([], 50))
