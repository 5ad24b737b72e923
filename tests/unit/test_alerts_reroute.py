"""Rerouting a stranded alert (`rules.plan_reroute`): once a directory change makes its clinician
reachable, an open alert whose routed revision reached the site's fallbacks or nobody goes to the
clinician, under the delivery ids the raise would have used, once per channel."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from services.alerts.rules import (
    Clinician,
    Reroute,
    RoutedTo,
    StrandedAlert,
    UnroutedReason,
    plan_alert,
    plan_reroute,
)
from shared import ids
from shared.topics import OUTCOME_ALERT
from tests.support.alerts import outcome_alert
from tests.unit.test_alerts_rules import alert

HOOK = "https://c1.example/hook"
MAIL = "c1@clinic.test"
ENTRY = Clinician("t1", "c1", "site-a", MAIL, HOOK)


def stranded(status: str = "open", routing: RoutedTo | None = "fallback",
             reason: UnroutedReason | None = "no_directory_entry", routed_revision: int = 1,
             revision: int = 1) -> StrandedAlert:
    return StrandedAlert(alert(revision=revision), status, routed_revision, routing, reason)


def plan(s: StrandedAlert, entry: Clinician | None = ENTRY, email: bool = True,
         tried: Mapping[str, tuple[str, str]] | None = None) -> Reroute | None:
    return plan_reroute(s, entry, email, tried or {})


def delivery(channel: str, revision: int = 1) -> str:
    a = alert(revision=revision)
    return ids.delivery_id(ids.alert_event_id(a.alert_id, revision), "clinician:c1", channel)


def test_an_open_alert_that_reached_the_fallback_goes_to_the_now_registered_clinician_by_both_channels() -> None:
    r = plan(stranded())
    assert r is not None
    assert [(p.recipient, p.channel, p.target) for p in r.new] == [("clinician:c1", "webhook", HOOK),
                                                                    ("clinician:c1", "email", MAIL)]
    assert (r.alert_id, r.revision, r.reason, r.retry) == (alert().alert_id, 1, "no_directory_entry", ())


def test_the_rerouted_deliveries_have_the_ids_the_raise_would_have_given_the_clinician() -> None:
    r = plan(stranded())
    _, raised = plan_alert(alert(), ENTRY, (), True)
    assert r is not None and [p.delivery_id for p in r.new] == [p.delivery_id for p in raised]
    assert [p.delivery_id for p in r.new] == [delivery("webhook"), delivery("email")]


def test_a_rerouted_delivery_is_the_clinicians_own_not_marked_as_a_fallback_copy() -> None:
    r = plan(stranded())
    assert r is not None and {(p.kind, p.routed_reason) for p in r.new} == {("alert", None)}


def test_an_alert_that_reached_nobody_goes_to_the_now_registered_clinician_too() -> None:
    r = plan(stranded(routing="none", reason="no_channel"))
    assert r is not None and r.reason == "no_channel" and len(r.new) == 2


def test_an_outcome_alert_is_rerouted_as_its_own_topic() -> None:
    ev = outcome_alert("t1", "c1", "client-7")
    r = plan_reroute(StrandedAlert(ev, "open", 1, "none", "no_directory_entry"), ENTRY, True, {})
    assert r is not None and {p.topic for p in r.new} == {OUTCOME_ALERT}


def test_without_smtp_only_the_webhook_goes() -> None:
    r = plan(stranded(), email=False)
    assert r is not None and [p.channel for p in r.new] == ["webhook"]


@pytest.mark.parametrize("status", ["acknowledged", "superseded", "withdrawn"])
def test_an_alert_no_longer_open_is_not_rerouted(status: str) -> None:
    assert plan(stranded(status=status)) is None


@pytest.mark.parametrize("routing", ["clinician", None])
def test_an_alert_that_reached_its_clinician_or_is_not_routed_yet_is_not_rerouted(routing: RoutedTo | None) -> None:
    assert plan(stranded(routing=routing, reason=None)) is None


def test_a_revision_whose_routing_is_not_recorded_yet_is_left_to_the_handler_routing_it() -> None:
    assert plan(stranded(revision=2, routed_revision=1)) is None


def test_an_entry_of_another_site_with_the_same_id_gets_nothing() -> None:
    assert plan(stranded(), entry=Clinician("t1", "c1", "site-b", MAIL, HOOK)) is None


def test_an_entry_of_another_tenant_gets_nothing() -> None:
    assert plan(stranded(), entry=Clinician("t2", "c1", "site-a", MAIL, HOOK)) is None


def test_an_entry_without_a_usable_channel_gets_nothing() -> None:
    assert plan(stranded(), entry=Clinician("t1", "c1", "site-a", MAIL, None), email=False) is None


def test_no_entry_gets_nothing() -> None:
    assert plan(stranded(), entry=None) is None


def test_an_undelivered_alert_whose_channels_failed_at_the_targets_the_entry_still_has_is_not_tried_again() -> None:
    tried = {delivery("webhook"): ("failed", HOOK), delivery("email"): ("failed", MAIL)}
    assert plan(stranded(routing="none", reason="undelivered"), tried=tried) is None


def test_an_undelivered_alerts_failed_channel_is_retried_at_the_entrys_new_target_and_only_that_one() -> None:
    tried = {delivery("webhook"): ("failed", "https://old.example/hook"), delivery("email"): ("failed", MAIL)}
    r = plan(stranded(routing="none", reason="undelivered"), tried=tried)
    assert r is not None and r.new == () and r.reason == "undelivered"
    assert [(p.delivery_id, p.target) for p in r.retry] == [(delivery("webhook"), HOOK)]


def test_a_channel_the_entry_gained_since_the_revision_failed_is_new() -> None:
    tried = {delivery("webhook"): ("failed", HOOK)}
    r = plan(stranded(routing="none", reason="undelivered"), tried=tried)
    assert r is not None and [p.channel for p in r.new] == ["email"] and r.retry == ()


@pytest.mark.parametrize("live", ["pending", "delivered"])
def test_a_reroute_stopped_between_its_writes_sends_nothing_again_and_is_still_recorded(live: str) -> None:
    tried = {delivery("webhook"): (live, HOOK), delivery("email"): (live, MAIL)}
    r = plan(stranded(), tried=tried)
    assert r is not None and (r.new, r.retry) == ((), ())


def test_a_cancelled_clinician_delivery_is_not_sent_again() -> None:
    tried = {delivery("webhook"): ("cancelled", HOOK), delivery("email"): ("cancelled", MAIL)}
    assert plan(stranded(), tried=tried) is None
