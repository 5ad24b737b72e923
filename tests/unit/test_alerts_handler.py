"""The alerts batch handlers with an in-memory store and publisher (tests/support/fakes.py): what
each consumed event schedules, what is dead-lettered, and what a redelivery does (the same
behaviours run against the real broker and store in tests/integration/test_alerts_*.py)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable, Sequence
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from services.alerts.handlers import INVALID, SERVICE, Handlers, StatusEvent
from services.alerts.rules import Clinician, Routing, Subscription
from shared import ids
from shared.events import AlertStatusChanged, AllianceDeterioration, DeadLetterReason, Instrument, SrsScored
from shared.kafka import DeadLetterTarget, InboundRecord, typed_handler
from shared.mongo import Document
from shared.topics import ALERT_STATUS, DETERIORATION, SCORED
from tests.support.fakes import T0, TOPICS, MemoryAlertsStore, Sink, StoreDown, inbound

TENANT = "acme"


class Wired:
    """The handlers on fakes, as the subscriber runs them on raw records (decoded to the model
    app.py subscribes them with, the records that do not decode dead-lettered to the sink),
    counting the worker wake-ups (`on_scheduled`)."""

    def __init__(self, store: MemoryAlertsStore | None = None) -> None:
        self.store = store or MemoryAlertsStore()
        self.sink = Sink()
        self.wakeups = 0
        handlers = Handlers(self.store, email_enabled=False, on_scheduled=self._wake, publisher=self.sink,
                            topics=TOPICS)
        dead_letters = DeadLetterTarget(TOPICS.deadletter, self.sink.publish_all)

        def consumer(model: type, handler: Any) -> Any:
            return typed_handler(model, handler, service=SERVICE, dead_letters=dead_letters, invalid_reason=INVALID)

        self.handlers = SimpleNamespace(on_deterioration=consumer(AllianceDeterioration, handlers.on_deterioration),
                                        on_alert_status=consumer(StatusEvent, handlers.on_alert_status),
                                        on_scored=consumer(SrsScored, handlers.on_scored))

    def _wake(self) -> None:
        self.wakeups += 1

    def letters(self) -> list[tuple[str, str | None]]:
        return [(d.reason, d.tenant_id) for d in self.sink.letters(TOPICS.deadletter)]


def directory(webhook: str | None = "https://clinic.example/hook") -> MemoryAlertsStore:
    """A store whose directory holds clinician c-1 of site north (with a webhook)."""
    store = MemoryAlertsStore()
    store.clinicians[(TENANT, "c-1")] = Clinician(TENANT, "c-1", "north", "c1@clinic.example", webhook)
    return store


def raised(session: int = 2, revision: int = 1, client: str = "x") -> AllianceDeterioration:
    alert_id = ids.alert_id(TENANT, client, "SRS", "e-1", session)
    return AllianceDeterioration(
        event_id=ids.alert_event_id(alert_id, revision), tenant_id=TENANT, occurred_at=T0,
        submission_id=f"{client}-{session}", site_id="north", clinician_id="c-1", client_id=client, episode_id="e-1",
        instrument=Instrument.SRS, session_number=session, administered_at=T0, alert_id=alert_id,
        triggers=["below_cutoff"], severity="warning", total=30.0, cutoff=36.0, revision=revision,
        accepted_at=T0 + timedelta(seconds=1))


def ended(alert: AllianceDeterioration, status: str = "withdrawn", revision: int | None = None,
          client: str | None = "x") -> AlertStatusChanged:
    rev = alert.revision if revision is None else revision
    return AlertStatusChanged(
        event_id=ids.alert_status_event_id(TENANT, alert.alert_id, status, rev or 0), tenant_id=TENANT,
        occurred_at=T0 + timedelta(hours=1), alert_id=alert.alert_id, site_id="north", clinician_id="c-1",
        status=status, revision=revision if revision is not None else alert.revision, client_id=client,
        instrument=Instrument.SRS, episode_id="e-1", session_number=alert.session_number)


def scored(client: str = "x") -> SrsScored:
    return SrsScored(
        event_id=ids.scored_event_id(TENANT, f"{client}-1"), tenant_id=TENANT, occurred_at=T0,
        submission_id=f"{client}-1", site_id="north", clinician_id="c-1", client_id=client, episode_id="e-1",
        session_number=1, administered_at=T0, total=38.0, cutoff=36.0, scored_at=T0)


def on(topic: str, event: AllianceDeterioration | AlertStatusChanged | SrsScored, correlation: str = "corr-1"
       ) -> InboundRecord:
    return inbound(topic, event, key=ids.partition_key(TENANT, "x"), correlation=correlation)


# --- decoding -------------------------------------------------------------------------------------


async def test_a_record_that_does_not_decode_is_dead_lettered_as_invalid_event_and_the_batch_goes_on() -> None:
    w = Wired(directory())
    await w.handlers.on_deterioration([
        inbound(TOPICS.deterioration, b"not json"),
        inbound(TOPICS.deterioration, b'{"tenant_id": "acme", "alert_id": "a"}'),
        on(TOPICS.deterioration, raised()),
    ])
    assert w.letters() == [("invalid_event", None), ("invalid_event", "acme")]
    assert len(w.store.deliveries) == 1 and w.wakeups == 1


async def test_a_dead_letter_names_the_fields_at_fault_but_not_their_values() -> None:
    w = Wired()
    bad = raised().model_copy(update={"session_number": 0}).model_dump_json().encode()
    await w.handlers.on_deterioration([inbound(TOPICS.deterioration, bad)])
    (letter,) = w.sink.letters(TOPICS.deadletter)
    assert letter.reason == DeadLetterReason.INVALID_EVENT and "session_number" in letter.detail
    assert raised().submission_id not in letter.detail and letter.payload == bad.decode()


async def test_a_withdrawal_naming_no_revision_is_dead_lettered_with_its_tenant() -> None:
    w = Wired(directory())
    await w.handlers.on_alert_status([on(TOPICS.alert_status, ended(raised()).model_copy(update={"revision": None}))])
    assert w.letters() == [("invalid_event", TENANT)]
    assert w.store.lkeys == {} and w.store.deliveries == {}


# --- raises ---------------------------------------------------------------------------------------


async def test_a_raise_is_recorded_and_its_clinician_webhook_scheduled_with_the_record_as_source() -> None:
    w = Wired(directory())
    rec = on(TOPICS.deterioration, raised(), correlation="corr-7")
    await w.handlers.on_deterioration([rec])
    (delivery,) = w.store.deliveries.values()
    assert (delivery["recipient"], delivery["channel"], delivery["status"]) == ("clinician:c-1", "webhook", "pending")
    assert delivery["body"] == rec.value.decode() and delivery["correlation_id"] == "corr-7"
    assert delivery["source"] == {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
                                  "key": "acme:x"}
    assert w.store.contents[raised().alert_id][0] == 1 and w.wakeups == 1 and w.letters() == []


async def test_a_partner_subscribed_to_deteriorations_is_scheduled_too() -> None:
    store = directory(webhook=None)
    store.subscriptions.append(Subscription("s-1", TENANT, "https://partner.example/in", frozenset({DETERIORATION})))
    w = Wired(store)
    await w.handlers.on_deterioration([on(TOPICS.deterioration, raised())])
    assert [d["recipient"] for d in w.store.deliveries.values()] == ["subscription:s-1"]


async def test_a_redelivered_batch_schedules_nothing_new() -> None:
    w = Wired(directory())
    batch = [on(TOPICS.deterioration, raised()), inbound(TOPICS.deterioration, b"{")]
    await w.handlers.on_deterioration(batch)
    first = dict(w.store.deliveries)
    await w.handlers.on_deterioration(batch)
    assert w.store.deliveries == first and w.wakeups == 1
    letters = w.sink.letters(TOPICS.deadletter)
    assert len(letters) == 2 and letters[0].event_id == letters[1].event_id  # the same dead letter, again


async def test_a_raise_whose_clinician_is_missing_is_scheduled_for_the_sites_fallback_and_its_routing_recorded(
        ) -> None:
    store = MemoryAlertsStore()
    store.clinicians[(TENANT, "duty")] = Clinician(TENANT, "duty", "north", None, "https://duty.example/h",
                                                   fallback=True)
    w = Wired(store)
    await w.handlers.on_deterioration([on(TOPICS.deterioration, raised())])
    (delivery,) = w.store.deliveries.values()
    assert (delivery["recipient"], delivery["routed_reason"]) == ("fallback:duty", "no_directory_entry")
    assert w.store.routings[raised().alert_id] == (1, Routing("fallback", "no_directory_entry", ("duty",)))
    assert w.sink.of_topic(TOPICS.alert_status) == []  # somebody was told: no `failed`


def test_the_handlers_cannot_be_built_without_where_to_publish_failed() -> None:
    params = inspect.signature(Handlers).parameters
    assert all(params[name].default is inspect.Parameter.empty for name in ("publisher", "topics"))


async def test_a_raise_reaching_nobody_publishes_failed_with_the_reason_again_on_redelivery_under_one_id() -> None:
    w = Wired(directory(webhook=None))  # email is off: c-1 has no usable channel
    batch = [on(TOPICS.deterioration, raised())]
    await w.handlers.on_deterioration(batch)
    await w.handlers.on_deterioration(batch)
    events = [AlertStatusChanged.model_validate_json(r.value) for r in w.sink.of_topic(TOPICS.alert_status)]
    assert [(e.status, e.routing_reason, e.channel) for e in events] == [("failed", "no_channel", None)] * 2
    assert len({e.event_id for e in events}) == 1 and w.store.deliveries == {}
    assert w.store.routings[raised().alert_id] == (1, Routing("none", "no_channel"))


async def test_a_raise_already_withdrawn_is_recorded_but_not_sent() -> None:
    w = Wired(directory())
    alert = raised()
    await w.handlers.on_alert_status([on(TOPICS.alert_status, ended(alert))])
    sent = len(w.store.deliveries)
    await w.handlers.on_deterioration([on(TOPICS.deterioration, alert)])
    assert len(w.store.deliveries) == sent and alert.alert_id in w.store.contents


# --- statuses and scored events -------------------------------------------------------------------


async def test_a_withdrawal_is_told_to_the_clinician() -> None:
    w = Wired(directory())
    alert = raised()
    await w.handlers.on_deterioration([on(TOPICS.deterioration, alert)])
    await w.handlers.on_alert_status([on(TOPICS.alert_status, ended(alert))])
    kinds = sorted(d["kind"] for d in w.store.deliveries.values())
    assert kinds == ["alert", "withdrawal"] and w.wakeups == 2


async def test_a_stale_withdrawal_is_not_told() -> None:
    w = Wired(directory())
    first = raised()
    await w.handlers.on_deterioration([on(TOPICS.deterioration, raised(revision=2))])
    await w.handlers.on_alert_status([on(TOPICS.alert_status, ended(first, revision=1))])
    assert [d["kind"] for d in w.store.deliveries.values()] == ["alert"]


async def test_scored_events_go_only_to_partners_subscribed_to_them() -> None:
    store = MemoryAlertsStore()
    store.subscriptions += [Subscription("s-1", TENANT, "https://a.example", frozenset({SCORED})),
                            Subscription("s-2", TENANT, "https://b.example", frozenset({ALERT_STATUS}))]
    w = Wired(store)
    await w.handlers.on_scored([on(TOPICS.scored, scored())])
    assert [d["recipient"] for d in w.store.deliveries.values()] == ["subscription:s-1"]


# --- failures -------------------------------------------------------------------------------------


async def test_a_store_failure_raises_and_publishes_no_dead_letter() -> None:
    w = Wired(directory())
    w.store.down = True
    with pytest.raises(StoreDown):
        await w.handlers.on_deterioration([inbound(TOPICS.deterioration, b"x"), on(TOPICS.deterioration, raised())])
    assert w.sink.attempted == []  # the subscriber retries the batch; its dead letters come with it


async def test_unacknowledged_dead_letters_fail_the_batch() -> None:
    w = Wired()
    w.sink.fail_next = 1
    with pytest.raises(ConnectionError):
        await w.handlers.on_scored([inbound(TOPICS.scored, b"x")])


# --- round trips ----------------------------------------------------------------------------------


class OverlapStore(MemoryAlertsStore):
    """The in-memory store, each call taking a moment as a round trip does; records the most
    calls under way at once."""

    def __init__(self) -> None:
        super().__init__()
        self.clinicians = directory().clinicians
        self.in_flight = 0
        self.most = 0

    async def _trip(self) -> None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(0.005)
        self.in_flight -= 1

    async def clinicians_for(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Clinician]:
        await self._trip()
        return await super().clinicians_for(keys)

    async def subscriptions_for(self, tenant_ids: Iterable[str], topic: str) -> list[Subscription]:
        await self._trip()
        return await super().subscriptions_for(tenant_ids, topic)

    async def record_raises(self, raises: Sequence[tuple[int, Document]]) -> None:
        await self._trip()
        await super().record_raises(raises)

    async def record_statuses(self, statuses: Sequence[tuple[str, int, Document]]) -> None:
        await self._trip()
        await super().record_statuses(statuses)


async def test_a_raise_waits_for_its_directory_reads_and_its_merge_together() -> None:
    w = Wired(OverlapStore())
    await w.handlers.on_deterioration([on(TOPICS.deterioration, raised())])
    assert isinstance(w.store, OverlapStore) and w.store.most == 3
    assert len(w.store.deliveries) == 1  # and the clinician's webhook is scheduled as before


async def test_a_withdrawal_waits_for_its_merge_and_its_directory_reads_together() -> None:
    w = Wired(OverlapStore())
    alert = raised()
    await w.handlers.on_deterioration([on(TOPICS.deterioration, alert)])
    assert isinstance(w.store, OverlapStore)
    w.store.most = 0
    await w.handlers.on_alert_status([on(TOPICS.alert_status, ended(alert))])
    assert w.store.most == 3
    assert sorted(d["kind"] for d in w.store.deliveries.values()) == ["alert", "withdrawal"]
