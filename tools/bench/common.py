"""What every bench does alike: percentiles, latency summaries, waiting for a condition, CPU used."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


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
