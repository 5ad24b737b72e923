"""The incremental indices on the real local store, through the real scored handler: whatever
the order, duplicates, corrections, transfers and restarts, and whatever a crash leaves between
the record write and the counter write, the counters equal what the records say
(`ReportingStore.verify`, the check behind `alliance reporting verify`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.asynchronous.database import AsyncDatabase

from services.reporting import rules
from services.reporting.handlers import ReportingHandlers
from services.reporting.store import FIRST_GENERATION, GenerationState, ReportingStore, SubmissionStore
from shared import ids
from shared.events import Instrument, SrsScored
from shared.kafka import Decoded
from shared.mongo import Document
from shared.topics import Topics
from tests.support.fakes import FixedGenerations, Sink, inbound
from tests.support.reporting import counters_verified_in_db
from tests.support.stack import StackUnderTest, scratch_database
from tools.demo import BASE, revised, scored, transferred

TOPICS = Topics("counters.")
T = "tenant-counters"
G = FIRST_GENERATION


@pytest.fixture
async def db(stack: StackUnderTest) -> AsyncIterator[AsyncDatabase[Document]]:
    async with scratch_database(stack, "t_counters_") as database:
        yield database


counters_agree_after_each_scenario = counters_verified_in_db()


def handlers(store: ReportingStore, gen: str = G) -> ReportingHandlers:
    return ReportingHandlers(store, FixedGenerations(GenerationState(gen)), Sink(), TOPICS, SubmissionStore(store.db))


async def deliver(h: ReportingHandlers, events: list[SrsScored]) -> None:
    """One batch of `srs.scored.v1`, decoded as the subscriber hands it to the handler."""
    await h.scored([Decoded(inbound(TOPICS.scored, e, key=ids.partition_key(e.tenant_id, e.client_id)), e)
                    for e in events])


def history() -> list[SrsScored]:
    """Two clients, two instruments, two sites: late sessions, a correction under the same id and
    one under a new id, a transfer, and an episode restart."""
    a = [scored(T, "a", n, total, administered_at=BASE + timedelta(days=20 * n), episode_id="e1")
         for n, total in ((1, 30.0), (2, 34.0), (3, 37.5))]
    b = [scored(T, "b", 1, 38.0, instrument=Instrument.CSRS, site_id="south", clinician_id="c-2",
                administered_at=BASE + timedelta(days=3))]
    fixed = revised(a[1], total=31.0)
    renamed = revised(a[2], submission_id="a-3-bis", total=39.0)
    moved = transferred([a[0], fixed, renamed], "south")
    restart = scored(T, "a", 1, 33.0, administered_at=BASE + timedelta(days=90), episode_id="e2")
    late = scored(T, "b", 2, 35.0, instrument=Instrument.CSRS, site_id="south", clinician_id="c-2",
                  administered_at=BASE + timedelta(days=40))
    return [*a, *b, fixed, renamed, *moved, restart, late]


async def test_counters_agree_with_the_records_after_corrections_transfers_and_restarts(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db, cache_entries=100)
    for e in history():
        await deliver(handlers(store), [e])
    assert await store.verify(G) == {}


async def test_the_summary_from_the_counters_counts_each_records_current_episode(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db, cache_entries=100)
    await deliver(handlers(store), history())
    s = await store.summary(G, T, None)
    assert s is not None
    # a: current episode e2 (one session, 33.0, below); b: two sessions 38.0 then 35.0 (below)
    assert (s["clients"], s["trajectories"], s["sessions"], s["clients_at_risk"]) == (2, 2, 3, 2)
    assert s["mean_first_session_total"] == round((33.0 + 38.0) / 2, 2)
    south = await store.summary(G, T, "south")
    assert south is not None and south["sessions"] == 3
    assert await store.summary(G, T, "north") is None


async def test_a_redelivered_batch_never_counts_twice(db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    events = history()
    await deliver(handlers(store), events)
    before = await store.counters(G).find({}, {"m": 0}).to_list()
    await deliver(handlers(ReportingStore(db)), events)
    assert await store.counters(G).find({}, {"m": 0}).to_list() == before


async def test_a_crash_between_the_record_write_and_the_counter_write_is_repaired_by_the_redelivery(
        db: AsyncDatabase[Document], monkeypatch: pytest.MonkeyPatch) -> None:
    dying = ReportingStore(db, cache_entries=100)
    events = history()
    await deliver(handlers(dying), events[:4])
    real = ReportingStore.apply_counters

    async def crash(self: ReportingStore, gen: str, moves: Any) -> int:
        if moves:
            raise ConnectionError("the process died here")
        return await real(self, gen, moves)

    monkeypatch.setattr(ReportingStore, "apply_counters", crash)
    with pytest.raises(ConnectionError):
        await deliver(handlers(dying), events[4:8])
    monkeypatch.undo()
    assert await dying.verify(G) != {}  # the records moved, the counters did not
    restarted = ReportingStore(db, cache_entries=100)
    await deliver(handlers(restarted), events[4:8])  # the uncommitted batch comes again
    await deliver(handlers(restarted), events[8:])
    assert await restarted.verify(G) == {}


async def test_a_crash_after_some_counters_took_the_moves_does_not_count_them_twice(
        db: AsyncDatabase[Document], monkeypatch: pytest.MonkeyPatch) -> None:
    store = ReportingStore(db, cache_entries=100)
    events = history()
    real = ReportingStore.apply_counters

    async def half(self: ReportingStore, gen: str, moves: Any) -> int:
        await real(self, gen, moves[: len(moves) // 2 + 1])
        raise ConnectionError("died after part of the counter write")

    monkeypatch.setattr(ReportingStore, "apply_counters", half)
    with pytest.raises(ConnectionError):
        await deliver(handlers(store), events)
    monkeypatch.undo()
    await deliver(handlers(ReportingStore(db)), events)
    assert await store.verify(G) == {}


async def test_trends_give_monthly_sessions_clients_and_change(db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    jan = [scored(T, "a", n, total, administered_at=BASE.replace(month=1, day=5 + n), episode_id="e1")
           for n, total in ((1, 30.0), (2, 34.0))]
    feb = scored(T, "a", 3, 38.0, administered_at=BASE.replace(month=2, day=3), episode_id="e1")
    await deliver(handlers(store), [*jan, feb])
    year = BASE.year
    series = await store.trends(G, T, f"{year}-01", f"{year}-03")
    assert [(p["month"], p["sessions"], p["clients_seen"]) for p in series] == [
        (f"{year}-01", 2, 1), (f"{year}-02", 1, 1), (f"{year}-03", 0, 0)]
    assert series[1]["mean_change_first_to_latest"] == 8.0 and series[0]["mean_change_first_to_latest"] is None
    assert series[0]["pct_sessions_below_cutoff"] == 100.0 * sum(rules.below_cutoff(rules.session_entry(e))
                                                                  for e in jan) / 2


_EVENTS = history()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(range(len(_EVENTS))), repeats=st.lists(st.integers(0, len(_EVENTS) - 1), max_size=6),
       batch=st.integers(1, 6))
async def test_any_order_duplicates_and_batching_leave_counters_equal_to_the_records(
        db: AsyncDatabase[Document], order: list[int], repeats: list[int], batch: int) -> None:
    gen = "g" + uuid.uuid4().hex[:8]  # one generation per example: the database is shared
    store = ReportingStore(db, cache_entries=100)
    h = handlers(store, gen)
    stream = [_EVENTS[i] for i in [*order, *repeats]]
    for i in range(0, len(stream), batch):
        await deliver(h, stream[i:i + batch])
    assert await store.verify(gen) == {}
    ordered = ReportingStore(db)
    await ordered.apply_scored("ref" + gen, _EVENTS)
    assert without_time(await store.summary(gen, T, None)) == without_time(await ordered.summary("ref" + gen, T, None))


def without_time(summary: Document | None) -> Document:
    assert summary is not None
    return {k: v for k, v in summary.items() if k != "as_of"}
