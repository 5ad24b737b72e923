"""A token bucket per API key (pure: the clock is passed in)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """`rate` tokens per second, at most `burst` saved up, one bucket per key.

    `take(key, cost)` admits a request and spends its cost, or answers how many seconds to wait
    (the `Retry-After`). A cost above the burst is capped at the burst so it can pass when the
    bucket is full instead of never. Buckets are kept for at most `max_keys` keys; the oldest
    are dropped (a dropped key starts again with a full bucket), so memory stays bounded.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float], max_keys: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, cost: float = 1.0) -> float:
        """0.0 when admitted (tokens spent), else the seconds until `cost` tokens are available."""
        now = self._clock()
        cost = min(max(cost, 0.0), self.burst)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                # dicts keep insertion order: drop the oldest half in one go
                for old in list(self._buckets)[: self._max_keys // 2]:
                    del self._buckets[old]
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
