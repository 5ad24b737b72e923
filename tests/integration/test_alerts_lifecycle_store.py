"""The alerts store merges an alert's lifecycle like `rules.merge_lifecycle`, whatever the order.

The consumer handlers run against the real store (no broker: every record here decodes, so
nothing is published). Each permutation of a history gets its own alert, fed one event per
batch, or one batch per topic; the stored status, revision and content must be what the pure
rules say.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import pytest
from pymongo import AsyncMongoClient, UpdateOne

from services.alerts.api import AlertOut
from services.alerts.handlers import Handlers, StatusEvent
from services.alerts.rules import api_status, merge_lifecycle
from services.alerts.store import AlertsStore
from shared.events import AlertStatusChanged, AllianceDeterioration, Severity
from shared.kafka import Decoded, InboundRecord
from shared.mongo import Document
from shared.topics import Topics
from tests.support.fakes import Sink
from tests.support.stack import StackUnderTest
from tools.harness import deterioration, ended, revised

Event = AllianceDeterioration | AlertStatusChanged
TOPICS = Topics()


@pytest.fixture
async def handlers(stack: StackUnderTest) -> AsyncIterator[tuple[Handlers, AlertsStore]]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True)
    store = AlertsStore(client[f"t_{uuid.uuid4().hex[:10]}"])
    await store.ensure_indexes()
    yield Handlers(store, email_enabled=False, on_scheduled=lambda: None, publisher=Sink(), topics=TOPICS), store
    await client.close()


def record(ev: Event, offset: int = 0) -> InboundRecord:
    topic = TOPICS.deterioration if isinstance(ev, AllianceDeterioration) else TOPICS.alert_status
    return InboundRecord(topic, 0, offset, b"k", ev.model_dump_json().encode(), {}, 0)


def raises(batch: Sequence[AllianceDeterioration]) -> list[Decoded[AllianceDeterioration]]:
    """A consumed batch of raises, as the subscriber hands it to the handler."""
    return [Decoded(record(e, i), e) for i, e in enumerate(batch)]


def statuses(batch: Sequence[AlertStatusChanged]) -> list[Decoded[StatusEvent]]:
    """A consumed batch of statuses, read as alerts reads them (`StatusEvent`)."""
    return [Decoded(record(e, i), StatusEvent.model_validate(e.model_dump())) for i, e in enumerate(batch)]


async def handle(h: Handlers, batch: Sequence[Event]) -> None:
    """One consumed batch of one topic."""
    if all(isinstance(e, AllianceDeterioration) for e in batch):
        await h.on_deterioration(raises([e for e in batch if isinstance(e, AllianceDeterioration)]))
    else:
        await h.on_alert_status(statuses([e for e in batch if isinstance(e, AlertStatusChanged)]))


async def feed(h: Handlers, events: Sequence[Event], per_topic_batch: bool = False) -> None:
    """Events in this order, one per batch; or one batch per topic, the topic of the first event first."""
    if not per_topic_batch:
        for e in events:
            await handle(h, [e])
        return
    raises = [e for e in events if isinstance(e, AllianceDeterioration)]
    statuses = [e for e in events if isinstance(e, AlertStatusChanged)]
    batches: list[Sequence[Event]] = [raises, statuses] if events[0] in raises else [statuses, raises]
    for batch in batches:
        if batch:
            await handle(h, batch)


def history(kind: str) -> list[Event]:
    """A fresh alert (its own episode) and a history of it, as scoring may publish it."""
    r1 = deterioration("t1", "c1", "client-1", session_number=4)
    r2 = revised(r1, 2, total=29.0, severity=Severity.CRITICAL, low_items=["goals"])
    r3 = revised(r1, 3, total=28.0)
    histories: dict[str, list[Event]] = {
        "revised then superseded, revision 1 withdrawn":
            [r1, r2, ended(r2, "superseded"), ended(r1, "withdrawn")],
        "withdrawn then raised again": [r1, ended(r1, "withdrawn"), r2],
        "superseded, raised again, withdrawn": [r1, ended(r1, "superseded"), r2, ended(r2, "withdrawn")],
        "three revisions, an old end": [r1, r2, r3, ended(r1, "superseded")],
    }
    return histories[kind]


def expected(events: Sequence[Event]) -> tuple[str, int, float | None]:
    """(API status, revision, total shown) the pure rules give."""
    alert_id = events[0].alert_id
    raises = [e for e in events if isinstance(e, AllianceDeterioration)]
    revisions = [e.revision for e in raises] + [e.revision for e in events
                                                if isinstance(e, AlertStatusChanged) and e.revision is not None]
    top = max(raises, key=lambda e: e.revision, default=None)
    return (api_status(merge_lifecycle(events)[alert_id], acknowledged=False), max(revisions),
            top.total if top is not None else None)


async def stored(store: AlertsStore, alert_id: str) -> tuple[str, int, float | None]:
    doc = await store.alerts.find_one({"_id": alert_id})
    assert doc is not None
    return doc["status"], doc["revision"], doc.get("total")


HISTORIES = ["revised then superseded, revision 1 withdrawn", "withdrawn then raised again",
             "superseded, raised again, withdrawn", "three revisions, an old end"]


@pytest.mark.parametrize("kind", HISTORIES)
async def test_every_arrival_order_one_event_at_a_time_ends_where_the_rules_say(
        handlers: tuple[Handlers, AlertsStore], kind: str) -> None:
    h, store = handlers
    for order in itertools.permutations(range(len(history(kind)))):
        events = history(kind)  # a new alert for every order
        await feed(h, [events[i] for i in order])
        assert await stored(store, events[0].alert_id) == expected(events), order


@pytest.mark.parametrize("kind", HISTORIES)
async def test_one_batch_per_topic_in_either_order_ends_where_the_rules_say(
        handlers: tuple[Handlers, AlertsStore], kind: str) -> None:
    h, store = handlers
    for order in itertools.permutations(range(len(history(kind)))):
        events = history(kind)
        await feed(h, [events[i] for i in order], per_topic_batch=True)
        assert await stored(store, events[0].alert_id) == expected(events), order


async def test_redelivering_a_whole_history_changes_nothing(handlers: tuple[Handlers, AlertsStore]) -> None:
    h, store = handlers
    events = history("superseded, raised again, withdrawn")
    await feed(h, events)
    before = await store.alerts.find_one({"_id": events[0].alert_id})
    await feed(h, events[::-1])
    assert await store.alerts.find_one({"_id": events[0].alert_id}) == before


async def test_a_raise_and_its_withdrawal_handled_at_the_same_moment_both_count(
        handlers: tuple[Handlers, AlertsStore]) -> None:
    # The two consumers are independent: both may try to create the same alert document at once.
    h, store = handlers
    raised = [deterioration("t1", "c1", f"client-{i}") for i in range(30)]
    await asyncio.gather(h.on_deterioration(raises(raised)),
                         h.on_alert_status(statuses([ended(e, "withdrawn") for e in raised])))
    docs = await store.alerts.find({"_id": {"$in": [e.alert_id for e in raised]}}).to_list()
    assert len(docs) == 30
    assert {(d["status"], d["crev"], d["total"]) for d in docs} == {("withdrawn", 1, 31.2)}


async def test_a_revision_keeps_the_acknowledgement(handlers: tuple[Handlers, AlertsStore]) -> None:
    h, store = handlers
    r1 = deterioration("t1", "c1", "client-1")
    await feed(h, [r1])
    await store.acknowledge("t1", r1.alert_id, "key-1")
    await feed(h, [revised(r1, 2, total=30.0)])
    assert await stored(store, r1.alert_id) == ("acknowledged", 2, 30.0)


async def test_an_acknowledged_alert_superseded_then_raised_again_is_acknowledged_again(
        handlers: tuple[Handlers, AlertsStore]) -> None:
    h, store = handlers
    r1 = deterioration("t1", "c1", "client-1")
    await feed(h, [r1])
    await store.acknowledge("t1", r1.alert_id, "key-1")
    await feed(h, [ended(r1, "superseded")])
    assert (await stored(store, r1.alert_id))[0] == "superseded"
    await feed(h, [revised(r1, 2)])
    assert (await stored(store, r1.alert_id))[0] == "acknowledged"


async def test_a_superseded_or_withdrawn_alert_cannot_be_acknowledged(handlers: tuple[Handlers, AlertsStore]) -> None:
    h, store = handlers
    for status in ("superseded", "withdrawn"):
        r1 = deterioration("t1", "c1", "client-1")
        await feed(h, [r1, ended(r1, status)])
        alert = await store.acknowledge("t1", r1.alert_id, "key-1")
        assert alert is not None and (alert.status, alert.acknowledged_at) == (status, None)


async def test_only_open_alerts_with_content_are_due_for_escalation(handlers: tuple[Handlers, AlertsStore]) -> None:
    h, store = handlers
    open_, withdrawn, acked = (deterioration("t1", "c1", f"client-{i}") for i in range(3))
    status_only = deterioration("t1", "c1", "client-9")
    await feed(h, [open_, withdrawn, ended(withdrawn, "withdrawn"), acked, ended(status_only, "superseded", 1)])
    await store.acknowledge("t1", acked.alert_id, "key-1")
    due = await store.due_escalations([(None, datetime.now(UTC))], 100)
    assert [d["_id"] for d in due] == [open_.alert_id]


async def test_an_alert_recorded_before_alerts_had_a_lifecycle_can_still_be_revised_and_withdrawn(
        handlers: tuple[Handlers, AlertsStore]) -> None:
    h, store = handlers
    r1 = deterioration("t1", "c1", "client-1")
    await store.alerts.insert_one({"_id": r1.alert_id, "tenant_id": "t1", "site_id": "site-a", "clinician_id": "c1",
                                   "client_id": "client-1", "status": "open", "escalated": False,
                                   "created_at": datetime.now(UTC), "total": 31.2})
    await feed(h, [revised(r1, 2, total=30.0)])
    assert await stored(store, r1.alert_id) == ("open", 2, 30.0)
    await feed(h, [ended(r1, "withdrawn", 2)])
    assert await stored(store, r1.alert_id) == ("withdrawn", 2, 30.0)


@pytest.mark.parametrize("kind", HISTORIES)
async def test_a_reader_between_the_writes_of_one_merge_always_sees_a_whole_alert(
        handlers: tuple[Handlers, AlertsStore], kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A merge's upserts are separate writes (one round trip, not one transaction): the API may read
    # the alert after the content upsert created it and before the lifecycle upsert opened it.
    h, store = handlers
    seen: list[Document] = []
    merge = store._merge

    async def one_write_at_a_time(ops: Sequence[UpdateOne]) -> None:
        for op in ops:
            await merge([op])
            seen.extend(await store.alerts.find({}).to_list())

    monkeypatch.setattr(store, "_merge", one_write_at_a_time)
    for order in itertools.permutations(range(len(history(kind)))):
        events = history(kind)
        await feed(h, [events[i] for i in order])
    assert seen
    for doc in seen:
        AlertOut.model_validate({**doc, "alert_id": doc["_id"]})
