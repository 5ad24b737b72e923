"""A rerouted alert whose deliveries to the clinician then use up their attempts: the routing says who
has it after all, through the real alerts service, broker and store (docs/partners.md, "Alerts that
reach no clinician"). When the site's fallback had received the revision, it is theirs again (routing
`fallback`, nobody told `failed`); when no person received it (the fallback's deliveries still waiting
for a retry were cancelled by the reroute), it reached nobody: told `failed` without a channel
(`undelivered`), routing `none`, counted.

Its own alerts instance: retries slow enough (one to two seconds) that a fallback's failed delivery
is still waiting for its retry when the clinician is registered; two attempts per delivery.
"""

from __future__ import annotations

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


async def test_a_rerouted_alert_nobody_got_is_told_failed_undelivered_routed_none_and_counted(env: Env) -> None:
    t = await new_tenant(env, "nobodygot")
    await put_fallback(env, t, "duty", unreachable=True)
    ev = await stranded(env, t, "c1", "client-2")

    async def waiting_for_a_retry() -> list[dict[str, Any]]:
        return [d for d in await deliveries(env, t, alert_id=ev.alert_id, status="pending")
                if d["recipient"] == "fallback:duty" and d["attempts"] == 1]
    await eventually(waiting_for_a_retry, until=lambda rows: len(rows) == 2)
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
    fallbacks = [d for d in await deliveries(env, t, alert_id=ev.alert_id) if d["recipient"] == "fallback:duty"]
    assert sorted(d["status"] for d in fallbacks) == ["cancelled", "cancelled"]  # the reroute stopped them
    after = await _metrics(env)
    assert unrouted(after, "undelivered", "no") - unrouted(before, "undelivered", "no") == 1
