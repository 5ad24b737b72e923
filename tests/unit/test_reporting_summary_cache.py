"""The summary cache: one aggregation per scope and window, stale answers while refreshing."""

from __future__ import annotations

import asyncio
from typing import Any

from services.reporting.api import SummaryCache

KEY = ("g1", "t", None)


class Counting:
    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        await self.gate.wait()
        return {"n": self.calls}


async def test_concurrent_requests_share_one_computation() -> None:
    cache, compute = SummaryCache(ttl=60), Counting()
    waiting = [asyncio.create_task(cache.get(KEY, compute)) for _ in range(5)]
    await asyncio.sleep(0)
    compute.gate.set()
    assert [await w for w in waiting] == [{"n": 1}] * 5
    assert compute.calls == 1
    assert await cache.get(KEY, compute) == {"n": 1} and compute.calls == 1


async def test_an_expired_summary_is_served_stale_while_one_refresh_runs() -> None:
    cache, compute = SummaryCache(ttl=0.2), Counting()
    compute.gate.set()
    assert await cache.get(KEY, compute) == {"n": 1}
    await asyncio.sleep(0.25)
    compute.gate.clear()
    assert await cache.get(KEY, compute) == {"n": 1}  # stale, at once
    assert await cache.get(KEY, compute) == {"n": 1}
    compute.gate.set()
    for _ in range(1000):
        await asyncio.sleep(0.001)
        if not cache._running:
            break
    assert compute.calls == 2
    assert await cache.get(KEY, compute) == {"n": 2}


async def test_no_ttl_means_no_cache() -> None:
    cache, compute = SummaryCache(ttl=0), Counting()
    compute.gate.set()
    assert await cache.get(KEY, compute) == {"n": 1}
    assert await cache.get(KEY, compute) == {"n": 2}
