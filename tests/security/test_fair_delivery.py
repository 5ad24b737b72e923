"""Issue 12, item 5: one tenant with many slow endpoints does not delay other tenants' alerts.

The alerts service runs in-process against the real broker and store (16 delivery slots, at most
4 per tenant); tenant A's partner endpoints hold every request until the test releases them.
Nothing here measures time: the p99 figure is the bench's (`python -m tools.bench.alerts
--fairness`); these tests check the structure that makes it hold.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.alerts.secretbox import new_key
from services.alerts.settings import AlertsSettings
from shared.auth import create_key
from tests.support.alerts import AlertsApp, alerts_app
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.harness import deterioration
from tools.receiver import webhook_receiver

SLOTS = 16
PER_TENANT = 4
SUBSCRIPTION_CAP = 20


@dataclass
class Tenant:
    id: str
    admin: dict[str, str]


@pytest.fixture(scope="module")
async def env(stack: StackUnderTest) -> AsyncIterator[AlertsApp]:
    settings = AlertsSettings(allow_private_targets=True, concurrency=SLOTS, tenant_concurrency=PER_TENANT,
                              # A's attempts stay in flight until released, never timing out here.
                              attempt_timeout_seconds=120.0, lease_seconds=240.0,
                              # No polling: only wake-ups (new deliveries, freed slots, retry
                              # timers) move the worker, so a missed wake-up shows as a stall.
                              poll_seconds=3600.0,
                              retry_first_seconds=0.05, retry_max_seconds=0.1,
                              secrets_keys=new_key("k1"))
    async with alerts_app(stack, settings) as a:
        yield a


async def new_tenant(env: AlertsApp, name: str) -> Tenant:
    tid = f"{name}-{uuid.uuid4().hex[:8]}"
    key, _ = await create_key(env.db, tid, "admin")
    t = Tenant(tid, {"Authorization": f"Bearer {key}"})
    assert (await env.client.post("/v1/webhook-secret", headers=t.admin)).status_code == 201
    return t


async def subscribe(env: AlertsApp, t: Tenant, url: str) -> httpx.Response:
    return await env.client.post("/v1/subscriptions", headers=t.admin,
                                 json={"url": url, "events": ["alliance.deterioration.v1"]})


async def _true(value: bool) -> bool:
    return value


async def test_a_tenant_with_twenty_hanging_endpoints_holds_only_its_share_while_others_are_delivered(
        env: AlertsApp) -> None:
    a, b = await new_tenant(env, "slow-a"), await new_tenant(env, "clinic-b")
    release = threading.Event()
    a_paths = [f"/{a.id}/p{i}" for i in range(SUBSCRIPTION_CAP)]
    for p in a_paths:
        r = await subscribe(env, a, env.receiver.behave(p, hold=release, hold_max=300.0))
        assert r.status_code == 201, r.text
    b_paths = [f"/{b.id}/c{i}" for i in range(6)]
    for i, p in enumerate(b_paths):
        body = {"site_id": "site-a", "email": f"c{i}@b.test", "webhook_url": env.receiver.url_for(p)}
        assert (await env.client.put(f"/v1/clinicians/c{i}", headers=b.admin, json=body)).status_code == 201

    def a_held() -> int:
        return sum(env.receiver.held(p) for p in a_paths)

    try:
        # A's alert is due first: 20 partner deliveries, more than the worker's 16 slots.
        ev_a = deterioration(a.id, "nobody", "client-a")
        await env.publisher.publish(env.topics.deterioration, ev_a, a.id, ev_a.client_id)
        await eventually(lambda: _true(a_held() >= PER_TENANT))
        # Then B's clinicians' alerts.
        for i in range(len(b_paths)):
            ev = deterioration(b.id, f"c{i}", f"client-b{i}")
            await env.publisher.publish(env.topics.deterioration, ev, b.id, ev.client_id)

        await eventually(lambda: _true(all(env.receiver.at(p) for p in b_paths)), timeout=60)
        # Every one of B's webhooks arrived while A's requests were all still held, and A never
        # had more than its share of the slots.
        assert all(not env.receiver.at(p) for p in a_paths)
        assert a_held() == PER_TENANT
        assert env.app.state.alerts.worker.peak_by_tenant[a.id] == PER_TENANT
    finally:
        release.set()
    # Released, A's endpoints all get theirs, a share at a time.
    await eventually(lambda: _true(all(env.receiver.at(p) for p in a_paths)), timeout=60)
    assert env.app.state.alerts.worker.peak_by_tenant[a.id] == PER_TENANT


async def test_a_tenant_alone_gets_its_whole_backlog_delivered_a_share_at_a_time(env: AlertsApp) -> None:
    t = await new_tenant(env, "backlog")
    paths = [f"/{t.id}/p{i}" for i in range(SUBSCRIPTION_CAP)]
    for p in paths:
        assert (await subscribe(env, t, env.receiver.behave(p))).status_code == 201
    for i in range(3):  # 60 deliveries, 15 times the tenant's share
        ev = deterioration(t.id, "nobody", f"client-{i}")
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    await eventually(lambda: _true(all(len(env.receiver.at(p)) == 3 for p in paths)), timeout=60)
    assert env.app.state.alerts.worker.peak_by_tenant[t.id] == PER_TENANT


async def test_a_tenant_may_not_have_more_than_the_cap_of_subscriptions(env: AlertsApp) -> None:
    t = await new_tenant(env, "cap")
    ids = []
    for i in range(SUBSCRIPTION_CAP):
        r = await subscribe(env, t, env.receiver.url_for(f"/{t.id}/s{i}"))
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])

    r = await subscribe(env, t, env.receiver.url_for(f"/{t.id}/one-more"))
    assert r.status_code == 409
    assert "at most 20 subscriptions" in r.json()["errors"][0]["message"]
    assert "max_subscriptions_per_tenant" in r.json()["errors"][0]["message"]
    assert len((await env.client.get("/v1/subscriptions", headers=t.admin)).json()) == SUBSCRIPTION_CAP

    assert (await env.client.delete(f"/v1/subscriptions/{ids[0]}", headers=t.admin)).status_code == 204
    assert (await subscribe(env, t, env.receiver.url_for(f"/{t.id}/one-more"))).status_code == 201


async def test_a_receiver_answering_a_huge_body_is_read_only_a_few_kib(env: AlertsApp) -> None:
    t = await new_tenant(env, "big")
    with webhook_receiver(status=200, body_bytes=64 * 1024 * 1024) as receiver:
        assert (await subscribe(env, t, receiver.url)).status_code == 201
        ev = deterioration(t.id, "nobody", "client-big")
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

        async def delivered() -> list[dict[str, Any]]:
            r = await env.client.get("/v1/deliveries", params={"alert_id": ev.alert_id, "status": "delivered"},
                                     headers=t.admin)
            return list(r.json())
        await eventually(delivered)
        # The sender hung up after its few KiB; what the receiver managed to write is socket
        # buffers' worth at most, nowhere near the 64 MiB body.
        await eventually(lambda: _true(receiver.bodies_finished == 1))
        assert receiver.body_bytes_sent < 16 * 1024 * 1024


async def test_a_redirect_is_not_followed(env: AlertsApp) -> None:
    t = await new_tenant(env, "redirect")
    with webhook_receiver() as elsewhere, webhook_receiver(status=307, headers={"location": "PLACEHOLDER"}) as hook:
        hook.default.headers["location"] = elsewhere.url
        assert (await subscribe(env, t, hook.url)).status_code == 201
        ev = deterioration(t.id, "nobody", "client-redirect")
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

        async def answered() -> list[dict[str, Any]]:
            r = await env.client.get("/v1/deliveries", params={"alert_id": ev.alert_id}, headers=t.admin)
            return [d for d in r.json() if d["last_outcome"] is not None]
        row = (await eventually(answered))[0]
        assert row["last_outcome"] == "3xx" and row["status"] != "delivered"
        assert hook.successes() and elsewhere.attempts == 0
