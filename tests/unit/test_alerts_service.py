"""The alerts API's commands (services/alerts/service.py) on an in-memory store and publisher:
who may put a directory entry, what acknowledging publishes, what may be requeued, who may change
the tenant-wide settings (subscriptions, the signing secret, the escalation interval) and how (the
HTTP mapping is tested through the API in tests/integration/test_alerts_*.py and tests/security)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.alerts import service
from services.alerts.rules import Clinician
from services.alerts.secretbox import SecretBox, subscription_row
from services.alerts.service import AlertsCommands
from services.alerts.settings import AlertsSettings
from services.alerts.store import Alert
from shared import ids
from shared.auth import Principal
from shared.events import AlertState, AlertStatus, AlertStatusChanged
from shared.mongo import Document
from tests.support.fakes import TOPICS, MemoryAlertsStore, Sink

TENANT = "acme"
ADMIN = Principal("k-admin", TENANT, "admin")
NORTH_ONLY = Principal("k-north", TENANT, "admin", site_id="north")


CREATED = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
KEYRING = [("k1", bytes(range(32)))]


class Wired:
    def __init__(self, max_subscriptions: int = 20) -> None:
        self.store = MemoryAlertsStore()
        self.sink = Sink()
        self.wakeups = 0
        self.forgotten: list[str] = []
        settings = AlertsSettings(max_subscriptions_per_tenant=max_subscriptions, escalation_seconds=3600.0,
                                  secret_rotation_grace_seconds=600.0)
        self.box = SecretBox(KEYRING)
        self.commands = AlertsCommands(self.store, self.sink, TOPICS, self._wake, allow_private_targets=True,
                                       settings=settings, box=self.box, forget_secret=self.forgotten.append)

    def _wake(self) -> None:
        self.wakeups += 1


def entry(site: str = "north", supervisor: str | None = None, webhook: str | None = None) -> Clinician:
    return Clinician(TENANT, "c-1", site, "c1@clinic.example", webhook, supervisor)


def alert(status: str = "open", site: str = "north") -> Document:
    return {"_id": "a-1", "tenant_id": TENANT, "site_id": site, "clinician_id": "c-1", "client_id": "x",
            "status": status, "acknowledged_at": None, "correlation_id": "corr-1", "created_at": CREATED,
            "escalated": False}


def failed_delivery(site: str = "north", status: str = "failed") -> Document:
    return {"_id": "d-1", "kind": "alert", "tenant_id": TENANT, "site_id": site, "subject_id": "a-1",
            "alert_id": "a-1", "topic": "alliance.deterioration.v1", "recipient": "clinician:c-1",
            "channel": "webhook", "target": "https://clinic.example/h", "status": status, "attempts": 8,
            "created_at": CREATED}


# --- put a clinician ------------------------------------------------------------------------------


async def test_a_new_entry_is_created_and_a_second_put_replaces_it() -> None:
    w = Wired()
    w.store.webhook_secrets[TENANT] = "sealed"
    assert await w.commands.put_clinician(ADMIN, entry()) is True
    assert await w.commands.put_clinician(ADMIN, entry(webhook="https://clinic.example/h")) is False
    assert w.store.clinicians[(TENANT, "c-1")].webhook_url == "https://clinic.example/h"


async def test_a_put_entry_is_looked_at_for_stranded_alerts_at_once() -> None:
    w = Wired()
    looked: list[tuple[str, str]] = []

    async def reroute(tenant_id: str, clinician_id: str) -> int:
        looked.append((tenant_id, clinician_id))
        return 1
    w.commands.reroute = reroute
    await w.commands.put_clinician(ADMIN, entry())
    assert looked == [(TENANT, "c-1")]


async def test_a_failed_look_for_stranded_alerts_does_not_fail_the_put_it_only_comes_later() -> None:
    w = Wired()

    async def reroute(tenant_id: str, clinician_id: str) -> int:
        raise ConnectionError("store away")
    w.commands.reroute = reroute
    assert await w.commands.put_clinician(ADMIN, entry()) is True
    assert w.store.clinicians[(TENANT, "c-1")].site_id == "north"


async def test_a_refused_put_looks_at_nothing() -> None:
    w = Wired()
    looked: list[str] = []

    async def reroute(tenant_id: str, clinician_id: str) -> int:
        looked.append(clinician_id)
        return 0
    w.commands.reroute = reroute
    with pytest.raises(service.SiteForbidden):
        await w.commands.put_clinician(NORTH_ONLY, entry(site="south"))
    assert looked == []


async def test_a_site_bound_key_may_not_move_an_entry_out_of_its_site_nor_take_one_from_another() -> None:
    w = Wired()
    with pytest.raises(service.SiteForbidden):
        await w.commands.put_clinician(NORTH_ONLY, entry(site="south"))
    await w.commands.put_clinician(ADMIN, entry(site="south"))
    with pytest.raises(service.SiteForbidden):
        await w.commands.put_clinician(NORTH_ONLY, entry(site="north"))
    assert w.store.clinicians[(TENANT, "c-1")].site_id == "south"


async def test_a_clinician_cannot_supervise_themselves() -> None:
    w = Wired()
    with pytest.raises(service.Invalid) as refused:
        await w.commands.put_clinician(ADMIN, entry(supervisor="c-1"))
    assert refused.value.field == "supervisor_id" and w.store.clinicians == {}


async def test_a_webhook_on_a_private_address_is_refused_unless_allowed() -> None:
    w = Wired()
    w.commands.allow_private_targets = False
    with pytest.raises(service.Invalid) as refused:
        await w.commands.put_clinician(ADMIN, entry(webhook="http://127.0.0.1/hook"))
    assert refused.value.field == "webhook_url"


async def test_a_webhook_is_refused_while_the_tenant_has_no_signing_secret() -> None:
    w = Wired()
    with pytest.raises(service.NoSigningSecret) as refused:
        await w.commands.put_clinician(ADMIN, entry(webhook="https://clinic.example/h"))
    assert "POST /v1/webhook-secret" in refused.value.message and w.store.clinicians == {}


async def test_an_entry_without_a_webhook_needs_no_signing_secret() -> None:
    w = Wired()
    assert await w.commands.put_clinician(ADMIN, entry()) is True


# --- acknowledge ----------------------------------------------------------------------------------


async def test_acknowledging_marks_the_alert_and_publishes_acknowledged_keyed_by_client() -> None:
    w = Wired()
    w.store.alerts["a-1"] = alert()
    acknowledged = await w.commands.acknowledge(ADMIN, "a-1")
    assert acknowledged.status == AlertState.ACKNOWLEDGED and acknowledged.acknowledged_by == "k-admin"
    (record,) = w.sink.published
    event = AlertStatusChanged.model_validate_json(record.value)
    assert (record.topic, record.key, record.correlation_id) == (
        TOPICS.alert_status, ids.partition_key(TENANT, "x"), "corr-1")
    assert event.status == AlertStatus.ACKNOWLEDGED
    assert event.event_id == ids.alert_status_event_id(TENANT, "a-1", "acknowledged")


async def test_acknowledging_again_publishes_the_same_event_again() -> None:
    w = Wired()
    w.store.alerts["a-1"] = alert()
    await w.commands.acknowledge(ADMIN, "a-1")
    await w.commands.acknowledge(ADMIN, "a-1")
    first, again = w.sink.published
    assert first.value == again.value


async def test_a_withdrawn_alert_is_answered_as_it_is_and_nothing_is_published() -> None:
    w = Wired()
    w.store.alerts["a-1"] = alert(status="withdrawn")
    assert (await w.commands.acknowledge(ADMIN, "a-1")).status == AlertState.WITHDRAWN
    assert w.sink.published == []


async def test_another_sites_alert_is_not_found_but_seen_for_the_audit() -> None:
    w = Wired()
    w.store.alerts["a-1"] = alert(site="south")
    seen: list[Alert | None] = []
    with pytest.raises(service.NotFound):
        await w.commands.acknowledge(NORTH_ONLY, "a-1", seen=seen.append)
    assert [a.alert_id for a in seen if a is not None] == ["a-1"] and w.store.alerts["a-1"]["status"] == "open"


async def test_an_unpublished_acknowledgement_is_kept_and_reported() -> None:
    w = Wired()
    w.store.alerts["a-1"] = alert()
    w.sink.fail_next = 1
    with pytest.raises(service.NotPublished):
        await w.commands.acknowledge(ADMIN, "a-1")
    assert w.store.alerts["a-1"]["status"] == "acknowledged"


# --- requeue --------------------------------------------------------------------------------------


async def test_a_failed_delivery_is_requeued_and_the_worker_woken() -> None:
    w = Wired()
    w.store.deliveries["d-1"] = failed_delivery()
    requeued = await w.commands.requeue(ADMIN, "d-1")
    assert (requeued.status, requeued.attempts, w.wakeups) == ("pending", 0, 1)


@pytest.mark.parametrize(("who", "delivery"), [
    (ADMIN, failed_delivery(status="delivered")),
    (NORTH_ONLY, failed_delivery(site="south")),
])
async def test_only_a_failed_delivery_of_the_callers_site_may_be_requeued(who: Principal, delivery: Document) -> None:
    w = Wired()
    w.store.deliveries["d-1"] = dict(delivery)
    with pytest.raises(service.NotFound):
        await w.commands.requeue(who, "d-1")
    assert w.store.deliveries["d-1"]["status"] == delivery["status"] and w.wakeups == 0



# --- tenant-wide settings -------------------------------------------------------------------------


async def test_a_subscription_is_created_with_a_secret_sealed_to_its_row_and_its_topics_in_order() -> None:
    w = Wired()
    new = await w.commands.create_subscription(ADMIN, "https://partner.example/h",
                                               ["srs.scored.v1", "alliance.deterioration.v1", "srs.scored.v1"])
    tenant, row, sealed = w.store.subscription_rows[new.subscription.subscription_id]
    assert (tenant, row.events) == (TENANT, ("alliance.deterioration.v1", "srs.scored.v1"))
    assert new.secret.startswith("whsec_") and new.secret not in sealed
    assert w.box.open(sealed, subscription_row(TENANT, row.subscription_id)) == new.secret


async def test_a_subscription_beyond_the_tenants_cap_is_refused() -> None:
    w = Wired(max_subscriptions=1)
    await w.commands.create_subscription(ADMIN, "https://partner.example/1", ["srs.scored.v1"])
    with pytest.raises(service.TooManySubscriptions):
        await w.commands.create_subscription(ADMIN, "https://partner.example/2", ["srs.scored.v1"])
    assert len(w.store.subscription_rows) == 1


async def test_a_subscription_to_a_private_address_is_refused_unless_allowed() -> None:
    w = Wired()
    w.commands.allow_private_targets = False
    with pytest.raises(service.Invalid) as refused:
        await w.commands.create_subscription(ADMIN, "http://10.0.0.5/hook", ["srs.scored.v1"])
    assert refused.value.field == "url" and w.store.subscription_rows == {}


async def test_deleting_a_subscription_forgets_its_cached_secret() -> None:
    w = Wired()
    new = await w.commands.create_subscription(ADMIN, "https://partner.example/h", ["srs.scored.v1"])
    await w.commands.delete_subscription(ADMIN, new.subscription.subscription_id)
    assert w.store.subscription_rows == {} and w.forgotten == ["sub:" + new.subscription.subscription_id]


async def test_deleting_an_unknown_subscription_is_not_found() -> None:
    with pytest.raises(service.NotFound):
        await Wired().commands.delete_subscription(ADMIN, "sub-none")


async def test_a_rotated_secret_keeps_the_previous_one_valid_for_the_grace_and_is_forgotten_from_caches() -> None:
    w = Wired()
    first = await w.commands.rotate_webhook_secret(ADMIN)
    second = await w.commands.rotate_webhook_secret(ADMIN)
    assert first.previous_valid_until is None
    assert second.previous_valid_until == w.store.now + timedelta(seconds=600)
    assert first.secret != second.secret and w.forgotten == ["tenant:acme", "tenant:acme"]


async def test_the_escalation_interval_is_the_tenants_own_until_cleared() -> None:
    w = Wired()
    assert (await w.commands.set_escalation(ADMIN, 60.0)).interval_seconds == 60.0
    assert await w.commands.escalation(ADMIN) == await w.commands.set_escalation(ADMIN, 60.0)
    cleared = await w.commands.set_escalation(ADMIN, None)
    assert (cleared.interval_seconds, cleared.default) == (3600.0, True)


@pytest.mark.parametrize("command", ["create", "delete", "rotate", "escalation"])
async def test_a_site_bound_key_may_not_change_tenant_wide_settings(command: str) -> None:
    w = Wired()
    with pytest.raises(service.TenantWideOnly):
        if command == "create":
            await w.commands.create_subscription(NORTH_ONLY, "https://partner.example/h", ["srs.scored.v1"])
        elif command == "delete":
            await w.commands.delete_subscription(NORTH_ONLY, "sub-1")
        elif command == "rotate":
            await w.commands.rotate_webhook_secret(NORTH_ONLY)
        else:
            await w.commands.set_escalation(NORTH_ONLY, 60.0)
    assert (w.store.subscription_rows, w.store.webhook_secrets, w.store.escalations) == ({}, {}, {})
