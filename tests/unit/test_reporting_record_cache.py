"""The record cache of a rebuild is bounded by the memory its records take, not by their number,
so that a rebuild's footprint does not grow with the network."""

from __future__ import annotations

from typing import Any

from services.reporting import rules
from services.reporting.store import ReportingStore, record_weight
from tools.demo import scored


def record(client: str, sessions: int) -> dict[str, Any]:
    doc = rules.merge(None, [scored("t", client, n, 36.0) for n in range(1, sessions + 1)]).doc
    assert doc is not None
    return doc


def test_a_records_weight_grows_with_its_entries() -> None:
    assert record_weight(record("a", 1)) < record_weight(record("a", 5)) < record_weight(record("a", 60))


def test_a_cache_bounded_by_bytes_keeps_the_most_recent_records_that_fit() -> None:
    five = record("x", 5)
    store = ReportingStore(None, cache_bytes=3 * record_weight(five))  # type: ignore[arg-type]  # never read
    for client in "abcde":
        store.cache.put(("g1", client), record(client, 5))
    assert [c for c in "abcde" if ("g1", c) in store.cache] == ["c", "d", "e"]


def test_one_long_history_takes_the_room_of_many_short_ones() -> None:
    store = ReportingStore(None, cache_bytes=12 * record_weight(record("x", 5)))  # type: ignore[arg-type]
    for client in "abcdefghij":
        store.cache.put(("g1", client), record(client, 5))
    store.cache.put(("g1", "long"), record("long", 60))
    assert len(store.cache) < 5 and ("g1", "long") in store.cache
