"""The alert lifecycle and site ownership through the alerts service, the real broker and store.

Scoring's events are published straight onto the service's topics (as scoring would): revisions
on `alliance.deterioration.v1`, `superseded` / `withdrawn` on `alliance.alert-status.v1`. The
alerts service runs once for the module (the fixture of test_alerts_delivery.py); each test has
its own tenant. To show that something was NOT sent, a test waits for a later event of the same
client on the same topic (same key, same partition, so handled after it) to be delivered.
"""

from __future__ import annotations

import json
from typing import Any

from standardwebhooks.webhooks import Webhook

from shared import ids
from shared.auth import create_key
from shared.events import AlertStatusChanged, AllianceDeterioration, Severity
from tests.integration import test_alerts_delivery as delivery
from tests.integration.test_alerts_delivery import (
    Env,
    Tenant,
    _async,
    bearer,
    deliveries,
    new_tenant,
    path,
    put_clinician,
    subscribe,
)
from tests.support.deadletters import dead_letters
from tests.support.wait import eventually
from tools.harness import deterioration, ended, revised

env = delivery.env  # the module-scoped alerts service (its own instance for this module)
ALERT_STATUS = "alliance.alert-status.v1"


async def raise_(env: Env, ev: AllianceDeterioration) -> None:
    await env.publisher.publish(env.topics.deterioration, ev, ev.tenant_id, ev.client_id)


async def end(env: Env, ev: AlertStatusChanged) -> None:
    await env.publisher.publish(env.topics.alert_status, ev, ev.tenant_id, ev.client_id or "")


async def alert(env: Env, t: Tenant, alert_id: str) -> dict[str, Any]:
    r = await env.client.get(f"/v1/alerts/{alert_id}", headers=t.read)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def alert_when(env: Env, t: Tenant, alert_id: str, **fields: Any) -> dict[str, Any]:
    """The alert once it shows these field values."""
    async def check() -> dict[str, Any] | None:
        r = await env.client.get(f"/v1/alerts/{alert_id}", headers=t.read)
        if r.status_code != 200:
            return None
        doc = dict(r.json())
        return doc if all(doc.get(k) == v for k, v in fields.items()) else None
    found = await eventually(check)
    assert found is not None
    return found


async def requests_at(env: Env, t: Tenant, name: str, n: int) -> list[Any]:
    return list(await eventually(lambda: _async(got if len(got := env.receiver.at(path(t, name))) >= n else None)))


def about(requests: list[Any], alert_id: str) -> list[dict[str, Any]]:
    return [b for b in (json.loads(r.body) for r in requests) if b["alert_id"] == alert_id]


async def kinds(env: Env, t: Tenant, alert_id: str) -> list[tuple[str, str, str]]:
    return sorted((d["kind"], d["recipient"], d["channel"]) for d in await deliveries(env, t, alert_id=alert_id))


async def status_sentinel(env: Env, t: Tenant, clinician: str, client_id: str) -> None:
    """Withdraw another alert of the same client (same key on the status topic, so handled after
    everything published there before) and wait until the clinician got the withdrawal."""
    other = deterioration(t.id, clinician, client_id)
    await end(env, ended(other, "withdrawn"))
    await eventually(lambda: _async(about(env.receiver.at(path(t, clinician)), other.alert_id)))


# ---- revisions ---------------------------------------------------------------------------------


async def test_a_revision_reaches_the_clinician_webhook_as_a_second_delivery(env: Env) -> None:
    t = await new_tenant(env, "rev")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    r1 = deterioration(t.id, "c1", "client-1")
    await raise_(env, r1)
    await requests_at(env, t, "c1", 1)
    r2 = revised(r1, 2, total=29.5, severity=Severity.CRITICAL, low_items=["goals"])
    await raise_(env, r2)

    got = await requests_at(env, t, "c1", 2)
    assert [json.loads(r.body)["revision"] for r in got] == [1, 2]
    assert [r.webhook_id for r in got] == [ids.delivery_id(r1.alert_id, "clinician:c1", "webhook"),
                                           ids.delivery_id(ids.alert_event_id(r1.alert_id, 2), "clinician:c1",
                                                           "webhook")]
    assert Webhook(t.secret).verify(got[1].body, got[1].headers)["total"] == 29.5
    shown = await alert(env, t, r1.alert_id)
    assert {k: shown[k] for k in ("status", "revision", "severity", "total", "low_items", "episode_id")} == {
        "status": "open", "revision": 2, "severity": "critical", "total": 29.5, "low_items": ["goals"],
        "episode_id": r1.episode_id}


async def test_a_revision_keeps_the_acknowledgement(env: Env) -> None:
    t = await new_tenant(env, "rev-ack")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    r1 = deterioration(t.id, "c1", "client-1")
    await raise_(env, r1)
    await alert_when(env, t, r1.alert_id, status="open")
    assert (await env.client.post(f"/v1/alerts/{r1.alert_id}/ack", headers=t.read)).json()["status"] == "acknowledged"
    await raise_(env, revised(r1, 2))
    await requests_at(env, t, "c1", 2)  # the clinician still hears of the revision
    assert (await alert_when(env, t, r1.alert_id, revision=2))["status"] == "acknowledged"


# ---- withdrawal --------------------------------------------------------------------------------


async def test_a_withdrawal_reaches_the_clinician_and_the_alert_is_withdrawn_and_never_escalated(env: Env) -> None:
    t = await new_tenant(env, "withdraw")
    await put_clinician(env, t, "boss", env.receiver.behave(path(t, "boss")))
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")), email_addr="c1@withdraw.test",
                        supervisor="boss")
    r1 = deterioration(t.id, "c1", "client-1")
    await raise_(env, r1)
    await requests_at(env, t, "c1", 1)
    await end(env, ended(r1, "withdrawn"))

    got = await requests_at(env, t, "c1", 2)
    body = Webhook(t.secret).verify(got[1].body, got[1].headers)
    assert (body["status"], body["alert_id"], body["revision"]) == ("withdrawn", r1.alert_id, 1)
    assert got[1].headers["x-alliance-event"] == ALERT_STATUS
    mails = await eventually(lambda: _async([m for m in env.smtp.to("c1@withdraw.test")
                                             if "withdrawn" in str(m["Subject"])]))
    assert "correction" in mails[0].get_content() and "client-1" in mails[0].get_content()
    assert (await alert(env, t, r1.alert_id))["status"] == "withdrawn"
    listed = (await env.client.get("/v1/alerts", params={"status": "withdrawn"}, headers=t.read)).json()
    assert [a["alert_id"] for a in listed] == [r1.alert_id]

    # Escalation due at once from now on: a later open alert escalates, the withdrawn one never does.
    await env.client.put("/v1/escalation", json={"interval_seconds": 0.2}, headers=t.admin)
    later = deterioration(t.id, "c1", "client-2")
    await raise_(env, later)
    boss = await requests_at(env, t, "boss", 1)
    assert [json.loads(r.body)["alert_id"] for r in boss] == [later.alert_id]
    assert (await alert(env, t, r1.alert_id))["escalated"] is False


async def test_acknowledging_a_withdrawn_alert_answers_it_as_it_is(env: Env) -> None:
    t = await new_tenant(env, "ack-withdrawn")
    r1 = deterioration(t.id, "c1", "client-1")
    await raise_(env, r1)
    await end(env, ended(r1, "withdrawn"))
    await alert_when(env, t, r1.alert_id, status="withdrawn", total=31.2)
    r = await env.client.post(f"/v1/alerts/{r1.alert_id}/ack", headers=t.read)
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["acknowledged_at"]) == ("withdrawn", None)


async def raised_after_its_end(env: Env, name: str, status: str) -> tuple[Tenant, AllianceDeterioration]:
    """An alert for clinician c1 of a new tenant: scoring's `status` of it is handled first, then its raise."""
    t = await new_tenant(env, name)
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    r1 = deterioration(t.id, "c1", "client-1")
    await end(env, ended(r1, status))
    await alert_when(env, t, r1.alert_id, status=status)
    await raise_(env, r1)
    return t, r1


async def test_a_withdrawal_arriving_before_its_raise_leaves_the_alert_withdrawn_and_sends_no_raise(
        env: Env) -> None:
    t, r1 = await raised_after_its_end(env, "early-end", "withdrawn")
    sentinel = deterioration(t.id, "c1", "client-1")  # same key: handled after r1
    await raise_(env, sentinel)
    await eventually(lambda: _async(about(env.receiver.at(path(t, "c1")), sentinel.alert_id)))

    shown = await alert(env, t, r1.alert_id)
    assert (shown["status"], shown["total"], shown["severity"]) == ("withdrawn", r1.total, r1.severity)
    # The clinician is told of the withdrawal (it was the alert's state when it arrived), never of the raise.
    assert [b.get("status") for b in about(env.receiver.at(path(t, "c1")), r1.alert_id)] == ["withdrawn"]
    assert {k for k, _, _ in await kinds(env, t, r1.alert_id)} == {"withdrawal"}


async def test_a_raise_arriving_after_its_supersession_still_warns_the_clinician(env: Env) -> None:
    # The two topics are consumed independently: which of them alerts happened to read first must
    # not decide whether the clinician is warned of a low session.
    t, r1 = await raised_after_its_end(env, "late-raise", "superseded")
    got = await eventually(lambda: _async(about(env.receiver.at(path(t, "c1")), r1.alert_id)))

    assert [b.get("status") for b in got] == [None]  # the raise
    assert (await alert(env, t, r1.alert_id))["status"] == "superseded"


async def test_a_stale_withdrawal_of_a_revision_already_raised_again_is_ignored(env: Env) -> None:
    t = await new_tenant(env, "stale-end")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    r1 = deterioration(t.id, "c1", "client-1")
    r2 = revised(r1, 2)
    await raise_(env, r1)
    await raise_(env, r2)
    await alert_when(env, t, r1.alert_id, revision=2)
    await end(env, ended(r1, "withdrawn", revision=1))
    await status_sentinel(env, t, "c1", r1.client_id)

    assert (await alert(env, t, r1.alert_id))["status"] == "open"
    assert {k for k, _, _ in await kinds(env, t, r1.alert_id)} == {"alert"}


# ---- supersession ------------------------------------------------------------------------------


async def test_a_supersession_is_not_sent_to_the_clinician_and_the_alert_lists_as_superseded(env: Env) -> None:
    t = await new_tenant(env, "supersede")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")), email_addr="c1@supersede.test")
    r1 = deterioration(t.id, "c1", "client-1")
    await raise_(env, r1)
    await requests_at(env, t, "c1", 1)
    await end(env, ended(r1, "superseded"))
    await status_sentinel(env, t, "c1", r1.client_id)

    assert [b.get("status") for b in about(env.receiver.at(path(t, "c1")), r1.alert_id)] == [None]  # the raise
    assert {k for k, _, _ in await kinds(env, t, r1.alert_id)} == {"alert"}
    assert (await alert(env, t, r1.alert_id))["status"] == "superseded"
    listed = (await env.client.get("/v1/alerts", params={"status": "superseded"}, headers=t.read)).json()
    assert [a["alert_id"] for a in listed] == [r1.alert_id]


async def test_a_partner_subscribed_to_alert_status_gets_every_status_event_of_the_tenant(env: Env) -> None:
    t = await new_tenant(env, "status-partner")
    # c1 has no directory entry: the site's fallback gets the raises, so no `failed` (reached nobody) is told.
    duty = {"site_id": "site-a", "email": "duty@site-a.test", "webhook_url": env.receiver.behave(path(t, "duty")),
            "fallback": True}
    assert (await env.client.put("/v1/clinicians/duty", json=duty, headers=t.admin)).status_code == 201
    sub = await subscribe(env, t, env.receiver.behave(path(t, "p")), [ALERT_STATUS])
    superseded, withdrawn = deterioration(t.id, "c1", "client-1"), deterioration(t.id, "c1", "client-1")
    for ev in (superseded, withdrawn):
        await raise_(env, ev)
    await end(env, ended(superseded, "superseded"))
    await end(env, ended(withdrawn, "withdrawn"))
    got = await requests_at(env, t, "p", 2)

    bodies = [Webhook(sub["secret"]).verify(r.body, r.headers) for r in got]
    # two deliveries, sent by the worker in no particular order
    assert sorted((b["alert_id"], b["status"]) for b in bodies) == sorted([(superseded.alert_id, "superseded"),
                                                                           (withdrawn.alert_id, "withdrawn")])
    assert {r.headers["x-alliance-event"] for r in got} == {ALERT_STATUS}  # and no deterioration
    (withdrawal,) = [r for r, b in zip(got, bodies, strict=True) if b["status"] == "withdrawn"]
    assert withdrawal.webhook_id == ids.delivery_id(ended(withdrawn, "withdrawn").event_id,
                                                    f"subscription:{sub['id']}", "webhook")


# ---- site ownership ----------------------------------------------------------------------------


async def test_a_clinician_of_another_site_with_the_same_id_gets_nothing(env: Env) -> None:
    t = await new_tenant(env, "site")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")), site="site-b")
    await subscribe(env, t, env.receiver.behave(path(t, "p")), ["alliance.deterioration.v1", ALERT_STATUS])
    r1 = deterioration(t.id, "c1", "client-1", site_id="site-a")
    await raise_(env, r1)
    await requests_at(env, t, "p", 1)
    await end(env, ended(r1, "withdrawn"))
    await requests_at(env, t, "p", 3)  # the partner heard of both, and of the raise reaching no person (`failed`)

    assert env.receiver.at(path(t, "c1")) == []
    recipients = [who for _, who, _ in await kinds(env, t, r1.alert_id)]
    assert len(recipients) == 3 and all(who.startswith("subscription:") for who in recipients)


async def test_a_site_bound_admin_cannot_take_over_a_clinician_of_another_site(env: Env) -> None:
    t = await new_tenant(env, "takeover")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")), site="site-b")
    site_admin, _ = await create_key(env.db, t.id, "admin", site_id="site-a")
    takeover = {"site_id": "site-a", "email": "me@site-a.test", "webhook_url": env.receiver.url_for("/mine")}
    r = await env.client.put("/v1/clinicians/c1", json=takeover, headers=bearer(site_admin))
    assert r.status_code == 403
    r = await env.client.put("/v1/clinicians/c1", json={**takeover, "site_id": "site-b"}, headers=bearer(site_admin))
    assert r.status_code == 403
    entry = (await env.client.get("/v1/clinicians/c1", headers=t.admin)).json()
    assert (entry["site_id"], entry["webhook_url"]) == ("site-b", env.receiver.url_for(path(t, "c1")))


# ---- contract violations -------------------------------------------------------------------------


async def test_a_withdrawal_naming_no_revision_is_dead_lettered(env: Env) -> None:
    t = await new_tenant(env, "no-rev")
    r1 = deterioration(t.id, "c1", "client-1")
    bad = ended(r1, "withdrawn").model_copy(update={"revision": None})
    async with dead_letters(env.ns.kafka()) as letters:
        await end(env, bad)
        dl = await letters.first(lambda d: d.reason == "invalid_event" and r1.alert_id in d.payload)
    assert dl.source_topic == env.topics.alert_status and "revision" in dl.detail
    assert (await env.client.get(f"/v1/alerts/{r1.alert_id}", headers=t.read)).status_code == 404
