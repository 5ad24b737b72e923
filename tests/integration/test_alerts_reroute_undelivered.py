"""A rerouted alert whose deliveries to the clinician then use up their attempts: the routing says who
has it after all, through the real alerts service, broker and store (docs/partners.md, "Alerts that
reach no clinician"). When the site's fallback had received the revision, it is theirs again (routing
`fallback`, nobody told `failed`); when the reroute had cancelled the fallback's deliveries still
waiting for a retry, they are scheduled again with fresh attempts (routing `fallback` again), so the
fallback gets what it would have got without the reroute; only when those fail too did it reach
nobody: told `failed` without a channel (`undelivered`), routing `none`, counted.

Its own alerts instance: retries slow enough (one to two seconds) that a fallback's failed delivery
is still waiting for its retry when the clinician is registered; two attempts per delivery.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared import ids
from shared.events import AllianceDeterioration
from tests.integration.test_alerts_delivery import (
    Env,
    Tenant,
    _async,
    _metrics,
    deliveries,
    env_with,
    new_tenant,
    path,
    put_clinician,
)
from tests.integration.test_alerts_reroute import SWEEPING, alerts_at, stranded
from tests.integration.test_alerts_unrouted import alert_row, failed_about, put_fallback, unrouted
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.recorder import TopicRecorder

ATTEMPTS = 2


@pytest.fixture(scope="module")
async def env(stack: StackUnderTest) -> AsyncIterator[Env]:
    slow = {"retry_first_seconds": 2.0, "retry_max_seconds": 2.0, "max_attempts": ATTEMPTS}
    async with env_with(stack, SWEEPING.model_copy(update=slow)) as e:
        yield e


async def register_dead(env: Env, t: Tenant, cid: str) -> str:
    """Register `cid` with a webhook and an email that fail every attempt; the webhook's path."""
    dead, mail = path(t, f"{cid}-dead"), f"{cid}@{t.id}.test"
    env.smtp.failing.add(mail)
    await put_clinician(env, t, cid, env.receiver.behave(dead, always_fail=True), mail)
    return dead


async def clinician_failed(env: Env, t: Tenant, ev: AllianceDeterioration, cid: str) -> list[dict[str, Any]]:
    """Wait until both of `cid`'s deliveries of `ev` used up their attempts."""
    async def failed() -> list[dict[str, Any]]:
        return [d for d in await deliveries(env, t, alert_id=ev.alert_id, status="failed")
                if d["recipient"] == f"clinician:{cid}"]
    return await eventually(failed, until=lambda rows: len(rows) == 2)


async def routing_is(env: Env, t: Tenant, alert_id: str, routing: str) -> dict[str, Any]:
    async def row() -> dict[str, Any]:
        return await alert_row(env, t, alert_id)
    return await eventually(row, timeout=10.0, until=lambda r: r["routing"] == routing)


async def test_a_rerouted_alert_the_clinician_never_got_goes_back_to_the_fallback_that_had_it(env: Env) -> None:
    t = await new_tenant(env, "backtofallback")
    fallback = await put_fallback(env, t, "duty")
    ev = await stranded(env, t, "c1", "client-1")
    await eventually(lambda: _async(alerts_at(env, fallback, ev.alert_id)))

    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        dead = await register_dead(env, t, "c1")
        await clinician_failed(env, t, ev, "c1")
        row = await routing_is(env, t, ev.alert_id, "fallback")
        told = failed_about(await statuses.until(lambda r: len(failed_about(r, ev.alert_id)) >= 2), ev.alert_id)

    assert len(env.receiver.at(dead)) == ATTEMPTS
    assert (row["routing"], row["routing_reason"]) == ("fallback", "no_directory_entry")
    assert sorted(f.channel or "-" for f in told) == ["email", "webhook"]  # each channel's; none without one
    assert len(alerts_at(env, fallback, ev.alert_id)) == 1  # the fallback is not sent it again


async def stranded_with_the_fallback_retrying(env: Env, name: str,
                                             client: str) -> tuple[Tenant, str, AllianceDeterioration]:
    """A new tenant whose fallback `duty` fails every attempt, and an alert for c1 (not registered yet)
    once both of the fallback's deliveries of it failed once and wait for a retry: (tenant, the
    fallback's webhook path, the alert)."""
    t = await new_tenant(env, name)
    hook = await put_fallback(env, t, "duty", unreachable=True)
    ev = await stranded(env, t, "c1", client)

    async def waiting() -> list[dict[str, Any]]:
        return [d for d in await deliveries(env, t, alert_id=ev.alert_id, status="pending")
                if d["recipient"] == "fallback:duty" and d["attempts"] == 1]
    await eventually(waiting, until=lambda rows: len(rows) == 2)
    return t, hook, ev


async def fallback_rows(env: Env, t: Tenant, ev: AllianceDeterioration) -> list[dict[str, Any]]:
    return [d for d in await deliveries(env, t, alert_id=ev.alert_id) if d["recipient"] == "fallback:duty"]


async def test_the_fallback_whose_retry_the_reroute_cancelled_gets_the_alert_once_the_clinicians_deliveries_fail(
        env: Env) -> None:
    t, hook, ev = await stranded_with_the_fallback_retrying(env, "fallbackagain", "client-3")
    before = await _metrics(env)

    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        await register_dead(env, t, "c1")  # the reroute cancels the fallback's retries
        assert sorted(d["status"] for d in await fallback_rows(env, t, ev)) == ["cancelled", "cancelled"]
        env.receiver.behave(hook)  # the fallback's receivers work again: without the reroute it would get it
        env.smtp.failing.discard(f"duty@{t.id}.test")
        await clinician_failed(env, t, ev, "c1")
        got = await eventually(lambda: _async([r for r in env.receiver.successes(hook)
                                                if json.loads(r.body)["alert_id"] == ev.alert_id]))
        row = await routing_is(env, t, ev.alert_id, "fallback")
        told = failed_about(await statuses.until(lambda r: len(failed_about(r, ev.alert_id)) >= 2), ev.alert_id)

    assert len(got) == 1 and got[0].headers["x-alliance-routed"] == "fallback"
    assert (row["routing"], row["routing_reason"]) == ("fallback", "no_directory_entry")
    assert sorted(f.channel or "-" for f in told) == ["email", "webhook"]  # the clinician's; none without one
    delivered = await eventually(lambda: fallback_rows(env, t, ev),
                                 until=lambda rows: [d["status"] for d in rows] == ["delivered", "delivered"])
    assert [d["attempts"] for d in delivered] == [1, 1]  # a fresh attempt budget
    after = await _metrics(env)
    assert unrouted(after, "undelivered", "yes") - unrouted(before, "undelivered", "yes") == 1
    assert unrouted(after, "undelivered", "no") == unrouted(before, "undelivered", "no")


async def test_a_rerouted_alert_whose_rescheduled_fallback_deliveries_fail_too_is_told_failed_undelivered_once(
        env: Env) -> None:
    t, hook, ev = await stranded_with_the_fallback_retrying(env, "nobodygot", "client-2")
    before = await _metrics(env)

    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        await register_dead(env, t, "c1")
        await clinician_failed(env, t, ev, "c1")
        row = await routing_is(env, t, ev.alert_id, "none")
        told = failed_about(await statuses.until(
            lambda r: any(f.channel is None for f in failed_about(r, ev.alert_id))), ev.alert_id)

    assert row["routing_reason"] == "undelivered"
    [nobody] = {f.event_id: f for f in told if f.channel is None}.values()
    assert nobody.event_id == ids.alert_status_event_id(t.id, ev.alert_id, "failed", 1)
    assert (nobody.routing_reason, nobody.revision) == ("undelivered", 1)
    fallbacks = await fallback_rows(env, t, ev)
    assert sorted(d["status"] for d in fallbacks) == ["failed", "failed"]  # re-scheduled, then used up again
    assert len(alerts_at(env, hook, ev.alert_id)) == 1 + ATTEMPTS
    after = await _metrics(env)
    assert unrouted(after, "undelivered", "no") - unrouted(before, "undelivered", "no") == 1
    assert unrouted(after, "undelivered", "yes") - unrouted(before, "undelivered", "yes") == 1
