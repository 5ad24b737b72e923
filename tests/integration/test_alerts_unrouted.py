"""An alert whose clinician cannot be reached (no directory entry, an entry of another site, or
no usable channel) through the real alerts service, broker and store: it goes to its site's
fallback entries with the reason, or, when the site has none, is told `failed` on the alert's
status topic; either way the counter moves and the API says so (docs/partners.md, "Alerts that
reach no clinician").

One alerts instance serves the module (webhook receiver, SMTP sink); each test has its own tenant.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from services.alerts.settings import AlertsSettings
from shared import ids
from shared.events import AlertStatusChanged, AllianceDeterioration
from tests.integration.test_alerts_delivery import (
    Env,
    Tenant,
    _async,
    _metrics,
    _sentinel,
    env_with,
    new_tenant,
    path,
    put_clinician,
)
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.harness import deterioration
from tools.recorder import Record, TopicRecorder

MAX_ATTEMPTS = 3


# Retries, polls and checks fast enough that a revision reaches nobody within a second.
FAST = AlertsSettings(allow_private_targets=True, retry_first_seconds=0.05, retry_max_seconds=0.2,
                      max_attempts=MAX_ATTEMPTS, poll_seconds=0.1, gauge_seconds=0.1, escalation_check_seconds=0.2)


@pytest.fixture(scope="module")
async def env(stack: StackUnderTest) -> AsyncIterator[Env]:
    async with env_with(stack, FAST) as e:
        yield e


async def put_fallback(env: Env, t: Tenant, cid: str, site: str = "site-a", supervisor: str | None = None,
                       unreachable: bool = False) -> str:
    """A site's fallback entry (the duty clinician) with a webhook and an email, both failing every
    attempt when `unreachable`; returns its webhook path."""
    hook = path(t, cid)
    if unreachable:
        env.smtp.failing.add(f"{cid}@{t.id}.test")
    body = {"site_id": site, "email": f"{cid}@{t.id}.test", "supervisor_id": supervisor, "fallback": True,
            "webhook_url": env.receiver.behave(hook, always_fail=unreachable)}
    r = await env.client.put(f"/v1/clinicians/{cid}", json=body, headers=t.admin)
    assert r.status_code in (200, 201), r.text
    assert r.json()["fallback"] is True
    return hook


async def alert_row(env: Env, t: Tenant, alert_id: str) -> dict[str, Any]:
    r = await env.client.get(f"/v1/alerts/{alert_id}", headers=t.read)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def routed(env: Env, t: Tenant, alert_id: str) -> dict[str, Any] | None:
    row = await alert_row(env, t, alert_id)
    return row if row.get("routing") is not None else None


def unrouted(m: dict[str, float], reason: str, fallback: str) -> float:
    return m.get(f'alliance_alerts_unrouted_total{{fallback="{fallback}",kind="alliance",reason="{reason}"}}', 0.0)


def failed_about(records: list[Record], alert_id: str) -> list[AlertStatusChanged]:
    events = [AlertStatusChanged.model_validate_json(r.value) for r in records]
    return [e for e in events if e.alert_id == alert_id and e.status == "failed"]


async def test_an_alert_for_a_clinician_missing_from_the_directory_reaches_the_sites_fallback_with_the_reason(
        env: Env) -> None:
    t = await new_tenant(env, "typo")
    hook = await put_fallback(env, t, "duty")
    ev = deterioration(t.id, "c-17x", "client-1")  # the EHR spelled the clinician's id wrongly
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    [req] = await eventually(lambda: _async(env.receiver.at(hook)))
    assert Webhook(t.secret).verify(req.body, req.headers)["alert_id"] == ev.alert_id
    assert req.headers["x-alliance-routed"] == "fallback"
    assert req.headers["x-alliance-routed-reason"] == "no_directory_entry"
    assert req.headers["webhook-id"] == ids.delivery_id(ev.alert_id, "fallback:duty", "webhook")
    [mail] = await eventually(lambda: _async(env.smtp.to(f"duty@{t.id}.test")))
    assert mail["X-Alliance-Routed"] == "fallback" and "c-17x" in mail.get_content()
    row = await eventually(lambda: routed(env, t, ev.alert_id))
    assert (row["routing"], row["routing_reason"], row["status"]) == ("fallback", "no_directory_entry", "open")


async def test_redelivering_an_unrouted_alert_sends_the_fallback_nothing_more_and_counts_it_once(env: Env) -> None:
    t = await new_tenant(env, "redeliver")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))  # for the sentinel
    hook = await put_fallback(env, t, "duty")
    before = await _metrics(env)
    ev = deterioration(t.id, "ghost", "client-2")
    for _ in range(3):
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
    await _sentinel(env, t, "c1", ev.client_id)  # consumed after the three copies, same partition
    await eventually(lambda: _async(env.receiver.at(hook)))

    assert [json.loads(r.body)["alert_id"] for r in env.receiver.at(hook)] == [ev.alert_id]
    after = await _metrics(env)
    assert unrouted(after, "no_directory_entry", "yes") - unrouted(before, "no_directory_entry", "yes") == 1


async def test_a_clinician_entry_of_another_site_sends_the_alert_to_the_alerts_sites_fallback(env: Env) -> None:
    t = await new_tenant(env, "moved")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")), site="site-b")
    hook = await put_fallback(env, t, "duty", site="site-a")
    ev = deterioration(t.id, "c1", "client-3", site_id="site-a")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    [req] = await eventually(lambda: _async(env.receiver.at(hook)))
    assert req.headers["x-alliance-routed-reason"] == "other_site"
    assert env.receiver.at(path(t, "c1")) == []  # never another site's people
    row = await eventually(lambda: routed(env, t, ev.alert_id))
    assert (row["routing"], row["routing_reason"]) == ("fallback", "other_site")


async def test_a_fallback_of_another_site_gets_nothing_and_the_alert_is_told_failed_once(env: Env) -> None:
    t = await new_tenant(env, "nobody")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))  # for the sentinel
    other = await put_fallback(env, t, "duty-b", site="site-b")
    before = await _metrics(env)
    ev = deterioration(t.id, "ghost", "client-4", site_id="site-a")
    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
        records = await statuses.until(lambda r: bool(failed_about(r, ev.alert_id)))
        await _sentinel(env, t, "c1", ev.client_id)
        failed = failed_about(statuses.records, ev.alert_id)
    # Published for each copy consumed, under one derived id: one event for a consumer that dedupes.
    assert {f.event_id for f in failed} == {ids.alert_status_event_id(t.id, ev.alert_id, "failed", 1)}
    assert failed_about(records, ev.alert_id)[0].routing_reason == "no_directory_entry"
    assert failed[0].channel is None and failed[0].revision == 1
    assert env.receiver.at(other) == []
    row = await eventually(lambda: routed(env, t, ev.alert_id))
    assert (row["routing"], row["routing_reason"]) == ("none", "no_directory_entry")
    after = await _metrics(env)
    assert unrouted(after, "no_directory_entry", "no") - unrouted(before, "no_directory_entry", "no") == 1


async def test_an_unrouted_alert_escalates_to_the_fallbacks_supervisor(env: Env) -> None:
    t = await new_tenant(env, "escalate")
    await put_clinician(env, t, "boss", env.receiver.behave(path(t, "boss")))
    hook = await put_fallback(env, t, "duty", supervisor="boss")
    r = await env.client.put("/v1/escalation", json={"interval_seconds": 0.2}, headers=t.admin)
    assert r.status_code == 200, r.text
    ev = deterioration(t.id, "ghost", "client-5")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    await eventually(lambda: _async(env.receiver.at(hook)))
    [copy] = await eventually(lambda: _async(env.receiver.at(path(t, "boss"))))
    assert json.loads(copy.body)["alert_id"] == ev.alert_id and copy.headers["x-alliance-escalation"] == "true"
    assert (await alert_row(env, t, ev.alert_id))["escalated_to"] == "boss"


async def told_reached_nobody(env: Env, t: Tenant, ev: AllianceDeterioration) -> AlertStatusChanged:
    """Publish `ev` and wait for its channel-less `failed` (the revision reached no person)."""
    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
        records = await statuses.until(lambda r: any(f.channel is None for f in failed_about(r, ev.alert_id)))
    [failed] = {f.event_id: f for f in failed_about(records, ev.alert_id) if f.channel is None}.values()
    return failed


async def routed_nowhere(env: Env, t: Tenant, alert_id: str) -> dict[str, Any] | None:
    row = await alert_row(env, t, alert_id)
    return row if row.get("routing") == "none" else None


async def test_an_alert_whose_only_fallback_fails_every_attempt_is_told_failed_undelivered_counted_and_listed(
        env: Env) -> None:
    t = await new_tenant(env, "deadfallback")
    hook = await put_fallback(env, t, "duty", unreachable=True)
    before = await _metrics(env)
    ev = deterioration(t.id, "ghost", "client-6")
    failed = await told_reached_nobody(env, t, ev)

    assert len(env.receiver.at(hook)) == MAX_ATTEMPTS  # every attempt was made first
    assert (failed.routing_reason, failed.revision) == ("undelivered", 1)
    assert failed.event_id == ids.alert_status_event_id(t.id, ev.alert_id, "failed", 1)
    row = await eventually(lambda: routed_nowhere(env, t, ev.alert_id))
    assert row["routing_reason"] == "undelivered"
    listed = await env.client.get("/v1/alerts", params={"routing": "none"}, headers=t.read)
    assert [a["alert_id"] for a in listed.json()] == [ev.alert_id]
    after = await _metrics(env)
    assert unrouted(after, "undelivered", "no") - unrouted(before, "undelivered", "no") == 1


async def test_an_alert_whose_clinicians_webhook_and_email_fail_every_attempt_is_told_failed_undelivered_too(
        env: Env) -> None:
    t = await new_tenant(env, "deadhook")
    hook = path(t, "c1")
    env.smtp.failing.add(f"c1@{t.id}.test")
    await put_clinician(env, t, "c1", env.receiver.behave(hook, always_fail=True), f"c1@{t.id}.test")
    ev = deterioration(t.id, "c1", "client-7")
    failed = await told_reached_nobody(env, t, ev)

    assert len(env.receiver.at(hook)) == MAX_ATTEMPTS
    assert failed.routing_reason == "undelivered"
    row = await eventually(lambda: routed_nowhere(env, t, ev.alert_id))
    assert row["routing_reason"] == "undelivered"


async def test_an_alert_one_of_whose_channels_got_through_is_not_told_it_reached_nobody(env: Env) -> None:
    t = await new_tenant(env, "halfway")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1"), always_fail=True))  # email gets through
    ev = deterioration(t.id, "c1", "client-8")
    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
        # The webhook's own `failed`: a channel-less one would be published with it, in one batch.
        failed = failed_about(await statuses.until(lambda r: bool(failed_about(r, ev.alert_id))), ev.alert_id)
    assert {f.channel for f in failed} == {"webhook"}
    assert (await alert_row(env, t, ev.alert_id))["routing"] == "clinician"
