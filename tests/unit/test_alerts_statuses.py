"""`delivered` / `failed` of clinicians' deliveries (services/alerts/statuses.py and the rules in
services/alerts/rules.py), on an in-memory store and publisher: which deliveries tell, on which
topic, under which id, and that a status left owed is published by the sweep, never lost; and the
channel-less `failed` of a revision whose every delivery to a person used up its attempts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from services.alerts.handlers import delivery_doc
from services.alerts.rules import (
    Clinician,
    PlannedDelivery,
    Reached,
    Routing,
    Subscription,
    first_deliveries,
    revision_reached,
    route_alert,
    tells_status,
    to_person,
)
from services.alerts.settings import AlertsSettings
from services.alerts.statuses import StatusTeller
from services.alerts.store import STATUS_OUTBOX
from shared import ids
from shared.events import AlertStatusChanged, AllianceDeterioration, OutcomeAlert, OutcomeAlertStatusChanged
from shared.mongo import Document
from tests.support.alerts import outcome_alert
from tests.support.fakes import TOPICS, MemoryAlertsStore, Sink, StoreDown
from tools.harness import deterioration

SWEEP = 30.0
CLINICIAN = Clinician("acme", "c1", "site-a", email="c1@clinic.test", webhook_url="https://clinic.test/hook")
PARTNER = Subscription("s1", "acme", "https://partner.test/hook",
                       frozenset({"alliance.deterioration.v1", "outcome.alert.v1"}))


def planned(alert: AllianceDeterioration | OutcomeAlert) -> dict[str, PlannedDelivery]:
    """The alert's deliveries by recipient role and channel, e.g. `clinician:webhook`, `subscription:webhook`."""
    return {f"{p.recipient.split(':')[0]}:{p.channel}": p for p in route_alert(alert, CLINICIAN, [PARTNER], True)}


def recorded(alert: AllianceDeterioration | OutcomeAlert, p: PlannedDelivery, status: str, at: datetime,
             owed: bool = True) -> Document:
    """A delivery as the worker's write leaves it: `status` at `at`, its status owed unless not `owed`."""
    doc = delivery_doc(p, alert.model_dump_json(), alert.occurred_at, "corr-1", None, at - timedelta(seconds=1))
    done = {"status": status, "finished_at": at, **({"delivered_at": at} if status == "delivered" else {})}
    return {**doc, **done, **({STATUS_OUTBOX: True} if owed else {})}


def pending(alert: AllianceDeterioration | OutcomeAlert, p: PlannedDelivery) -> Document:
    """A delivery still being tried (not finished)."""
    return delivery_doc(p, alert.model_dump_json(), alert.occurred_at, "corr-1", None, NOW)


def teller(store: MemoryAlertsStore, sink: Sink) -> StatusTeller:
    return StatusTeller(store, sink, TOPICS, AlertsSettings(status_sweep_seconds=SWEEP))


def alliance_statuses(sink: Sink) -> list[AlertStatusChanged]:
    return [AlertStatusChanged.model_validate_json(r.value) for r in sink.of_topic(TOPICS.alert_status)]


NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # when the deliveries of most tests were recorded


def test_only_a_clinicians_delivery_of_a_raised_revision_tells_a_status() -> None:
    assert tells_status("alert", "clinician:c1")
    assert not tells_status("alert", "subscription:s1")
    assert not tells_status("escalation", "supervisor:boss")
    assert not tells_status("withdrawal", "clinician:c1")
    assert not tells_status("event", "subscription:s1")


def test_a_delivery_of_a_raised_revision_to_its_clinician_or_a_fallback_is_one_to_a_person() -> None:
    assert to_person("alert", "clinician:c1") and to_person("alert", "fallback:duty")
    assert not to_person("alert", "subscription:s1")
    assert not to_person("escalation", "supervisor:boss")
    assert not to_person("withdrawal", "fallback:duty")


def people(*deliveries: tuple[str, str]) -> list[tuple[str, str, str]]:
    """(delivery id, recipient, status) of deliveries given as (recipient, status), ids d0, d1, ..."""
    return [(f"d{i}", r, st) for i, (r, st) in enumerate(deliveries)]


def test_a_revision_reached_nobody_when_every_delivery_to_a_person_used_up_its_attempts() -> None:
    assert revision_reached(people(("fallback:duty", "failed"))) == Reached("none")
    assert revision_reached(people(("clinician:c1", "failed"), ("clinician:c1", "failed"))) == Reached("none")
    assert revision_reached(people(("fallback:duty", "failed"), ("clinician:c1", "failed"))) == Reached("none")


def test_a_fallbacks_deliveries_a_reroute_cancelled_go_to_the_fallback_again_once_the_clinicians_failed() -> None:
    assert revision_reached(people(("fallback:duty", "cancelled"), ("clinician:c1", "failed"),
                                   ("fallback:duty", "cancelled"))) == Reached("fallback", ("d0", "d2"))


def test_only_the_fallbacks_deliveries_the_reroute_cancelled_go_again_not_those_that_had_failed_already() -> None:
    assert revision_reached(people(("fallback:duty", "failed"), ("fallback:duty", "cancelled"),
                                   ("clinician:c1", "failed"))) == Reached("fallback", ("d1",))


def test_a_fallbacks_delivery_that_got_through_needs_none_of_the_cancelled_ones_again() -> None:
    assert revision_reached(people(("fallback:duty", "delivered"), ("fallback:duty", "cancelled"),
                                   ("clinician:c1", "failed"))) == Reached("fallback")


def test_a_clinicians_delivery_that_got_through_reached_them_whatever_the_others_did() -> None:
    for other in ("failed", "pending", "delivered", "cancelled"):
        assert revision_reached(people(("clinician:c1", "delivered"), ("fallback:duty", other))) == Reached("clinician")


def test_a_rerouted_revision_none_of_whose_clinician_deliveries_got_through_reached_the_fallback_that_had_it() -> None:
    assert revision_reached(people(("fallback:duty", "delivered"), ("clinician:c1", "failed"))) == Reached("fallback")


def test_who_a_revision_reached_is_not_settled_while_a_delivery_to_a_person_is_pending() -> None:
    assert revision_reached(people(("clinician:c1", "failed"), ("clinician:c1", "pending"))) is None
    assert revision_reached(people(("fallback:duty", "delivered"), ("clinician:c1", "pending"))) is None
    assert revision_reached(people(("fallback:duty", "pending"), ("clinician:c1", "failed"))) is None
    assert revision_reached(people(("fallback:duty", "cancelled"), ("clinician:c1", "pending"))) is None


def test_who_a_revision_reached_is_not_settled_before_one_of_its_deliveries_failed() -> None:
    assert revision_reached([]) is None  # routed to nobody is told when it is routed, not here
    assert revision_reached(people(("fallback:duty", "cancelled"))) is None


def test_the_first_delivery_of_a_revision_is_the_earliest_recorded_ties_broken_by_id() -> None:
    assert first_deliveries([("b", "rev-1", NOW), ("a", "rev-1", NOW + timedelta(seconds=1)),
                             ("c", "rev-2", NOW)]) == {"b", "c"}
    assert first_deliveries([("b", "rev-1", NOW), ("a", "rev-1", NOW)]) == {"a"}


async def test_a_clinicians_delivered_webhook_publishes_delivered_with_the_derived_id_and_settles_its_debt() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-1"), MemoryAlertsStore(), Sink()
    d = recorded(alert, planned(alert)["clinician:webhook"], "delivered", NOW)
    await store.insert_deliveries([d])

    assert await teller(store, sink).tell(await store.owed_statuses([d["_id"]])) == 1

    [status] = alliance_statuses(sink)
    assert status.event_id == ids.alert_status_event_id("acme", alert.alert_id, "delivered", 1)
    assert (status.status, status.revision, status.channel, status.client_id, status.occurred_at) == (
        "delivered", 1, "webhook", "client-1", NOW)
    assert sink.published[0].key == ids.partition_key("acme", "client-1")
    assert STATUS_OUTBOX not in store.deliveries[d["_id"]]


async def test_a_clinician_delivery_that_used_up_its_attempts_publishes_failed_naming_its_channel() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-2"), MemoryAlertsStore(), Sink()
    d = recorded(alert, planned(alert)["clinician:email"], "failed", NOW)
    webhook = planned(alert)["clinician:webhook"]  # still being tried: the revision may reach c1 yet
    await store.insert_deliveries([d, pending(alert, webhook)])

    await teller(store, sink).tell(await store.owed_statuses([d["_id"]]))

    [status] = alliance_statuses(sink)
    assert status.event_id == ids.alert_status_event_id("acme", alert.alert_id, "failed", 1, channel="email")
    assert (status.status, status.channel) == ("failed", "email")


async def test_a_second_channel_delivering_the_same_revision_tells_nothing_more() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-3"), MemoryAlertsStore(), Sink()
    first = recorded(alert, planned(alert)["clinician:email"], "delivered", NOW)
    second = recorded(alert, planned(alert)["clinician:webhook"], "delivered", NOW + timedelta(seconds=2))
    await store.insert_deliveries([first, second])
    statuses = teller(store, sink)

    await statuses.tell(await store.owed_statuses([first["_id"]]))
    await statuses.tell(await store.owed_statuses([second["_id"]]))

    assert [(s.status, s.channel) for s in alliance_statuses(sink)] == [("delivered", "email")]
    assert await store.owed_statuses() == []


async def test_an_outcome_alerts_status_goes_to_the_outcome_status_topic_only() -> None:
    alert, store, sink = outcome_alert("acme", "c1", "client-4"), MemoryAlertsStore(), Sink()
    d = recorded(alert, planned(alert)["clinician:webhook"], "delivered", NOW)
    await store.insert_deliveries([d])

    await teller(store, sink).tell(await store.owed_statuses([d["_id"]]))

    assert sink.of_topic(TOPICS.alert_status) == []
    [record] = sink.of_topic(TOPICS.outcome_alert_status)
    status = OutcomeAlertStatusChanged.model_validate_json(record.value)
    assert (status.alert_id, status.status, status.instrument) == (alert.alert_id, "delivered", "ORS")


async def test_a_status_the_broker_did_not_take_stays_owed_and_the_sweep_publishes_the_same_event() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-5"), MemoryAlertsStore(), Sink()
    finished = NOW - timedelta(seconds=SWEEP + 1)
    d = recorded(alert, planned(alert)["clinician:webhook"], "delivered", finished)
    await store.insert_deliveries([d])
    statuses = teller(store, sink)
    sink.fail_next = 1

    with pytest.raises(ConnectionError):
        await statuses.tell(await store.owed_statuses([d["_id"]]))
    assert store.deliveries[d["_id"]][STATUS_OUTBOX] is True

    assert await statuses.sweep() == 1
    assert [r.value for r in sink.published] == [sink.attempted[0].value]
    assert STATUS_OUTBOX not in store.deliveries[d["_id"]]


async def test_the_sweep_leaves_a_status_owed_for_less_than_its_interval_to_the_worker() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-6"), MemoryAlertsStore(), Sink()
    just_now = datetime.now(UTC)
    await store.insert_deliveries([recorded(alert, planned(alert)["clinician:webhook"], "delivered", just_now)])

    assert await teller(store, sink).sweep() == 0
    assert sink.attempted == []


async def test_a_delivery_requeued_and_finished_again_since_it_was_told_keeps_its_new_debt() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-7"), MemoryAlertsStore(), Sink()
    d = recorded(alert, planned(alert)["clinician:webhook"], "failed", NOW)
    await store.insert_deliveries([d])
    owed = await store.owed_statuses([d["_id"]])
    store.deliveries[d["_id"]] = recorded(alert, planned(alert)["clinician:webhook"], "delivered",
                                          NOW + timedelta(minutes=1))

    await teller(store, sink).tell(owed)

    assert store.deliveries[d["_id"]][STATUS_OUTBOX] is True


# --- a revision whose every delivery to a person used up its attempts reached nobody -------------


DUTY = Clinician("acme", "duty", "site-a", email="duty@clinic.test", webhook_url="https://duty.test/h", fallback=True)


def to_fallback(alert: AllianceDeterioration, store: MemoryAlertsStore) -> dict[str, PlannedDelivery]:
    """The revision routed to the site's fallback `duty` (its clinician has no entry), as recorded."""
    store.routings[alert.alert_id] = (alert.revision, Routing("fallback", "no_directory_entry", ("duty",)))
    return {f"{p.recipient.split(':')[0]}:{p.channel}": p for p in route_alert(alert, None, [PARTNER], True, [DUTY])}


def unrouted_no(reason: str = "undelivered") -> float:
    labels = {"kind": "alliance", "reason": reason, "fallback": "no"}
    return REGISTRY.get_sample_value("alliance_alerts_unrouted_total", labels) or 0.0


async def test_a_fallbacks_failed_delivery_tells_nothing_while_another_channel_may_reach_it() -> None:
    alert, store, sink = deterioration("acme", "ghost", "client-20"), MemoryAlertsStore(), Sink()
    p = to_fallback(alert, store)
    d = recorded(alert, p["fallback:webhook"], "failed", NOW)
    await store.insert_deliveries([d, pending(alert, p["fallback:email"])])
    assert await teller(store, sink).tell(await store.owed_statuses([d["_id"]])) == 1
    assert sink.published == [] and STATUS_OUTBOX not in store.deliveries[d["_id"]]


async def test_the_last_failed_delivery_to_a_person_tells_failed_undelivered_records_routing_none_and_counts() -> None:
    alert, store, sink = deterioration("acme", "ghost", "client-21"), MemoryAlertsStore(), Sink()
    p = to_fallback(alert, store)
    first = recorded(alert, p["fallback:webhook"], "failed", NOW, owed=False)
    last = recorded(alert, p["fallback:email"], "failed", NOW + timedelta(seconds=3))
    await store.insert_deliveries([first, last])
    before = unrouted_no()

    await teller(store, sink).tell(await store.owed_statuses([last["_id"]]))

    [status] = alliance_statuses(sink)  # no per-channel `failed` of a fallback's delivery
    assert status.event_id == ids.alert_status_event_id("acme", alert.alert_id, "failed", 1)
    assert (status.channel, status.routing_reason, status.occurred_at) == (None, "undelivered", last["finished_at"])
    assert store.routings[alert.alert_id] == (1, Routing("none", "undelivered", ("duty",)))
    assert unrouted_no() == before + 1


async def test_telling_that_a_revision_reached_nobody_again_is_the_same_event_and_not_counted_again() -> None:
    alert, store, sink = deterioration("acme", "ghost", "client-22"), MemoryAlertsStore(), Sink()
    p = to_fallback(alert, store)
    docs = [recorded(alert, p["fallback:webhook"], "failed", NOW), recorded(alert, p["fallback:email"], "failed", NOW)]
    await store.insert_deliveries(docs)
    statuses = teller(store, sink)
    await statuses.tell(docs[:1])
    before = unrouted_no()
    await statuses.tell(docs[1:])  # the other delivery's teller (or the sweep) sees the same
    assert len({r.value for r in sink.of_topic(TOPICS.alert_status)}) == 1 and unrouted_no() == before


async def test_a_clinicians_two_failed_channels_tell_each_failed_and_that_the_revision_reached_nobody() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-23"), MemoryAlertsStore(), Sink()
    store.routings[alert.alert_id] = (1, Routing("clinician"))
    docs = [recorded(alert, planned(alert)[f"clinician:{c}"], "failed", NOW) for c in ("webhook", "email")]
    await store.insert_deliveries(docs)
    await teller(store, sink).tell(docs)
    assert sorted((s.channel or "-", s.routing_reason or "-") for s in alliance_statuses(sink)) == [
        ("-", "undelivered"), ("email", "-"), ("webhook", "-")]
    assert store.routings[alert.alert_id] == (1, Routing("none", "undelivered"))


# --- a revision a directory fix rerouted to its clinician, whose deliveries to them all failed ---


def rerouted(alert: AllianceDeterioration, store: MemoryAlertsStore) -> dict[str, PlannedDelivery]:
    """The revision routed to the fallback `duty`, then rerouted to its registered clinician c1 (as
    recorded): the fallback's and the clinician's deliveries, by role and channel."""
    p = to_fallback(alert, store)
    store.routings[alert.alert_id] = (alert.revision, Routing("clinician"))
    return {**p, **planned(alert)}


async def test_a_rerouted_revision_the_fallback_had_is_the_fallbacks_again_once_the_clinicians_deliveries_fail(
        ) -> None:
    alert, store, sink = deterioration("acme", "c1", "client-30"), MemoryAlertsStore(), Sink()
    p = rerouted(alert, store)
    got = [recorded(alert, p[f"fallback:{c}"], "delivered", NOW - timedelta(minutes=5), owed=False)
           for c in ("webhook", "email")]
    failed = [recorded(alert, p[f"clinician:{c}"], "failed", NOW) for c in ("webhook", "email")]
    await store.insert_deliveries([*got, *failed])
    before, before_yes = unrouted_no(), unrouted_yes()

    await teller(store, sink).tell(failed)

    assert sorted(s.channel or "-" for s in alliance_statuses(sink)) == ["email", "webhook"]  # nobody told failed
    assert store.routings[alert.alert_id] == (1, Routing("fallback", "no_directory_entry", ()))
    assert (unrouted_no(), unrouted_yes()) == (before, before_yes + 1)


def unrouted_yes() -> float:
    labels = {"kind": "alliance", "reason": "undelivered", "fallback": "yes"}
    return REGISTRY.get_sample_value("alliance_alerts_unrouted_total", labels) or 0.0


async def stopped_by_the_reroute(alert: AllianceDeterioration,
                                 store: MemoryAlertsStore) -> tuple[list[Document], Document]:
    """The revision rerouted to c1 while the fallback's two deliveries waited for a retry (cancelled
    by the reroute), and c1's two deliveries failed, as stored: (the fallback's, c1's last, owed)."""
    p = rerouted(alert, store)
    stopped = [{**recorded(alert, p[f"fallback:{c}"], "cancelled", NOW - timedelta(minutes=5), owed=False),
                "attempts": 1} for c in ("webhook", "email")]
    first = recorded(alert, p["clinician:email"], "failed", NOW - timedelta(seconds=3), owed=False)
    last = recorded(alert, p["clinician:webhook"], "failed", NOW)
    await store.insert_deliveries([*stopped, first, last])
    return stopped, last


async def test_a_rerouted_revision_whose_fallback_retries_the_reroute_cancelled_schedules_them_again() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-31"), MemoryAlertsStore(), Sink()
    stopped, last = await stopped_by_the_reroute(alert, store)
    woken: list[bool] = []
    statuses = teller(store, sink)
    statuses.wake = lambda: woken.append(True)
    before_yes, before_no = unrouted_yes(), unrouted_no()

    await statuses.tell([last])

    assert [s.channel for s in alliance_statuses(sink)] == ["webhook"]  # c1's own; nobody told failed
    assert [(store.deliveries[d["_id"]]["status"], store.deliveries[d["_id"]]["attempts"]) for d in stopped] == [
        ("pending", 0), ("pending", 0)]  # a fresh attempt budget
    assert store.routings[alert.alert_id] == (1, Routing("fallback", "no_directory_entry", ()))
    assert woken == [True]
    assert (unrouted_yes(), unrouted_no()) == (before_yes + 1, before_no)


async def test_a_rerouted_revision_whose_rescheduled_fallback_deliveries_fail_too_reached_nobody() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-34"), MemoryAlertsStore(), Sink()
    stopped, last = await stopped_by_the_reroute(alert, store)
    statuses = teller(store, sink)
    await statuses.tell([last])
    failed = [{**store.deliveries[d["_id"]], "status": "failed", "finished_at": NOW + timedelta(minutes=1),
               STATUS_OUTBOX: True} for d in stopped]
    store.deliveries.update((d["_id"], d) for d in failed)
    before = unrouted_no()

    await statuses.tell(failed)

    nobody = [s for s in alliance_statuses(sink) if s.channel is None]
    assert [(s.routing_reason, s.occurred_at) for s in nobody] == [("undelivered", NOW + timedelta(minutes=1))]
    assert store.routings[alert.alert_id] == (1, Routing("none", "undelivered", ()))
    assert unrouted_no() == before + 1


async def test_telling_a_failed_reroute_again_schedules_the_fallback_once_and_counts_it_once() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-35"), MemoryAlertsStore(), Sink()
    stopped, last = await stopped_by_the_reroute(alert, store)
    statuses = teller(store, sink)
    await statuses.tell([last])
    before = unrouted_yes()
    for d in stopped:  # the worker got to them: no longer cancelled
        store.deliveries[d["_id"]]["attempts"] = 1

    await statuses.tell([last])  # the sweep, or another process, after a crash before the flag was unset

    assert [store.deliveries[d["_id"]]["attempts"] for d in stopped] == [1, 1]
    assert unrouted_yes() == before


class FailsToReschedule(MemoryAlertsStore):
    """A store that fails the write scheduling deliveries again once (a crash right before it)."""

    failed_once = False

    async def reschedule_cancelled(self, delivery_ids: Sequence[str]) -> int:
        if not self.failed_once:
            self.failed_once = True
            raise StoreDown("store unreachable")
        return await super().reschedule_cancelled(delivery_ids)


async def test_a_crash_before_the_fallback_is_scheduled_again_is_finished_by_the_next_look() -> None:
    alert, store, sink = deterioration("acme", "c1", "client-36"), FailsToReschedule(), Sink()
    stopped, last = await stopped_by_the_reroute(alert, store)
    statuses = teller(store, sink)
    with pytest.raises(StoreDown):
        await statuses.tell([last])
    assert store.routings[alert.alert_id][1].to == "fallback"  # recorded first
    assert store.deliveries[last["_id"]][STATUS_OUTBOX] is True  # still owed: the sweep looks again

    await statuses.tell(await store.owed_statuses([last["_id"]]))

    assert [store.deliveries[d["_id"]]["status"] for d in stopped] == ["pending", "pending"]
    assert STATUS_OUTBOX not in store.deliveries[last["_id"]]


async def test_a_fallbacks_delivery_that_got_through_after_the_rerouted_clinicians_failed_makes_it_the_fallbacks(
        ) -> None:
    alert, store, sink = deterioration("acme", "c1", "client-32"), MemoryAlertsStore(), Sink()
    p = rerouted(alert, store)
    failed = [recorded(alert, p[f"clinician:{c}"], "failed", NOW, owed=False) for c in ("webhook", "email")]
    late = recorded(alert, p["fallback:webhook"], "delivered", NOW + timedelta(seconds=1))  # in flight at the reroute
    await store.insert_deliveries([*failed, late])

    await teller(store, sink).tell([late])

    assert sink.published == []
    assert store.routings[alert.alert_id] == (1, Routing("fallback", "no_directory_entry", ()))


async def test_a_revision_only_ever_routed_to_the_fallback_keeps_its_routing_when_the_fallback_gets_it() -> None:
    alert, store, sink = deterioration("acme", "ghost", "client-33"), MemoryAlertsStore(), Sink()
    p = to_fallback(alert, store)
    failed = recorded(alert, p["fallback:webhook"], "failed", NOW)
    await store.insert_deliveries([failed, recorded(alert, p["fallback:email"], "delivered", NOW, owed=False)])

    await teller(store, sink).tell([failed])

    assert sink.published == []
    assert store.routings[alert.alert_id] == (1, Routing("fallback", "no_directory_entry", ("duty",)))
