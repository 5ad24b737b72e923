"""Issue 12, item 4: webhook egress with the production guard on (private targets refused).

The alerts service runs in-process against the real broker and store; webhook host names are
answered by `RebindingDns`, which plays an attacker's DNS server (the seam is `create_app`'s
resolver, the one every webhook connection and every URL check goes through).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from services.alerts.app import AlertsConfig, create_app
from services.alerts.secretbox import new_key
from services.alerts.settings import AlertsSettings, SmtpSettings
from services.alerts.targets import system_resolve
from shared.auth import create_key
from shared.mongo import Document
from shared.topic_admin import ensure_topics
from shared.topics import Topics
from tests.support.apps import serving
from tests.support.services import Namespace
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.harness import EventPublisher, deterioration
from tools.receiver import webhook_receiver

MAX_ATTEMPTS = 3
PUBLIC = "93.184.216.34"


@dataclass
class RebindingDns:
    """Answers each name from its own sequence of answers (the last one repeats); other names
    go to the system resolver. `asked` counts the questions per name."""

    answers: dict[str, list[list[str]]] = field(default_factory=dict)
    asked: dict[str, int] = field(default_factory=dict)

    def serve(self, name: str, *answers: list[str]) -> str:
        self.answers[name] = list(answers)
        return name

    async def __call__(self, host: str, port: int) -> list[str]:
        if host not in self.answers:
            return await system_resolve(host, port)
        n = self.asked.get(host, 0)
        self.asked[host] = n + 1
        seq = self.answers[host]
        return seq[min(n, len(seq) - 1)]


@dataclass
class Env:
    topics: Topics
    client: httpx.AsyncClient
    publisher: EventPublisher
    db: Any
    dns: RebindingDns


@pytest.fixture(scope="module")
async def env(stack: StackUnderTest) -> AsyncIterator[Env]:
    ns = Namespace.fresh(stack)
    await ensure_topics(ns.kafka())
    dns = RebindingDns()
    config = AlertsConfig(
        kafka=ns.kafka(), mongo=ns.mongo(),
        alerts=AlertsSettings(allow_private_targets=False, retry_first_seconds=0.05, retry_max_seconds=0.1,
                              max_attempts=MAX_ATTEMPTS, attempt_timeout_seconds=5.0, poll_seconds=0.1,
                              secrets_keys=new_key("k1")),
        smtp=SmtpSettings(host=""))
    app = create_app(config, resolve=dns)
    publisher = EventPublisher(stack.bootstrap)
    await publisher.start()
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True)
    try:
        async with serving(app) as client:
            yield Env(ns.kafka().topics(), client, publisher, mongo[ns.database], dns)
    finally:
        await publisher.stop()
        await mongo.close()


@pytest.fixture
def receiver() -> Iterator[Any]:
    with webhook_receiver() as r:
        yield r


async def admin_of_new_tenant(env: Env) -> tuple[str, dict[str, str]]:
    tenant = f"egress-{uuid.uuid4().hex[:8]}"
    key, _ = await create_key(env.db, tenant, "admin")
    headers = {"Authorization": f"Bearer {key}"}
    assert (await env.client.post("/v1/webhook-secret", headers=headers)).status_code == 201
    return tenant, headers


async def finished_delivery(env: Env, headers: dict[str, str], alert_id: str) -> dict[str, Any]:
    """The alert's delivery once it reached a final state ({} until then)."""
    r = await env.client.get("/v1/deliveries", params={"alert_id": alert_id}, headers=headers)
    rows = [d for d in r.json() if d["status"] != "pending"]
    return dict(rows[0]) if rows else {}


async def test_a_name_that_rebinds_to_loopback_after_the_check_gets_no_request_through(
        env: Env, receiver: Any) -> None:
    # First answer public (the registration check passes), every later answer 127.0.0.1: what a
    # rebinding DNS server does with a TTL of 0.
    name = env.dns.serve(f"rebind-{uuid.uuid4().hex[:6]}.example", [PUBLIC], ["127.0.0.1"])
    tenant, admin = await admin_of_new_tenant(env)
    r = await env.client.post("/v1/subscriptions", headers=admin,
                              json={"url": f"http://{name}:{receiver.port}/hook",
                                    "events": ["alliance.deterioration.v1"]})
    assert r.status_code == 201, r.text
    ev = deterioration(tenant, "c1", "client-1")
    await env.publisher.publish(env.topics.deterioration, ev, tenant, ev.client_id)

    row = await eventually(lambda: finished_delivery(env, admin, ev.alert_id))
    assert row["status"] == "failed" and row["attempts"] == MAX_ATTEMPTS
    assert env.dns.asked[name] >= 2  # the name was asked again, and answered 127.0.0.1
    assert receiver.attempts == 0 and receiver.successes() == []


async def test_a_delivery_to_an_internal_address_shows_only_blocked_to_the_tenant(env: Env) -> None:
    name = env.dns.serve(f"meta-{uuid.uuid4().hex[:6]}.example", [PUBLIC], ["169.254.169.254"])
    tenant, admin = await admin_of_new_tenant(env)
    r = await env.client.post("/v1/subscriptions", headers=admin,
                              json={"url": f"http://{name}/latest/meta-data", "events": ["alliance.deterioration.v1"]})
    assert r.status_code == 201, r.text
    ev = deterioration(tenant, "c1", "client-2")
    await env.publisher.publish(env.topics.deterioration, ev, tenant, ev.client_id)

    row = await eventually(lambda: finished_delivery(env, admin, ev.alert_id))
    assert row["last_outcome"] == "blocked"
    assert "response_status" not in row and "last_error" not in row
    assert "169.254" not in str(row.values())


@pytest.mark.parametrize("host", [
    "[2002:7f00:1::]",  # 6to4 of 127.0.0.1: the probe's address
    "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
    "[64:ff9b:1::a00:1]",  # local-use NAT64
    "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",  # Teredo
    "[::ffff:169.254.169.254]",  # IPv4-mapped
    "[::127.0.0.1]",  # IPv4-compatible
    "100.64.0.1",  # CGNAT
    "198.18.0.1",  # benchmarking
])
async def test_addresses_that_embed_or_map_an_internal_one_are_refused_at_registration(env: Env, host: str) -> None:
    _, admin = await admin_of_new_tenant(env)
    r = await env.client.post("/v1/subscriptions", headers=admin,
                              json={"url": f"http://{host}:8080/hook", "events": ["alliance.deterioration.v1"]})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "url"
    assert r.json()["errors"][0]["message"].startswith("the URL points to a")


async def test_a_name_with_one_internal_answer_among_public_ones_is_refused(env: Env) -> None:
    name = env.dns.serve(f"mixed-{uuid.uuid4().hex[:6]}.example", [PUBLIC, "10.0.0.7"])
    _, admin = await admin_of_new_tenant(env)
    r = await env.client.post("/v1/subscriptions", headers=admin,
                              json={"url": f"https://{name}/hook", "events": ["srs.scored.v1"]})
    assert r.status_code == 422 and "private" in r.json()["errors"][0]["message"]
