"""The per-key limit intake (and alerts and reporting) use: `limits`' sliding window counter over
`shared.ratelimit.SlotStorage`, here on in-process counters and a fake clock."""

from __future__ import annotations

import pytest

from services.intake.ratelimit import submission_limiter
from services.intake.settings import IntakeSettings
from shared.ratelimit import Limiter, MemoryCounters, SlotStorage, retry_after_header, seconds_until
from shared.settings import IntakeHttp


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0  # the start of a slot for every window size used here

    def __call__(self) -> float:
        return self.now


def limiter(rate: float, burst: float, clock: Clock, max_names: int = 100_000) -> Limiter:
    return Limiter(SlotStorage(MemoryCounters(clock, max_names), clock), "test", rate, burst)


async def test_a_fresh_key_is_admitted_up_to_the_burst_then_refused_with_a_wait() -> None:
    lim = limiter(rate=1, burst=4, clock=Clock())
    assert [await lim.take("k") for _ in range(4)] == [0.0, 0.0, 0.0, 0.0]
    assert await lim.take("k") == pytest.approx(4.0)  # the whole window: all four were spent just now


async def test_the_limit_frees_up_as_the_window_slides() -> None:
    clock = Clock()
    lim = limiter(rate=1, burst=4, clock=clock)
    await lim.take("k", 4)
    clock.now += 5.0  # into the next slot, a quarter of the way: 3 of the previous 4 still count
    assert await lim.take("k") == 0.0
    assert await lim.take("k") > 0
    clock.now += 8.0  # two windows later nothing counts any more
    assert await lim.take("k", 4) == 0.0  # never more than the burst at once
    assert await lim.take("k") > 0


async def test_the_wait_is_the_time_until_the_cost_fits() -> None:
    clock = Clock()
    lim = limiter(rate=1, burst=4, clock=clock)
    await lim.take("k", 4)
    clock.now += 4.0  # next slot: the previous 4 count fully and shrink by one per second
    assert await lim.take("k", 2) == pytest.approx(1.0)  # 2 fit once fewer than 3 count
    clock.now += 1.01
    assert await lim.take("k", 2) == 0.0


async def test_a_cost_above_the_burst_is_capped_at_the_burst() -> None:
    lim = limiter(rate=10, burst=100, clock=Clock())
    assert await lim.take("k", 160) == 0.0
    assert await lim.take("k", 1) > 0


async def test_keys_are_limited_separately() -> None:
    lim = limiter(rate=1, burst=1, clock=Clock())
    assert await lim.take("a") == 0.0
    assert await lim.take("a") > 0
    assert await lim.take("b") == 0.0


async def test_the_number_of_counters_in_memory_is_bounded() -> None:
    clock = Clock()
    counters = MemoryCounters(clock, max_names=100)
    lim = Limiter(SlotStorage(counters, clock), "test", 1, 1)
    for i in range(1000):
        await lim.take(f"k{i}")
    assert len(counters) <= 100


@pytest.mark.parametrize(("seconds", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (30, "30")])
def test_retry_after_is_whole_seconds_at_least_one(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


async def test_waiting_for_admission_spends_nothing() -> None:
    lim = limiter(rate=1, burst=2, clock=Clock())
    assert await lim.wait("k") == 0.0
    assert await lim.wait("k") == 0.0
    assert await lim.take("k", 2) == 0.0
    assert await lim.wait("k") == pytest.approx(2.0)


async def test_charged_work_is_spent_beyond_the_limit_and_repaid_over_time() -> None:
    clock = Clock()
    lim = limiter(rate=10, burst=100, clock=clock)  # 100 per 10 s window
    await lim.charge("k", 150)  # capped at the burst: the window is full
    await lim.charge("k", 30)  # a debt of 30
    # next slot at 10 s; then 130 counted fully, shrinking by 13/s, below 100 after 30/13 s more
    assert await lim.wait("k") == pytest.approx(10 + 30 / 13)
    clock.now += 10 + 30 / 13 + 0.01
    assert await lim.wait("k") == 0.0


async def test_a_debt_is_at_most_one_burst() -> None:
    lim = limiter(rate=10, burst=100, clock=Clock())
    for _ in range(10):
        await lim.charge("k", 100)
    # 200 counted at most: next slot (10 s), then below 100 once it has shrunk by half (5 s)
    assert await lim.wait("k") == pytest.approx(15.0)


def test_seconds_until_is_zero_while_the_cost_fits() -> None:
    assert seconds_until(1, limit=10, window=10, previous=5, previous_share=0.5, current=7) == 0.0


def test_seconds_until_waits_for_the_previous_slot_to_shrink_when_the_current_one_has_room() -> None:
    # 10 * 0.6 + 5 = 11 counted; one more fits once 10 * share + 5 < 10: share below 0.5, in 1 s
    assert seconds_until(1, limit=10, window=10, previous=10, previous_share=0.6, current=5) == pytest.approx(1.0)


def test_seconds_until_waits_for_the_next_slot_when_the_current_one_is_full() -> None:
    # 2 s to the next slot, where 10 counts fully and shrinks by 1/s: 1 more fits below 10, at once
    assert seconds_until(1, limit=10, window=10, previous=0, previous_share=0.2, current=10) == pytest.approx(2.0)
    # 3 more fit once 10 * share < 8: 2 s into the next slot
    assert seconds_until(3, limit=10, window=10, previous=0, previous_share=0.2, current=10) == pytest.approx(4.0)


class CountedCounters(MemoryCounters):
    """In-process counters counting the adds a shared store would have answered."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.adds = 0

    async def add(self, name: str, amount: int, expires_at: float) -> int:
        self.adds += 1
        return await super().add(name, amount, expires_at)


async def test_intake_by_default_reaches_the_store_once_per_fifty_single_submissions() -> None:
    clock = Clock()
    counters = CountedCounters(clock)
    lim = submission_limiter(IntakeSettings(), SlotStorage(counters, clock), IntakeHttp().rate_limit_lease)
    for _ in range(100):
        assert await lim.take("k") == 0.0
        clock.now += 0.005  # 200 submissions/s: well inside one 4-second slot
    assert counters.adds <= 3  # two leases of 50, and at most one counted ahead of need
