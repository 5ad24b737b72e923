"""The alerts API's commands (services/alerts/service.py) on an in-memory store and publisher:
who may put a directory entry, what acknowledging publishes, what may be requeued (the HTTP
mapping is tested through the API in tests/integration/test_alerts_*.py and tests/security)."""

from __future__ import annotations

import pytest

from services.alerts.rules import Clinician
from services.alerts.service import AlertsCommands, Invalid, NotFound, NotPublished, SiteForbidden
from shared import ids
from shared.auth import Principal
from shared.events import AlertStatusChanged
from shared.mongo import Document
from shared.topics import Topics
from tests.support.fakes import MemoryAlertsStore, Sink

TOPICS = Topics("u.")
TENANT = "acme"
ADMIN = Principal("k-admin", TENANT, "admin")
NORTH_ONLY = Principal("k-north", TENANT, "admin", site_id="north")


class Wired:
    def __init__(self) -> None:
        self.store = MemoryAlertsStore()
        self.sink = Sink()
        self.wakeups = 0
        self.commands = AlertsCommands(self.store, self.sink, TOPICS, self._wake, allow_private_targets=True)

    def _wake(self) -> None:
        self.wakeups += 1


def entry(site: str = "north", supervisor: str | None = None, webhook: str | None = None) -> Clinician:
    return Clinician(TENANT, "c-1", site, "c1@clinic.example", webhook, supervisor)


def alert(status: str = "open", site: str = "north") -> Document:
    return {"_id": "a-1", "tenant_id": TENANT, "site_id": site, "clinician_id": "c-1", "client_id": "x",
            "status": status, "acknowledged_at": None, "correlation_id": "corr-1"}


def failed_delivery(site: str = "north", status: str = "failed") -> Document:
    return {"_id": "d-1", "tenant_id": TENANT, "site_id": site, "status": status, "attempts": 8}


# --- put a clinician ------------------------------------------------------------------------------


async def test_a_new_entry_is_created_and_a_second_put_replaces_it() -> None:
    w = Wired()
    assert await w.commands.put_clinician(ADMIN, entry()) is True
    assert await w.commands.put_clinician(ADMIN, entry(webhook="https://clinic.example/h")) is False
    assert w.store.clinicians[(TENANT, "c-1")].webhook_url == "https://clinic.example/h"


async def test_a_site_bound_key_may_not_move_an_entry_out_of_its_site_nor_take_one_from_another() -> None:
    w = Wired()
    with pytest.raises(SiteForbidden):
        await w.commands.put_clinician(NORTH_ONLY, entry(site="south"))
    await w.commands.put_clinician(ADMIN, entry(site="south"))
    with pytest.raises(SiteForbidden):
        await w.commands.put_clinician(NORTH_ONLY, entry(site="north"))
    assert w.store.clinicians[(TENANT, "c-1")].site_id == "south"


async def test_a_clinician_cannot_supervise_themselves() -> None:
    w = Wired()
    with pytest.raises(Invalid) as refused:
        await w.commands.put_clinician(ADMIN, entry(supervisor="c-1"))
    assert refused.value.field == "supervisor_id" and w.store.clinicians == {}


async def test_a_webhook_on_a_private_address_is_refused_unless_allowed() -> None:
    w = Wired()
    w.commands.allow_private_targets = False
    with pytest.raises(Invalid) as refused:
        await w.commands.put_clinician(ADMIN, entry(webhook="http://127.0.0.1/hook"))
    assert refused.value.field == "webhook_url"


# --- acknowledge ----------------------------------------------------------------------------------


async def test_acknowledging_marks_the_alert_and_publishes_acknowledged_keyed_by_client() -> None:
    w = Wired()
    w.store.alerts["a-1"] = alert()
    doc = await w.commands.acknowledge(ADMIN, "a-1")
    assert doc["status"] == "acknowledged" and doc["acknowledged_by"] == "k-admin"
    (record,) = w.sink.published
    event = AlertStatusChanged.model_validate_json(record.value)
    assert (record.topic, record.key, record.correlation_id) == (
        TOPICS.alert_status, ids.partition_key(TENANT, "x"), "corr-1")
    assert event.status == "acknowledged" and event.event_id == ids.alert_status_event_id(TENANT, "a-1", "acknowledged")


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
    assert (await w.commands.acknowledge(ADMIN, "a-1"))["status"] == "withdrawn"
    assert w.sink.published == []


async def test_another_sites_alert_is_not_found_but_seen_for_the_audit() -> None:
    w = Wired()
    w.store.alerts["a-1"] = alert(site="south")
    seen: list[Document | None] = []
    with pytest.raises(NotFound):
        await w.commands.acknowledge(NORTH_ONLY, "a-1", seen=seen.append)
    assert [d["_id"] for d in seen if d is not None] == ["a-1"] and w.store.alerts["a-1"]["status"] == "open"


async def test_an_unpublished_acknowledgement_is_kept_and_reported() -> None:
    w = Wired()
    w.store.alerts["a-1"] = alert()
    w.sink.fail_next = 1
    with pytest.raises(NotPublished):
        await w.commands.acknowledge(ADMIN, "a-1")
    assert w.store.alerts["a-1"]["status"] == "acknowledged"


# --- requeue --------------------------------------------------------------------------------------


async def test_a_failed_delivery_is_requeued_and_the_worker_woken() -> None:
    w = Wired()
    w.store.deliveries["d-1"] = failed_delivery()
    doc = await w.commands.requeue(ADMIN, "d-1")
    assert (doc["status"], doc["attempts"], w.wakeups) == ("pending", 0, 1)


@pytest.mark.parametrize(("who", "delivery"), [
    (ADMIN, failed_delivery(status="delivered")),
    (NORTH_ONLY, failed_delivery(site="south")),
])
async def test_only_a_failed_delivery_of_the_callers_site_may_be_requeued(who: Principal, delivery: Document) -> None:
    w = Wired()
    w.store.deliveries["d-1"] = dict(delivery)
    with pytest.raises(NotFound):
        await w.commands.requeue(who, "d-1")
    assert w.store.deliveries["d-1"]["status"] == delivery["status"] and w.wakeups == 0

