"""Alerts against the real local broker and store, a webhook receiver and an SMTP server.

One alerts instance (in-process, started once for the module) serves every test; each test
works in its own tenant, so tests cannot see each other's deliveries.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from standardwebhooks.webhooks import Webhook
from typer.testing import CliRunner

from services.alerts import cli
from services.alerts.app import AlertsConfig, create_app
from services.alerts.rules import Clinician
from services.alerts.secretbox import new_key
from services.alerts.settings import AlertsSettings, SmtpSettings
from services.alerts.store import AlertsStore
from shared import ids
from shared.auth import create_key
from shared.events import AlertStatusChanged, AllianceDeterioration, SrsScored
from tests.support.alerts import AlertsApp, alerts_app
from tests.support.deadletters import dead_letters
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.harness import deterioration, scored
from tools.receiver import Received
from tools.recorder import Record, TopicRecorder
from tools.stack import free_port

MAX_ATTEMPTS = 4
# The module's alerts instance seals with KEY_1 and also opens KEY_2 (step 1 of a rotation).
KEY_1, KEY_2 = new_key("k1"), new_key("k2")


class SmtpSink:
    """aiosmtpd handler that keeps every message it receives, but refuses for now (a transient 451)
    every message to an address in `failing`."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []
        self.failing: set[str] = set()
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.failing.intersection(envelope.rcpt_tos):
            return "451 4.3.0 mailbox unavailable, try again later"
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._lock:
            self.messages.append((list(envelope.rcpt_tos), msg))  # type: ignore[arg-type]
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        with self._lock:
            return [m for rcpt, m in self.messages if address in rcpt]


@dataclass
class Env(AlertsApp):
    smtp: SmtpSink = field(default_factory=SmtpSink)  # the mail alerts sent


@dataclass
class Tenant:
    id: str
    admin: dict[str, str]
    read: dict[str, str]
    secret: str


@asynccontextmanager
async def env_with(stack: StackUnderTest, settings: AlertsSettings) -> AsyncIterator[Env]:
    """Alerts with `settings`, its webhook receiver and an SMTP server of its own."""
    sink = SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        async with alerts_app(stack, settings, SmtpSettings(host="127.0.0.1", port=controller.port,
                                                            sender="alerts@alliance.test")) as a:
            yield Env(a.ns, a.topics, a.client, a.receiver, a.publisher, a.mongo, a.app, sink)
    finally:
        controller.stop()


@pytest.fixture(scope="module")
async def env(stack: StackUnderTest) -> AsyncIterator[Env]:
    settings = AlertsSettings(allow_private_targets=True, retry_first_seconds=0.05, retry_max_seconds=0.2,
                              max_attempts=MAX_ATTEMPTS, attempt_timeout_seconds=5.0, poll_seconds=0.1,
                              gauge_seconds=0.1, escalation_check_seconds=0.2,
                              secrets_keys=f"{KEY_1},{KEY_2}")  # type: ignore[arg-type]
    async with env_with(stack, settings) as e:
        yield e


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_tenant(env: Env, name: str) -> Tenant:
    tid = f"{name}-{uuid.uuid4().hex[:8]}"
    admin, _ = await create_key(env.db, tid, "admin")
    read, _ = await create_key(env.db, tid, "read")
    r = await env.client.post("/v1/webhook-secret", headers=bearer(admin))
    assert r.status_code == 201, r.text
    return Tenant(tid, bearer(admin), bearer(read), r.json()["secret"])


async def put_clinician(env: Env, t: Tenant, cid: str, webhook: str | None = None, email_addr: str | None = None,
                        supervisor: str | None = None, site: str = "site-a") -> None:
    body = {"site_id": site, "email": email_addr or f"{cid}@clinic.test", "webhook_url": webhook,
            "supervisor_id": supervisor}
    r = await env.client.put(f"/v1/clinicians/{cid}", json=body, headers=t.admin)
    assert r.status_code in (200, 201), r.text


async def subscribe(env: Env, t: Tenant, url: str, events: list[str]) -> dict[str, Any]:
    r = await env.client.post("/v1/subscriptions", json={"url": url, "events": events}, headers=t.admin)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def deliveries(env: Env, t: Tenant, **params: str) -> list[dict[str, Any]]:
    r = await env.client.get("/v1/deliveries", params=params, headers=t.read)
    assert r.status_code == 200, r.text
    return list(r.json())


async def delivered(env: Env, t: Tenant, alert_id: str, n: int) -> list[dict[str, Any]] | None:
    rows = await deliveries(env, t, alert_id=alert_id, status="delivered")
    return rows if len(rows) >= n else None


def path(t: Tenant, name: str) -> str:
    return f"/{t.id}/{name}"


async def first_partner_delivery(env: Env, t: Tenant, topic: str,
                                 ev: AllianceDeterioration | SrsScored) -> tuple[dict[str, Any], Received]:
    """Subscribe a partner of `t` to `topic`'s events, publish `ev` there: the subscription and
    the first request the partner's endpoint got."""
    event_type = topic.removeprefix(env.ns.prefix)
    sub = await subscribe(env, t, env.receiver.behave(path(t, event_type)), [event_type])
    await env.publisher.publish(topic, ev, t.id, ev.client_id)
    return sub, (await eventually(lambda: _async(env.receiver.at(path(t, event_type)))))[0]


async def test_deterioration_reaches_the_clinician_webhook_signed_with_the_tenant_secret(env: Env) -> None:
    t = await new_tenant(env, "hook")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    ev = deterioration(t.id, "c1", "client-1")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    got = await eventually(lambda: _async(env.receiver.at(path(t, "c1"))))
    req = got[0]
    body = Webhook(t.secret).verify(req.body, req.headers)  # raises unless the signature verifies
    assert body["alert_id"] == ev.alert_id and body["client_id"] == "client-1"
    assert req.headers["webhook-id"] == ids.delivery_id(ev.alert_id, "clinician:c1", "webhook")
    assert req.headers["x-alliance-event"] == "alliance.deterioration.v1"  # the contract name, not the test topic


async def test_deterioration_reaches_the_clinicians_inbox(env: Env) -> None:
    t = await new_tenant(env, "mail")
    await put_clinician(env, t, "c1", email_addr="c1@mail.test")
    ev = deterioration(t.id, "c1", "client-xy")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    msgs = await eventually(lambda: _async(env.smtp.to("c1@mail.test")))
    msg = msgs[0]
    text = msg.get_content()
    assert "client-xy" in str(msg["Subject"])
    assert "Client: client-xy" in text and "Total: 31.2 (cutoff 36)" in text
    assert "Triggers: below_cutoff, drop_from_previous" in text
    assert "http://127.0.0.1:8004/dashboard?client=client-xy&instrument=SRS" in text
    assert "site-a" not in text and ev.submission_id not in text
    assert str(msg["Message-ID"]) == f"<{ids.delivery_id(ev.alert_id, 'clinician:c1', 'email')}@alliance-stream>"


async def test_a_subscribed_partner_gets_the_deterioration_signed_with_its_own_secret(env: Env) -> None:
    # The tenant has no clinician-webhook secret: a subscription needs none, it has its own.
    t = await _tenant_without_secret(env, "partner")
    ev = deterioration(t.id, "nobody-in-directory", "client-2")
    sub, req = await first_partner_delivery(env, t, env.topics.deterioration, ev)
    assert Webhook(sub["secret"]).verify(req.body, req.headers)["alert_id"] == ev.alert_id
    assert req.headers["webhook-id"] == ids.delivery_id(ev.alert_id, f"subscription:{sub['id']}", "webhook")


async def test_a_partner_subscribed_to_scored_events_gets_them(env: Env) -> None:
    t = await new_tenant(env, "scored")
    ev = scored(t.id, "c1", "client-3")
    sub, req = await first_partner_delivery(env, t, env.topics.scored, ev)
    assert Webhook(sub["secret"]).verify(req.body, req.headers)["event_id"] == ev.event_id
    assert req.headers["x-alliance-event"] == "srs.scored.v1"


async def test_a_tenants_subscription_never_receives_another_tenants_events(env: Env) -> None:
    a, b = await new_tenant(env, "ta"), await new_tenant(env, "tb")
    events = ["alliance.deterioration.v1", "srs.scored.v1"]
    await subscribe(env, a, env.receiver.behave(path(a, "p")), events)
    await subscribe(env, b, env.receiver.behave(path(b, "p")), events)
    a_events = [deterioration(a.id, "c1", f"ca{i}") for i in range(3)]
    for ev in a_events:
        await env.publisher.publish(env.topics.deterioration, ev, a.id, ev.client_id)
        await env.publisher.publish(env.topics.scored, scored(a.id, "c1", ev.client_id), a.id, ev.client_id)
    await eventually(lambda: _async(len(env.receiver.at(path(a, "p"))) >= 6))
    # B's own event, published after all of A's were delivered, is the only thing B may ever see.
    b_ev = deterioration(b.id, "c1", "cb")
    await env.publisher.publish(env.topics.deterioration, b_ev, b.id, b_ev.client_id)
    await eventually(lambda: _async(env.receiver.at(path(b, "p"))))

    b_bodies = [json.loads(r.body) for r in env.receiver.at(path(b, "p"))]
    assert [x["tenant_id"] for x in b_bodies] == [b.id]
    assert {d["tenant_id"] for d in await env.db["deliveries"].find(
        {"target": env.receiver.url_for(path(b, "p"))}).to_list()} == {b.id}


async def test_a_receiver_failing_three_times_then_recovering_gets_exactly_one_successful_delivery(env: Env) -> None:
    t = await new_tenant(env, "flaky")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1"), fail_first=3))
    ev = deterioration(t.id, "c1", "client-4")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    rows = await eventually(lambda: _delivered_channel(env, t, ev.alert_id, "webhook"))
    assert rows["attempts"] == 4 and rows["last_outcome"] == "2xx"
    # Replaying the event after success sends nothing more (checked after a later event went through).
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
    await _sentinel(env, t, "c1", ev.client_id)
    got = env.receiver.at(path(t, "c1"))
    first = [r for r in got if json.loads(r.body)["alert_id"] == ev.alert_id]
    assert [r.status for r in first] == [500, 500, 500, 200]
    assert len({r.webhook_id for r in first}) == 1


async def test_a_receiver_that_never_recovers_ends_in_the_dead_letter_topic_while_others_are_delivered(
        env: Env) -> None:
    t = await new_tenant(env, "dead")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1"), always_fail=True), email_addr="c1@dead.test")
    await subscribe(env, t, env.receiver.behave(path(t, "p")), ["alliance.deterioration.v1"])
    ev = deterioration(t.id, "c1", "client-5")
    async with dead_letters(env.ns.kafka()) as letters:
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
        failed = await eventually(lambda: _failed(env, t, ev.alert_id))
        assert failed["attempts"] == MAX_ATTEMPTS and failed["last_outcome"] == "5xx" and "last_error" not in failed
        assert failed["delivery_id"] == ids.delivery_id(ev.alert_id, "clinician:c1", "webhook")
        dl = await letters.first(lambda d: d.reason == "delivery_failed" and failed["delivery_id"] in d.detail)
    assert dl.service == "alerts" and dl.tenant_id == t.id and dl.source_topic == env.topics.deterioration
    assert json.loads(dl.payload)["alert_id"] == ev.alert_id
    # The partner and the clinician's email were delivered all the same.
    assert len(env.receiver.at(path(t, "p"))) == 1
    assert {d["channel"] for d in await deliveries(env, t, alert_id=ev.alert_id, status="delivered")} == {
        "webhook", "email"}
    assert len(env.receiver.at(path(t, "c1"))) == MAX_ATTEMPTS


async def test_a_slow_receiver_does_not_hold_up_deliveries_to_others(env: Env) -> None:
    t = await new_tenant(env, "slow")
    release = threading.Event()
    await put_clinician(env, t, "slow", env.receiver.behave(path(t, "slow"), hold=release))
    await put_clinician(env, t, "fast", env.receiver.behave(path(t, "fast")))
    slow_ev = deterioration(t.id, "slow", "client-6")
    fast_ev = deterioration(t.id, "fast", "client-6")  # same client: same partition, consumed after slow_ev
    try:
        await env.publisher.publish(env.topics.deterioration, slow_ev, t.id, "client-6")
        await eventually(lambda: _async(env.receiver.held(path(t, "slow")) == 1))
        await env.publisher.publish(env.topics.deterioration, fast_ev, t.id, "client-6")
        await eventually(lambda: _async(env.receiver.at(path(t, "fast"))))
        # The fast one arrived while the slow attempt was still in flight (no attempt recorded yet).
        assert env.receiver.held(path(t, "slow")) == 1
        slow = await deliveries(env, t, alert_id=slow_ev.alert_id)
        assert [(d["status"], d["attempts"]) for d in slow if d["channel"] == "webhook"] == [("pending", 0)]
    finally:
        release.set()
    await eventually(lambda: _delivered_channel(env, t, slow_ev.alert_id, "webhook"))


async def test_replaying_a_deterioration_five_times_yields_one_delivery_per_recipient_and_channel(env: Env) -> None:
    t = await new_tenant(env, "replay")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")), email_addr="c1@replay.test")
    await subscribe(env, t, env.receiver.behave(path(t, "p")), ["alliance.deterioration.v1"])
    ev = deterioration(t.id, "c1", "client-7")
    for _ in range(5):
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
    await eventually(lambda: delivered(env, t, ev.alert_id, 3))
    await _sentinel(env, t, "c1", ev.client_id)  # consumed after the five copies, same partition

    def mine(p: str) -> int:
        return sum(json.loads(r.body)["alert_id"] == ev.alert_id for r in env.receiver.at(p))
    assert mine(path(t, "c1")) == 1
    assert mine(path(t, "p")) == 1
    assert sum(ev.alert_id in m.get_content() for m in env.smtp.to("c1@replay.test")) == 1
    assert len(await deliveries(env, t, alert_id=ev.alert_id)) == 3
    assert await env.db["alerts"].count_documents({"_id": ev.alert_id}) == 1


async def test_an_undecodable_event_is_dead_lettered_and_the_partition_goes_on(env: Env) -> None:
    t = await new_tenant(env, "poison")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    key = ids.partition_key(t.id, "client-8")
    async with dead_letters(env.ns.kafka()) as letters:
        await env.publisher.publish_raw(env.topics.deterioration, b'{"not": "an alert"' + t.id.encode(), key)
        ev = deterioration(t.id, "c1", "client-8")
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
        await eventually(lambda: _async(env.receiver.at(path(t, "c1"))))
        dl = await letters.first(lambda d: d.reason == "invalid_event" and t.id in d.payload)
    assert dl.service == "alerts" and dl.key == f"{t.id}:client-8"


async def test_metrics_count_attempts_outcomes_latency_and_pending_retries(env: Env) -> None:
    t = await new_tenant(env, "metrics")
    release = threading.Event()
    # Fails once, then its second attempt is held: the delivery waits with one failed attempt.
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1"), fail_first=1, hold=release, hold_after=1))
    before = await _metrics(env)
    ev = deterioration(t.id, "c1", "client-9")
    try:
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
        await eventually(lambda: _async(env.receiver.held(path(t, "c1")) == 1))
        during = await eventually(lambda: _metrics_when(env, "alliance_notification_pending_retries", 1))
        assert during["alliance_notification_pending_retries"] >= 1
    finally:
        release.set()
    await eventually(lambda: _delivered_channel(env, t, ev.alert_id, "webhook"))
    await eventually(lambda: delivered(env, t, ev.alert_id, 2))  # webhook and email

    async def settled() -> dict[str, float] | None:
        m = await _metrics(env)
        return m if m["alliance_alert_to_delivered_seconds_count{channel=\"webhook\"}"] >= before.get(
            "alliance_alert_to_delivered_seconds_count{channel=\"webhook\"}", 0) + 1 else None
    after = await eventually(settled)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)
    assert delta('alliance_notification_attempts_total{channel="webhook",outcome="error"}') >= 1
    assert delta('alliance_notification_attempts_total{channel="webhook",outcome="ok"}') >= 1
    assert delta('alliance_notifications_total{channel="webhook",outcome="delivered"}') >= 1
    assert delta('alliance_notifications_total{channel="email",outcome="delivered"}') >= 1
    assert delta('alliance_alert_to_delivered_seconds_count{channel="email"}') >= 1
    assert 'alliance_alert_to_delivered_seconds_bucket{channel="webhook",le="1.0"}' in after


async def test_acknowledging_an_alert_lists_it_as_acknowledged_and_publishes_the_status(env: Env) -> None:
    t = await new_tenant(env, "ack")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    ev = deterioration(t.id, "c1", "client-10")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    async def listed(status: str) -> list[dict[str, Any]]:
        r = await env.client.get("/v1/alerts", params={"clinician_id": "c1", "status": status}, headers=t.read)
        return [a for a in r.json() if a["alert_id"] == ev.alert_id]
    assert (await eventually(lambda: listed("open")))[0]["client_id"] == "client-10"
    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as statuses:
        r = await env.client.post(f"/v1/alerts/{ev.alert_id}/ack", headers=t.read)
        assert r.status_code == 200 and r.json()["status"] == "acknowledged"
        assert await listed("acknowledged") and not await listed("open")

        def about_it(records: list[Record]) -> list[AlertStatusChanged]:
            events = [AlertStatusChanged.model_validate_json(r.value) for r in records]
            # (the clinician's webhook delivery also told `delivered`)
            return [e for e in events if e.alert_id == ev.alert_id and e.status == "acknowledged"]
        e = about_it(await statuses.until(about_it))[0]
    assert (e.status, e.tenant_id, e.clinician_id, e.site_id) == ("acknowledged", t.id, "c1", "site-a")


async def test_an_unacknowledged_alert_escalates_once_to_the_supervisor(env: Env) -> None:
    t = await new_tenant(env, "esc")
    await put_clinician(env, t, "boss", env.receiver.behave(path(t, "boss")), email_addr="boss@esc.test")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")), supervisor="boss")
    acked, ignored = deterioration(t.id, "c1", "client-11"), deterioration(t.id, "c1", "client-12")
    for ev in (acked, ignored):
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
    await eventually(lambda: _async(len(env.receiver.at(path(t, "c1"))) == 2))
    assert (await env.client.post(f"/v1/alerts/{acked.alert_id}/ack", headers=t.read)).status_code == 200
    # Only now shorten the tenant's interval, so the acknowledged one was acknowledged in time.
    r = await env.client.put("/v1/escalation", json={"interval_seconds": 0.2}, headers=t.admin)
    assert r.json() == {"interval_seconds": 0.2, "default": False}

    reqs = await eventually(lambda: _async(env.receiver.at(path(t, "boss"))))
    body = Webhook(t.secret).verify(reqs[0].body, reqs[0].headers)
    assert body["alert_id"] == ignored.alert_id and reqs[0].headers["x-alliance-escalation"] == "true"
    assert reqs[0].headers["webhook-id"] == ids.delivery_id(ignored.alert_id, "supervisor:boss", "webhook")
    mails = await eventually(lambda: _async(env.smtp.to("boss@esc.test")))
    assert str(mails[0]["Subject"]).strip().startswith("Escalated")
    # A later alert escalating proves escalation ticks went on: still one per alert, none for the acked one.
    later = deterioration(t.id, "c1", "client-13")
    await env.publisher.publish(env.topics.deterioration, later, t.id, later.client_id)
    await eventually(lambda: _async(len(env.receiver.at(path(t, "boss"))) >= 2))
    escalated = [json.loads(r.body)["alert_id"] for r in env.receiver.at(path(t, "boss"))]
    assert sorted(escalated) == sorted([ignored.alert_id, later.alert_id])
    alert = (await env.client.get(f"/v1/alerts/{ignored.alert_id}", headers=t.read)).json()
    assert alert["escalated"] is True and alert["escalated_to"] == "boss"
    assert (await env.client.get(f"/v1/alerts/{acked.alert_id}", headers=t.read)).json()["escalated"] is False


async def test_deleting_a_subscription_stops_its_deliveries_and_its_secret_is_stored_encrypted(env: Env) -> None:
    t = await new_tenant(env, "unsub")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    sub = await subscribe(env, t, env.receiver.behave(path(t, "p")), ["alliance.deterioration.v1"])
    stored = await env.db["subscriptions"].find_one({"_id": sub["id"]})
    assert sub["secret"] not in json.dumps(stored, default=str)
    listed = (await env.client.get("/v1/subscriptions", headers=t.read)).json()
    assert listed == [{"id": sub["id"], "url": sub["url"], "events": ["alliance.deterioration.v1"],
                       "created_at": sub["created_at"]}]
    assert (await env.client.delete(f"/v1/subscriptions/{sub['id']}", headers=t.admin)).status_code == 204
    assert (await env.client.delete(f"/v1/subscriptions/{sub['id']}", headers=t.admin)).status_code == 404
    ev = deterioration(t.id, "c1", "client-14")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
    await eventually(lambda: _async(env.receiver.at(path(t, "c1"))))
    assert env.receiver.at(path(t, "p")) == []


async def test_bad_bodies_get_422_naming_the_field(env: Env) -> None:
    t = await new_tenant(env, "validate")
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/clinicians/c1", {"site_id": "s", "email": "c@x.org", "webhook_url": "ftp://x.org/h"}, "webhook_url"),
        ("/v1/clinicians/c1", {"site_id": "s", "email": "not-an-email"}, "email"),
        ("/v1/clinicians/c1", {"site_id": "s"}, "email"),
        ("/v1/clinicians/c1", {"site_id": "s", "email": "c@x.org", "supervisor_id": "c1"}, "supervisor_id"),
    ]
    for url, body, named in cases:
        r = await env.client.put(url, json=body, headers=t.admin)
        assert r.status_code == 422, (body, r.text)
        assert [e["field"] for e in r.json()["errors"]] == [named], r.text
    r = await env.client.post("/v1/subscriptions", json={"url": "https://x.org", "events": ["nope"]}, headers=t.admin)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "events[0]"
    r = await env.client.post("/v1/subscriptions", json={"url": "javascript:alert(1)", "events": ["srs.scored.v1"]},
                              headers=t.admin)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "url"


async def test_private_targets_are_refused_unless_allowed(env: Env) -> None:
    # A second app on the same store with the default (refusing) setting; its API needs no broker.
    strict = create_app(AlertsConfig(kafka=env.ns.kafka(), mongo=env.ns.mongo(), alerts=AlertsSettings(),
                                     smtp=SmtpSettings(host="")))
    t = await new_tenant(env, "ssrf")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=strict), base_url="http://strict") as client:
        for url in ("http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.1.2.3/hook"):
            r = await client.put("/v1/clinicians/c1", json={"site_id": "s", "email": "c@x.org", "webhook_url": url},
                                 headers=t.admin)
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == "webhook_url", r.text
            assert r.json()["errors"][0]["message"] in ("the URL points to a loopback address",
                                                        "the URL points to a private address")
            r = await client.post("/v1/subscriptions", json={"url": url, "events": ["srs.scored.v1"]}, headers=t.admin)
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == "url"


async def _tenant_without_secret(env: Env, name: str) -> Tenant:
    tid = f"{name}-{uuid.uuid4().hex[:8]}"
    admin, _ = await create_key(env.db, tid, "admin")
    read, _ = await create_key(env.db, tid, "read")
    return Tenant(tid, bearer(admin), bearer(read), secret="")


async def test_a_clinician_webhook_is_refused_with_409_naming_the_fix_while_the_tenant_has_no_signing_secret(
        env: Env) -> None:
    # Accepted, every delivery to it would retry until it failed, seen only in alerts' log.
    t = await _tenant_without_secret(env, "nosecret")
    body = {"site_id": "site-a", "email": "c1@clinic.test", "webhook_url": env.receiver.url_for(path(t, "c1"))}
    r = await env.client.put("/v1/clinicians/c1", json=body, headers=t.admin)
    assert r.status_code == 409, r.text
    [error] = r.json()["errors"]
    assert error["field"] == "webhook_url" and "POST /v1/webhook-secret" in error["message"]
    assert (await env.client.get("/v1/clinicians/c1", headers=t.admin)).status_code == 404


async def test_a_clinician_webhook_is_accepted_once_the_tenant_has_a_signing_secret(env: Env) -> None:
    t = await _tenant_without_secret(env, "secretlater")
    assert (await env.client.post("/v1/webhook-secret", headers=t.admin)).status_code == 201
    body = {"site_id": "site-a", "email": "c1@clinic.test", "webhook_url": env.receiver.url_for(path(t, "c1"))}
    assert (await env.client.put("/v1/clinicians/c1", json=body, headers=t.admin)).status_code == 201


async def test_a_clinician_without_a_webhook_needs_no_signing_secret(env: Env) -> None:
    t = await _tenant_without_secret(env, "emailonly")
    r = await env.client.put("/v1/clinicians/c1", json={"site_id": "site-a", "email": "c1@clinic.test"},
                             headers=t.admin)
    assert r.status_code == 201, r.text


async def test_webhook_attempts_without_a_signing_secret_are_counted_as_waiting_for_an_operator(env: Env) -> None:
    # An entry stored before registration checked for a secret: its webhook cannot be signed.
    t = await _tenant_without_secret(env, "legacy")
    await AlertsStore(env.db).put_clinician(Clinician(t.id, "c1", "site-a", "c1@clinic.test",
                                                      env.receiver.url_for(path(t, "c1"))))
    name = 'alliance_notification_blocked_attempts_total{reason="no_secret"}'
    before = (await _metrics(env)).get(name, 0.0)
    ev = deterioration(t.id, "c1", "client-4")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    await eventually(lambda: _metrics_when(env, name, before + 1))
    assert env.receiver.at(path(t, "c1")) == []


async def test_keys_are_tenant_and_site_scoped(env: Env) -> None:
    t = await new_tenant(env, "scope")
    site_admin, _ = await create_key(env.db, t.id, "admin", site_id="site-a")
    site_read, _ = await create_key(env.db, t.id, "read", site_id="site-a")
    other = await new_tenant(env, "scope-other")
    await put_clinician(env, t, "a1", env.receiver.behave(path(t, "a1")), site="site-a")
    await put_clinician(env, t, "b1", env.receiver.behave(path(t, "b1")), site="site-b")
    for cid, site in (("a1", "site-a"), ("b1", "site-b")):
        ev = deterioration(t.id, cid, f"client-{cid}", site_id=site)
        await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
    await eventually(lambda: _async(env.receiver.at(path(t, "a1")) and env.receiver.at(path(t, "b1"))))

    assert (await env.client.get("/v1/clinicians/a1")).status_code == 401
    assert (await env.client.put("/v1/clinicians/x", json={"site_id": "site-a", "email": "x@y.org"},
                                 headers=t.read)).status_code == 403
    r = await env.client.put("/v1/clinicians/x", json={"site_id": "site-b", "email": "x@y.org"},
                             headers=bearer(site_admin))
    assert r.status_code == 403
    assert (await env.client.put("/v1/clinicians/b1", json={"site_id": "site-a", "email": "x@y.org"},
                                 headers=bearer(site_admin))).status_code == 403  # b1 belongs to site-b
    assert (await env.client.post("/v1/webhook-secret", headers=bearer(site_admin))).status_code == 403
    assert (await env.client.get("/v1/clinicians/b1", headers=bearer(site_read))).status_code == 404
    assert (await env.client.get("/v1/clinicians/a1", headers=bearer(site_read))).status_code == 200
    seen = {a["clinician_id"] for a in (await env.client.get("/v1/alerts", headers=bearer(site_read))).json()}
    assert seen == {"a1"}
    assert {a["clinician_id"] for a in (await env.client.get("/v1/alerts", headers=t.read)).json()} == {"a1", "b1"}
    # Another tenant sees none of it.
    assert (await env.client.get("/v1/alerts", headers=other.read)).json() == []
    assert (await env.client.get("/v1/clinicians/a1", headers=other.read)).status_code == 404


async def _a_failed_delivery(env: Env, name: str) -> tuple[Tenant, dict[str, Any]]:
    t = await new_tenant(env, name)
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1"), always_fail=True))
    ev = deterioration(t.id, "c1", "client-20")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)
    failed = await eventually(lambda: _failed(env, t, ev.alert_id))
    env.receiver.behave(path(t, "c1"))  # the receiver is fixed
    return t, failed


async def test_an_admin_can_retry_a_failed_delivery_through_the_api(env: Env) -> None:
    t, failed = await _a_failed_delivery(env, "retry-api")
    assert (await env.client.post(f"/v1/deliveries/{failed['delivery_id']}/retry", headers=t.read)).status_code == 403
    r = await env.client.post(f"/v1/deliveries/{failed['delivery_id']}/retry", headers=t.admin)
    assert r.status_code == 200 and r.json()["status"] == "pending"
    done = await eventually(lambda: _delivered_channel(env, t, failed["alert_id"], "webhook"))
    assert done["delivery_id"] == failed["delivery_id"] and done["attempts"] == 1


async def test_an_operator_can_requeue_failed_deliveries_with_the_cli(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    t, failed = await _a_failed_delivery(env, "retry-cli")
    monkeypatch.setenv("ALLIANCE_MONGO_URL", env.ns.stack.mongo_url)
    monkeypatch.setenv("ALLIANCE_MONGO_DATABASE", env.ns.database)
    runner = CliRunner()
    listed = await asyncio.to_thread(runner.invoke, cli.app, ["deliveries", "--tenant", t.id])
    assert listed.exit_code == 0 and failed["delivery_id"] in listed.output and "HTTP 500" in listed.output
    result = await asyncio.to_thread(runner.invoke, cli.app, ["retry", "--tenant", t.id])
    assert result.exit_code == 0 and "requeued 1 deliveries" in result.output
    await eventually(lambda: _delivered_channel(env, t, failed["alert_id"], "webhook"))


# ---- helpers -------------------------------------------------------------------------------------

async def _async(value: Any) -> Any:
    return value


async def _delivered_channel(env: Env, t: Tenant, alert_id: str, channel: str) -> dict[str, Any] | None:
    rows = [d for d in await deliveries(env, t, alert_id=alert_id, status="delivered") if d["channel"] == channel]
    return rows[0] if rows else None


async def _failed(env: Env, t: Tenant, alert_id: str) -> dict[str, Any] | None:
    rows = [d for d in await deliveries(env, t, status="failed") if d["alert_id"] == alert_id]
    return rows[0] if rows else None


async def _sentinel(env: Env, t: Tenant, clinician: str, client_id: str) -> None:
    """Publish one more alert for the same client (same partition) and wait until it is delivered."""
    ev = deterioration(t.id, clinician, client_id)
    await env.publisher.publish(env.topics.deterioration, ev, t.id, client_id)
    await eventually(lambda: delivered(env, t, ev.alert_id, 1))


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")


async def _metrics(env: Env) -> dict[str, float]:
    text = (await env.client.get("/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def _metrics_when(env: Env, name: str, at_least: float) -> dict[str, float] | None:
    m = await _metrics(env)
    return m if m.get(name, 0.0) >= at_least else None
