"""The reporting store on the real local MongoDB-protocol server: concurrent writers, generations,
the alert lifecycle and the submission statuses in every arrival order."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from services.alerts.rules import delivery_status
from services.reporting import rules
from services.reporting import store as store_module
from services.reporting.store import (
    COUNTED_VERSION,
    FIRST_GENERATION,
    PENDING,
    Generations,
    RebuildInProgress,
    ReportingStore,
    SubmissionStore,
    alerts_name,
    clients_name,
    from_stored,
    record_entry,
)
from shared.events import AlertState, AlertStatus, AlertStatusChanged, DeadLetter, OrsScored, SrsScored, SrsSubmitted
from shared.mongo import Document
from tests.integration.test_reporting_counters import (
    commands_of_batches,
    die_in_the_command_before,
    history,
    refuse_the_command,
    replay_as_a_rebuild,
    replayer,
)
from tests.support.outcome_events import ors_scored
from tests.support.reporting import counters_verified_in_db
from tests.support.stack import StackUnderTest, scratch_database
from tools.demo import acknowledgement, deterioration_for, lifecycle, revised, scored

T = "tenant-store"


@pytest.fixture
async def db(stack: StackUnderTest) -> AsyncIterator[AsyncDatabase[Document]]:
    async with scratch_database(stack, "t_store_") as database:
        yield database


counters_agree_after_each_scenario = counters_verified_in_db()


def tid(client: str) -> str:
    return rules.record_id(T, client, "SRS")


def spy_on_reads(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The ids the store reads by `find_by_ids` (records and alerts), one list per read."""
    reads: list[list[str]] = []
    read = store_module.find_by_ids

    async def spy(col: Any, wanted: Any, *args: Any) -> list[Document]:
        reads.append(sorted(wanted))
        return await read(col, wanted, *args)

    monkeypatch.setattr(store_module, "find_by_ids", spy)
    return reads


async def test_a_writer_with_a_stale_cache_loses_nothing(db: AsyncDatabase[Document]) -> None:
    a = ReportingStore(db, cache_entries=100)
    b = ReportingStore(db, cache_entries=100)
    await a.apply_scored("g1", [scored(T, "c1", 1, 38.0)])
    await b.apply_scored("g1", [scored(T, "c1", 2, 37.0)])  # b reads v1, writes v2; a's cache still has v1
    report = await a.apply_scored("g1", [scored(T, "c1", 3, 30.0)])
    assert report.conflicts == 1 and report.outcomes["applied"] == 1
    doc = await a.clients("g1").find_one({"_id": tid("c1")})
    assert doc is not None and from_stored(doc)["session_count"] == 3 and doc["v"] == 3


async def test_a_fresh_generation_insert_that_meets_an_existing_trajectory_merges_into_it(
        db: AsyncDatabase[Document]) -> None:
    live = ReportingStore(db)
    replay = ReportingStore(db, cache_entries=100)
    await live.apply_scored("g2", [scored(T, "c1", 5, 31.0)])  # the live consumer's double write came first
    report = await replay.apply_scored("g2", [scored(T, "c1", 1, 38.0), scored(T, "c1", 2, 37.5)], fresh=True)
    assert report.conflicts == 1 and report.outcomes["applied"] == 2
    doc = await replay.clients("g2").find_one({"_id": tid("c1")})
    assert doc is not None
    assert [s["session_number"] for s in rules.trajectory_view(from_stored(doc))["sessions"]] == [1, 2, 5]
    assert doc["latest_total"] == 31.0


async def test_a_new_clients_first_session_is_inserted_without_reading_its_record(
        db: AsyncDatabase[Document], monkeypatch: pytest.MonkeyPatch) -> None:
    reads = spy_on_reads(monkeypatch)
    report = await ReportingStore(db).apply_scored("g1", [scored(T, "c1", 1, 38.0)])
    assert (reads, report.outcomes["applied"], report.conflicts) == ([], 1, 0)
    await ReportingStore(db).apply_scored("g1", [scored(T, "c1", 2, 37.0, previous_total=38.0)])
    assert reads == [[tid("c1")]]  # a later session of a record not in the cache: read first


async def test_a_new_episodes_first_session_taken_for_a_new_client_is_merged_into_the_existing_record(
        db: AsyncDatabase[Document]) -> None:
    await ReportingStore(db).apply_scored("g1", [scored(T, "c1", 1, 38.0, episode_id="e1"),
                                                 scored(T, "c1", 2, 37.0, episode_id="e1")])
    restarted = ReportingStore(db)  # nothing cached: session 1 of e2 looks like a new client's
    report = await restarted.apply_scored("g1", [scored(T, "c1", 1, 30.0, episode_id="e2")])
    assert (report.outcomes["applied"], report.conflicts) == (1, 1)  # the insert met the record: read, merged
    doc = await restarted.record("g1", T, "c1", "SRS")
    assert doc is not None and len(doc["entries"]) == 3 and doc["v"] == 2


async def test_a_record_read_back_is_the_one_written(db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    events = [scored(T, "c1", 1, 38.0), scored(T, "c1", 2, 30.5)]
    events.append(revised(events[1], submission_id="fix", total=31.0))
    await store.apply_scored("g1", events)
    written = rules.merge(None, events).doc
    read = await store.record("g1", T, "c1", "SRS")
    assert written is not None and read is not None
    assert rules.trajectory_view(read) == rules.trajectory_view(written)
    assert read["entries"] == written["entries"]
    assert read["entries"]["fix"]["administered_at"] == events[1].administered_at
    # scoped by the owning site, and by tenant
    assert await store.record("g1", T, "c1", "SRS", site_id="north") is not None
    assert await store.record("g1", T, "c1", "SRS", site_id="south") is None
    assert await store.record("g1", "other", "c1", "SRS") is None


async def test_duplicates_write_nothing(db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    e = scored(T, "c1", 1, 38.0)
    await store.apply_scored("g1", [e])
    report = await store.apply_scored("g1", [e, e])
    assert report.outcomes == {"duplicate": 2} and not report.visible
    doc = await store.clients("g1").find_one({"_id": tid("c1")})
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
    assert docs[0]["record_id"] == tid("c1")


async def test_a_batch_of_one_alert_event_is_counted_from_the_document_its_write_returned(
        db: AsyncDatabase[Document], monkeypatch: pytest.MonkeyPatch) -> None:
    store = ReportingStore(db)
    alert = deterioration_for(scored(T, "c1", 2, 30.0, previous_total=38.0))
    assert alert is not None
    reads = spy_on_reads(monkeypatch)
    await store.apply_deterioration("g1", [alert])
    await store.apply_alert_status("g1", [acknowledgement(alert)])
    assert reads == []
    (march,) = await store.trends("g1", T, alert.occurred_at.strftime("%Y-%m"), alert.occurred_at.strftime("%Y-%m"))
    assert (march["alerts_raised"], march["alerts_acknowledged"]) == (1, 1)


async def test_a_status_naming_another_tenants_alert_fails_its_batch_as_a_bulk_write_error(
        db: AsyncDatabase[Document]) -> None:
    """The single-update path (find-and-modify) hands a refusal to the bulk write, whose error the
    subscriber classifies."""
    store = ReportingStore(db)
    alert = deterioration_for(scored(T, "c1", 2, 30.0, previous_total=38.0))
    assert alert is not None
    await store.apply_deterioration("g1", [alert])
    foreign = acknowledgement(alert).model_copy(update={"tenant_id": "another-tenant"})
    with pytest.raises(BulkWriteError):
        await store.apply_alert_status("g1", [foreign])


async def test_delivered_and_failed_statuses_are_neither_acknowledgements_nor_ends_of_the_alert(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    alert = deterioration_for(scored(T, "c1", 1, 30.0))
    assert alert is not None
    later = alert.occurred_at + timedelta(minutes=1)
    told = [delivery_status(alert, AlertStatus.FAILED, "webhook", later),
            delivery_status(alert, AlertStatus.DELIVERED, "email", later)]
    await store.apply_deterioration("g1", [alert])
    await store.apply_alert_status("g1", told)
    doc = await store.alerts("g1").find_one({"_id": alert.alert_id})
    assert doc is not None and not doc["acknowledged"]
    assert rules.alert_status(doc) == (AlertState.OPEN, 1)
    assert [fields for fields in rules.alert_share(doc).values()] == [{rules.ALERTS_RAISED: 1}] * 2


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
    assert clients_name(FIRST_GENERATION) not in names and clients_name(new) in names
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


# ---------------------------------------------------------------------------------------------
# The alert lifecycle: every arrival order of one alert's history gives the same document.


def _alert_doc(doc: Document) -> Document:
    # `cv` counts how often the alert's share of the counters changed, and `pending` holds its last
    # change, both of which depend on the order (what it holds, `counted`, does not)
    out = {k: v for k, v in doc.items() if k not in ("_id", COUNTED_VERSION, PENDING)}
    out["status_at"] = {k: v.replace(microsecond=0) for k, v in (doc.get("status_at") or {}).items()}
    return out


async def test_every_arrival_order_of_an_alerts_history_gives_one_document(db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    first = scored(T, "c1", 2, 30.0, previous_total=38.0)
    raised = deterioration_for(first)
    assert raised is not None
    revised_alert = deterioration_for(revised(first, total=29.0))
    assert revised_alert is not None and revised_alert.alert_id == raised.alert_id
    history: list[Any] = [raised, acknowledgement(raised), revised_alert, lifecycle(revised_alert, "withdrawn")]
    seen: list[Document] = []
    for i, order in enumerate(itertools.permutations(history)):
        gen = f"g{100 + i}"
        for e in [*order, order[0]]:  # and a redelivery
            if isinstance(e, AlertStatusChanged):
                await store.apply_alert_status(gen, [e])
            else:
                await store.apply_deterioration(gen, [e])
        docs = await store.alerts(gen).find({}).to_list()
        assert len(docs) == 1
        seen.append(_alert_doc(docs[0]))
        view = rules.alert_view(docs[0])
        assert (view["status"], view["revision"], view["acknowledged"], view["severity"]) == (
            "withdrawn", 2, True, revised_alert.severity)
    assert all(d == seen[0] for d in seen)


async def test_a_revision_after_a_superseded_status_reopens_and_keeps_the_acknowledgement(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db)
    raised = deterioration_for(scored(T, "c1", 2, 30.0, previous_total=38.0))
    assert raised is not None
    again = raised.model_copy(update={"revision": 2, "event_id": "r2"})
    await store.apply_deterioration("g1", [again])
    await store.apply_alert_status("g1", [lifecycle(raised, "superseded", 1), acknowledgement(raised)])
    await store.apply_deterioration("g1", [raised])
    (doc,) = await store.alerts("g1").find({}).to_list()
    assert rules.alert_status(doc) == ("acknowledged", 2)


# ---------------------------------------------------------------------------------------------
# Submission statuses


def _submitted(sid: str, session: int, accepted: datetime, site: str = "north") -> SrsSubmitted:
    return SrsSubmitted(event_id="e-" + sid, tenant_id=T, occurred_at=accepted, submission_id=sid, site_id=site,
                        clinician_id="c-1", client_id="c1", session_number=session, administered_at=accepted,
                        total=30.0, accepted_at=accepted)


def _dead(sub: SrsSubmitted, reason: str, at: datetime) -> DeadLetter:
    return DeadLetter(event_id="dl-" + sub.submission_id + reason, tenant_id=T, occurred_at=at, service="scoring",
                      reason=reason, detail="why", source_topic="srs.submitted.v1", payload=sub.model_dump_json())


async def test_submission_parts_converge_in_any_order_and_with_concurrent_writers(
        db: AsyncDatabase[Document]) -> None:
    s1 = scored(T, "c1", 1, 30.0, submission_id="s")
    s2 = revised(s1, total=31.0)
    by = revised(s2, submission_id="b", total=32.0)
    late = _submitted("s", 1, (s1.accepted_at or s1.scored_at) + timedelta(days=1))
    rejected = (T, _dead(late, "site_conflict", datetime(2026, 2, 1, tzinfo=UTC)), late)
    results = []
    for i, order in enumerate(itertools.permutations(["s1", "s2", "by", "rejected"])):
        store = SubmissionStore(db)
        store.col = db[f"subs_{i}"]
        racing = SubmissionStore(db)
        racing.col = store.col
        for name in order:
            if name == "rejected":
                await store.apply_rejected([rejected])
            else:
                event = {"s1": s1, "s2": s2, "by": by}[name]
                # two writers at once (a rebalance): the greater part must win whatever the interleaving
                await asyncio.gather(store.apply_scored([event]), racing.apply_scored([s1]))
        doc = await store.get(T, "s")
        assert doc is not None
        results.append((doc["scored"]["revision"], doc["superseded"]["by"], doc["rejected"]["reason"],
                         rules.submission_status(doc)))
    assert set(results) == {(2, "b", "site_conflict", "rejected")}


async def test_rejections_page_oldest_first_per_tenant_and_site(db: AsyncDatabase[Document]) -> None:
    store = SubmissionStore(db)
    await store.ensure_indexes()
    at = datetime(2026, 3, 1, tzinfo=UTC)
    subs = [_submitted(f"r{i}", 40 + i, at, site="north" if i % 2 else "south") for i in range(5)]
    await store.apply_rejected([(T, _dead(s, "session_gap", at + timedelta(minutes=i)), s)
                                for i, s in reversed(list(enumerate(subs)))])
    await store.apply_rejected([("other", _dead(subs[0], "invalid", at), subs[0])])
    page = await store.rejections(T, None, "", 2)
    assert [d["submission_id"] for d in page] == ["r0", "r1", "r2"]  # limit + 1
    rest = await store.rejections(T, None, page[1]["rejected"]["sort"], 10)
    assert [d["submission_id"] for d in rest] == ["r2", "r3", "r4"]
    since = rules.rejection_sort_floor(at + timedelta(minutes=3))
    assert [d["submission_id"] for d in await store.rejections(T, None, since, 10)] == ["r3", "r4"]
    assert [d["submission_id"] for d in await store.rejections(T, "north", "", 10)] == ["r1", "r3"]
    assert [d["submission_id"] for d in await store.rejections("other", None, "", 10)] == ["r0"]


async def test_a_scored_status_document_has_no_rejections_listing(db: AsyncDatabase[Document]) -> None:
    store = SubmissionStore(db)
    await store.ensure_indexes()
    await store.apply_scored([scored(T, "c1", 1, 30.0, submission_id="ok")])
    assert await store.get(T, "ok") is not None
    assert await store.listed.count_documents({}) == 0
    assert set(await store.col.index_information()) == {"_id_"}  # no index to maintain on every status write


def _rejudged(dead: DeadLetter, at: datetime, judgement: int) -> DeadLetter:
    return dead.model_copy(update={"occurred_at": at, "judgement": judgement, "reason": "rejudged"})


async def _a_then_b_rejected(db: AsyncDatabase[Document]) -> tuple[SubmissionStore, SrsSubmitted, DeadLetter]:
    """A store listing "a" then "b" (a minute later); returns "a"'s submission and dead letter."""
    store = SubmissionStore(db)
    await store.ensure_indexes()
    at = datetime(2026, 3, 1, tzinfo=UTC)
    a, b = _submitted("a", 1, at), _submitted("b", 2, at)
    first = _dead(a, "session_gap", at)
    await store.apply_rejected([(T, first, a), (T, _dead(b, "session_gap", at + timedelta(minutes=1)), b)])
    return store, a, first


async def test_a_rejudged_rejection_moves_in_the_listing_and_an_older_one_does_not(
        db: AsyncDatabase[Document]) -> None:
    store, a, first = await _a_then_b_rejected(db)
    at = first.occurred_at
    await store.apply_rejected([(T, _rejudged(first, at + timedelta(minutes=2), 1), a)])
    assert [(d["submission_id"], d["rejected"]["reason"]) for d in await store.rejections(T, None, "", 10)] == [
        ("b", "session_gap"), ("a", "rejudged")]
    await store.apply_rejected([(T, first, a)])  # the first judgement redelivered: its key is lower
    listing = await store.listed.find({}, {"_id": 0, "sort": 1}).sort("sort").to_list()
    page = await store.rejections(T, None, "", 10)
    assert [d["submission_id"] for d in page] == ["b", "a"]
    assert [d["rejected"]["sort"] for d in page] == [row["sort"] for row in listing]


async def test_a_listing_written_late_keeps_the_page_in_listing_order(db: AsyncDatabase[Document]) -> None:
    """A crash between a re-judgement's part and its listing: the page follows the listing (its
    cursor too) and shows the newer part; the redelivery then moves the listing."""
    store, a, first = await _a_then_b_rejected(db)
    at = first.occurred_at
    again = (T, _rejudged(first, at + timedelta(minutes=2), 1), a)
    part = rules.rejected_part(again[1], a)
    await store.col.update_one({"_id": rules.submission_doc_id(T, "a")}, {"$set": {"rejected": part}})
    page = await store.rejections(T, None, "", 1)
    assert [(d["submission_id"], d["rejected"]["reason"]) for d in page] == [("a", "rejudged"), ("b", "session_gap")]
    assert [d["submission_id"] for d in await store.rejections(T, None, page[0]["rejected"]["sort"], 1)] == ["b"]
    await store.apply_rejected([again])
    assert [d["submission_id"] for d in await store.rejections(T, None, "", 10)] == ["b", "a"]


async def test_upgrading_lists_the_rejections_of_status_documents_and_drops_their_indexes(
        db: AsyncDatabase[Document]) -> None:
    store = SubmissionStore(db)
    at = datetime(2026, 3, 1, tzinfo=UTC)
    subs = [_submitted(f"r{i}", 40 + i, at, site="north" if i % 2 else "south") for i in range(3)]
    # written the old way: the parts on the status documents, indexed there
    await store.col.insert_many([
        {"_id": rules.submission_doc_id(T, s.submission_id), "tenant_id": T, "submission_id": s.submission_id,
         "rejected": rules.rejected_part(_dead(s, "session_gap", at + timedelta(minutes=i)), s)}
        for i, s in enumerate(subs)])
    await store.apply_scored([scored(T, "c1", 1, 30.0, submission_id="ok")])
    await store.col.create_index([("tenant_id", 1), ("rejected.sort", 1)], name="rejections")
    await store.col.create_index([("tenant_id", 1), ("rejected.site_id", 1), ("rejected.sort", 1)],
                                 name="site_rejections")
    await store.ensure_indexes()
    assert [d["submission_id"] for d in await store.rejections(T, None, "", 10)] == ["r0", "r1", "r2"]
    assert [d["submission_id"] for d in await store.rejections(T, "north", "", 10)] == ["r1"]
    assert set(await store.col.index_information()) == {"_id_"}
    listing = await store.listed.find().sort("_id").to_list()
    assert len(listing) == 3
    # a process of the previous version recreates the old indexes; the next start migrates again
    await store.col.create_index([("tenant_id", 1), ("rejected.sort", 1)], name="rejections")
    await SubmissionStore(db).ensure_indexes()
    assert await store.listed.find().sort("_id").to_list() == listing
    assert set(await store.col.index_information()) == {"_id_"}


# A submission id names one submission per scale (docs/clinical-records.md, "Session identity").


async def test_an_srs_and_an_ors_under_one_id_each_keep_their_own_status(db: AsyncDatabase[Document]) -> None:
    store = SubmissionStore(db)
    srs, ors = scored(T, "c1", 1, 30.0, submission_id="appt-1"), ors_scored(T, "c1", 1, 20.0, intake_total=20.0,
                                                                             submission_id="appt-1")
    await store.apply_scored([srs, ors])
    by_scale = {scale: await store.get(T, "appt-1", scale) for scale in ("alliance", "outcome")}
    assert {s: (d or {})["scored"]["total"] for s, d in by_scale.items()} == {"alliance": 30.0, "outcome": 20.0}
    assert await store.get(T, "appt-1") == by_scale["alliance"]


async def test_an_ors_status_written_under_the_bare_id_before_is_found_as_the_outcome_one(
        db: AsyncDatabase[Document]) -> None:
    store = SubmissionStore(db)
    ors = ors_scored(T, "c1", 1, 20.0, intake_total=20.0, submission_id="old-ors")
    await store.col.insert_one({"_id": rules.submission_doc_id(T, "old-ors"), "tenant_id": T,
                                "submission_id": "old-ors", "scored": rules.scored_part(ors)})
    found = await store.get(T, "old-ors", "outcome")
    assert found is not None and found == await store.get(T, "old-ors")
    assert await store.get(T, "old-ors", "alliance") is None
    assert (rules.submission_view(found) or {})["scale"] == "outcome"


# ---------------------------------------------------------------------------------------------
# The record directories (store.py, module docs): the caseload index (and `by_site`) live on one
# small entry per record, written only when a record's indexed fields change

def population() -> tuple[list[SrsScored], list[OrsScored]]:
    """Clients of two clinicians at two sites, at risk or not, with an alliance record, an outcome
    record, or both."""
    srs = [scored(T, f"k{i}", 1, 25.0 if i % 3 == 0 else 38.0, clinician_id=f"c-{i % 2 + 1}",
                  site_id="south" if i % 4 == 0 else "north") for i in range(12)]
    ors = [ors_scored(T, f"k{i}", 1, 20.0, intake_total=None, clinician_id=f"c-{i % 2 + 1}",
                      site_id="south" if i % 4 == 0 else "north") for i in range(6, 18)]
    return srs, ors


async def populated(db: AsyncDatabase[Document]) -> ReportingStore:
    store = ReportingStore(db, cache_entries=100)
    srs, ors = population()
    await store.apply_scored(FIRST_GENERATION, srs)
    await store.apply_outcomes(FIRST_GENERATION, ors)
    return store


class CaseloadAsBefore(ReportingStore):
    """The caseload of before the directories: a page of records found by their own fields."""

    @staticmethod
    async def _directory_page(directory: Any, records: Any, q: Document, limit: int) -> list[Document]:
        return [from_stored(d) for d in await records.find(q).sort("caseload_key").limit(limit + 1).to_list()]


async def every_page(store: ReportingStore, clinician: str, site: str | None, limit: int) -> list[list[Document]]:
    """Every page of a caseload, following the cursor as the API does."""
    pages: list[list[Document]] = []
    after = None
    while True:
        page = await store.caseload(FIRST_GENERATION, T, clinician, site, after, limit)
        pages.append(page[:limit])
        if len(page) <= limit:
            return pages
        after = page[limit - 1]["caseload_key"]


async def every_caseload(store: ReportingStore) -> dict[tuple[str, str | None, int], list[list[Document]]]:
    return {(c, s, n): await every_page(store, c, s, n)
            for c in ("c-1", "c-2") for s in (None, "north", "south") for n in (1, 2, 5)}


async def entries(store: ReportingStore) -> list[Document]:
    return [*await store.client_directory(FIRST_GENERATION).find({}).sort("_id").to_list(),
            *await store.outcome_directory(FIRST_GENERATION).find({}).sort("_id").to_list()]


async def identities(store: ReportingStore) -> list[Document]:
    """Every record's identity and version: what its directory entry must be."""
    shown = dict.fromkeys(("tenant_id", "clinician_id", "caseload_key", "site_id", "instrument", "v"), 1)
    return [record_entry(d) for col in (store.clients(FIRST_GENERATION), store.outcomes(FIRST_GENERATION))
            for d in await col.find({}, shown).sort("_id").to_list()]


async def test_caseload_pages_through_the_directories_are_those_the_records_own_indexes_gave(
        db: AsyncDatabase[Document]) -> None:
    store = await populated(db)
    await store.ensure_indexes(FIRST_GENERATION)
    through_directory = await every_caseload(store)
    assert sum(len(p) for p in through_directory[("c-1", None, 5)]) > 5  # several pages, both sources
    assert through_directory == await every_caseload(CaseloadAsBefore(db))
    assert await entries(store) == await identities(store)
    assert sorted(await store.clients(FIRST_GENERATION).index_information()) == ["_id_"]
    assert sorted(await store.outcomes(FIRST_GENERATION).index_information()) == ["_id_"]


async def test_a_client_turning_at_risk_moves_its_entry_to_the_head_of_the_caseload(
        db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db, cache_entries=100)
    await store.apply_scored(FIRST_GENERATION, [scored(T, "a", 1, 38.0), scored(T, "b", 1, 39.0)])
    await store.apply_scored(FIRST_GENERATION, [scored(T, "b", 2, 20.0)])
    assert [d["client_id"] for d in await store.caseload(FIRST_GENERATION, T, "c-1", None, None, 5)] == ["b", "a"]
    entry = await store.client_directory(FIRST_GENERATION).find_one({"_id": tid("b")})
    assert entry is not None and entry["caseload_key"].startswith("0") and entry["v"] == 2


async def test_an_older_record_version_never_overwrites_a_newer_entry(db: AsyncDatabase[Document]) -> None:
    store = ReportingStore(db, cache_entries=100)
    await store.apply_scored(FIRST_GENERATION, [scored(T, "a", 1, 38.0)])
    await store.apply_scored(FIRST_GENERATION, [scored(T, "a", 2, 20.0)])
    newer = await store.client_directory(FIRST_GENERATION).find_one({"_id": tid("a")})
    assert newer is not None
    await store_module.enter_records(store.client_directory(FIRST_GENERATION),
                                     [{**newer, "v": 1, "caseload_key": "1\x1fa\x1fSRS", "clinician_id": "c-9"}])
    assert await store.client_directory(FIRST_GENERATION).find_one({"_id": tid("a")}) == newer


def die_before_the_entries(monkeypatch: pytest.MonkeyPatch, one_command: bool) -> None:
    """The store or the process dies after a batch's record write and its counter write, before
    its directory entries: inside the one ordered command (the store dies), or between the
    separate writes of a store without that command (the process dies)."""
    if one_command:
        die_in_the_command_before(monkeypatch, "_client_directory")
        return

    async def crash(directory: Any, written: Any) -> None:
        if written:
            raise ConnectionError("the process died here")

    refuse_the_command(monkeypatch)
    monkeypatch.setattr(store_module, "enter_records", crash)


@pytest.mark.parametrize("one_command", [True, False], ids=["one command", "separate writes"])
async def test_a_crash_between_a_record_and_its_entry_is_repaired_by_the_redelivery(
        db: AsyncDatabase[Document], monkeypatch: pytest.MonkeyPatch, one_command: bool) -> None:
    dying = ReportingStore(db, cache_entries=100)
    await dying.apply_scored(FIRST_GENERATION, [scored(T, "a", 1, 38.0), scored(T, "b", 1, 39.0)])
    flip = [scored(T, "b", 2, 20.0)]  # b turns at risk: its entry must move
    die_before_the_entries(monkeypatch, one_command)
    with pytest.raises(ConnectionError):
        await dying.apply_scored(FIRST_GENERATION, flip)
    monkeypatch.undo()
    assert await entries(dying) != await identities(dying)  # the record moved, its entry did not
    # listed where its entry says, with the entry's key (the cursor's order), the record's figures
    page = await dying.caseload(FIRST_GENERATION, T, "c-1", None, None, 5)
    assert [(d["client_id"], d["caseload_key"][0], d["session_count"]) for d in page] == [("a", "1", 1), ("b", "1", 2)]
    restarted = ReportingStore(db, cache_entries=100)
    await restarted.apply_scored(FIRST_GENERATION, flip)  # the uncommitted batch comes again: "duplicate"
    assert await entries(restarted) == await identities(restarted)
    assert [d["client_id"] for d in await restarted.caseload(FIRST_GENERATION, T, "c-1", None, None, 5)] == ["b", "a"]


async def test_upgrading_a_generation_from_before_the_directories_enters_its_records_and_drops_their_indexes(
        db: AsyncDatabase[Document]) -> None:
    store = await populated(db)
    for directory in (store.client_directory(FIRST_GENERATION), store.outcome_directory(FIRST_GENERATION)):
        await directory.drop()
    for col, names in ((store.clients(FIRST_GENERATION), ("caseload", "by_site")),
                       (store.outcomes(FIRST_GENERATION), ("caseload",))):
        for name in names:
            fields = ("clinician_id", "caseload_key") if name == "caseload" else ("site_id", "instrument")
            await col.create_index([("tenant_id", 1), *((f, 1) for f in fields)], name=name)
    before = await every_caseload(CaseloadAsBefore(db))
    upgraded = ReportingStore(db)
    await upgraded.ensure_indexes(FIRST_GENERATION)
    assert await entries(upgraded) == await identities(upgraded) != []
    assert sorted(await upgraded.clients(FIRST_GENERATION).index_information()) == ["_id_"]
    assert sorted(await upgraded.outcomes(FIRST_GENERATION).index_information()) == ["_id_"]
    assert sorted(await upgraded.client_directory(FIRST_GENERATION).index_information()) == [
        "_id_", "by_site", "caseload"]
    assert await every_caseload(upgraded) == before
    # died before dropping `caseload`: the next process upgrades again, to the same directory
    listed = await entries(upgraded)
    await upgraded.clients(FIRST_GENERATION).create_index([("tenant_id", 1), ("clinician_id", 1),
                                                           ("caseload_key", 1)], name="caseload")
    again = ReportingStore(db)
    await again.ensure_indexes(FIRST_GENERATION)
    assert await entries(again) == listed
    assert sorted(await again.clients(FIRST_GENERATION).index_information()) == ["_id_"]


async def test_a_batch_that_moves_no_indexed_field_of_its_records_sends_nothing_to_their_directory(
        db: AsyncDatabase[Document], stack: StackUnderTest) -> None:
    events = history()  # client a: 30, 34, then 37.5 (no longer below the cutoff)
    new, same, flip = await commands_of_batches(stack, db, [events[:1], events[1:2], events[2:3]],
                                                [ReportingStore(db).client_directory(FIRST_GENERATION).name])
    assert ([name for name, _ in new], same, [name for name, _ in flip]) == (["bulkWrite"], [], ["bulkWrite"])


async def test_a_rebuild_enters_every_record_it_writes_in_its_directory(db: AsyncDatabase[Document]) -> None:
    replay = replayer(ReportingStore(db, cache_entries=100))
    await replay_as_a_rebuild(replay, history())
    await replay.finish()
    assert await entries(replay.store) == await identities(replay.store) != []
