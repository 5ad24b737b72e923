"""A token bucket per API key (pure: the clock is passed in).

Every request an authenticated client makes is paid for, accepted or not: intake parses and
validates a rejected body just as it does an accepted one, so invalid bodies must not be a free
way to keep it busy. The API (services/intake/api.py) uses the bucket three ways:

- `wait(key)` before the body is read: a key whose bucket holds less than one token gets 429 at
  once, so a client in debt costs a key look-up, never a body.
- `take(key, cost)` once the body is understood: the submissions it holds (1, the batch's items,
  the file's rows), refused with 429 when the bucket does not hold them.
- `charge(key, cost)` when the request is rejected before `take` (413, 415, 422 for JSON, the
  batch envelope, the CSV file): the work done so far, spent even when the bucket holds less,
  down to a debt of at most one burst. The cost is proportional to the work: one token per
  item or CSV row parsed, one per `max_single_bytes` of body read (what one submission may
  weigh), at least one. A 4 MiB body refused as too large costs 64 tokens, a CSV refused at
  the row limit its limit + 1 rows.
"""

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
        cost = min(max(cost, 0.0), self.burst)
        bucket = self._refill(key)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate

    def wait(self, key: str) -> float:
        """0.0 when the bucket holds at least one token, else the seconds until it does; spends nothing."""
        bucket = self._refill(key)
        return 0.0 if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) / self.rate

    def charge(self, key: str, cost: float) -> None:
        """Spend `cost` (capped at the burst) even when the bucket holds less: work already done is paid
        for after the fact. The balance goes no lower than minus one burst, so a debt is repaid within
        `2 * burst / rate` seconds at most."""
        bucket = self._refill(key)
        bucket.tokens = max(-self.burst, bucket.tokens - min(max(cost, 0.0), self.burst))

    def _refill(self, key: str) -> _Bucket:
        now = self._clock()
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
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
