"""The incremental indices on the real local store, through the real scored handler: whatever
the order, duplicates, corrections, transfers and restarts, and whatever a crash leaves between
the record write and the counter write, the counters equal what the records say
(`ReportingStore.verify`, the check behind `alliance reporting verify`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import InvalidOperation

from services.reporting import rules
from services.reporting.handlers import ReportingHandlers
from services.reporting.rebuild import Replayer
from services.reporting.store import (
    FIRST_GENERATION,
    SUBMISSIONS,
    CounterTally,
    GenerationState,
    ReportingStore,
    SubmissionStore,
    pending_of,
    rollup_id,
    rollup_of,
    stamp_id,
)
from shared import ids
from shared.events import AlertStatus, AlertStatusChanged, AllianceDeterioration, Instrument, SrsScored
from shared.kafka import Decoded
from shared.mongo import Document
from shared.settings import KafkaSettings, MongoSettings
from shared.topics import Topics
from tests.support.fakes import FixedGenerations, Sink, inbound
from tests.support.reporting import assert_counters_agree, counters_verified_in_db
from tests.support.stack import StackUnderTest, scratch_database
from tools.demo import BASE, acknowledgement, deterioration_for, lifecycle, revised, scored, transferred

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


# ---------------------------------------------------------------------------------------------
# Alert figures: raised, acknowledged and the time to acknowledge, counted once per alert

AlertEvent = AllianceDeterioration | AlertStatusChanged


def alert_history() -> list[AlertEvent]:
    """Three alerts of two clients: one revised by a correction and acknowledged after 3 hours,
    one acknowledged after 20 minutes then superseded, one withdrawn without acknowledgement."""
    out: list[AllianceDeterioration] = []
    for client, total in (("a", 28.0), ("b", 27.0), ("c", 26.0)):
        alert = deterioration_for(scored(T, client, 2, total, previous_total=36.0, episode_id="e1",
                                         administered_at=BASE.replace(month=3, day=10)))
        assert alert is not None
        out.append(alert)
    a, b, c = out
    again = a.model_copy(update={"revision": 2, "total": 26.5, "event_id": ids.alert_event_id(a.alert_id, 2),
                                 "occurred_at": a.occurred_at + timedelta(hours=1)})
    return [*out, again, acknowledgement(a, a.occurred_at + timedelta(hours=3)),
            acknowledgement(b, b.occurred_at + timedelta(minutes=20)), lifecycle(b, AlertStatus.SUPERSEDED),
            lifecycle(c, AlertStatus.WITHDRAWN)]


async def test_counters_agree_with_the_records_after_corrections_transfers_and_restarts(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db, cache_entries=100)
    for e in history():
        await deliver(handlers(store), [e])
    assert await store.verify(G) == {}


async def test_the_check_after_each_scenario_fails_naming_a_counter_that_differs_from_the_records(
        db: AsyncDatabase[Document], stack: StackUnderTest) -> None:
    store = ReportingStore(db)
    await deliver(handlers(store), history()[:3])
    tampered = await store.counters(G).find_one_and_update({}, {"$inc": {"sessions": 1}})
    assert tampered is not None
    with pytest.raises(AssertionError, match=tampered["_id"]):
        await assert_counters_agree(MongoSettings(url=stack.mongo_url, database=db.name), timeout=1)
    await store.counters(G).update_one({"_id": tampered["_id"]}, {"$inc": {"sessions": -1}})


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


async def deliver_alerts(h: ReportingHandlers, events: Sequence[SrsScored | AlertEvent]) -> None:
    """One batch of each topic (scored, then the two alert topics), as the subscribers hand them
    to the handlers."""
    if sessions := [e for e in events if isinstance(e, SrsScored)]:
        await deliver(h, sessions)
    raises = [e for e in events if isinstance(e, AllianceDeterioration)]
    statuses = [e for e in events if isinstance(e, AlertStatusChanged)]
    if raises:
        await h.deterioration([Decoded(inbound(TOPICS.deterioration, e), e) for e in raises])
    if statuses:
        await h.alert_status([Decoded(inbound(TOPICS.alert_status, e), e) for e in statuses])


@pytest.mark.parametrize("kind", ["sessions", "alerts"])
async def test_a_redelivered_batch_never_counts_twice(db: AsyncDatabase[Document], kind: str) -> None:
    store = ReportingStore(db)
    events: Sequence[SrsScored | AlertEvent] = history() if kind == "sessions" else alert_history()
    await deliver_alerts(handlers(store), events)
    before = await store.counters(G).find({}, {"m": 0}).to_list()
    await deliver_alerts(handlers(ReportingStore(db)), events)
    assert await store.counters(G).find({}, {"m": 0}).to_list() == before


def die_before_the_counters(monkeypatch: pytest.MonkeyPatch, one_command: bool) -> None:
    """The store or the process dies after a batch's document writes, before its counter writes:
    inside the one ordered command that carries them (the store dies), or between the separate
    writes of a store without that command (the process dies)."""
    if one_command:
        die_in_the_command_before(monkeypatch, "_counters")
        return

    async def crash(self: ReportingStore, gen: str, moves: Any, **kwargs: Any) -> int | None:
        if moves:
            raise ConnectionError("the process died here")
        return await real_apply(self, gen, moves, **kwargs)

    real_apply = ReportingStore.apply_counters
    refuse_the_command(monkeypatch)
    monkeypatch.setattr(ReportingStore, "apply_counters", crash)


def die_in_the_command_before(monkeypatch: pytest.MonkeyPatch, collection_suffix: str) -> None:
    """The store dies inside the ordered cross-collection command, before its first write to a
    collection whose name ends in `collection_suffix` (what comes before it is written)."""
    real = AsyncMongoClient.bulk_write

    async def dying(self: AsyncMongoClient[Document], models: Any, **kwargs: Any) -> Any:
        first = next(i for i, m in enumerate(models) if str(m._namespace).endswith(collection_suffix))
        if first:
            await real(self, models[:first], **kwargs)
        raise ConnectionError("the store died here")

    monkeypatch.setattr(AsyncMongoClient, "bulk_write", dying)


def refuse_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store without the cross-collection command: the writes it would join are made apart."""

    async def refuse(self: AsyncMongoClient[Document], models: Any, **kwargs: Any) -> Any:
        raise InvalidOperation("MongoClient.bulk_write requires MongoDB server version 8.0+.")

    monkeypatch.setattr(AsyncMongoClient, "bulk_write", refuse)


@pytest.mark.parametrize("one_command", [True, False], ids=["one command", "separate writes"])
@pytest.mark.parametrize(("kind", "cut"), [("sessions", (4, 8)), ("alerts", (3, 9))])
async def test_a_crash_between_the_document_write_and_the_counter_write_is_repaired_by_the_redelivery(
        db: AsyncDatabase[Document], monkeypatch: pytest.MonkeyPatch, kind: str, cut: tuple[int, int],
        one_command: bool) -> None:
    """Sessions: the record is written, its moves are not; alerts: the alert's new contribution is
    written (`counted`), its moves are not."""
    dying = ReportingStore(db, cache_entries=100)
    events: Sequence[SrsScored | AlertEvent] = history() if kind == "sessions" else alert_history()
    await deliver_alerts(handlers(dying), events[:cut[0]])
    die_before_the_counters(monkeypatch, one_command)
    with pytest.raises(ConnectionError):
        await deliver_alerts(handlers(dying), events[cut[0]:cut[1]])
    monkeypatch.undo()
    assert await dying.verify(G) != {}  # the documents moved, the counters did not
    restarted = ReportingStore(db, cache_entries=100)
    await deliver_alerts(handlers(restarted), events[cut[0]:cut[1]])  # the uncommitted batch comes again
    await deliver_alerts(handlers(restarted), events[cut[1]:])
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


async def test_trends_count_each_alert_once_as_raised_and_acknowledgements_with_their_median_delay(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    await deliver_alerts(handlers(store), alert_history())
    (march,) = await store.trends(G, T, f"{BASE.year}-03", f"{BASE.year}-03")
    assert (march["alerts_raised"], march["alerts_acknowledged"]) == (3, 2)
    expected = (rules.ack_bin_value(rules.ack_bin(20 * 60)) + rules.ack_bin_value(rules.ack_bin(3 * 3600))) / 2
    assert march["median_seconds_to_acknowledge"] == round(expected, 1)
    assert await store.verify(G) == {}


async def test_the_summary_counts_alerts_raised_and_acknowledged_from_the_counters_not_the_alert_documents(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    await deliver_alerts(handlers(store), alert_history())
    await store.alerts(G).drop()  # a summary that still counted alert documents would see none
    for scope in (None, "north"):
        summary = await store.summary(G, T, scope)
        assert summary is not None and summary["alerts"] == {"raised": 3, "acknowledged": 2}
    await store.counters(G).drop()  # nothing left to disagree for the check after the scenario


async def test_writers_counting_the_same_alerts_at_once_count_each_once(db: AsyncDatabase[Document]) -> None:
    """Two consumers around a rebalance, or the live consumer and a rebuild in one generation:
    each writes and counts the same alerts concurrently; the version on `counted` lets one win
    per alert and version, and the other re-reads and counts what is left."""
    events = alert_history()
    await asyncio.gather(*(deliver_alerts(handlers(ReportingStore(db)), events[i:] + events[:i])
                           for i in range(0, len(events), 2)))
    store = ReportingStore(db)
    assert await store.verify(G) == {}
    (march,) = await store.trends(G, T, f"{BASE.year}-03", f"{BASE.year}-03")
    assert (march["alerts_raised"], march["alerts_acknowledged"]) == (3, 2)


def spy_on_counter_writes(store: ReportingStore) -> list[tuple[str, int]]:
    """The (record or alert id, version) pairs `store` asks `apply_counters` to apply, as it asks."""
    asked: list[tuple[str, int]] = []
    apply = store.apply_counters

    async def spy(gen: str, moves: Sequence[tuple[str, int, rules.Counters]], **kwargs: Any) -> int | None:
        asked.extend((rid, version) for rid, version, _ in moves)
        return await apply(gen, moves, **kwargs)

    store.apply_counters = spy  # type: ignore[method-assign]
    return asked


async def test_an_alert_counted_by_this_process_has_its_moves_applied_once_when_it_is_counted_again(
        db: AsyncDatabase[Document]) -> None:
    """`pending` stays on a counted alert (clearing it cost a write per batch); the process that
    applied it remembers so and, counting the alert again, applies only the new version's moves."""
    raised, *_ = alert_history()
    store = ReportingStore(db)
    h = handlers(store)
    await deliver_alerts(h, [raised])
    assert (await store.alerts(G).find_one({"_id": raised.alert_id}) or {}).get("pending")
    asked = spy_on_counter_writes(store)
    await deliver_alerts(h, [acknowledgement(raised, raised.occurred_at + timedelta(hours=1))])
    assert asked == [(raised.alert_id, 2)]
    assert await store.verify(G) == {}


async def test_an_alert_counted_by_another_process_has_its_applied_moves_applied_again_without_effect(
        db: AsyncDatabase[Document]) -> None:
    raised, *_ = alert_history()
    await deliver_alerts(handlers(ReportingStore(db)), [raised])
    restarted = ReportingStore(db)
    asked = spy_on_counter_writes(restarted)
    await deliver_alerts(handlers(restarted), [acknowledgement(raised, raised.occurred_at + timedelta(hours=1))])
    assert asked == [(raised.alert_id, 1), (raised.alert_id, 2)]
    assert await restarted.verify(G) == {}
    (march,) = await restarted.trends(G, T, f"{BASE.year}-03", f"{BASE.year}-03")
    assert (march["alerts_raised"], march["alerts_acknowledged"]) == (1, 1)


_ALERT_EVENTS = alert_history()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(range(len(_ALERT_EVENTS))),
       repeats=st.lists(st.integers(0, len(_ALERT_EVENTS) - 1), max_size=6), batch=st.integers(1, 5))
async def test_any_order_duplicates_and_batching_of_alert_events_leave_the_same_alert_figures(
        db: AsyncDatabase[Document], order: list[int], repeats: list[int], batch: int) -> None:
    gen = "g" + uuid.uuid4().hex[:8]
    store = ReportingStore(db)
    h = handlers(store, gen)
    stream = [_ALERT_EVENTS[i] for i in [*order, *repeats]]
    for i in range(0, len(stream), batch):
        await deliver_alerts(h, stream[i:i + batch])
    assert await store.verify(gen) == {}
    ordered = ReportingStore(db)
    await deliver_alerts(handlers(ordered, "ref" + gen), _ALERT_EVENTS)
    months = (f"{BASE.year}-01", f"{BASE.year}-12")
    assert await store.trends(gen, T, *months) == await ordered.trends("ref" + gen, T, *months)


# ---------------------------------------------------------------------------------------------
# Tenant roll-ups: a tenant's summary and trends from one document (store.py, "Tenant roll-ups")

SPAN = (f"{BASE.year}-01", f"{BASE.year + 1}-12")


async def test_a_refreshed_tenant_rollup_gives_the_summary_and_trends_the_counters_give(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db, cache_entries=100)
    await deliver_alerts(handlers(store), [*history(), *alert_history()])
    from_counters = await store.summary(G, T, None), await store.trends(G, T, *SPAN)  # no roll-up yet
    assert await store.refresh_rollups(G) == 1
    rollup = await store.rollups(G).find_one({"_id": rollup_id(T)})
    assert rollup is not None
    made = rollup["as_of"].replace(tzinfo=rollup["as_of"].tzinfo or UTC)
    summary = await store.summary(G, T, None)
    series, as_of = await store.trends_as_of(G, T, *SPAN)
    assert summary is not None and datetime.fromisoformat(summary["as_of"]) == as_of == made  # read from the roll-up
    assert (without_time(summary), series) == (without_time(from_counters[0]), from_counters[1])


async def test_a_tenant_rollup_behind_the_counters_is_served_only_within_its_max_age(
        db: AsyncDatabase[Document]) -> None:
    events = history()
    writer = ReportingStore(db, cache_entries=100)
    await deliver(handlers(writer), events[:4])
    await writer.refresh_rollups(G)
    at_refresh = await writer.summary(G, T, None)
    await deliver(handlers(writer), events[4:])  # the roll-up misses these until the next refresh
    lenient, exact = ReportingStore(db, rollup_max_age=3600), ReportingStore(db, rollup_max_age=0)
    stale, current = await lenient.summary(G, T, None), await exact.summary(G, T, None)
    assert without_time(stale) == without_time(at_refresh) != without_time(current)
    assert (current or {})["sessions"] == 3  # the counters: every record's current episode


async def test_a_refresh_brings_a_tenant_rollup_up_to_date_with_the_counters(db: AsyncDatabase[Document]) -> None:
    events = history()
    store = ReportingStore(db, cache_entries=100, rollup_max_age=3600)
    await deliver(handlers(store), events[:4])
    await store.refresh_rollups(G)
    await deliver(handlers(store), events[4:])
    assert await store.refresh_rollups(G) == 1
    assert await store.refresh_rollups(G) == 0  # nothing written since: nothing to do
    assert (await store.summary(G, T, None) or {})["sessions"] == 3


# One command for a batch's counter moves and its tenants' stamps (issue 11: a round trip less on
# every batch's critical path), ordered so that each stamp still follows the counters it covers

class Commands(monitoring.CommandListener):
    """The commands a client sent, by name."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Document]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent.append((event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def commands_of_one_batch(stack: StackUnderTest, db: AsyncDatabase[Document],
                                events: Sequence[SrsScored | AlertEvent], names: Sequence[str],
                                ) -> list[tuple[str, Document]]:
    """The commands (name, body) one batch of `events` sends on these collections of generation G."""
    return (await commands_of_batches(stack, db, [events], names))[0]


async def commands_of_batches(stack: StackUnderTest, db: AsyncDatabase[Document],
                              batches: Sequence[Sequence[SrsScored | AlertEvent]], names: Sequence[str],
                              ) -> list[list[tuple[str, Document]]]:
    """Per batch, the commands (name, body) it sends on these collections of generation G, the
    batches delivered in turn to one process."""
    listener = Commands()
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True, event_listeners=[listener])
    spaces = {f"{db.name}.{n}" for n in names}
    out: list[list[tuple[str, Document]]] = []
    try:
        store = ReportingStore(client[db.name], cache_entries=100)
        await store.ensure_indexes(G)
        for events in batches:
            listener.sent.clear()
            await deliver_alerts(handlers(store), events)
            out.append([(name, cmd) for name, cmd in listener.sent
                        if cmd.get(name) in names or any(ns["ns"] in spaces for ns in cmd.get("nsInfo", []))])
    finally:
        await client.close()
    return out


async def test_a_batchs_counter_moves_and_its_tenants_stamps_reach_the_store_as_one_ordered_command(
        db: AsyncDatabase[Document], stack: StackUnderTest) -> None:
    store = ReportingStore(db)
    touching = await commands_of_one_batch(stack, db, history()[:4], (store.counters(G).name, store.rollups(G).name))
    assert [name for name, _ in touching] == ["bulkWrite"]
    command = touching[0][1]
    order = [[ns["ns"] for ns in command["nsInfo"]][op["update"]].rsplit("_g1_", 1)[-1] for op in command["ops"]]
    assert command["ordered"] is True
    # the stamp after every counter; then the new records' directory entries (store.directory_entries)
    counters, entries = order.count("counters"), order.count("client_directory")
    assert order[:counters + 1 + entries] == ["counters"] * counters + ["rollups"] + ["client_directory"] * entries


async def test_a_scored_batchs_submission_statuses_ride_last_in_its_counter_command_not_in_one_of_their_own(
        db: AsyncDatabase[Document], stack: StackUnderTest) -> None:
    store = ReportingStore(db)
    events = history()[:4]
    names = (store.counters(G).name, store.rollups(G).name, SUBMISSIONS)
    touching = await commands_of_one_batch(stack, db, events, names)
    assert [name for name, _ in touching] == ["bulkWrite"]
    command = touching[0][1]
    spaces = [ns["ns"] for ns in command["nsInfo"]]
    order = [spaces[op["update"]].rsplit(".", 1)[-1] for op in command["ops"]]
    statuses = order.count(SUBMISSIONS)
    assert statuses and order[-statuses:] == [SUBMISSIONS] * statuses
    known = SubmissionStore(db)
    for e in events:
        status = await known.get(T, e.submission_id)
        assert status is not None and status["scored"]["revision"] == e.revision


async def test_statuses_whose_guard_stops_the_counter_command_are_written_apart_and_nothing_counts_twice(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db, cache_entries=100)
    events = history()[:4]
    newer = events[0].model_copy(update={"revision": events[0].revision + 1})
    statuses = SubmissionStore(db)
    await statuses.apply_scored([newer])  # another writer got there with a later revision first
    await deliver(handlers(store), events)
    kept = await statuses.get(T, newer.submission_id)
    assert kept is not None and kept["scored"]["revision"] == newer.revision
    for e in events[1:]:
        status = await statuses.get(T, e.submission_id)
        assert status is not None and status["scored"]["revision"] == e.revision
    assert await store.verify(G) == {}


async def test_an_alerts_counted_share_its_counter_moves_and_stamp_follow_its_raise_in_one_ordered_command(
        db: AsyncDatabase[Document], stack: StackUnderTest) -> None:
    store = ReportingStore(db)
    names = (store.alerts(G).name, store.counters(G).name, store.rollups(G).name)
    touching = await commands_of_one_batch(stack, db, alert_history()[:1], names)
    assert [name for name, _ in touching] == ["findAndModify", "bulkWrite"]
    command = touching[1][1]
    order = [[ns["ns"] for ns in command["nsInfo"]][op["update"]].rsplit("_", 1)[-1] for op in command["ops"]]
    assert command["ordered"] is True
    assert order == ["alerts", *(["counters"] * (len(order) - 2)), "rollups"]


async def test_a_redelivered_counter_write_counts_nothing_twice_and_still_bumps_the_stamp(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db, cache_entries=100)
    await deliver(handlers(store), history())
    record = await store.clients(G).find_one({"_id": rules.record_id(T, "a", Instrument.SRS.value)})
    assert record is not None
    carried = pending_of(record)
    assert carried is not None
    counters = await store.counters(G).find({}).to_list()
    stamp = await store.rollups(G).find_one({"_id": stamp_id(T)})
    await store.apply_counters(G, [(record["_id"], *carried)])  # its guard misses: already applied
    assert await store.counters(G).find({}).to_list() == counters
    again = await store.rollups(G).find_one({"_id": stamp_id(T)})
    assert stamp is not None and again is not None and again["changed"] == stamp["changed"] + 1
    assert await store.verify(G) == {}


async def test_a_store_without_the_cross_collection_bulk_write_gets_the_counters_and_stamps_apart(
        db: AsyncDatabase[Document], monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    async def refuse(self: AsyncMongoClient[Document], models: Any, **kwargs: Any) -> Any:
        asked.append(len(models))
        raise InvalidOperation("MongoClient.bulk_write requires MongoDB server version 8.0+.")

    monkeypatch.setattr(AsyncMongoClient, "bulk_write", refuse)
    store = ReportingStore(db, cache_entries=100, rollup_max_age=0)
    events = history()
    await deliver(handlers(store), events[:4])
    await store.refresh_rollups(G)
    await deliver(handlers(store), events[4:])
    assert len(asked) == 1  # remembered: not asked again
    assert await store.verify(G) == {}
    assert await store.refresh_rollups(G) == 1  # the later batch stamped its tenant apart


# A rebuild's replay (`rebuild.Replayer`): counter moves held in memory (`CounterTally`) and written
# once per counter document, alerts held (`HeldAlerts`) and inserted once each, counted as inserted

def replayer(store: ReportingStore, gen: str = G, alert_bytes: int = 2**20, record_bytes: int = 0,
             tally_bytes: int = 2**20) -> Replayer:
    return Replayer(store, gen, KafkaSettings(), alert_bytes=alert_bytes, record_bytes=record_bytes,
                    tally_bytes=tally_bytes)


async def replay_as_a_rebuild(replay: Replayer, events: Sequence[SrsScored | AlertEvent], batch: int = 1) -> None:
    for i in range(0, len(events), batch):
        await replay.apply_events(events[i:i + batch])


def alert_documents(docs: list[Document]) -> list[Document]:
    """Alert documents without how they were counted (a rebuild counts on insert, live consumers after)."""
    return sorted(({k: v for k, v in d.items() if k not in ("counted", "cv", "pending")} for d in docs),
                  key=lambda d: str(d["_id"]))


async def test_a_rebuild_writes_each_counter_and_alert_document_once_without_markers_and_the_counters_agree(
        db: AsyncDatabase[Document]) -> None:
    replay = replayer(ReportingStore(db, cache_entries=100))
    await replay_as_a_rebuild(replay, [*history(), *alert_history()])
    assert await replay.store.counters(G).count_documents({}) == 0  # nothing written before the end
    assert await replay.store.alerts(G).count_documents({}) == 0
    await replay.finish()
    assert await replay.store.counters(G).count_documents({"m": {"$exists": True}}) == 0
    assert await replay.store.alerts(G).count_documents({"pending": {"$exists": True}}) == 0
    assert await replay.store.verify(G) == {}


@pytest.mark.parametrize("alert_bytes", [2**20, 0], ids=["alerts held to the end", "alerts pushed out each batch"])
async def test_a_rebuild_makes_the_alert_documents_and_figures_live_consumers_make(
        db: AsyncDatabase[Document], alert_bytes: int) -> None:
    """Held to the end, each alert is one insert; pushed out after each batch, its later events
    find it written and are applied and counted as a live consumer's."""
    events = alert_history()
    replay = replayer(ReportingStore(db), alert_bytes=alert_bytes)
    await replay_as_a_rebuild(replay, events)
    await replay.finish()
    live = ReportingStore(db)
    await deliver_alerts(handlers(live, "live"), events)
    assert alert_documents(await replay.store.alerts(G).find({}).to_list()) == alert_documents(
        await live.alerts("live").find({}).to_list())
    assert await replay.store.trends(G, T, *SPAN) == await live.trends("live", T, *SPAN)
    assert await replay.store.verify(G) == {}


@pytest.mark.parametrize("held_bytes", [2**20, 0], ids=["sessions and alerts held to the end",
                                                         "sessions and alerts pushed out each batch"])
async def test_a_rebuild_and_live_consumers_filling_the_same_generation_at_once_count_everything_once(
        db: AsyncDatabase[Document], held_bytes: int) -> None:
    """The live consumers write the generation being built (beside the active one), with their
    markers, while the replay holds its own moves, sessions and alerts: both add up to what the
    records and alerts say."""
    events: list[SrsScored | AlertEvent] = [*history(), *alert_history()]
    replay = replayer(ReportingStore(db, cache_entries=100), alert_bytes=held_bytes, record_bytes=held_bytes)
    live = ReportingHandlers(ReportingStore(db, cache_entries=100), FixedGenerations(GenerationState("g0", G)),
                             Sink(), TOPICS, SubmissionStore(db))
    await asyncio.gather(replay_as_a_rebuild(replay, events),
                         *(deliver_alerts(live, [e]) for e in reversed(events[len(events) // 3:])))
    await replay.finish()
    assert await replay.store.verify(G) == {}
    after_switch = handlers(ReportingStore(db, cache_entries=100))
    await deliver_alerts(after_switch, events)  # and the live consumers go on counting after the switch
    assert await replay.store.verify(G) == {}


def record_documents(docs: list[Document]) -> list[Document]:
    """Record documents without how they were written (version, time, carried moves)."""
    return sorted(({k: v for k, v in d.items() if k not in ("v", "updated_at", "pending")} for d in docs),
                  key=lambda d: str(d["_id"]))


# How much `HeldRecords` holds: every session of the history, or about one session (a client pushed
# out and touched again is written again), or none (each batch's records written as replayed).
HELD_RECORDS = pytest.mark.parametrize("record_bytes", [2**20, 1_500, 0], ids=[
    "sessions held to the end", "sessions pushed out by the next client", "sessions written each batch"])


@HELD_RECORDS
async def test_a_rebuild_makes_the_records_and_figures_live_consumers_make(
        db: AsyncDatabase[Document], record_bytes: int) -> None:
    events = history()
    replay = replayer(ReportingStore(db, cache_entries=100), record_bytes=record_bytes)
    await replay_as_a_rebuild(replay, events)
    await replay.finish()
    live = ReportingStore(db, cache_entries=100)
    for e in events:
        await deliver(handlers(live, "live"), [e])
    assert record_documents(await replay.store.clients(G).find({}).to_list()) == record_documents(
        await live.clients("live").find({}).to_list())
    assert await replay.store.trends(G, T, *SPAN) == await live.trends("live", T, *SPAN)
    rebuilt, lived = await replay.store.summary(G, T, None) or {}, await live.summary("live", T, None) or {}
    assert {**rebuilt, "as_of": None} == {**lived, "as_of": None}
    assert await replay.store.verify(G) == {}


async def test_a_rebuild_holding_its_clients_sessions_writes_each_record_once_at_the_end(
        db: AsyncDatabase[Document]) -> None:
    replay = replayer(ReportingStore(db, cache_entries=100), record_bytes=2**20)
    await replay_as_a_rebuild(replay, history())
    assert await replay.store.clients(G).count_documents({}) == 0  # every session still held
    await replay.finish()
    versions = [d["v"] for d in await replay.store.clients(G).find({}).to_list()]
    assert versions and set(versions) == {1}  # one write each
    assert replay.events == len(history())


async def test_a_replayed_scored_record_that_does_not_decode_is_skipped_and_the_others_written(
        db: AsyncDatabase[Document]) -> None:
    replay = replayer(ReportingStore(db, cache_entries=100), record_bytes=2**20)
    good = history()[:2]
    await replay.apply([inbound(replay.scored, good[0], key=b"k"), inbound(replay.scored, b"{not json", key=b"k"),
                        inbound(replay.scored, good[1], key=b"k")])
    await replay.finish()
    record = await replay.store.clients(G).find_one({})
    assert (replay.events, replay.skipped) == (2, 1)
    assert record is not None and record["session_count"] == 2


async def test_the_counter_moves_of_what_a_rebuild_writes_at_the_end_are_written_as_they_pass_their_bound(
        db: AsyncDatabase[Document], monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory bounded by the settings, not the network: the alerts and records written at the end
    add their moves to the tally, which is written whenever it passes its bound then too."""
    replay = replayer(ReportingStore(db, cache_entries=100), record_bytes=2**20, tally_bytes=0)
    await replay_as_a_rebuild(replay, [*history(), *alert_history()])
    held: list[int] = []
    write = replay.store.flush_tally

    async def flush_tally(gen: str, tally: CounterTally) -> int:
        held.append(tally.held_bytes)
        return await write(gen, tally)

    monkeypatch.setattr(replay.store, "flush_tally", flush_tally)
    await replay.finish(records=1, alerts=1)
    alerts = await replay.store.alerts(G).count_documents({})
    assert len([n for n in held if n]) >= alerts  # a write after each alert that moved counters
    assert await replay.store.verify(G) == {}


async def test_a_tally_inserts_a_counter_document_whose_moves_sum_to_nothing_without_the_zero_fields(
        db: AsyncDatabase[Document]) -> None:
    store, tally = ReportingStore(db), CounterTally()
    cur, month = (T, "s1", "doc1", Instrument.SRS.value, rules.CURRENT), (T, "s1", "doc1", Instrument.SRS.value,
                                                                          "2026-01")
    tally.add({cur: {"records": 1, "sessions": 2}, month: {"sessions": 2}})
    tally.add({cur: {"records": -1, "sessions": -2}, month: {"sessions": -2}})
    assert await store.flush_tally(G, tally) == 1
    doc = await store.counters(G).find_one({})
    assert doc is not None and doc["site_id"] == "s1" and not {"records", "sessions", "mo"} & set(doc)


async def test_a_tally_writes_nothing_to_a_known_counter_document_whose_moves_sum_to_nothing(
        db: AsyncDatabase[Document]) -> None:
    store, tally = ReportingStore(db), CounterTally()
    cur = (T, "s1", "doc1", Instrument.SRS.value, rules.CURRENT)
    tally.add({cur: {"sessions": 1}})
    tally.add({cur: {"sessions": -1}})
    await store.flush_tally(G, tally)
    tally.add({cur: {"sessions": 1}})
    tally.add({cur: {"sessions": -1}})
    assert await store.flush_tally(G, tally) == 0


async def test_a_rebuilds_counter_write_marks_its_tenants_rollup_out_of_date(db: AsyncDatabase[Document]) -> None:
    events = history()
    store = ReportingStore(db, cache_entries=100, rollup_max_age=0)
    replay = replayer(store)
    await replay_as_a_rebuild(replay, events[:4])
    await store.flush_tally(G, replay.tally)
    await store.refresh_rollups(G)
    await replay_as_a_rebuild(replay, events[4:])
    await store.flush_tally(G, replay.tally)
    assert await store.refresh_rollups(G) == 1
    assert (await store.summary(G, T, None) or {})["sessions"] == 3


# The counter directory (store.py, "Counters"): a scope's counter documents are found through a
# directory of their identities, which holds the scope indexes the counters no longer carry

IDENTITY = dict.fromkeys(("tenant_id", "site_id", "clinician_id", "instrument"), 1)
SCOPES: dict[str, dict[str, str]] = {"tenant": {}, "site": {"site_id": "south"}, "clinician": {"clinician_id": "c-1"},
                                     "site and clinician": {"site_id": "south", "clinician_id": "c-1"}}


class ReadingAsBefore(ReportingStore):
    """The reads of before the directory: a scope's counter documents found by their own fields."""

    async def _scope_counters(self, gen: str, scope: Document, shown: Document) -> AsyncIterator[Document]:
        async for d in self.counters(gen).find(scope, shown):
            yield d

    async def sites(self, gen: str, tenant_id: str) -> list[str]:
        return sorted(str(s) for s in await self.counters(gen).distinct("site_id", {"tenant_id": tenant_id}) if s)


async def reads(store: ReportingStore, scope: dict[str, str]) -> tuple[Document | None, list[Document], list[str]]:
    """(summary without its time, trends, sites) of a scope, read from its counters (no roll-up)."""
    summary = await store.summary(G, T, scope.get("site_id"), scope.get("clinician_id"))
    series = await store.trends(G, T, *SPAN, site_id=scope.get("site_id"), clinician_id=scope.get("clinician_id"))
    return (None if summary is None else without_time(summary)), series, await store.sites(G, T)


async def directory(store: ReportingStore) -> list[Document]:
    return await store.counter_directory(G).find({}).sort("_id").to_list()


async def identities(store: ReportingStore) -> list[Document]:
    """Every counter document's identity: what its directory entry must be."""
    return await store.counters(G).find({}, IDENTITY).sort("_id").to_list()


async def generation_from_before_the_directory(db: AsyncDatabase[Document]) -> None:
    """Generation G as written before the directory: counter documents carrying the scope indexes, no directory."""
    store = ReportingStore(db, cache_entries=100)
    await deliver_alerts(handlers(store), [*history(), *alert_history()])
    await store.counter_directory(G).drop()
    for name, field in (("by_site", "site_id"), ("by_clinician", "clinician_id")):
        await store.counters(G).create_index([("tenant_id", 1), (field, 1)], name=name)


@pytest.mark.parametrize("scope", SCOPES.values(), ids=SCOPES.keys())
async def test_summaries_trends_and_sites_through_the_directory_are_those_of_the_scopes_counter_documents(
        db: AsyncDatabase[Document], scope: dict[str, str]) -> None:
    store = ReportingStore(db, cache_entries=100)
    await deliver_alerts(handlers(store), [*history(), *alert_history()])
    through_directory = await reads(store, scope)
    assert through_directory[0] is not None and any(p["sessions"] for p in through_directory[1])  # the scope counts
    assert through_directory == await reads(ReadingAsBefore(db), scope)


async def test_a_tenant_rollup_refreshed_through_the_directory_sums_every_counter_document_of_the_tenant(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db, cache_entries=100)
    await deliver_alerts(handlers(store), [*history(), *alert_history()])
    assert await store.refresh_rollups(G) == 1
    rollup = await store.rollups(G).find_one({"_id": rollup_id(T)}, {"cur": 1, "mo": 1, "_id": 0})
    assert rollup == rollup_of(await store.counters(G).find({"tenant_id": T}).to_list())


async def test_every_counter_document_a_live_consumer_writes_is_listed_in_the_directory(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db, cache_entries=100)
    await deliver_alerts(handlers(store), [*history(), *alert_history()])
    assert await directory(store) == await identities(store) != []
    assert sorted(await store.counters(G).index_information()) == ["_id_"]


async def test_a_batch_on_buckets_this_process_listed_before_writes_nothing_to_the_directory(
        db: AsyncDatabase[Document], stack: StackUnderTest) -> None:
    events = history()
    # client a's first session, then its next two: the same counter document
    first, then = await commands_of_batches(stack, db, [events[:1], events[1:3]],
                                            [ReportingStore(db).counter_directory(G).name])
    assert ([name for name, _ in first], then) == (["insert"], [])


async def test_a_directory_entry_whose_counter_a_crash_left_unwritten_reads_as_nothing_until_the_redelivery(
        db: AsyncDatabase[Document], monkeypatch: pytest.MonkeyPatch) -> None:
    store = ReportingStore(db, cache_entries=100)
    await deliver(handlers(store), history())
    before = await reads(store, {})
    newcomer = scored(T, "z", 1, 30.0, clinician_id="c-9")  # the first session of a new clinician
    die_before_the_counters(monkeypatch, one_command=True)
    with pytest.raises(ConnectionError):
        await deliver(handlers(store), [newcomer])
    monkeypatch.undo()
    assert await store.counter_directory(G).count_documents({"clinician_id": "c-9"}) == 1
    assert await store.counters(G).count_documents({"clinician_id": "c-9"}) == 0
    assert await store.summary(G, T, None, "c-9") is None
    assert not any(p["sessions"] for p in await store.trends(G, T, *SPAN, clinician_id="c-9"))
    summary, series, sites = await reads(store, {})
    assert (summary, series) == before[:2]
    # its site is listed (`sites` reads the directory alone), and reads as nothing
    assert (before[2], sites) == (["south"], ["north", "south"]) and await store.summary(G, T, "north") is None
    await deliver(handlers(ReportingStore(db)), [newcomer])  # the uncommitted batch comes again
    assert (await store.summary(G, T, None, "c-9") or {})["sessions"] == 1


async def test_verify_names_a_counter_document_its_directory_does_not_list(db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    await deliver(handlers(store), history()[:3])
    unlisted = await store.counter_directory(G).find_one_and_delete({})
    assert unlisted is not None
    assert unlisted["_id"] in await store.verify(G)  # no query would find it: it counts for nothing
    await store.counter_directory(G).insert_one(unlisted)


async def test_upgrading_a_generation_from_before_the_directory_lists_its_counters_and_drops_their_indexes(
        db: AsyncDatabase[Document]) -> None:
    await generation_from_before_the_directory(db)
    before = {name: await reads(ReadingAsBefore(db), scope) for name, scope in SCOPES.items()}
    store = ReportingStore(db)
    await store.ensure_indexes(G)
    assert await directory(store) == await identities(store) != []
    assert sorted(await store.counters(G).index_information()) == ["_id_"]
    assert sorted(await store.counter_directory(G).index_information()) == ["_id_", "by_clinician", "by_site"]
    assert {name: await reads(store, scope) for name, scope in SCOPES.items()} == before


async def test_an_upgrade_that_died_before_dropping_the_by_site_index_is_done_again_to_the_same_directory(
        db: AsyncDatabase[Document]) -> None:
    await generation_from_before_the_directory(db)
    await ReportingStore(db).ensure_indexes(G)
    listed = await directory(ReportingStore(db))
    await ReportingStore(db).counters(G).create_index([("tenant_id", 1), ("site_id", 1)], name="by_site")
    store = ReportingStore(db)  # another process, as after the crash
    await store.ensure_indexes(G)
    assert await directory(store) == listed
    assert sorted(await store.counters(G).index_information()) == ["_id_"]


async def test_two_processes_upgrading_a_generation_at_once_both_start(db: AsyncDatabase[Document]) -> None:
    await generation_from_before_the_directory(db)
    first, second = ReportingStore(db), ReportingStore(db)
    await asyncio.gather(first.ensure_indexes(G), second.ensure_indexes(G))
    assert await directory(first) == await identities(first)
    assert sorted(await first.counters(G).index_information()) == ["_id_"]


async def test_a_rebuild_lists_every_counter_document_it_writes_in_the_directory(db: AsyncDatabase[Document]) -> None:
    replay = replayer(ReportingStore(db, cache_entries=100))
    await replay_as_a_rebuild(replay, [*history(), *alert_history()])
    await replay.finish()
    assert await directory(replay.store) == await identities(replay.store) != []
