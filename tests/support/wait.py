"""Polling helpers: wait for an effect instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 30.0, interval: float = 0.2,
                     until: Callable[[T], object] | None = None) -> T:
    """Poll an async check until its value is done; fail with the last value otherwise.

    Without `until`, done means truthy. With it, `check` returns what it observed (a page, the
    deliveries so far) and `until(observed)` says whether that is done, so that a timeout shows
    the state the wait last saw instead of a `None` that says nothing of where it stuck."""
    done = until if until is not None else bool
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: T | None = None
    while loop.time() < deadline:
        last = await check()
        if done(last):
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")
