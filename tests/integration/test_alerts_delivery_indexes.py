"""The deliveries' indexes against the real store, which maintains every index on every delivery
write: the schedule's (status, next_attempt_at), the listings' (tenant_id, status, created_at) and
the alert id's, no more. A subscription's delete finds its pending deliveries by the schedule's.
"""
# ruff: noqa: F811

from __future__ import annotations

import uuid

from pymongo import ASCENDING

from services.alerts.store import STATUS_OUTBOX, AlertsStore, utcnow

# The `store` fixture (an AlertsStore of its own per test); the tests' parameters name it.
from tests.integration.test_alerts_outcome import store  # noqa: F401


async def index_names(store: AlertsStore) -> set[str]:
    return {i["name"] async for i in await store.deliveries.list_indexes()}


async def test_the_deliveries_have_the_schedules_the_listings_and_the_alert_ids_indexes(store: AlertsStore) -> None:
    assert await index_names(store) == {"_id_", "status_1_next_attempt_at_1", "tenant_id_1_status_1_created_at_-1",
                                        "alert_id_1"}


async def test_a_start_drops_the_indexes_of_before_and_a_second_start_changes_nothing(store: AlertsStore) -> None:
    old = AlertsStore(store.db.client[f"t_{uuid.uuid4().hex[:10]}"])
    await old.deliveries.create_index([("subscription_id", ASCENDING), ("status", ASCENDING)])
    await old.deliveries.create_index([(STATUS_OUTBOX, ASCENDING)], sparse=True)
    await old.ensure_indexes()
    await old.ensure_indexes()
    assert await index_names(old) == await index_names(store)


async def test_deleting_a_subscription_cancels_its_pending_deliveries_and_no_others(store: AlertsStore) -> None:
    mine = await store.create_subscription("t1", "https://partner.test/a", ["srs.scored.v1"], "sealed")
    other = await store.create_subscription("t1", "https://partner.test/b", ["srs.scored.v1"], "sealed")
    now = utcnow()
    await store.deliveries.insert_many([
        {"_id": "mine-pending", "subscription_id": mine.subscription_id, "status": "pending", "next_attempt_at": now},
        {"_id": "mine-delivered", "subscription_id": mine.subscription_id, "status": "delivered"},
        {"_id": "other-pending", "subscription_id": other.subscription_id, "status": "pending",
         "next_attempt_at": now}])
    assert await store.delete_subscription("t1", mine.subscription_id)
    statuses = {d["_id"]: d["status"] async for d in store.deliveries.find({})}
    assert statuses == {"mine-pending": "cancelled", "mine-delivered": "delivered", "other-pending": "pending"}
