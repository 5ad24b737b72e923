"""The delivery worker's round trips to the store: a claim that got every delivery it read hands out
the documents it read, and a recorded outcome is told from what the worker knows it wrote (issue 11:
the store's operations per delivery). Against the real store, so what is compared is what it holds.
"""
# ruff: noqa: F811

from __future__ import annotations

from datetime import timedelta

from services.alerts.handlers import delivery_doc
from services.alerts.rules import PlannedDelivery
from services.alerts.store import OWED_AT, AlertsStore, AttemptResult, utcnow
from services.alerts.worker import recorded_doc

# The `store` fixture (an AlertsStore of its own per test); the tests' parameters name it.
from tests.integration.test_alerts_outcome import store  # noqa: F401

LEASE = timedelta(seconds=30)


def planned(n: int) -> PlannedDelivery:
    return PlannedDelivery(delivery_id=f"d{n}", kind="alert", tenant_id="t1", site_id="s1", subject_id=f"a{n}",
                           alert_id=f"a{n}", topic="alliance.deterioration.v1", recipient="clinician:c1",
                           channel="webhook", target="https://example.org/hook", subscription_id=None)


async def scheduled(store: AlertsStore, count: int, ago: timedelta = timedelta(seconds=1)) -> list[str]:
    now = utcnow() - ago
    docs = [delivery_doc(planned(n), '{"body": 1}', now, f"corr-{n}", None, now) for n in range(count)]
    await store.insert_deliveries(docs)
    return [str(d["_id"]) for d in docs]


async def test_a_claim_that_gets_every_delivery_it_read_hands_out_what_the_store_now_holds(store: AlertsStore) -> None:
    ids = await scheduled(store, 3)
    now = utcnow()
    read = {str(d["_id"]): d for d in await store.due_documents(now, 10)}
    claimed = await store.claim(now, ids, LEASE, "w1", read)
    stored = {d["_id"]: d for d in await store.deliveries.find({"_id": {"$in": ids}}).to_list()}
    assert {d["_id"]: d for d in claimed} == stored


async def test_a_claim_hands_out_only_what_it_got_when_another_worker_claimed_one_first(store: AlertsStore) -> None:
    ids = await scheduled(store, 3)
    now = utcnow()
    read = {str(d["_id"]): d for d in await store.due_documents(now, 10)}
    await store.claim(now, ids[:1], LEASE, "other")
    claimed = await store.claim(now, ids, LEASE, "w1", read)
    assert sorted(d["_id"] for d in claimed) == ids[1:]
    assert {d["claimed_by"] for d in claimed} == {"w1"}


async def test_a_claim_hands_out_what_the_store_holds_when_an_expired_leases_holder_recorded_since_the_read(
        store: AlertsStore) -> None:
    """A worker whose lease ran out may still record its attempt (a retry is recorded by the claim
    token, not the lease): between another worker's read and its claim, that changes the delivery."""
    [i] = await scheduled(store, 1, ago=timedelta(minutes=2))
    now = utcnow()
    [late] = await store.claim(now - 2 * LEASE, [i], LEASE, "late")  # its lease ended 30 s ago
    read = {str(d["_id"]): d for d in await store.due_documents(now, 10)}
    await store.record([AttemptResult(i, str(late["claim"]), "retry", 1, error="timeout", last_outcome="timeout",
                                      next_attempt_at=now - timedelta(seconds=1))])
    [claimed] = await store.claim(now, [i], LEASE, "w1", read)
    assert claimed == await store.deliveries.find_one({"_id": i})


async def test_the_document_a_recorded_delivery_is_told_from_is_what_the_store_holds(store: AlertsStore) -> None:
    [i] = await scheduled(store, 1)
    now = utcnow()
    [d] = await store.claim(now, [i], LEASE, "w1", {str(x["_id"]): x for x in await store.due_documents(now, 10)})
    result = AttemptResult(i, str(d["claim"]), "delivered", 1, response_status=204, last_outcome="2xx",
                           tells_status=True)
    at = await store.record([result])
    assert at is not None
    told = recorded_doc(d, result, at)
    assert {k: v for k, v in told.items() if k != OWED_AT} == await store.deliveries.find_one({"_id": i})
    assert await store.outbox.find_one({"_id": i}) == {"_id": i, "finished_at": told[OWED_AT]}


async def test_recording_an_outcome_another_worker_recorded_first_says_the_caller_cannot_know_the_document(
        store: AlertsStore) -> None:
    [i] = await scheduled(store, 1)
    now = utcnow()
    [d] = await store.claim(now, [i], LEASE, "w1")
    delivered = AttemptResult(i, str(d["claim"]), "delivered", 1, response_status=204, last_outcome="2xx",
                              tells_status=True)
    assert await store.record([delivered]) is not None
    assert await store.record([delivered]) is None
