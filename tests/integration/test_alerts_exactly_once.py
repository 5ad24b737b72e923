"""Exactly-once effect of deliveries: two alerts instances in one group, and a kill -9 mid-send."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
from pymongo import AsyncMongoClient
from standardwebhooks.webhooks import Webhook

from services.alerts.app import AlertsConfig, create_app
from services.alerts.settings import AlertsSettings, SmtpSettings
from shared import ids
from shared.auth import create_key
from shared.mongo import Document
from shared.topic_admin import ensure_topics
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.harness import EventPublisher, deterioration
from tools.receiver import WebhookReceiver


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


async def test_two_alerts_instances_in_one_group_send_each_delivery_once(
        stack: StackUnderTest, mongo: AsyncMongoClient[Document]) -> None:
    ns = Namespace.fresh(stack)
    await ensure_topics(ns.kafka())
    receiver = WebhookReceiver().start()
    publisher = EventPublisher(stack.bootstrap)
    await publisher.start()
    settings = AlertsSettings(allow_private_targets=True, poll_seconds=0.05, concurrency=8)
    apps = [create_app(AlertsConfig(kafka=ns.kafka(), mongo=ns.mongo(), alerts=settings, smtp=SmtpSettings(host="")))
            for _ in range(2)]
    db = mongo[ns.database]
    tenant = "two-" + uuid.uuid4().hex[:6]
    admin, _ = await create_key(db, tenant, "admin")
    headers = {"Authorization": f"Bearer {admin}"}
    try:
        async with AsyncExitStack() as stack_:
            clients = []
            for app in apps:
                await stack_.enter_async_context(app.router.lifespan_context(app))
                clients.append(await stack_.enter_async_context(
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://alerts")))
            for c in clients:
                await eventually(lambda c=c: _ready(c), timeout=60)  # type: ignore[misc]
            # Each request takes a while, so one instance's slots fill up and the other claims too.
            url = receiver.behave("/c1", delay=0.05)
            assert (await clients[1].post("/v1/webhook-secret", headers=headers)).status_code == 201
            body = {"site_id": "site-a", "email": "c1@x.org", "webhook_url": url}
            r = await clients[0].put("/v1/clinicians/c1", json=body, headers=headers)
            assert r.status_code == 201
            sub = (await clients[1].post("/v1/subscriptions", headers=headers, json={
                "url": receiver.behave("/p", delay=0.05), "events": ["alliance.deterioration.v1"]})).json()
            events = [deterioration(tenant, "c1", f"client-{i}") for i in range(40)]
            for ev in events:
                await publisher.publish(ns.kafka().topics().deterioration, ev, tenant, ev.client_id)

            async def all_delivered() -> list[Document] | None:
                docs = await db["deliveries"].find({"tenant_id": tenant, "status": "delivered"}).to_list()
                return docs if len(docs) == 80 else None
            docs = await eventually(all_delivered, timeout=90)
    finally:
        await publisher.stop()
        receiver.stop()

    sent = Counter(r.webhook_id for r in receiver.requests)
    assert len(sent) == 80 and set(sent.values()) == {1}, [k for k, n in sent.items() if n > 1]
    assert sent.keys() == {ids.delivery_id(ev.alert_id, who, "webhook") for ev in events
                           for who in ("clinician:c1", f"subscription:{sub['id']}")}
    # Both instances really competed for the same schedule.
    owners = {d["claimed_by"] for d in docs}
    assert len(owners) == 2, owners


async def test_a_delivery_interrupted_by_kill_9_is_resent_with_the_same_id_and_recorded_once(
        stack: StackUnderTest, mongo: AsyncMongoClient[Document], log_dir: Path) -> None:
    ns = Namespace.fresh(stack)
    await ensure_topics(ns.kafka())
    receiver = WebhookReceiver().start()
    release = threading.Event()
    url = receiver.behave("/c1", hold=release, hold_after=0)
    publisher = EventPublisher(stack.bootstrap)
    await publisher.start()
    db = mongo[ns.database]
    tenant = "kill-" + uuid.uuid4().hex[:6]
    admin, _ = await create_key(db, tenant, "admin")
    headers = {"Authorization": f"Bearer {admin}"}
    env = {"ALLIANCE_ALERTS_LEASE_SECONDS": "2", "ALLIANCE_ALERTS_ATTEMPT_TIMEOUT_SECONDS": "1.5",
           "ALLIANCE_ALERTS_POLL_SECONDS": "0.2"}
    try:
        with running(["alerts"], ns, log_dir, extra_env=env) as procs:
            alerts = procs["alerts"]
            async with httpx.AsyncClient(base_url=alerts.url, headers=headers) as client:
                secret = (await client.post("/v1/webhook-secret")).json()["secret"]
                r = await client.put("/v1/clinicians/c1", json={"site_id": "site-a", "email": "c@x.org",
                                                                  "webhook_url": url})
                assert r.status_code == 201, r.text
            ev = deterioration(tenant, "c1", "client-1")
            await publisher.publish(ns.kafka().topics().deterioration, ev, tenant, ev.client_id)
            await eventually(_held(receiver, "/c1"))
            alerts.kill()  # mid-send: the receiver has the request, alerts never learns the answer
            release.set()
            await eventually(_count(receiver, "/c1", 1))
            alerts.start()  # deliveries resume from the store; no need to wait for the consumer group

            async def recorded() -> Document | None:
                return await db["deliveries"].find_one({"alert_id": ev.alert_id, "status": "delivered"})
            doc = await eventually(recorded, timeout=60)
            alerts.kill()  # a graceful stop would wait for the consumer group; nothing left to test here
    finally:
        release.set()
        await publisher.stop()
        receiver.stop()

    got = receiver.at("/c1")
    # The documented worst case: the receiver saw the same delivery twice, with the same webhook-id.
    assert [r.webhook_id for r in got] == [doc["_id"], doc["_id"]]
    for r in got:
        Webhook(secret).verify(r.body, r.headers)
    assert doc["attempts"] == 1 and await db["deliveries"].count_documents({"alert_id": ev.alert_id}) == 1


def _held(receiver: WebhookReceiver, path: str) -> Any:
    async def check() -> bool:
        return receiver.held(path) == 1
    return check


def _count(receiver: WebhookReceiver, path: str, n: int) -> Any:
    async def check() -> bool:
        return len(receiver.at(path)) >= n
    return check
