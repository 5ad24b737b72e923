"""Outcome alerts (the ORS, docs/outcome.md) through the alerts service, the real broker and store.

Scoring's outcome events, built with the real models (tests/support/alerts.py), are published
straight onto `outcome.alert.v1` / `outcome.alert-status.v1` as scoring would. The clinician's
webhook is the single receiver of tools/receiver.py; signatures are checked with the
`standardwebhooks` package, as a partner would. The alerts service runs once for the module (the
fixture of test_alerts_delivery.py); each test has its own tenant. To show that something was NOT
sent, a test waits for a later event of the same client on the same topic (same key, same
partition, so handled after it) to be delivered.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from standardwebhooks.webhooks import Webhook

from services.alerts.handlers import Handlers, OutcomeStatusEvent, StatusEvent, alert_content, status_identity
from services.alerts.rules import ALLIANCE_KIND, lifecycle_order
from services.alerts.store import AlertsStore
from shared.auth import create_key
from shared.events import AlertStatusChanged, Lifecycle, OutcomeAlert, OutcomeAlertStatusChanged
from shared.kafka import Decoded, InboundRecord
from shared.mongo import Document
from tests.integration import test_alerts_delivery as delivery
from tests.integration.test_alerts_delivery import Env, Tenant, _async, new_tenant, path, put_clinician, subscribe
from tests.integration.test_alerts_lifecycle import requests_at
from tests.support.alerts import NOT_ON_TRACK_ADVICE, outcome_alert, outcome_ended
from tests.support.fakes import TOPICS, Sink
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.harness import deterioration, ended
from tools.recorder import Record, TopicRecorder

env = delivery.env  # the module-scoped alerts service (its own instance for this module)
OUTCOME_ALERT, OUTCOME_STATUS = "outcome.alert.v1", "outcome.alert-status.v1"


async def raise_outcome(env: Env, ev: OutcomeAlert) -> None:
    await env.publisher.publish(env.topics.outcome_alert, ev, ev.tenant_id, ev.client_id)


async def end_outcome(env: Env, ev: OutcomeAlertStatusChanged) -> None:
    await env.publisher.publish(env.topics.outcome_alert_status, ev, ev.tenant_id, ev.client_id or "")


async def listed(env: Env, t: Tenant, n: int, **params: str) -> list[dict[str, Any]]:
    """`GET /v1/alerts` once it lists at least `n` alerts."""
    async def check() -> list[dict[str, Any]] | None:
        r = await env.client.get("/v1/alerts", params=params, headers=t.read)
        assert r.status_code == 200, r.text
        return list(r.json()) if len(r.json()) >= n else None
    return await eventually(check)


# ---- deliveries --------------------------------------------------------------------------------


async def test_an_outcome_alert_reaches_the_clinicians_webhook_signed_as_outcome_alert_v1(env: Env) -> None:
    t = await new_tenant(env, "ors-hook")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    ev = outcome_alert(t.id, "c1", "client-1")
    await raise_outcome(env, ev)

    (req,) = await requests_at(env, t, "c1", 1)
    body = Webhook(t.secret).verify(req.body, req.headers)  # raises unless the signature verifies
    assert req.headers["x-alliance-event"] == OUTCOME_ALERT
    assert (body["alert_type"], body["alert_id"], body["triggers"], body["advice"]) == (
        "outcome", ev.alert_id, ["reliable_deterioration", "not_on_track"], NOT_ON_TRACK_ADVICE)


async def test_an_outcome_alert_email_carries_the_advice(env: Env) -> None:
    t = await new_tenant(env, "ors-mail")
    await put_clinician(env, t, "c1", email_addr="c1@ors-mail.test")
    await raise_outcome(env, outcome_alert(t.id, "c1", "client-2"))

    (msg,) = await eventually(lambda: _async(env.smtp.to("c1@ors-mail.test")))
    assert str(msg["Subject"]).startswith("Outcome alert (critical) for client client-2")
    assert NOT_ON_TRACK_ADVICE in msg.get_content()


async def test_an_outcome_withdrawal_reaches_the_clinician_as_outcome_alert_status_v1(env: Env) -> None:
    t = await new_tenant(env, "ors-withdraw")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    ev = outcome_alert(t.id, "c1", "client-3")
    await raise_outcome(env, ev)
    await requests_at(env, t, "c1", 1)
    await end_outcome(env, outcome_ended(ev, "withdrawn"))

    got = await requests_at(env, t, "c1", 2)
    body = Webhook(t.secret).verify(got[1].body, got[1].headers)
    assert (body["status"], body["alert_id"], body["instrument"]) == ("withdrawn", ev.alert_id, "ORS")
    assert got[1].headers["x-alliance-event"] == OUTCOME_STATUS


async def test_a_superseded_outcome_alert_is_not_sent_to_the_clinician(env: Env) -> None:
    t = await new_tenant(env, "ors-supersede")
    await put_clinician(env, t, "c1", env.receiver.behave(path(t, "c1")))
    ev, other = outcome_alert(t.id, "c1", "client-4"), outcome_alert(t.id, "c1", "client-4")
    await raise_outcome(env, ev)
    await raise_outcome(env, other)
    await requests_at(env, t, "c1", 2)
    await end_outcome(env, outcome_ended(ev, "superseded"))
    # The sentinel: a withdrawal of the client's other alert, after the supersession on the same partition.
    await end_outcome(env, outcome_ended(other, "withdrawn"))

    got = await requests_at(env, t, "c1", 3)
    statuses = [(b["alert_id"], b.get("status")) for b in (json.loads(r.body) for r in got[2:])]
    assert statuses == [(other.alert_id, "withdrawn")]
    (shown,) = [a for a in await listed(env, t, 2) if a["alert_id"] == ev.alert_id]
    assert shown["status"] == "superseded"


async def test_a_partner_subscribed_to_outcome_alerts_gets_them_signed_with_its_own_secret(env: Env) -> None:
    t = await new_tenant(env, "ors-partner")
    sub = await subscribe(env, t, env.receiver.behave(path(t, "p")), [OUTCOME_ALERT])
    ev = outcome_alert(t.id, "nobody-in-directory", "client-5")
    await raise_outcome(env, ev)

    (req,) = await requests_at(env, t, "p", 1)
    assert Webhook(sub["secret"]).verify(req.body, req.headers)["alert_id"] == ev.alert_id
    assert req.headers["x-alliance-event"] == OUTCOME_ALERT


# ---- acknowledgement and the list --------------------------------------------------------------


async def test_acknowledging_an_outcome_alert_publishes_on_outcome_alert_status_v1_only(env: Env) -> None:
    t = await new_tenant(env, "ors-ack")
    await put_clinician(env, t, "c1")
    ors, srs = outcome_alert(t.id, "c1", "client-6"), deterioration(t.id, "c1", "client-6")
    await raise_outcome(env, ors)
    await env.publisher.publish(env.topics.deterioration, srs, t.id, srs.client_id)
    await listed(env, t, 2)

    def about(model: type[AlertStatusChanged], alert_id: str, status: str | None = None) -> Any:
        # `status`: only those (the clinician's deliveries also tell `delivered`)
        return lambda records: [e for e in (model.model_validate_json(r.value) for r in records)
                                if e.alert_id == alert_id and status in (None, e.status)]

    async with (TopicRecorder(env.ns.stack.bootstrap, env.topics.outcome_alert_status) as outcome_statuses,
                TopicRecorder(env.ns.stack.bootstrap, env.topics.alert_status) as alliance_statuses):
        r = await env.client.post(f"/v1/alerts/{ors.alert_id}/ack", headers=t.read)
        assert r.status_code == 200 and r.json()["status"] == "acknowledged"
        acks = about(OutcomeAlertStatusChanged, ors.alert_id, "acknowledged")
        (acked,) = acks(await outcome_statuses.until(acks))
        # The sentinel: the client's alliance alert acknowledged after it, keyed to the same partition.
        assert (await env.client.post(f"/v1/alerts/{srs.alert_id}/ack", headers=t.read)).status_code == 200
        records: list[Record] = await alliance_statuses.until(about(AlertStatusChanged, srs.alert_id,
                                                                    "acknowledged"))
    assert (acked.status, acked.tenant_id, acked.clinician_id) == ("acknowledged", t.id, "c1")
    assert about(AlertStatusChanged, ors.alert_id)(records) == []


async def test_the_alert_list_shows_both_types_with_their_triggers_and_filters_by_type(env: Env) -> None:
    t = await new_tenant(env, "ors-list")
    await put_clinician(env, t, "c1")
    ors = outcome_alert(t.id, "c1", "client-7", session_number=3)
    srs = deterioration(t.id, "c1", "client-7", episode_id=ors.episode_id, session_number=3).model_copy(
        update={"outcome_at_risk": True})
    await raise_outcome(env, ors)
    await env.publisher.publish(env.topics.deterioration, srs, t.id, srs.client_id)

    shown = {a["alert_id"]: a for a in await listed(env, t, 2)}
    assert {k: shown[ors.alert_id][k] for k in ("alert_type", "triggers", "status", "advice", "outcome_at_risk")} == {
        "alert_type": "outcome", "triggers": ["reliable_deterioration", "not_on_track"], "status": "open",
        "advice": NOT_ON_TRACK_ADVICE, "outcome_at_risk": None}
    assert {k: shown[srs.alert_id][k] for k in ("alert_type", "triggers", "status", "outcome_at_risk")} == {
        "alert_type": "alliance", "triggers": srs.triggers, "status": "open", "outcome_at_risk": True}
    assert [a["alert_id"] for a in await listed(env, t, 1, alert_type="outcome")] == [ors.alert_id]
    assert [a["alert_id"] for a in await listed(env, t, 1, alert_type="alliance")] == [srs.alert_id]
    r = await env.client.get(f"/v1/alerts/{ors.alert_id}", headers=t.read)
    assert (r.json()["alert_type"], r.json()["triggers"]) == ("outcome", ors.triggers)


async def test_an_open_outcome_alert_escalates_to_the_supervisor_as_outcome_alert_v1_and_a_withdrawn_one_never(
        env: Env) -> None:
    t = await new_tenant(env, "ors-esc")
    await put_clinician(env, t, "boss", env.receiver.behave(path(t, "boss")))
    await put_clinician(env, t, "c1", supervisor="boss")
    withdrawn, still_open = outcome_alert(t.id, "c1", "client-9"), outcome_alert(t.id, "c1", "client-10")
    await raise_outcome(env, withdrawn)
    await end_outcome(env, outcome_ended(withdrawn, "withdrawn"))
    await raise_outcome(env, still_open)

    async def settled() -> bool | None:
        status = {a["alert_id"]: a["status"] for a in await listed(env, t, 2)}
        return status == {withdrawn.alert_id: "withdrawn", still_open.alert_id: "open"} or None
    await eventually(settled)

    def escalations(records: list[Record]) -> list[OutcomeAlertStatusChanged]:
        events = [OutcomeAlertStatusChanged.model_validate_json(r.value) for r in records]
        return [e for e in events if e.alert_id == still_open.alert_id and e.status == "escalated"]

    async with TopicRecorder(env.ns.stack.bootstrap, env.topics.outcome_alert_status) as statuses:
        # Escalation due at once from now on.
        await env.client.put("/v1/escalation", json={"interval_seconds": 0.2}, headers=t.admin)
        (req,) = await requests_at(env, t, "boss", 1)
        assert escalations(await statuses.until(escalations))
    body = Webhook(t.secret).verify(req.body, req.headers)
    assert body["alert_id"] == still_open.alert_id
    assert (req.headers["x-alliance-event"], req.headers["x-alliance-escalation"]) == (OUTCOME_ALERT, "true")
    assert {a["alert_id"]: a["escalated"] for a in await listed(env, t, 2)}[withdrawn.alert_id] is False


async def test_another_sites_key_sees_no_outcome_alert(env: Env) -> None:
    t = await new_tenant(env, "ors-site")
    await put_clinician(env, t, "c1")
    ev = outcome_alert(t.id, "c1", "client-8")
    await raise_outcome(env, ev)
    await listed(env, t, 1)
    other_site, _ = await create_key(env.db, t.id, "read", site_id="site-b")
    headers = {"Authorization": f"Bearer {other_site}"}
    assert (await env.client.get("/v1/alerts", headers=headers)).json() == []
    assert (await env.client.get(f"/v1/alerts/{ev.alert_id}", headers=headers)).status_code == 404
    assert (await env.client.post(f"/v1/alerts/{ev.alert_id}/ack", headers=headers)).status_code == 404


# ---- the store: one type never ends the other --------------------------------------------------


@pytest.fixture
async def store(stack: StackUnderTest) -> AsyncIterator[AlertsStore]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True)
    s = AlertsStore(client[f"t_{uuid.uuid4().hex[:10]}"])
    await s.ensure_indexes()
    yield s
    await client.close()


def decoded(topic: str, ev: Any) -> Decoded[Any]:
    return Decoded(InboundRecord(topic, 0, 0, b"k", ev.model_dump_json().encode(), {}, 0), ev)


async def test_an_outcome_status_naming_an_alliance_alert_does_not_end_it(store: AlertsStore) -> None:
    h = Handlers(store, email_enabled=False, on_scheduled=lambda: None, publisher=Sink(), topics=TOPICS)
    srs = deterioration("acme", "c1", "x")
    await h.on_deterioration([decoded("alliance.deterioration.v1", srs)])
    wrong = outcome_ended(outcome_alert("acme", "c1", "x"), "withdrawn").model_copy(update={"alert_id": srs.alert_id})
    await h.on_outcome_status([decoded(OUTCOME_STATUS, OutcomeStatusEvent.model_validate(wrong.model_dump()))])

    alert = await store.get_alert("acme", srs.alert_id)
    assert alert is not None and (alert.alert_type, alert.status) == ("alliance", "open")


async def test_an_alliance_status_naming_an_outcome_alert_does_not_end_it(store: AlertsStore) -> None:
    h = Handlers(store, email_enabled=False, on_scheduled=lambda: None, publisher=Sink(), topics=TOPICS)
    ors = outcome_alert("acme", "c1", "x")
    await h.on_outcome_alert([decoded(OUTCOME_ALERT, ors)])
    wrong = ended(deterioration("acme", "c1", "x"), "withdrawn").model_copy(update={"alert_id": ors.alert_id})
    await h.on_alert_status([decoded("alliance.alert-status.v1", StatusEvent.model_validate(wrong.model_dump()))])

    alert = await store.get_alert("acme", ors.alert_id)
    assert alert is not None and (alert.alert_type, alert.status) == ("outcome", "open")


async def test_an_alliance_alert_stored_before_alerts_had_types_is_still_ended_by_its_status(
        store: AlertsStore) -> None:
    srs = deterioration("acme", "c1", "x")
    content = alert_content(srs, srs.model_dump_json(), InboundRecord("t", 0, 0, None, b"", {}, 0))
    await store.record_raises([(1, content)])
    await store.alerts.update_one({"_id": srs.alert_id}, {"$unset": {"alert_type": "", "outcome_at_risk": ""}})
    await store.record_statuses([(Lifecycle.WITHDRAWN, 1, status_identity(ended(srs, "withdrawn"), ALLIANCE_KIND))])

    assert (await store.lifecycle_orders([srs.alert_id]))[srs.alert_id] == lifecycle_order(Lifecycle.WITHDRAWN, 1)
    alert = await store.get_alert("acme", srs.alert_id)
    assert alert is not None and (alert.alert_type, alert.status, alert.outcome_at_risk) == (
        "alliance", "withdrawn", False)
