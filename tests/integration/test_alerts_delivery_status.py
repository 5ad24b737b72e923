"""`delivered` and `failed`: what alerts tells of a clinician's delivery of an alert, through the real
service, broker and store (docs/events.md, AlertStatusChanged).

Alerts runs once for the module, with a webhook receiver (tools/receiver.py) and an SMTP sink;
each test has its own tenant. The status topics are read with the topic recorder, as a partner's
consumer would. To show that something was NOT published, a test waits for a later alert of the
same client (same key, same partition) to have its own status published first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from services.alerts.handlers import delivery_doc
from services.alerts.rules import Clinician, route_alert
from services.alerts.settings import AlertsSettings
from services.alerts.store import AlertsStore
from shared import ids
from shared.events import AlertStatusChanged, AllianceDeterioration, OutcomeAlertStatusChanged
from tests.integration.test_alerts_delivery import (
    Env,
    Tenant,
    _async,
    _failed,
    deliveries,
    env_with,
    new_tenant,
    path,
    put_clinician,
    subscribe,
)
from tests.support.alerts import outcome_alert
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.harness import deterioration
from tools.recorder import Record, TopicRecorder

MAX_ATTEMPTS = 3
SWEEP_SECONDS = 0.5


@pytest.fixture(scope="module")
async def env(stack: StackUnderTest) -> AsyncIterator[Env]:
    settings = AlertsSettings(allow_private_targets=True, retry_first_seconds=0.05, retry_max_seconds=0.2,
                              max_attempts=MAX_ATTEMPTS, poll_seconds=0.1, gauge_seconds=0.1,
                              status_sweep_seconds=SWEEP_SECONDS)
    async with env_with(stack, settings) as e:
        yield e


def about(records: list[Record], alert_id: str, status: str | None = None) -> list[AlertStatusChanged]:
    """The status events of `records` about `alert_id` (of `status`, if given), in the order read."""
    events = [(OutcomeAlertStatusChanged if r.topic.endswith("outcome.alert-status.v1") else AlertStatusChanged)
              .model_validate_json(r.value) for r in records]
    return [e for e in events if e.alert_id == alert_id and (status is None or e.status == status)]


async def raise_alliance(env: Env, ev: AllianceDeterioration) -> None:
    await env.publisher.publish(env.topics.deterioration, ev, ev.tenant_id, ev.client_id)


async def delivered_status_of_a_later_alert(env: Env, statuses: TopicRecorder, t: Tenant, client_id: str) -> None:
    """Raise one more alliance alert of `client_id` for the clinician `c1` (who has a working webhook)
    and wait for its `delivered`: anything published earlier about that client is recorded by then."""
    later = deterioration(t.id, "c1", client_id)
    await raise_alliance(env, later)
    await statuses.until(lambda records: bool(about(records, later.alert_id, "delivered")))


async def test_a_clinician_webhook_delivery_publishes_delivered_once_with_the_derived_id(env: Env) -> None:
    t = await new_tenant(env, "delivered")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))  # webhook and email
    ev = deterioration(t.id, "c1", "client-1")
    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        await raise_alliance(env, ev)
        [status] = about(await statuses.until(lambda r: bool(about(r, ev.alert_id))), ev.alert_id)
        # Both channels delivered this revision before a later alert of the client was even raised.
        await eventually(lambda: _both_channels_delivered(env, t, ev.alert_id))
        await delivered_status_of_a_later_alert(env, statuses, t, ev.client_id)
        assert about(statuses.records, ev.alert_id) == [status]
    assert status.event_id == ids.alert_status_event_id(t.id, ev.alert_id, "delivered", 1)
    assert (status.status, status.revision, status.tenant_id, status.site_id, status.clinician_id,
            status.client_id) == ("delivered", 1, t.id, "site-a", "c1", "client-1")
    assert status.channel in ("webhook", "email")


async def test_a_clinician_webhook_that_never_succeeds_publishes_failed_after_its_last_attempt(env: Env) -> None:
    t = await new_tenant(env, "failed")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1"), always_fail=True))
    ev = deterioration(t.id, "c1", "client-2")
    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        await raise_alliance(env, ev)
        records = await statuses.until(lambda r: bool(about(r, ev.alert_id, "failed")))
        assert len(env.receiver.at(path(t, "c1"))) == MAX_ATTEMPTS
        [failed] = about(records, ev.alert_id, "failed")
    assert failed.event_id == ids.alert_status_event_id(t.id, ev.alert_id, "failed", 1, channel="webhook")
    assert (failed.channel, failed.revision, failed.client_id) == ("webhook", 1, "client-2")
    row = await eventually(lambda: _failed(env, t, ev.alert_id))
    assert row is not None and row["attempts"] == MAX_ATTEMPTS


async def test_a_partners_subscription_delivery_publishes_no_delivered_and_reaching_no_person_is_failed(
        env: Env) -> None:
    t = await new_tenant(env, "partner")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    await subscribe(env, t, env.receiver.behave(path(t, "p")), ["alliance.deterioration.v1"])
    unlisted = deterioration(t.id, "not-in-directory", "client-3")  # reaches the partner only
    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        await raise_alliance(env, unlisted)
        await eventually(lambda: _async(env.receiver.at(path(t, "p"))))
        await eventually(lambda: deliveries(env, t, alert_id=unlisted.alert_id, status="delivered"))
        await delivered_status_of_a_later_alert(env, statuses, t, unlisted.client_id)
        # A partner is not a person: the partner's delivery tells nothing, and no person was reached.
        [failed] = about(statuses.records, unlisted.alert_id)
    assert (failed.status, failed.channel, failed.routing_reason) == ("failed", None, "no_directory_entry")


async def test_an_outcome_alerts_statuses_go_only_to_the_outcome_status_topic(env: Env) -> None:
    t = await new_tenant(env, "outcome")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    ors = outcome_alert(t.id, "c1", "client-4")
    async with (TopicRecorder(env.ns.stack.bootstrap, env.topics.outcome_alert_status) as outcome,
                TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as alliance):
        await env.publisher.publish(env.topics.outcome_alert, ors, t.id, ors.client_id)
        records = await outcome.until(lambda r: bool(about(r, ors.alert_id, "delivered")))
        await delivered_status_of_a_later_alert(env, alliance, t, ors.client_id)
        assert about(alliance.records, ors.alert_id) == []
    [status] = about(records, ors.alert_id)
    assert status.event_id == ids.alert_status_event_id(t.id, ors.alert_id, "delivered", 1)
    assert status.instrument == "ORS"


async def test_a_delivered_status_left_unpublished_by_a_crash_is_published_by_the_sweep(env: Env) -> None:
    # What a process that died between recording a delivery and publishing its status leaves behind:
    # the delivery recorded `delivered` with its status still owed.
    t = await new_tenant(env, "crash")
    ev = deterioration(t.id, "c1", "client-5")
    clinician = Clinician(t.id, "c1", "site-a", webhook_url=env.receiver.url_for(path(t, "c1")))
    [planned] = route_alert(ev, clinician, [], email_enabled=False)
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    doc = delivery_doc(planned, ev.model_dump_json(), ev.occurred_at, None, None, long_ago)
    store = AlertsStore(env.db)
    await store.insert_deliveries([{**doc, "status": "delivered", "attempts": 1, "delivered_at": long_ago,
                                    "finished_at": long_ago}])
    await store.outbox.insert_one({"_id": planned.delivery_id, "finished_at": long_ago})
    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        [status] = about(await statuses.until(lambda r: bool(about(r, ev.alert_id))), ev.alert_id)
    assert status.event_id == ids.alert_status_event_id(t.id, ev.alert_id, "delivered", 1)
    assert status.occurred_at == long_ago.replace(microsecond=long_ago.microsecond - long_ago.microsecond % 1000)
    await eventually(lambda: _no_status_owed(env, planned.delivery_id))


async def _both_channels_delivered(env: Env, t: Tenant, alert_id: str) -> bool:
    return {d["channel"] for d in await deliveries(env, t, alert_id=alert_id, status="delivered")} == {
        "webhook", "email"}


async def _no_status_owed(env: Env, delivery_id: str) -> bool:
    owed: int = await AlertsStore(env.db).outbox.count_documents({"_id": delivery_id})
    return owed == 0
