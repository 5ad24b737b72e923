"""The persistence kit of `shared.mongo`: its caches (pure, on an injected clock) and how it reads a
bulk write's errors (the policy every store follows: a duplicate key is an answer, anything else
is raised). Against the real store: tests/integration/test_persistence_kit_store.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError

from shared.mongo import DUPLICATE_KEY, LruCache, TtlCache, batches, duplicate_key_indexes, given, guarded_upserts


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- LruCache


def test_an_lru_cache_drops_the_least_recently_used_entry_past_its_capacity() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3


def test_an_lru_cache_weighs_entries_by_what_they_hold() -> None:
    cache: LruCache[str, list[int]] = LruCache(5, weight=len)
    cache.put("small", [1])
    cache.put("large", [1, 2, 3, 4])
    assert cache.held == 5
    cache.put("more", [1, 2])
    assert "small" not in cache and "large" not in cache and cache.held == 2


def test_an_lru_cache_keeps_no_value_heavier_than_its_whole_capacity() -> None:
    cache: LruCache[str, list[int]] = LruCache(2, weight=len)
    cache.put("huge", [1, 2, 3])
    assert len(cache) == 0 and cache.held == 0


def test_an_lru_cache_of_capacity_zero_keeps_nothing() -> None:
    cache: LruCache[str, int] = LruCache(0)
    cache.put("a", 1)
    assert cache.get("a") is None


def test_replacing_an_lru_entry_counts_its_weight_once() -> None:
    cache: LruCache[str, list[int]] = LruCache(10, weight=len)
    cache.put("a", [1, 2, 3])
    cache.put("a", [1])
    assert cache.held == 1 and len(cache) == 1


def test_popping_an_lru_entry_returns_it_and_frees_its_weight() -> None:
    cache: LruCache[str, list[int]] = LruCache(10, weight=len)
    cache.put("a", [1, 2])
    assert cache.pop("a") == [1, 2] and cache.pop("a") is None
    assert cache.held == 0


# ---- TtlCache


def holding_v(clock: Clock) -> TtlCache[str, str]:
    """A cache with "v" put under "k" now, trusted for 5 seconds."""
    cache: TtlCache[str, str] = TtlCache(5.0, clock=clock)
    cache.put("k", "v")
    return cache


def test_a_ttl_value_is_fresh_until_its_time_to_live_has_passed() -> None:
    clock = Clock()
    cache = holding_v(clock)
    clock.now += 4.9
    hit = cache.fresh("k")
    assert hit is not None and hit.value == "v"
    clock.now += 0.1
    assert cache.fresh("k") is None


def test_a_stale_ttl_value_is_still_there_marked_stale() -> None:
    clock = Clock()
    cache = holding_v(clock)
    clock.now += 6
    hit = cache.get("k")
    assert hit is not None and hit.value == "v" and hit.stale
    assert "k" in cache


def test_a_ttl_cache_holds_none_as_a_value() -> None:
    cache: TtlCache[str, str | None] = TtlCache(5.0, clock=Clock())
    cache.put("gone", None)
    hit = cache.fresh("gone")
    assert hit is not None and hit.value is None


def test_a_ttl_of_zero_makes_every_value_stale_at_once() -> None:
    cache: TtlCache[str, str] = TtlCache(0, clock=Clock())
    cache.put("k", "v")
    assert cache.fresh("k") is None and "k" in cache


def test_putting_a_ttl_value_again_starts_its_time_to_live_again() -> None:
    clock = Clock()
    cache: TtlCache[str, str] = TtlCache(5.0, clock=clock)
    cache.put("k", "old")
    clock.now += 4
    cache.put("k", "new")
    clock.now += 4
    hit = cache.fresh("k")
    assert hit is not None and hit.value == "new"


def test_a_ttl_cache_drops_the_least_recently_used_past_its_bound() -> None:
    cache: TtlCache[str, int] = TtlCache(5.0, max_entries=2, clock=Clock())
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")
    cache.put("c", 3)
    assert "a" in cache and "b" not in cache and "c" in cache


def test_a_popped_ttl_value_is_gone() -> None:
    cache: TtlCache[str, int] = TtlCache(5.0, clock=Clock())
    cache.put("a", 1)
    cache.pop("a")
    assert cache.get("a") is None and len(cache) == 0


# ---- the duplicate-key / write-concern policy


def bulk_error(codes: list[tuple[int, int]], *, write_concern: bool = False) -> BulkWriteError:
    return BulkWriteError({"writeErrors": [{"index": i, "code": c} for i, c in codes],
                           "writeConcernErrors": [{"code": 64}] if write_concern else [],
                           "nInserted": 0, "nUpserted": 0, "nModified": 0})


def test_duplicate_keys_alone_are_read_as_the_indexes_of_their_ops() -> None:
    assert duplicate_key_indexes(bulk_error([(0, DUPLICATE_KEY), (3, DUPLICATE_KEY)])) == [0, 3]


def test_any_other_write_error_makes_the_error_one_to_raise() -> None:
    assert duplicate_key_indexes(bulk_error([(0, DUPLICATE_KEY), (1, 121)])) is None


def test_a_write_concern_error_makes_even_duplicate_keys_an_error_to_raise() -> None:
    assert duplicate_key_indexes(bulk_error([(0, DUPLICATE_KEY)], write_concern=True)) is None


class Result:
    upserted_count = 0
    modified_count = 1
    inserted_count = 0


class FakeCollection:
    """Answers each bulk_write with the next planned list of (op index, error code). The local
    store serializes writes, so the race `guarded_upserts` retries cannot be produced on it."""

    def __init__(self, *answers: list[tuple[int, int]]) -> None:
        self.answers = list(answers)
        self.calls: list[list[Any]] = []

    async def bulk_write(self, ops: list[Any], ordered: bool = True) -> Result:
        self.calls.append(list(ops))
        errors = self.answers.pop(0) if self.answers else []
        if errors:
            raise bulk_error(errors)
        return Result()


OPS = [UpdateOne({"_id": str(i)}, {"$set": {"x": i}}, upsert=True) for i in range(3)]


async def test_guarded_upserts_that_collided_are_run_once_more_and_only_they() -> None:
    col = FakeCollection([(1, DUPLICATE_KEY)], [])
    await guarded_upserts(cast(Any, col), OPS)
    assert col.calls == [OPS, [OPS[1]]]


async def test_a_second_collision_of_a_guarded_upsert_is_a_stale_write_and_not_an_error() -> None:
    col = FakeCollection([(0, DUPLICATE_KEY), (2, DUPLICATE_KEY)], [(1, DUPLICATE_KEY)])
    await guarded_upserts(cast(Any, col), OPS)
    assert col.calls == [OPS, [OPS[0], OPS[2]]]  # no third try


async def test_a_guarded_upsert_raises_any_other_write_error() -> None:
    col = FakeCollection([(0, DUPLICATE_KEY), (1, 121)])
    with pytest.raises(BulkWriteError):
        await guarded_upserts(cast(Any, col), OPS)


def test_given_keeps_only_the_fields_that_are_not_none() -> None:
    assert given(site_id="north", status=None, flag=False) == {"site_id": "north", "flag": False}


# ---- batches (a migration's backfill)


async def numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


async def test_batches_hold_size_items_each_and_the_rest_last() -> None:
    got = [b async for b in batches(numbers(2_500), 1_000)]
    assert [len(b) for b in got] == [1_000, 1_000, 500]
    assert [i for b in got for i in b] == list(range(2_500))


async def test_batches_of_nothing_are_none() -> None:
    assert [b async for b in batches(numbers(0), 1_000)] == []
