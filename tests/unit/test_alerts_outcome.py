"""Outcome alerts (the ORS, docs/outcome.md) in the alerts service, on fakes: the handlers, the
commands and the pure rules treat them like alliance alerts, on their own topics, and never let
one type touch the other. The same behaviours through the real broker and store are in
tests/integration/test_alerts_outcome.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from services.alerts.handlers import INVALID, SERVICE, Handlers, OutcomeStatusEvent, StatusEvent
from services.alerts.rules import (
    ALLIANCE_KIND,
    OUTCOME_KIND,
    Clinician,
    Subscription,
    email_text,
    route_escalation,
    status_changed,
    withdrawal_email_text,
)
from services.alerts.service import AlertsCommands
from services.alerts.store import Alert, AlertFields
from shared import ids
from shared.auth import Principal
from shared.events import (
    AlertStatus,
    AlertStatusChanged,
    AllianceDeterioration,
    OrsScored,
    OutcomeAlert,
    OutcomeAlertStatusChanged,
)
from shared.kafka import DeadLetterTarget, InboundRecord, typed_handler
from shared.topics import ALERT_STATUS, DETERIORATION, ORS_SCORED, OUTCOME_ALERT, OUTCOME_ALERT_STATUS
from tests.support.alerts import NOT_ON_TRACK_ADVICE, outcome_alert, outcome_ended
from tests.support.fakes import TOPICS, MemoryAlertsStore, Sink, inbound
from tools.harness import deterioration

TENANT = "acme"
ORS_SCORED_FIXTURE = OrsScored.model_validate_json(
    (Path(__file__).resolve().parents[1] / "fixtures/events/v1/OrsScored.current.json").read_text())
HOOK = "https://clinic.example/hook"


class Wired:
    """The handlers on fakes, each fed raw records as the subscriber app.py wires feeds them."""

    def __init__(self, webhook: str | None = HOOK, subscriptions: list[Subscription] | None = None) -> None:
        self.store = MemoryAlertsStore(subscriptions=subscriptions or [])
        self.store.clinicians[(TENANT, "c-1")] = Clinician(TENANT, "c-1", "site-a", "c1@clinic.example", webhook)
        self.sink = Sink()
        handlers = Handlers(self.store, email_enabled=True, on_scheduled=lambda: None, publisher=self.sink,
                            topics=TOPICS)
        dead_letters = DeadLetterTarget(TOPICS.deadletter, self.sink.publish_all)

        def consumer(model: type, handler: Any) -> Any:
            return typed_handler(model, handler, service=SERVICE, dead_letters=dead_letters, invalid_reason=INVALID)

        self.on = SimpleNamespace(
            deterioration=consumer(AllianceDeterioration, handlers.on_deterioration),
            alert_status=consumer(StatusEvent, handlers.on_alert_status),
            outcome_alert=consumer(OutcomeAlert, handlers.on_outcome_alert),
            outcome_status=consumer(OutcomeStatusEvent, handlers.on_outcome_status),
            ors_scored=consumer(OrsScored, handlers.on_ors_scored))

    def sent(self, recipient: str = "clinician:c-1") -> list[tuple[str, str, str]]:
        """(kind, topic, channel) of every delivery scheduled for `recipient`."""
        return sorted((d["kind"], d["topic"], d["channel"]) for d in self.store.deliveries.values()
                      if d["recipient"] == recipient)


def rec(topic: str, event: Any) -> InboundRecord:
    return inbound(topic, event, key=ids.partition_key(TENANT, event.client_id or ""))


def raised(**changes: Any) -> OutcomeAlert:
    return outcome_alert(TENANT, "c-1", "x", episode_id="e-1", **changes)


# --- what is scheduled ----------------------------------------------------------------------------


async def test_an_outcome_alert_goes_to_the_clinicians_webhook_and_email_as_outcome_alert_v1() -> None:
    w = Wired()
    await w.on.outcome_alert([rec(TOPICS.outcome_alert, raised())])
    assert w.sent() == [("alert", OUTCOME_ALERT, "email"), ("alert", OUTCOME_ALERT, "webhook")]


async def test_an_outcome_alert_is_stored_typed_with_its_advice_and_no_outcome_at_risk() -> None:
    w = Wired()
    await w.on.outcome_alert([rec(TOPICS.outcome_alert, raised())])
    (_, content), = w.store.contents.values()
    assert (content["alert_type"], content["advice"], content["intake_total"]) == ("outcome", NOT_ON_TRACK_ADVICE,
                                                                                   23.0)
    assert "outcome_at_risk" not in content


async def test_an_alliance_alert_is_stored_typed_alliance_with_its_outcome_at_risk() -> None:
    w = Wired()
    alert = deterioration(TENANT, "c-1", "x").model_copy(update={"outcome_at_risk": True})
    await w.on.deterioration([rec(TOPICS.deterioration, alert)])
    (_, content), = w.store.contents.values()
    assert (content["alert_type"], content["outcome_at_risk"]) == ("alliance", True)


async def test_an_outcome_alert_nobody_can_be_told_of_is_told_failed_on_outcome_alert_status_v1() -> None:
    w = Wired()
    w.store.clinicians.clear()  # no directory entry, no fallback: nobody can be told
    await w.on.outcome_alert([rec(TOPICS.outcome_alert, raised())])
    (record,) = w.sink.of_topic(TOPICS.outcome_alert_status)
    event = OutcomeAlertStatusChanged.model_validate_json(record.value)
    assert (event.status, event.routing_reason) == ("failed", "no_directory_entry") and w.sent() == []


async def test_a_withdrawn_outcome_alert_is_told_to_the_clinician_as_outcome_alert_status_v1() -> None:
    w = Wired()
    alert = raised()
    await w.on.outcome_alert([rec(TOPICS.outcome_alert, alert)])
    await w.on.outcome_status([rec(TOPICS.outcome_alert_status, outcome_ended(alert, "withdrawn"))])
    assert ("withdrawal", OUTCOME_ALERT_STATUS, "webhook") in w.sent()


async def test_a_superseded_outcome_alert_is_not_told_to_the_clinician() -> None:
    w = Wired()
    alert = raised()
    await w.on.outcome_alert([rec(TOPICS.outcome_alert, alert)])
    await w.on.outcome_status([rec(TOPICS.outcome_alert_status, outcome_ended(alert, "superseded"))])
    assert [k for k, _, _ in w.sent()] == ["alert", "alert"]


async def test_a_stale_outcome_withdrawal_is_not_told() -> None:
    w = Wired()
    alert = raised()
    await w.on.outcome_alert([rec(TOPICS.outcome_alert, alert.model_copy(
        update={"revision": 2, "event_id": ids.alert_event_id(alert.alert_id, 2)}))])
    await w.on.outcome_status([rec(TOPICS.outcome_alert_status, outcome_ended(alert, "withdrawn", revision=1))])
    assert "withdrawal" not in [k for k, _, _ in w.sent()]


async def test_an_outcome_withdrawal_naming_no_revision_is_dead_lettered_as_invalid_event() -> None:
    w = Wired()
    bad = outcome_ended(raised(), "withdrawn").model_copy(update={"revision": None})
    await w.on.outcome_status([rec(TOPICS.outcome_alert_status, bad)])
    assert [d.reason for d in w.sink.letters(TOPICS.deadletter)] == ["invalid_event"]
    assert w.store.lkeys == {}


async def test_partners_get_outcome_alerts_only_when_subscribed_to_outcome_alert_v1() -> None:
    srs_only = Subscription("s-srs", TENANT, "https://srs.example/h", frozenset({DETERIORATION, ALERT_STATUS}))
    ors = Subscription("s-ors", TENANT, "https://ors.example/h", frozenset({OUTCOME_ALERT}))
    w = Wired(webhook=None, subscriptions=[srs_only, ors])
    await w.on.outcome_alert([rec(TOPICS.outcome_alert, raised())])
    assert w.sent("subscription:s-srs") == []
    assert w.sent("subscription:s-ors") == [("alert", OUTCOME_ALERT, "webhook")]


async def test_partners_get_outcome_statuses_only_when_subscribed_to_outcome_alert_status_v1() -> None:
    srs_only = Subscription("s-srs", TENANT, "https://srs.example/h", frozenset({ALERT_STATUS}))
    ors = Subscription("s-ors", TENANT, "https://ors.example/h", frozenset({OUTCOME_ALERT_STATUS}))
    w = Wired(webhook=None, subscriptions=[srs_only, ors])
    await w.on.outcome_status([rec(TOPICS.outcome_alert_status, outcome_ended(raised(), "superseded"))])
    assert w.sent("subscription:s-srs") == []
    assert w.sent("subscription:s-ors") == [("event", OUTCOME_ALERT_STATUS, "webhook")]


async def test_scored_ors_sessions_go_to_partners_subscribed_to_ors_scored_v1_only() -> None:
    scored = ORS_SCORED_FIXTURE.model_copy(update={"tenant_id": TENANT})
    subs = [Subscription("s-srs", TENANT, "https://srs.example/h", frozenset({"srs.scored.v1"})),
            Subscription("s-ors", TENANT, "https://ors.example/h", frozenset({ORS_SCORED}))]
    w = Wired(webhook=None, subscriptions=subs)
    await w.on.ors_scored([rec(TOPICS.ors_scored, scored)])
    assert [d["recipient"] for d in w.store.deliveries.values()] == ["subscription:s-ors"]


# --- one type never ends the other ----------------------------------------------------------------


async def test_an_outcome_status_naming_an_alliance_alert_leaves_it_open_and_tells_nobody() -> None:
    w = Wired()
    alliance = deterioration(TENANT, "c-1", "x", site_id="site-a")
    await w.on.deterioration([rec(TOPICS.deterioration, alliance)])
    wrong = outcome_ended(raised(), "withdrawn").model_copy(update={"alert_id": alliance.alert_id})
    await w.on.outcome_status([rec(TOPICS.outcome_alert_status, wrong)])
    assert w.store.lkeys[alliance.alert_id].endswith("0")  # still raised
    assert {k for k, _, _ in w.sent()} == {"alert"}


async def test_an_alliance_alert_and_an_outcome_alert_of_one_session_are_two_alerts() -> None:
    w = Wired(webhook=None)
    alliance = deterioration(TENANT, "c-1", "x", episode_id="e-1", session_number=6)
    await w.on.deterioration([rec(TOPICS.deterioration, alliance)])
    await w.on.outcome_alert([rec(TOPICS.outcome_alert, raised())])
    assert raised().alert_id != alliance.alert_id
    assert w.store.types == {alliance.alert_id: "alliance", raised().alert_id: "outcome"}


# --- acknowledge ----------------------------------------------------------------------------------


def stored(alert_type: str) -> dict[str, Any]:
    return {"_id": "a-1", "alert_type": alert_type, "tenant_id": TENANT, "site_id": "north", "clinician_id": "c-1",
            "client_id": "x", "status": "open", "acknowledged_at": None, "correlation_id": "corr-1",
            "created_at": datetime(2026, 3, 1, tzinfo=UTC), "escalated": False}


async def test_acknowledging_an_outcome_alert_publishes_on_outcome_alert_status_v1_only() -> None:
    store, sink = MemoryAlertsStore(), Sink()
    store.alerts["a-1"] = stored("outcome")
    commands = AlertsCommands(store, sink, TOPICS, lambda: None)
    await commands.acknowledge(Principal("k", TENANT, "read"), "a-1")
    assert [r.topic for r in sink.published] == [TOPICS.outcome_alert_status]
    event = OutcomeAlertStatusChanged.model_validate_json(sink.published[0].value)
    assert (event.alert_id, event.status) == ("a-1", AlertStatus.ACKNOWLEDGED)


async def test_acknowledging_an_alliance_alert_still_publishes_on_alliance_alert_status_v1() -> None:
    store, sink = MemoryAlertsStore(), Sink()
    store.alerts["a-1"] = stored("alliance")
    await AlertsCommands(store, sink, TOPICS, lambda: None).acknowledge(Principal("k", TENANT, "read"), "a-1")
    assert [r.topic for r in sink.published] == [TOPICS.alert_status]


# --- the pure rules and the stored alert ---------------------------------------------------------


def test_what_alerts_reports_of_an_outcome_alert_is_an_outcome_status_event() -> None:
    event = status_changed(TENANT, "a-1", "north", "c-1", AlertStatus.ESCALATED, datetime.now(UTC), "x",
                           OUTCOME_KIND)
    assert type(event) is OutcomeAlertStatusChanged
    assert type(status_changed(TENANT, "a-1", "north", "c-1", AlertStatus.ESCALATED, datetime.now(UTC), "x",
                               ALLIANCE_KIND)) is AlertStatusChanged


def test_an_escalated_outcome_alert_goes_to_the_supervisor_as_outcome_alert_v1() -> None:
    supervisor = Clinician(TENANT, "sup", "site-a", "sup@clinic.example", HOOK)
    planned = route_escalation(raised(), supervisor, email_enabled=False)
    assert [(p.kind, p.topic, p.recipient) for p in planned] == [("escalation", OUTCOME_ALERT, "supervisor:sup")]


def test_an_outcome_alert_email_names_its_type_and_carries_the_advice() -> None:
    subject, body = email_text(raised(), "https://dash.example/")
    assert subject.startswith("Outcome alert (critical) for client x")
    assert NOT_ON_TRACK_ADVICE in body and "Intake total: 23; change from intake: -5.6" in body


def test_an_alliance_alert_email_is_as_it_was() -> None:
    subject, body = email_text(deterioration(TENANT, "c-1", "x"), "https://dash.example/")
    assert subject.startswith("Alliance alert (critical) for client x")
    assert "Intake total" not in body


def test_an_outcome_withdrawal_email_names_its_type() -> None:
    subject, body = withdrawal_email_text(outcome_ended(raised(), "withdrawn"), "https://dash.example/", OUTCOME_KIND)
    assert subject == "Outcome alert withdrawn for client x" and "Instrument: ORS, session 6" in body


def test_an_alert_stored_before_alerts_had_types_reads_as_an_alliance_alert_not_at_outcome_risk() -> None:
    legacy = {**stored("alliance"), "total": 30.0}
    del legacy["alert_type"]
    alert = Alert.from_doc(legacy)
    assert (alert.alert_type, alert.outcome_at_risk) == ("alliance", False)


def test_an_outcome_alert_shows_no_outcome_at_risk() -> None:
    alert = AlertFields.model_validate({**stored("outcome"), "alert_id": "a-1", "total": 17.4})
    assert (alert.alert_type, alert.outcome_at_risk) == ("outcome", None)
