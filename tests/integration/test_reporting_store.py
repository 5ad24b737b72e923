"""The reporting store on the real local MongoDB-protocol server: concurrent writers, generations."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.reporting import rules
from services.reporting.demo import deterioration_for, scored
from services.reporting.store import (
    FIRST_GENERATION,
    Generations,
    RebuildInProgress,
    ReportingStore,
    alerts_name,
    from_stored,
    trajectories_name,
)
from shared.events import AlertStatusChanged
from shared.mongo import Document
from tests.support.stack import StackUnderTest

T = "tenant-store"


@pytest.fixture
async def db(stack: StackUnderTest) -> AsyncIterator[AsyncDatabase[Document]]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True)
    name = "t_store_" + uuid.uuid4().hex[:10]
    yield client[name]
    await client.drop_database(name)
    await client.close()


def tid(client: str) -> str:
    return rules.trajectory_id(T, client, "SRS", None)


async def test_a_writer_with_a_stale_cache_loses_nothing(db: AsyncDatabase[Document]) -> None:
    a = ReportingStore(db, cache_entries=100)
    b = ReportingStore(db, cache_entries=100)
    await a.apply_scored("g1", [scored(T, "c1", 1, 38.0)])
    await b.apply_scored("g1", [scored(T, "c1", 2, 37.0)])  # b reads v1, writes v2; a's cache still has v1
    report = await a.apply_scored("g1", [scored(T, "c1", 3, 30.0)])
    assert report.conflicts == 1 and report.outcomes["applied"] == 1
    doc = await a.trajectories("g1").find_one({"_id": tid("c1")})
    assert doc is not None and sorted(from_stored(doc)["sessions"]) == ["1", "2", "3"] and doc["v"] == 3


async def test_a_fresh_generation_insert_that_meets_an_existing_trajectory_merges_into_it(
        db: AsyncDatabase[Document]) -> None:
    live = ReportingStore(db)
    replay = ReportingStore(db, cache_entries=100)
    await live.apply_scored("g2", [scored(T, "c1", 5, 31.0)])  # the live consumer's double write came first
    report = await replay.apply_scored("g2", [scored(T, "c1", 1, 38.0), scored(T, "c1", 2, 37.5)], fresh=True)
    assert report.conflicts == 1 and report.outcomes["applied"] == 2
    doc = await replay.trajectories("g2").find_one({"_id": tid("c1")})
    assert doc is not None and sorted(from_stored(doc)["sessions"]) == ["1", "2", "5"]
    assert doc["latest_total"] == 31.0


async def test_a_trajectory_read_back_is_the_one_written(db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    events = [scored(T, "c1", 1, 38.0), scored(T, "c1", 2, 30.5)]
    await store.apply_scored("g1", events)
    written = rules.merge(None, events).doc
    read = await store.trajectory("g1", T, "c1", "SRS")
    assert written is not None and read is not None
    assert rules.trajectory_view(read) == rules.trajectory_view(written)
    assert read["sessions"]["2"]["administered_at"] == events[1].administered_at


async def test_duplicates_write_nothing(db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    e = scored(T, "c1", 1, 38.0)
    await store.apply_scored("g1", [e])
    report = await store.apply_scored("g1", [e, e])
    assert report.outcomes == {"duplicate": 2} and not report.visible
    doc = await store.trajectories("g1").find_one({"_id": tid("c1")})
    assert doc is not None and doc["v"] == 1


async def test_an_acknowledgement_before_its_alert_counts_once_both_are_in(db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    e = scored(T, "c1", 1, 30.0)
    alert = deterioration_for(e)
    assert alert is not None
    ack = AlertStatusChanged(event_id="x", tenant_id=T, occurred_at=datetime.now(UTC), alert_id=alert.alert_id,
                             site_id=e.site_id, clinician_id=e.clinician_id, status="acknowledged")
    await store.apply_alert_status("g1", [ack, ack])
    await store.apply_deterioration("g1", [alert, alert])
    docs = await store.alerts("g1").find({}).to_list()
    assert len(docs) == 1 and docs[0]["raised"] and docs[0]["acknowledged"]
    assert docs[0]["trajectory_id"] == tid("c1")


async def test_generations_claim_switch_and_drop(db: AsyncDatabase[Document]) -> None:
    gens = Generations(db, ttl=0.01)
    state = await gens.ensure()
    assert state.active == FIRST_GENERATION and state.write_targets == (FIRST_GENERATION,)
    _, new = await gens.begin_rebuild()
    assert (await gens.current()).write_targets == (FIRST_GENERATION, new)
    with pytest.raises(RebuildInProgress):
        await gens.begin_rebuild()
    store = ReportingStore(db)
    await store.apply_scored(new, [scored(T, "c1", 1, 38.0)])
    switched = await gens.switch(new)
    assert (switched.active, switched.previous, switched.building) == (new, FIRST_GENERATION, None)
    _, newer = await gens.begin_rebuild()
    await store.apply_scored(newer, [scored(T, "c1", 1, 38.0)])
    await gens.switch(newer)
    await store.apply_scored(FIRST_GENERATION, [scored(T, "c1", 1, 38.0)])
    assert await gens.drop_unused() == [FIRST_GENERATION]
    names = set(await db.list_collection_names())
    assert trajectories_name(FIRST_GENERATION) not in names and trajectories_name(new) in names
    assert alerts_name(FIRST_GENERATION) not in names


async def test_an_abandoned_rebuild_frees_the_slot_and_leaves_the_live_generation(db: AsyncDatabase[Document]) -> None:
    gens = Generations(db, ttl=0.01)
    await gens.ensure()
    _, new = await gens.begin_rebuild()
    await gens.abandon(new)
    state = await gens.current()
    assert (state.active, state.building) == (FIRST_GENERATION, None)
    with pytest.raises(RebuildInProgress):
        await gens.switch(new)
