"""The outbox of `delivered` / `failed` (services/alerts/statuses.py, "Exactly-once effect under
at-least-once"), against the real store: the debt of a delivery's status is an entry in
`delivery_outbox` written with (before) its outcome, published by the teller or its sweep and then
deleted; an entry without its outcome (a crash between the two) is dropped; a re-queued delivery
keeps its new debt; and deliveries flagged the way of before the upgrade are moved to the outbox.
The publisher is the in-memory sink; everything the teller reads and writes is the store's.
"""
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import pytest
from pymongo import ASCENDING

from services.alerts.handlers import delivery_doc
from services.alerts.rules import Clinician, route_alert
from services.alerts.settings import AlertsSettings
from services.alerts.statuses import StatusTeller
from services.alerts.store import EPOCH, OUTBOX, STATUS_OUTBOX, AlertsStore, AttemptResult, utcnow
from services.alerts.worker import recorded_doc
from shared.events import AlertStatusChanged
from shared.mongo import Document

# The `store` fixture (an AlertsStore of its own per test); the tests' parameters name it.
from tests.integration.test_alerts_outcome import store  # noqa: F401
from tests.support.fakes import TOPICS, Sink
from tools.harness import deterioration

LEASE = timedelta(seconds=30)
SWEEP_SECONDS = 0.05  # the sweep publishes what has been owed this long
CLINICIAN = Clinician("t1", "c1", "site-a", webhook_url="https://clinic.test/hook")


def teller(store: AlertsStore, sink: Sink) -> StatusTeller:
    return StatusTeller(store, sink, TOPICS, AlertsSettings(status_sweep_seconds=SWEEP_SECONDS))


def told(sink: Sink) -> list[tuple[str, str]]:
    """(alert id, status) of every delivery's status the sink was given, in order (not the
    channel-less `failed` of a revision that reached nobody, which a lone failed delivery also tells)."""
    return [(e.alert_id, str(e.status)) for e in (AlertStatusChanged.model_validate_json(r.value)
                                                  for r in sink.of_topic(TOPICS.alert_status)) if e.channel]


async def claimed(store: AlertsStore, client_id: str) -> Document:
    """A clinician's webhook delivery of a raised alert, scheduled and claimed by a worker."""
    ev = deterioration("t1", "c1", client_id)
    [planned] = route_alert(ev, CLINICIAN, [], email_enabled=False)
    now = utcnow()
    await store.insert_deliveries([delivery_doc(planned, ev.model_dump_json(), ev.occurred_at, None, None, now)])
    [d] = await store.claim(now, [planned.delivery_id], LEASE, "w1")
    return d


def outcome(d: Document, status: str) -> AttemptResult:
    return AttemptResult(str(d["_id"]), str(d["claim"]), "delivered" if status == "delivered" else "failed", 1,
                         last_outcome="2xx" if status == "delivered" else "http_5xx", tells_status=True)


async def entries(store: AlertsStore) -> dict[str, datetime]:
    return {str(e["_id"]): e["finished_at"] for e in await store.outbox.find({}).to_list()}


async def sweep_later(store: AlertsStore, sink: Sink) -> int:
    """The teller's sweep once what is owed now has been owed for longer than `SWEEP_SECONDS`."""
    await asyncio.sleep(2 * SWEEP_SECONDS)
    return await teller(store, sink).sweep()


async def test_recording_an_outcome_owes_its_status_by_an_outbox_entry_not_a_flag_on_the_delivery(
        store: AlertsStore) -> None:
    d = await claimed(store, "client-1")
    at = await store.record([outcome(d, "delivered")])
    assert await entries(store) == {d["_id"]: at}
    stored = await store.deliveries.find_one({"_id": d["_id"]})
    assert stored is not None and stored["status"] == "delivered" and STATUS_OUTBOX not in stored


async def test_recording_a_retry_owes_no_status(store: AlertsStore) -> None:
    d = await claimed(store, "client-1")
    await store.record([AttemptResult(str(d["_id"]), str(d["claim"]), "retry", 1, error="timeout",
                                      next_attempt_at=utcnow() + LEASE, tells_status=True)])
    assert await entries(store) == {}


@pytest.mark.parametrize("status", ["delivered", "failed"])
async def test_a_recorded_status_is_published_once_and_its_entry_deleted(store: AlertsStore, status: str) -> None:
    d, sink = await claimed(store, "client-1"), Sink()
    result = outcome(d, status)
    at = await store.record([result])
    assert at is not None
    assert await teller(store, sink).tell([recorded_doc(d, result, at)]) == 1
    assert await entries(store) == {}
    assert await sweep_later(store, sink) == 0
    assert told(sink) == [(d["alert_id"], status)]


async def test_a_status_recorded_and_not_published_before_a_crash_is_published_once_by_the_sweep(
        store: AlertsStore) -> None:
    d, sink = await claimed(store, "client-1"), Sink()
    await store.record([outcome(d, "failed")])  # the process dies before its teller publishes
    assert await sweep_later(store, sink) == 1
    assert await teller(store, sink).sweep() == 0
    assert told(sink) == [(d["alert_id"], "failed")]
    assert await entries(store) == {}


async def test_an_entry_whose_outcome_a_crash_did_not_write_is_dropped_and_the_outcome_recorded_later_told(
        store: AlertsStore) -> None:
    """A crash between the entry and the outcome (they are written in that order): the delivery is
    pending, attempted again once its lease ends, and its next outcome writes its entry again."""
    d, sink = await claimed(store, "client-1"), Sink()
    await store.outbox.insert_one({"_id": d["_id"], "finished_at": utcnow()})
    assert await sweep_later(store, sink) == 0
    assert await entries(store) == {}
    await store.record([outcome(d, "delivered")])  # the attempt made again (same claim: the store does not care)
    assert await sweep_later(store, sink) == 1
    assert told(sink) == [(d["alert_id"], "delivered")]


async def test_an_entry_written_with_an_outcome_that_did_not_match_is_dropped_by_the_sweep(
        store: AlertsStore) -> None:
    """A worker whose lease ran out records a failure: the outcome does not match (another worker
    holds the claim now), the entry was written before it and names a delivery still pending."""
    d, sink = await claimed(store, "client-1"), Sink()
    stale = AttemptResult(str(d["_id"]), "another-claim", "failed", 1, last_outcome="http_5xx", tells_status=True)
    assert await store.record([stale]) is None
    assert list(await entries(store)) == [d["_id"]]
    assert await sweep_later(store, sink) == 0
    assert await entries(store) == {} and told(sink) == []


async def test_a_delivery_requeued_and_finished_again_after_its_debt_was_read_keeps_its_new_debt(
        store: AlertsStore) -> None:
    d, sink = await claimed(store, "client-1"), Sink()
    await store.record([outcome(d, "failed")])
    owed = await store.owed_statuses([d["_id"]])
    # Meanwhile (in a later millisecond, as any attempt is) an operator re-queues it, and it is delivered.
    await asyncio.sleep(0.01)
    assert await store.requeue_failed("t1", [d["_id"]]) == 1
    [again] = await store.claim(utcnow(), [d["_id"]], LEASE, "w2")
    await store.record([outcome(again, "delivered")])
    await teller(store, sink).tell(owed)  # tells the failure it read, and deletes only that debt
    assert list(await entries(store)) == [d["_id"]]
    assert await sweep_later(store, sink) == 1
    assert told(sink) == [(d["alert_id"], "failed"), (d["alert_id"], "delivered")]


async def old_version_store(store: AlertsStore) -> AlertsStore:
    """A store of its own whose deliveries carry the indexes of the version before the outbox."""
    old = AlertsStore(store.db.client[f"t_{uuid.uuid4().hex[:10]}"])
    await old.deliveries.create_index([(STATUS_OUTBOX, ASCENDING)], sparse=True)
    return old


async def test_a_delivery_flagged_before_the_upgrade_is_moved_to_the_outbox_at_start(store: AlertsStore) -> None:
    old = await old_version_store(store)
    d = await claimed(old, "client-1")
    at = await old.record([outcome(d, "delivered")])
    await old.outbox.delete_many({})
    await old.deliveries.update_one({"_id": d["_id"]}, {"$set": {STATUS_OUTBOX: True}})  # as the old write left it
    await old.ensure_indexes()
    assert await entries(old) == {d["_id"]: at}
    assert await old.deliveries.count_documents({STATUS_OUTBOX: {"$exists": True}}) == 0


async def test_a_delivery_flagged_before_the_upgrade_is_told_by_the_sweep_after_it(store: AlertsStore) -> None:
    old, sink = await old_version_store(store), Sink()
    d = await claimed(old, "client-1")
    await old.record([outcome(d, "failed")])
    await old.outbox.delete_many({})
    await old.deliveries.update_one({"_id": d["_id"]}, {"$set": {STATUS_OUTBOX: True}})
    await old.ensure_indexes()
    assert await sweep_later(old, sink) == 1
    assert told(sink) == [(d["alert_id"], "failed")]


async def test_the_upgrade_drops_the_flags_index_and_a_second_start_changes_nothing(store: AlertsStore) -> None:
    old = await old_version_store(store)
    await old.ensure_indexes()
    await old.ensure_indexes()
    names = {i["name"] async for i in await old.deliveries.list_indexes()}
    assert f"{STATUS_OUTBOX}_1" not in names
    assert {i["name"] async for i in await old.db[OUTBOX].list_indexes()} <= {"_id_"}


async def test_an_entry_the_upgrade_finds_written_since_is_kept(store: AlertsStore) -> None:
    """A flag moved after this version's worker recorded the delivery again keeps the newer entry."""
    old = await old_version_store(store)
    d = await claimed(old, "client-1")
    at = await old.record([outcome(d, "failed")])
    await old.deliveries.update_one({"_id": d["_id"]}, {"$set": {STATUS_OUTBOX: True, "finished_at": EPOCH}})
    await old.ensure_indexes()
    assert await entries(old) == {d["_id"]: at}
