"""A directory fix delivers the alerts it strands no more: once an admin registers a missing
clinician, moves their entry to the alert's site or gives it a channel, every alert of theirs that is
still open and reached them not (routing `fallback` or `none`) is delivered to them, once per
revision, through the real alerts service, broker and store (docs/operations.md, "Rerouting stranded
alerts").

The module shares one alerts instance (its webhook receiver and SMTP sink); every test is a tenant of its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from standardwebhooks.webhooks import Webhook

from services.alerts.reroute import Rerouter
from services.alerts.rules import Clinician
from services.alerts.settings import AlertsSettings
from services.alerts.store import AlertsStore
from shared import ids
from shared.events import AllianceDeterioration
from tests.integration.test_alerts_delivery import (
    Env,
    Tenant,
    _async,
    _metrics,
    _sentinel,
    deliveries,
    env_with,
    new_tenant,
    path,
    put_clinician,
)
from tests.integration.test_alerts_unrouted import (
    FAST,
    MAX_ATTEMPTS,
    alert_row,
    put_fallback,
    routed_nowhere,
    told_reached_nobody,
)
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.harness import deterioration, ended

# The unrouted module's fast settings, and the sweep looks again half a second after a put: the
# tests wait for it (`swept`).
SWEEPING = FAST.model_copy(update={"status_sweep_seconds": 0.5})


@pytest.fixture(scope="module")
async def env(stack: StackUnderTest) -> AsyncIterator[Env]:
    async with env_with(stack, SWEEPING) as e:
        yield e


async def stranded(env: Env, t: Tenant, cid: str, client: str) -> AllianceDeterioration:
    """An alert for `cid`, who is not in the directory yet, once its routing is recorded."""
    ev = deterioration(t.id, cid, client)
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    async def routing_recorded() -> object:
        r = await env.client.get(f"/v1/alerts/{ev.alert_id}", headers=t.read)
        return r.status_code == 200 and r.json()["routing"] is not None
    await eventually(routing_recorded)
    return ev


async def swept(env: Env, t: Tenant, cid: str) -> None:
    """Wait until the sweep has looked again at `cid`'s entry (its owed flag is unset): whatever
    rerouting was going to do is done."""
    async def looked() -> bool:
        doc = await env.db["clinicians"].find_one({"tenant_id": t.id, "clinician_id": cid})
        return doc is not None and "reroute_owed" not in doc
    await eventually(looked)


def alerts_at(env: Env, hook: str, alert_id: str) -> list[dict[str, object]]:
    return [b for b in (json.loads(r.body) for r in env.receiver.at(hook)) if b["alert_id"] == alert_id]


def rerouted(m: dict[str, float], reason: str) -> float:
    return m.get(f'alliance_alerts_rerouted_total{{kind="alliance",reason="{reason}"}}', 0.0)


async def test_registering_a_missing_clinician_delivers_their_stranded_alert_signed_with_its_id_and_revision(
        env: Env) -> None:
    t = await new_tenant(env, "register")
    await put_fallback(env, t, "duty")
    ev = await stranded(env, t, "c-new", "client-1")
    assert (await alert_row(env, t, ev.alert_id))["routing"] == "fallback"

    hook = path(t, "c-new")
    await put_clinician(env, t, "c-new", env.receiver.behave(hook))

    [req] = await eventually(lambda: _async(env.receiver.at(hook)))
    body = Webhook(t.secret).verify(req.body, req.headers)
    assert (body["alert_id"], body["revision"]) == (ev.alert_id, ev.revision)
    assert req.headers["webhook-id"] == ids.delivery_id(ids.alert_event_id(ev.alert_id, 1), "clinician:c-new",
                                                        "webhook")
    assert "x-alliance-routed" not in req.headers  # it is the clinician's own alert, not a fallback copy
    row = await alert_row(env, t, ev.alert_id)
    assert (row["routing"], row["routing_reason"], row["status"]) == ("clinician", None, "open")


async def test_putting_the_fixed_entry_again_sends_the_clinician_nothing_more(env: Env) -> None:
    t = await new_tenant(env, "again")
    ev = await stranded(env, t, "c1", "client-2")  # no fallback either: routing none
    hook = path(t, "c1")
    before = await _metrics(env)
    for _ in range(3):
        await put_clinician(env, t, "c1", env.receiver.behave(hook))
    await eventually(lambda: _async(alerts_at(env, hook, ev.alert_id)))
    await swept(env, t, "c1")
    await _sentinel(env, t, "c1", "client-2")

    assert len(alerts_at(env, hook, ev.alert_id)) == 1
    mine = [d for d in await deliveries(env, t, alert_id=ev.alert_id) if d["recipient"] == "clinician:c1"]
    assert sorted(d["channel"] for d in mine) == ["email", "webhook"]  # one delivery per channel
    assert sum(ev.alert_id in m.get_content() for m in env.smtp.to("c1@clinic.test")) == 1
    after = await _metrics(env)
    assert rerouted(after, "no_directory_entry") - rerouted(before, "no_directory_entry") == 1


async def test_an_acknowledged_stranded_alert_is_not_sent_when_the_clinician_is_registered(env: Env) -> None:
    t = await new_tenant(env, "acked")
    await put_fallback(env, t, "duty")
    ev = await stranded(env, t, "c1", "client-3")
    r = await env.client.post(f"/v1/alerts/{ev.alert_id}/ack", headers=t.read)
    assert r.status_code == 200 and r.json()["status"] == "acknowledged"
    hook = path(t, "c1")
    await put_clinician(env, t, "c1", env.receiver.behave(hook))
    await swept(env, t, "c1")
    await _sentinel(env, t, "c1", "client-3")

    assert alerts_at(env, hook, ev.alert_id) == []
    assert (await alert_row(env, t, ev.alert_id))["routing"] == "fallback"


async def test_a_superseded_stranded_alert_is_not_sent_when_the_clinician_is_registered(env: Env) -> None:
    t = await new_tenant(env, "superseded")
    ev = await stranded(env, t, "c1", "client-4")
    await env.publisher.publish(env.topics.alert_status, ended(ev, "superseded"), t.id, ev.client_id)

    async def superseded() -> bool:
        return (await alert_row(env, t, ev.alert_id))["status"] == "superseded"
    await eventually(superseded)
    hook = path(t, "c1")
    await put_clinician(env, t, "c1", env.receiver.behave(hook))
    await swept(env, t, "c1")
    await _sentinel(env, t, "c1", "client-4")

    assert alerts_at(env, hook, ev.alert_id) == []


async def test_an_entry_of_another_site_with_the_same_id_gets_nothing(env: Env) -> None:
    t = await new_tenant(env, "othersite")
    ev = await stranded(env, t, "c1", "client-5")  # site-a
    hook = path(t, "c1-b")
    await put_clinician(env, t, "c1", env.receiver.behave(hook), site="site-b")
    await put_clinician(env, t, "sentinel", env.receiver.behave(path(t, "sentinel")))
    await swept(env, t, "c1")
    await _sentinel(env, t, "sentinel", "client-5")

    assert env.receiver.at(hook) == []
    assert (await alert_row(env, t, ev.alert_id))["routing"] == "none"


async def test_moving_an_entry_to_the_alerts_site_delivers_the_alert_the_fallback_got(env: Env) -> None:
    t = await new_tenant(env, "moved")
    fallback = await put_fallback(env, t, "duty")
    hook = path(t, "c1")
    await put_clinician(env, t, "c1", env.receiver.behave(hook), site="site-b")
    ev = await stranded(env, t, "c1", "client-6")
    await eventually(lambda: _async(env.receiver.at(fallback)))
    assert (await alert_row(env, t, ev.alert_id))["routing_reason"] == "other_site"

    await put_clinician(env, t, "c1", env.receiver.behave(hook), site="site-a")

    [body] = await eventually(lambda: _async(alerts_at(env, hook, ev.alert_id)))
    assert body["alert_id"] == ev.alert_id
    assert len(alerts_at(env, fallback, ev.alert_id)) == 1  # the fallback is not sent it again
    assert (await alert_row(env, t, ev.alert_id))["routing"] == "clinician"


async def undelivered(env: Env, t: Tenant, client: str) -> tuple[AllianceDeterioration, str, str]:
    """An alert of clinician c1 whose webhook and email failed every attempt (routing none,
    undelivered): the alert, the dead webhook's path and the refused address."""
    dead, mail = path(t, "c1-dead"), f"c1@{t.id}.test"
    env.smtp.failing.add(mail)
    await put_clinician(env, t, "c1", env.receiver.behave(dead, always_fail=True), mail)
    ev = deterioration(t.id, "c1", client)
    await told_reached_nobody(env, t, ev)
    await eventually(lambda: routed_nowhere(env, t, ev.alert_id))
    return ev, dead, mail


async def test_an_undelivered_alert_is_delivered_once_the_clinicians_webhook_is_changed(env: Env) -> None:
    t = await new_tenant(env, "newhook")
    ev, dead, mail = await undelivered(env, t, "client-7")
    assert len(env.receiver.at(dead)) == MAX_ATTEMPTS

    hook = path(t, "c1-fixed")
    await put_clinician(env, t, "c1", env.receiver.behave(hook), mail)  # the webhook fixed, the email not

    [req] = await eventually(lambda: _async(env.receiver.at(hook)))
    assert json.loads(req.body)["alert_id"] == ev.alert_id
    assert req.headers["webhook-id"] == ids.delivery_id(ids.alert_event_id(ev.alert_id, 1), "clinician:c1", "webhook")
    assert len(env.receiver.at(dead)) == MAX_ATTEMPTS
    row = await alert_row(env, t, ev.alert_id)
    assert (row["routing"], row["routing_reason"]) == ("clinician", None)


async def test_putting_an_undelivered_clinicians_entry_again_unchanged_does_not_retry_it(env: Env) -> None:
    t = await new_tenant(env, "samehook")
    ev, dead, mail = await undelivered(env, t, "client-8")

    await put_clinician(env, t, "c1", env.receiver.behave(dead, always_fail=True), mail)
    await swept(env, t, "c1")

    assert len(env.receiver.at(dead)) == MAX_ATTEMPTS
    assert (await alert_row(env, t, ev.alert_id))["routing"] == "none"


async def stored_without_a_look(env: Env, t: Tenant, cid: str) -> str:
    """What a put's store write leaves when its process dies right after it: the entry (with a
    webhook; its path returned), owing a look that nobody took yet."""
    hook = path(t, cid)
    await AlertsStore(env.db).put_clinician(Clinician(t.id, cid, "site-a", None, env.receiver.behave(hook)))
    return hook


async def test_an_entry_stored_by_a_process_that_died_before_looking_is_looked_at_by_the_sweep(env: Env) -> None:
    t = await new_tenant(env, "crash")
    ev = await stranded(env, t, "c1", "client-9")
    hook = await stored_without_a_look(env, t, "c1")

    [body] = await eventually(lambda: _async(alerts_at(env, hook, ev.alert_id)))
    assert body["revision"] == 1
    await swept(env, t, "c1")
    assert (await alert_row(env, t, ev.alert_id))["routing"] == "clinician"


async def test_two_processes_rerouting_at_once_deliver_each_channel_once_and_count_it_once(env: Env) -> None:
    t = await new_tenant(env, "twice")
    ev = await stranded(env, t, "c1", "client-10")
    hook = await stored_without_a_look(env, t, "c1")
    before = await _metrics(env)
    settings = AlertsSettings()
    one, two = (Rerouter(AlertsStore(env.db), True, lambda: None, settings) for _ in range(2))

    counted = await asyncio.gather(one.reroute(t.id, "c1"), two.reroute(t.id, "c1"), one.reroute(t.id, "c1"))

    assert sum(counted) <= 1  # the app's own sweep may be the one that records it
    await eventually(lambda: _async(alerts_at(env, hook, ev.alert_id)))
    await swept(env, t, "c1")
    await _sentinel(env, t, "c1", "client-10")
    assert len(alerts_at(env, hook, ev.alert_id)) == 1
    after = await _metrics(env)
    assert rerouted(after, "no_directory_entry") - rerouted(before, "no_directory_entry") == 1
