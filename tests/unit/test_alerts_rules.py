"""Pure rules of the alerts service: routing (site ownership included), retry schedule, email
text, URL checks. The lifecycle merge has its own file (test_alerts_lifecycle.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.alerts import rules
from services.alerts.rules import Clinician, Subscription
from shared import ids
from shared.events import AlertStatusChanged, AllianceDeterioration
from shared.topics import ALERT_STATUS, DETERIORATION, SCORED

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def alert(tenant: str = "t1", clinician: str = "c1", client: str = "client-7", revision: int = 1,
          site: str = "site-a") -> AllianceDeterioration:
    alert_id = ids.alert_id(tenant, client, "SRS", "ep-1", 4)
    return AllianceDeterioration(
        event_id=ids.alert_event_id(alert_id, revision), tenant_id=tenant, occurred_at=NOW, submission_id="s1",
        site_id=site, clinician_id=clinician, client_id=client, episode_id="ep-1", session_number=4,
        administered_at=NOW, alert_id=alert_id, triggers=["below_cutoff", "drop_from_previous"],
        severity="critical", total=30.5, previous_total=37.0, change_from_previous=-6.5, cutoff=36.0,
        accepted_at=NOW, revision=revision, low_items=["goals"])


def status(status: str, revision: int | None = 1, site: str = "site-a") -> AlertStatusChanged:
    a = alert(site=site)
    return AlertStatusChanged.model_validate({
        "event_id": ids.alert_status_event_id(a.tenant_id, a.alert_id, status, revision), "tenant_id": a.tenant_id,
        "occurred_at": NOW, "alert_id": a.alert_id, "site_id": site, "clinician_id": "c1", "status": status,
        "revision": revision, "client_id": a.client_id, "instrument": "SRS", "episode_id": "ep-1",
        "session_number": 4})


def clinician(webhook: str | None = "https://c1.example/hook", email: str | None = "c1@example.org",
              tenant: str = "t1", site: str = "site-a") -> Clinician:
    return Clinician(tenant, "c1", site, email, webhook, "sup1")


def sub(sid: str, tenant: str = "t1", events: tuple[str, ...] = (DETERIORATION,)) -> Subscription:
    return Subscription(sid, tenant, f"https://partner.example/{sid}", frozenset(events))


def test_alert_goes_to_clinician_webhook_and_email_and_matching_partner() -> None:
    planned = rules.route_alert(alert(), clinician(), [sub("p1")], email_enabled=True)
    assert [(p.recipient, p.channel, p.target) for p in planned] == [
        ("clinician:c1", "webhook", "https://c1.example/hook"),
        ("clinician:c1", "email", "c1@example.org"),
        ("subscription:p1", "webhook", "https://partner.example/p1"),
    ]


def test_delivery_ids_are_the_shared_deterministic_ids() -> None:
    a = alert()
    planned = rules.route_alert(a, clinician(), [sub("p1")], email_enabled=True)
    assert {p.delivery_id for p in planned} == {
        ids.delivery_id(a.alert_id, "clinician:c1", "webhook"),
        ids.delivery_id(a.alert_id, "clinician:c1", "email"),
        ids.delivery_id(a.alert_id, "subscription:p1", "webhook"),
    }
    assert planned == rules.route_alert(a, clinician(), [sub("p1")], email_enabled=True)


def test_each_revision_of_an_alert_is_a_new_delivery_and_revision_1_keeps_the_old_ids() -> None:
    first = rules.route_alert(alert(revision=1), clinician(), [sub("p1")], email_enabled=True)
    second = rules.route_alert(alert(revision=2), clinician(), [sub("p1")], email_enabled=True)
    a = alert()
    assert first[0].delivery_id == ids.delivery_id(a.alert_id, "clinician:c1", "webhook")
    assert {p.delivery_id for p in second} == {
        ids.delivery_id(ids.alert_event_id(a.alert_id, 2), who, channel)
        for who, channel in (("clinician:c1", "webhook"), ("clinician:c1", "email"), ("subscription:p1", "webhook"))}
    assert not {p.delivery_id for p in first} & {p.delivery_id for p in second}
    assert {p.alert_id for p in second} == {a.alert_id}


def test_a_clinician_entry_of_another_site_gets_nothing_while_partners_still_do() -> None:
    planned = rules.route_alert(alert(site="site-a"), clinician(site="site-b"), [sub("p1")], email_enabled=True)
    assert [p.recipient for p in planned] == ["subscription:p1"]


def test_a_withdrawal_goes_to_the_clinician_and_alert_status_partners_only() -> None:
    ev = status("withdrawn")
    planned = rules.route_status(ev, clinician(), [sub("p1", events=(ALERT_STATUS,)), sub("p2")], email_enabled=True)
    assert [(p.recipient, p.channel, p.kind, p.topic) for p in planned] == [
        ("clinician:c1", "webhook", "withdrawal", ALERT_STATUS),
        ("clinician:c1", "email", "withdrawal", ALERT_STATUS),
        ("subscription:p1", "webhook", "event", ALERT_STATUS),
    ]
    assert {p.delivery_id for p in planned} == {
        ids.delivery_id(ev.event_id, who, ch)
        for who, ch in (("clinician:c1", "webhook"), ("clinician:c1", "email"), ("subscription:p1", "webhook"))}
    assert {p.alert_id for p in planned} == {ev.alert_id}


def test_a_withdrawal_is_not_sent_to_a_clinician_of_another_site() -> None:
    planned = rules.route_status(status("withdrawn"), clinician(site="site-b"), [], email_enabled=True)
    assert planned == []


@pytest.mark.parametrize("name", ["superseded", "acknowledged", "escalated"])
def test_other_status_events_go_to_alert_status_partners_but_not_the_clinician(name: str) -> None:
    ev = status(name, revision=1 if name == "superseded" else None)
    planned = rules.route_status(ev, clinician(), [sub("p1", events=(ALERT_STATUS,))], email_enabled=True)
    assert [p.recipient for p in planned] == ["subscription:p1"]


def test_partners_can_subscribe_to_alert_status_events() -> None:
    assert ALERT_STATUS in rules.SUBSCRIBABLE


def test_no_email_delivery_when_smtp_is_not_configured() -> None:
    planned = rules.route_alert(alert(), clinician(), [], email_enabled=False)
    assert [p.channel for p in planned] == ["webhook"]


def test_clinician_without_webhook_gets_email_only() -> None:
    planned = rules.route_alert(alert(), clinician(webhook=None), [], email_enabled=True)
    assert [p.channel for p in planned] == ["email"]


def test_unknown_clinician_still_reaches_partners() -> None:
    planned = rules.route_alert(alert(), None, [sub("p1")], email_enabled=True)
    assert [p.recipient for p in planned] == ["subscription:p1"]


def test_another_tenants_subscription_never_matches() -> None:
    planned = rules.route_alert(alert(tenant="t1"), None, [sub("p1", tenant="t2"), sub("p2")], email_enabled=True)
    assert [p.recipient for p in planned] == ["subscription:p2"]


def test_another_tenants_clinician_entry_is_ignored() -> None:
    planned = rules.route_alert(alert(tenant="t1"), clinician(tenant="t2"), [], email_enabled=True)
    assert planned == []


def test_subscription_to_scored_only_does_not_get_deteriorations() -> None:
    planned = rules.route_alert(alert(), None, [sub("p1", events=(SCORED,))], email_enabled=True)
    assert planned == []


def test_scored_events_go_to_scored_subscribers_of_the_tenant() -> None:
    planned = rules.partner_deliveries("event", "t1", "site-a", "ev9", None, SCORED,
                                       [sub("p1", events=(SCORED,)), sub("p2"), sub("p3", "t2", (SCORED,))])
    assert [(p.recipient, p.delivery_id) for p in planned] == [
        ("subscription:p1", ids.delivery_id("ev9", "subscription:p1", "webhook"))]


def test_escalation_goes_to_the_supervisor_under_its_own_recipient_id() -> None:
    a = alert()
    supervisor = Clinician("t1", "sup1", "site-a", "sup@example.org", "https://sup.example/h")
    planned = rules.route_escalation(a, supervisor, email_enabled=True)
    assert [(p.recipient, p.channel, p.kind) for p in planned] == [
        ("supervisor:sup1", "webhook", "escalation"), ("supervisor:sup1", "email", "escalation")]
    # Distinct from what the same person would get as the clinician of the alert.
    assert planned[0].delivery_id == ids.delivery_id(a.alert_id, "supervisor:sup1", "webhook")


def test_escalation_without_a_supervisor_entry_plans_nothing() -> None:
    assert rules.route_escalation(alert(), None, email_enabled=True) == []


def test_escalation_never_goes_to_a_supervisor_of_another_site_or_tenant() -> None:
    elsewhere = Clinician("t1", "sup1", "site-b", "sup@example.org", "https://sup.example/h")
    other_tenant = Clinician("t2", "sup1", "site-a", "sup@example.org", "https://sup.example/h")
    assert rules.route_escalation(alert(), elsewhere, email_enabled=True) == []
    assert rules.route_escalation(alert(), other_tenant, email_enabled=True) == []


def test_escalation_is_one_per_alert_whatever_its_revision() -> None:
    supervisor = Clinician("t1", "sup1", "site-a", None, "https://sup.example/h")
    assert (rules.route_escalation(alert(revision=1), supervisor, email_enabled=False)
            == rules.route_escalation(alert(revision=3), supervisor, email_enabled=False))


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    full = [rules.backoff_seconds(n, 1.0, 300.0, jitter=0.999999) for n in range(1, 11)]
    assert [round(x) for x in full] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    low = [rules.backoff_seconds(n, 1.0, 300.0, jitter=0.0) for n in range(1, 4)]
    assert low == [0.5, 1.0, 2.0]


@given(st.integers(min_value=1, max_value=10_000), st.floats(min_value=0, max_value=1))
def test_backoff_stays_within_half_and_full_capped_delay(n: int, jitter: float) -> None:
    d = rules.backoff_seconds(n, 0.05, 2.0, jitter)
    cap = min(2.0, 0.05 * 2 ** min(n - 1, 64))
    assert cap / 2 <= d <= cap


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        rules.backoff_seconds(0, 1.0, 300.0, 0.5)


def test_final_after_max_attempts() -> None:
    assert not rules.is_final(7, 8)
    assert rules.is_final(8, 8)


def test_email_text_has_pseudonym_totals_triggers_and_link_only() -> None:
    subject, body = rules.email_text(alert(client="cl/7 x"), "http://127.0.0.1:8004/dashboard")
    assert "cl/7 x" in subject
    assert "Total: 30.5 (cutoff 36)" in body
    assert "Previous total: 37; change: -6.5" in body
    assert "Triggers: below_cutoff, drop_from_previous" in body
    assert "Trajectory: http://127.0.0.1:8004/dashboard?client=cl%2F7+x&instrument=SRS" in body
    assert "site-a" not in body and "s1" not in body.split()  # no site, no submission id


def test_a_revised_alert_email_says_it_replaces_the_earlier_one() -> None:
    subject, body = rules.email_text(alert(revision=2), "http://x/d")
    assert subject.startswith("Revised alliance alert")
    assert "revision 2" in body and "replaces the earlier one" in body


def test_withdrawal_email_says_a_correction_cleared_the_alert_and_names_no_site() -> None:
    subject, body = rules.withdrawal_email_text(status("withdrawn"), "http://127.0.0.1:8004/dashboard")
    assert subject == "Alliance alert withdrawn for client client-7"
    assert "withdrawn" in body and "correction" in body and "cleared" in body
    assert "Client: client-7" in body and "Instrument: SRS, session 4" in body
    assert "Trajectory: http://127.0.0.1:8004/dashboard?client=client-7&instrument=SRS" in body
    assert "site-a" not in body


def test_escalation_email_says_it_is_escalated() -> None:
    subject, body = rules.email_text(alert(), "http://x/d", escalation=True)
    assert subject.startswith("Escalated")
    assert "has not been acknowledged" in body


@pytest.mark.parametrize(("url", "problem"), [
    ("ftp://example.org/x", "only http and https URLs are allowed"),
    ("file:///etc/passwd", "only http and https URLs are allowed"),
    ("https://", "the URL has no host"),
    ("https://user:pw@example.org/", "credentials in the URL are not allowed"),
    ("http://example.org:99999/", "not a valid URL"),
    ("https://example.org/hook", None),
    ("http://127.0.0.1:8080/x", None),  # syntax is fine; the address check is separate
])
def test_url_problem(url: str, problem: str | None) -> None:
    assert rules.url_problem(url) == problem


@pytest.mark.parametrize(("address", "public"), [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("0.0.0.0", False), ("100.64.0.1", False), ("::1", False), ("fe80::1%eth0", False),
    ("fd00::1", False), ("::ffff:127.0.0.1", False), ("224.0.0.1", False),
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
])
def test_is_public_address(address: str, public: bool) -> None:
    assert rules.is_public_address(address) is public


def test_escalation_thresholds_use_overrides_then_default() -> None:
    pairs = rules.due_for_escalation_filter(1000.0, 100.0, {"fast": 1.0})
    assert pairs == [("fast", 999.0), (None, 900.0)]


def test_status_event_id_is_stable_per_alert_and_status() -> None:
    a = rules.status_changed("t1", "a1", "s", "c", "acknowledged", NOW)
    b = rules.status_changed("t1", "a1", "s", "c", "acknowledged", datetime.now(UTC))
    c = rules.status_changed("t1", "a1", "s", "c", "escalated", NOW)
    assert a.event_id == b.event_id != c.event_id
    assert a.event_id == ids.alert_status_event_id("t1", "a1", "acknowledged")
    assert a.revision is None  # what alerts did holds for every revision


# ---- alerts that reach no clinician: the site's fallback ----------------------------------------


def fallback(cid: str = "duty", site: str = "site-a", tenant: str = "t1", webhook: str | None = "https://duty.example/h",
             email: str | None = "duty@example.org", supervisor: str | None = None) -> Clinician:
    return Clinician(tenant, cid, site, email, webhook, supervisor, fallback=True)


def people(planned: list[rules.PlannedDelivery]) -> list[tuple[str, str, str | None]]:
    return [(p.recipient, p.channel, p.routed_reason) for p in planned if not p.recipient.startswith("subscription:")]


@pytest.mark.parametrize(("entry", "email_enabled", "reason"), [
    (None, True, "no_directory_entry"),
    (Clinician("t1", "c1", "site-b", "c1@example.org", "https://c1.example/hook"), True, "other_site"),
    (Clinician("t2", "c1", "site-a", "c1@example.org", "https://c1.example/hook"), True, "no_directory_entry"),
    (Clinician("t1", "c2", "site-a", "c1@example.org", "https://c1.example/hook"), True, "no_directory_entry"),
    (Clinician("t1", "c1", "site-a", None, None), True, "no_channel"),
    (Clinician("t1", "c1", "site-a", "c1@example.org", None), False, "no_channel"),
])
def test_why_a_clinician_cannot_be_reached(entry: Clinician | None, email_enabled: bool, reason: str) -> None:
    assert rules.unrouted_reason(entry, "t1", "site-a", "c1", email_enabled) == reason


@pytest.mark.parametrize(("entry", "email_enabled"), [
    (Clinician("t1", "c1", "site-a", None, "https://c1.example/hook"), False),
    (Clinician("t1", "c1", "site-a", "c1@example.org", None), True),
])
def test_a_clinician_with_one_usable_channel_is_reached(entry: Clinician, email_enabled: bool) -> None:
    assert rules.unrouted_reason(entry, "t1", "site-a", "c1", email_enabled) is None


def test_an_alert_naming_an_alias_of_an_entry_reaches_that_entrys_clinician_under_the_entrys_id() -> None:
    routing, planned = rules.plan_alert(alert(clinician="c-1x"), replace(clinician(), alias="c-1x"), [], True,
                                        [fallback()])
    assert routing == rules.Routing("clinician")
    assert {p.recipient for p in planned} == {"clinician:c1"}


def test_an_alias_of_an_entry_of_another_site_reaches_nobody_there_but_the_alerts_sites_fallback() -> None:
    routing, _ = rules.plan_alert(alert(clinician="c-1x", site="site-a"),
                                  replace(clinician(site="site-b"), alias="c-1x"), [], True, [fallback()])
    assert routing == rules.Routing("fallback", "other_site", ("duty",))


def test_an_entry_found_under_another_alias_is_not_the_alerts_clinician() -> None:
    assert rules.unrouted_reason(replace(clinician(), alias="c-other"), "t1", "site-a", "c-1x",
                                 True) == "no_directory_entry"


def test_an_alert_whose_clinician_is_reached_goes_to_no_fallback() -> None:
    routing, planned = rules.plan_alert(alert(), clinician(), [], True, [fallback()])
    assert routing == rules.Routing("clinician")
    assert {p.recipient for p in planned} == {"clinician:c1"}
    assert all(p.routed_reason is None for p in planned)


def test_an_alert_for_a_clinician_missing_from_the_directory_goes_to_the_sites_fallbacks_with_the_reason() -> None:
    routing, planned = rules.plan_alert(alert(clinician="c-typo"), None, [sub("p1")], True,
                                        [fallback("lead"), fallback("duty")])
    assert routing == rules.Routing("fallback", "no_directory_entry", ("duty", "lead"))
    assert people(planned) == [("fallback:duty", "webhook", "no_directory_entry"),
                               ("fallback:duty", "email", "no_directory_entry"),
                               ("fallback:lead", "webhook", "no_directory_entry"),
                               ("fallback:lead", "email", "no_directory_entry")]
    assert [p.recipient for p in planned if p.recipient.startswith("subscription:")] == ["subscription:p1"]


def test_a_clinician_entry_of_another_site_sends_the_alert_to_the_alerts_sites_fallback_not_the_entrys() -> None:
    routing, planned = rules.plan_alert(alert(site="site-a"), clinician(site="site-b"), [], True,
                                        [fallback("duty-a", site="site-a"), fallback("duty-b", site="site-b")])
    assert routing == rules.Routing("fallback", "other_site", ("duty-a",))
    assert {p.recipient for p in planned} == {"fallback:duty-a"}


def test_a_fallback_of_another_site_or_tenant_or_an_entry_not_marked_fallback_gets_nothing() -> None:
    others = [fallback("b", site="site-b"), fallback("t2", tenant="t2"),
              Clinician("t1", "plain", "site-a", "p@example.org", "https://plain.example/h")]
    routing, planned = rules.plan_alert(alert(), None, [sub("p1")], True, others)
    assert routing == rules.Routing("none", "no_directory_entry")
    assert [p.recipient for p in planned] == ["subscription:p1"]  # a partner is not a person


def test_a_fallback_without_a_usable_channel_leaves_the_alert_reaching_nobody() -> None:
    routing, planned = rules.plan_alert(alert(), None, [], False, [fallback(webhook=None)])
    assert (routing.to, planned) == ("none", [])


def test_a_fallbacks_delivery_ids_are_deterministic_per_revision_and_distinct_from_its_own_as_a_clinician() -> None:
    a = alert(clinician="duty")
    as_fallback = rules.route_alert(alert(clinician="ghost"), None, [], True, [fallback()])
    as_clinician = rules.route_alert(a, fallback(), [], True)
    assert [p.delivery_id for p in as_fallback] == [ids.delivery_id(a.alert_id, "fallback:duty", c)
                                                    for c in ("webhook", "email")]
    assert not {p.delivery_id for p in as_fallback} & {p.delivery_id for p in as_clinician}
    assert as_fallback == rules.route_alert(alert(clinician="ghost"), None, [], True, [fallback()])
    revised = rules.route_alert(alert(clinician="ghost", revision=2), None, [], True, [fallback()])
    assert not {p.delivery_id for p in as_fallback} & {p.delivery_id for p in revised}


def test_a_withdrawal_of_an_alert_whose_clinician_cannot_be_reached_goes_to_the_sites_fallbacks() -> None:
    planned = rules.route_status(status("withdrawn"), None, [], True, fallbacks=[fallback(), fallback("b", "site-b")])
    assert people(planned) == [("fallback:duty", "webhook", "no_directory_entry"),
                               ("fallback:duty", "email", "no_directory_entry")]
    assert {p.kind for p in planned} == {"withdrawal"}


def test_a_withdrawal_reaching_its_clinician_and_a_supersession_go_to_no_fallback() -> None:
    assert people(rules.route_status(status("withdrawn"), clinician(), [], True, fallbacks=[fallback()])) == [
        ("clinician:c1", "webhook", None), ("clinician:c1", "email", None)]
    assert rules.route_status(status("superseded"), None, [], True, fallbacks=[fallback()]) == []


def test_escalation_goes_to_the_clinicians_supervisor_else_to_the_first_told_fallback_naming_one() -> None:
    assert rules.escalation_supervisor(clinician(), [fallback(supervisor="boss")]) == "sup1"
    told = [fallback("z", supervisor="boss-z"), fallback("a"), fallback("m", supervisor="boss-m")]
    assert rules.escalation_supervisor(None, told) == "boss-m"
    assert rules.escalation_supervisor(None, [fallback("a")]) is None
    assert rules.escalation_supervisor(None, []) is None


def test_an_alert_reaching_nobody_is_told_failed_with_the_reason_and_no_channel_under_its_own_id() -> None:
    a = alert(revision=2)
    event = rules.unrouted_status(a, "other_site", NOW)
    assert (event.status, event.revision, event.channel, event.routing_reason) == ("failed", 2, None, "other_site")
    assert event.event_id == ids.alert_status_event_id("t1", a.alert_id, "failed", 2)
    assert event.event_id != rules.delivery_status(a, "failed", "webhook", NOW).event_id
    assert '"routing_reason":"other_site"' in event.model_dump_json() and '"channel"' not in event.model_dump_json()


def test_a_status_without_a_reason_serialises_as_before() -> None:
    assert '"routing_reason"' not in status("withdrawn").model_dump_json()


def test_a_fallbacks_email_says_whose_alert_it_is_and_why_it_came_to_them() -> None:
    _, text = rules.email_text(alert(clinician="c-17x"), "https://dash.example/dashboard",
                               routed_reason="no_directory_entry")
    assert "site's fallback: clinician c-17x has no directory entry" in text
    assert "reason: no_directory_entry" in text and "site-a" not in text
    _, plain = rules.email_text(alert(), "https://dash.example/dashboard")
    assert "fallback" not in plain
