"""Leases: a replica counts several units of a per-key limit in the shared store at once and admits
from them without a round trip (`shared.ratelimit.Limiter(lease=...)`). Replicas sharing the store
must still never admit more than the limit together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongo.errors import PyMongoError

from shared.ratelimit import Limiter, MemoryCounters, SlotStorage


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0  # the start of a slot for every window size used here

    def __call__(self) -> float:
        return self.now


class CountedCounters(MemoryCounters):
    """In-process counters that count the round trips a store would have answered."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.trips = 0

    async def counts(self, names: Sequence[str]) -> dict[str, int]:
        self.trips += 1
        return await super().counts(names)

    async def add(self, name: str, amount: int, expires_at: float) -> int:
        self.trips += 1
        return await super().add(name, amount, expires_at)


def replica(counters: CountedCounters, clock: Clock, burst: float = 200, lease: int = 10) -> Limiter:
    """One replica's limiter (its own process memory) over the store all replicas share."""
    return Limiter(SlotStorage(counters, clock), "test", rate=burst / 4, burst=burst, lease=lease)


@dataclass
class Holding:
    """One replica (burst 200, lease 10) that has just taken its first unit of key "k": the other nine
    of its lease are held. `trips` is the store's round-trip count at that moment."""

    clock: Clock
    store: CountedCounters
    limiter: Limiter
    trips: int


async def holding_a_lease() -> Holding:
    clock = Clock()
    store = CountedCounters(clock)
    limiter = replica(store, clock)
    await limiter.take("k")
    return Holding(clock, store, limiter, store.trips)


async def test_a_lease_admits_that_many_requests_for_one_store_add() -> None:
    h = await holding_a_lease()
    assert [await h.limiter.take("k") for _ in range(9)] == [0.0] * 9
    assert h.store.trips == h.trips  # the other nine came out of the lease
    await h.limiter.take("k")
    assert h.store.trips > h.trips  # the eleventh needed a new one


async def test_waiting_before_the_body_reads_nothing_while_units_are_held() -> None:
    h = await holding_a_lease()
    assert await h.limiter.wait("k") == 0.0
    assert h.store.trips == h.trips


async def test_one_replica_alone_still_gets_the_whole_burst() -> None:
    # The last requests take exactly what they lack when a whole lease no longer fits.
    clock = Clock()
    lim = replica(CountedCounters(clock), clock, burst=205, lease=10)
    assert [await lim.take("k", 3) for _ in range(68)] == [0.0] * 68  # 204 units
    assert await lim.take("k") == 0.0
    assert await lim.take("k") > 0


async def test_units_held_from_an_ended_slot_are_not_spent() -> None:
    h = await holding_a_lease()
    h.clock.now += 4.0  # the next slot (a window of 200 / 50 = 4 s)
    await h.limiter.take("k")
    assert h.store.trips > h.trips


async def test_charged_work_spends_held_units_first() -> None:
    h = await holding_a_lease()
    await h.limiter.charge("k", 9)
    assert h.store.trips == h.trips
    await h.limiter.take("k")
    assert h.store.trips > h.trips  # nothing was left


async def test_the_lease_is_at_most_a_twentieth_of_the_burst() -> None:
    clock = Clock()
    assert replica(CountedCounters(clock), clock, burst=10, lease=10).lease == 1  # failed authentications
    assert replica(CountedCounters(clock), clock, burst=2000, lease=10).lease == 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 12)), min_size=1, max_size=120),
       st.integers(1, 40))
async def test_replicas_with_leases_never_admit_more_than_the_limit_together(
        requests: list[tuple[int, int]], lease: int) -> None:
    clock = Clock()
    store = CountedCounters(clock)
    replicas = [replica(store, clock, burst=100, lease=lease) for _ in range(3)]
    admitted = 0
    for which, cost in requests:  # all in one slot: nothing frees up
        if await replicas[which].take("k", cost) == 0.0:
            admitted += cost
    assert admitted <= 100


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=60))
async def test_a_lease_changes_no_answer_of_a_single_replica_within_a_slot(costs: list[int]) -> None:
    clock = Clock()
    exact = replica(CountedCounters(clock), clock, burst=100, lease=1)
    leased = replica(CountedCounters(clock), clock, burst=100, lease=5)
    for cost in costs:
        assert (await exact.take("k", cost) == 0.0) == (await leased.take("k", cost) == 0.0)


async def settle() -> None:
    """Let background refills run (the in-process counters answer without waiting)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_next_lease_is_counted_before_the_held_one_runs_out() -> None:
    clock = Clock()
    store = CountedCounters(clock)
    lim = replica(store, clock)
    for _ in range(6):  # the first counts a lease of 10; the sixth leaves 4 held, under half a lease
        await lim.take("k")
    await settle()
    trips = store.trips
    assert [await lim.take("k") for _ in range(14)] == [0.0] * 14  # 4 held + the 10 counted ahead
    assert store.trips == trips


class SlowCounters(CountedCounters):
    """Counters whose adds let other tasks run meanwhile, as a store's round trip does; adds counted."""

    adds = 0

    async def add(self, name: str, amount: int, expires_at: float) -> int:
        self.adds += 1
        await asyncio.sleep(0)
        return await super().add(name, amount, expires_at)


async def test_requests_finding_too_few_units_wait_for_the_refill_under_way() -> None:
    clock = Clock()
    store = SlowCounters(clock)
    lim = replica(store, clock)
    for _ in range(6):
        await lim.take("k")  # the sixth started a refill, which has not counted its lease yet
    await lim.take("k", 4)  # the 4 held
    adds = store.adds
    assert list(await asyncio.gather(lim.take("k"), lim.take("k"))) == [0.0, 0.0]
    assert store.adds - adds == 1  # both served from the refill's lease, neither counted one of its own


async def test_concurrent_requests_finding_no_units_held_count_one_lease_between_them() -> None:
    clock = Clock()
    store = SlowCounters(clock)
    lim = replica(store, clock)
    # Four: six units stay held, more than half a lease, so no refill ahead is counted either.
    assert list(await asyncio.gather(*(lim.take("k") for _ in range(4)))) == [0.0] * 4
    assert store.adds == 1  # one lease of 10 served all four


async def test_waiting_with_no_units_held_counts_the_lease_the_request_then_takes_from() -> None:
    clock = Clock()
    store = SlowCounters(clock)
    lim = replica(store, clock)
    assert await lim.wait("k") == 0.0
    adds, trips = store.adds, store.trips
    assert await lim.take("k") == 0.0
    assert (adds, store.trips) == (1, trips)  # the wait counted the lease; the take cost no round trip


async def test_once_the_store_refused_a_lease_of_a_key_waiting_reads_its_window_without_counting() -> None:
    clock = Clock()
    store = SlowCounters(clock)
    lim = replica(store, clock, burst=200, lease=10)
    assert await replica(store, clock).take("k", 195) == 0.0  # another replica: 5 units left, less than a lease
    assert await lim.wait("k") == 0.0  # room for one, though not for a lease (the store refused it)
    adds = store.adds
    assert await lim.wait("k") == 0.0
    assert store.adds == adds  # the second wait only read


async def test_once_the_store_refused_a_lease_of_a_key_a_request_counts_only_what_it_needs() -> None:
    clock = Clock()
    store = CountedCounters(clock)
    lim = replica(store, clock, burst=200, lease=10)
    assert await replica(store, clock).take("k", 195) == 0.0  # another replica: 5 units left, less than a lease
    assert await lim.take("k") == 0.0  # the store refused the lease: the unit was counted alone
    trips = store.trips
    assert await lim.take("k") == 0.0
    assert store.trips - trips == 1  # one add: no lease asked for (and given back) first


async def test_refilled_units_never_exceed_the_limit() -> None:
    clock = Clock()
    lim = replica(CountedCounters(clock), clock, burst=200, lease=10)
    admitted = 0
    for _ in range(300):
        if await lim.take("k") == 0.0:
            admitted += 1
        await settle()
    assert admitted == 200


async def test_a_key_busy_in_a_slot_has_a_lease_counted_as_the_next_slot_begins() -> None:
    clock = Clock()
    clock.now = time.time()
    store = CountedCounters(clock)
    lim = Limiter(SlotStorage(store, clock), "test", rate=100_000, burst=100_000, lease=10)  # a 1 s window
    for _ in range(6):
        await lim.take("k")
    await settle()
    slot = lim.storage.current_slot(lim.window)
    clock.now = float(slot + 1)  # the next slot, where the units held are dropped
    await asyncio.sleep(slot + 1 - time.time() + 0.05)  # the turn of the slot passes on the loop's clock
    await settle()
    trips = store.trips
    assert await lim.take("k") == 0.0
    assert store.trips == trips


async def test_a_refill_the_store_does_not_answer_leaves_the_request_to_ask_itself() -> None:
    clock = Clock()
    store = CountedCounters(clock)
    lim = replica(store, clock)
    for _ in range(6):
        await lim.take("k")
    failing = store.add

    async def refuse(name: str, amount: int, expires_at: float) -> int:
        raise PyMongoError("store away")

    store.add = refuse  # type: ignore[method-assign]
    await settle()  # the refill fails quietly
    await lim.take("k", 4)
    with pytest.raises(PyMongoError):  # the request's own round trip reports the outage
        await lim.take("k")
    store.add = failing  # type: ignore[method-assign]
    assert await lim.take("k") == 0.0


async def test_a_lease_count_the_store_never_answers_is_given_up_so_the_next_request_counts_again() -> None:
    # A store connection that hangs (no error, no answer) must not leave the key waiting on one
    # count forever: every later request of the key would wait for it and get 503.
    clock = Clock()
    store = CountedCounters(clock)
    lim = Limiter(SlotStorage(store, clock), "test", rate=50, burst=200, lease=10, count_timeout=0.05)
    answering = store.add
    hung = asyncio.Event()

    async def hang(name: str, amount: int, expires_at: float) -> int:
        hung.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    store.add = hang  # type: ignore[method-assign]
    first = asyncio.create_task(lim.take("k"))
    await hung.wait()
    store.add = answering  # type: ignore[method-assign]
    assert await asyncio.wait_for(first, 1.0) == 0.0  # given up after 0.05 s, then asked again
    assert await asyncio.wait_for(lim.take("k"), 1.0) == 0.0


async def test_the_first_add_of_a_slot_reads_the_previous_slot_in_the_same_wait() -> None:
    clock = Clock()

    class Overlapping(CountedCounters):
        in_flight = 0
        most = 0

        async def _trip(self) -> None:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            await asyncio.sleep(0.01)
            self.in_flight -= 1

        async def counts(self, names: Sequence[str]) -> dict[str, int]:
            await self._trip()
            return await super().counts(names)

        async def add(self, name: str, amount: int, expires_at: float) -> int:
            await self._trip()
            return await super().add(name, amount, expires_at)

    store = Overlapping(clock)
    assert await replica(store, clock).take("k") == 0.0
    assert store.most == 2  # the read of the previous slot and the add were under way together


async def test_the_check_before_the_body_refuses_a_key_without_room_for_one_unit() -> None:
    clock = Clock()
    lim = replica(CountedCounters(clock), clock, burst=200, lease=10)
    await lim.charge("k", 200)  # a debt: the weighted count is at the limit
    assert await lim.wait("k") > 0


async def test_a_key_whose_pace_would_not_spend_the_held_units_in_this_slot_counts_no_lease_ahead() -> None:
    clock = Clock()
    store = CountedCounters(clock)
    lim = replica(store, clock)  # a window of 4 s
    await lim.take("k")  # a lease: 9 held
    clock.now += 3.5
    for _ in range(4):  # 5 held, 5 spent in 3.5 s: at that pace under one more before the slot ends
        await lim.take("k")
    trips = store.trips
    await settle()
    assert store.trips == trips
