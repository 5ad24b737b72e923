"""The per-key token bucket, on a fake clock."""

from __future__ import annotations

import pytest

from services.intake.ratelimit import RateLimiter, retry_after_header


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_admits_the_burst_then_refuses() -> None:
    limiter = RateLimiter(rate=2, burst=3, clock=Clock())
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)


def test_tokens_refill_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2, burst=3, clock=clock)
    limiter.take("k", 3)
    clock.now += 0.5
    assert limiter.take("k") == 0.0
    assert limiter.take("k") > 0
    clock.now += 100
    assert limiter.take("k", 3) == 0.0  # never more than the burst saved up
    assert limiter.take("k") > 0


def test_a_refused_request_spends_nothing() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=2, clock=clock)
    limiter.take("k", 2)
    assert limiter.take("k") == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.take("k") == 0.0


def test_batch_cost_counts_items_and_is_capped_at_the_burst() -> None:
    limiter = RateLimiter(rate=10, burst=100, clock=Clock())
    assert limiter.take("k", 60) == 0.0
    assert limiter.take("k", 60) == pytest.approx(2.0)  # 20 missing at 10/s
    fresh = RateLimiter(rate=10, burst=100, clock=Clock())
    assert fresh.take("k", 1000) == 0.0  # larger than the burst: admitted when the bucket is full


def test_keys_have_separate_buckets() -> None:
    limiter = RateLimiter(rate=1, burst=1, clock=Clock())
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0.0


def test_the_number_of_buckets_is_bounded() -> None:
    limiter = RateLimiter(rate=1, burst=1, clock=Clock(), max_keys=100)
    for i in range(1000):
        limiter.take(f"k{i}")
    assert len(limiter) <= 100


@pytest.mark.parametrize(("seconds", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (30, "30")])
def test_retry_after_is_whole_seconds_at_least_one(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


def test_waiting_for_admission_spends_nothing() -> None:
    limiter = RateLimiter(rate=1, burst=2, clock=Clock())
    assert limiter.wait("k") == 0.0
    assert limiter.wait("k") == 0.0
    assert limiter.take("k", 2) == 0.0
    assert limiter.wait("k") == pytest.approx(1.0)


def test_rejected_work_is_charged_even_past_an_empty_bucket_and_makes_the_key_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10, burst=100, clock=clock)
    limiter.charge("k", 150)  # capped at the burst: the bucket is now empty
    limiter.charge("k", 30)  # a debt of 30 tokens
    assert limiter.wait("k") == pytest.approx(3.1)  # 31 tokens to one token at 10/s
    clock.now += 3.2
    assert limiter.wait("k") == 0.0


def test_a_debt_is_at_most_one_burst() -> None:
    limiter = RateLimiter(rate=10, burst=100, clock=Clock())
    for _ in range(10):
        limiter.charge("k", 100)
    assert limiter.wait("k") == pytest.approx(10.1)  # from -100 to 1 token at 10/s
