"""What every bench does alike: percentiles, latency summaries, waiting for a condition, CPU used."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def histogram_quantile(text: str, name: str, q: float, **labels: str) -> float:
    """The `q` quantile (0..1) of one histogram series of a /metrics page, as Prometheus's
    `histogram_quantile` estimates it (linear within the bucket the rank falls in; the lower bound
    of +Inf's bucket when it falls there); NaN when the series is absent or empty."""
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket" and all(sample.labels.get(k) == v for k, v in labels.items()):
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    below, below_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return below
            return below + (le - below) * (rank - below_count) / (count - below_count) if count > below_count else le
        below, below_count = le, count
    return below


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Count, p50/p95/p99, max and mean of latencies given in seconds, in milliseconds."""
    if not seconds:
        return {"n": 0}
    return {"n": len(seconds), "p50_ms": percentile(seconds, 50) * 1000, "p95_ms": percentile(seconds, 95) * 1000,
            "p99_ms": percentile(seconds, 99) * 1000, "max_ms": max(seconds) * 1000,
            "mean_ms": sum(seconds) / len(seconds) * 1000}


async def until(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1) -> bool:
    """Poll `check` until it holds or `timeout` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """`until` for a plain predicate."""
    async def check() -> bool:
        return predicate()
    return await until(check, timeout, interval)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU a live process has used so far (Linux /proc); NaN when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, TypeError):
        return math.nan
