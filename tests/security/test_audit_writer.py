"""The batching audit writer (`shared.audit.AuditLog`) against a fake collection: when batches go
out, that nothing queued is lost on close, and that a retried batch stores no entry twice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from fastapi import HTTPException
from pymongo.errors import AutoReconnect, BulkWriteError

from shared.audit import AuditFull, AuditLog, Auditor, entry
from shared.auth import Principal
from shared.mongo import DUPLICATE_KEY, Document
from tests.support.wait import eventually


class FakeCollection:
    """Stores entries by `_id` like the store: a known id is refused as a duplicate, the rest written."""

    def __init__(self, fail_calls: int = 0, write_before_failing: bool = False) -> None:
        self.docs: dict[Any, Document] = {}
        self.calls: list[int] = []
        self.fail_calls = fail_calls
        self.write_before_failing = write_before_failing

    async def insert_many(self, documents: Sequence[Document], ordered: bool = True) -> None:
        assert ordered is False
        self.calls.append(len(documents))
        if self.fail_calls > 0:
            self.fail_calls -= 1
            if self.write_before_failing:  # the store wrote them, but the answer was lost
                for d in documents:
                    self.docs[d["_id"]] = d
            raise AutoReconnect("store not answering")
        errors = []
        for i, d in enumerate(documents):
            if d["_id"] in self.docs:
                errors.append({"index": i, "code": DUPLICATE_KEY, "errmsg": "duplicate key"})
            else:
                self.docs[d["_id"]] = d
        if errors:
            raise BulkWriteError({"writeErrors": errors, "nInserted": len(documents) - len(errors)})


def some_entry(n: int = 0) -> Document:
    return entry(tenant_id="t1", key_id="k1", role="read", site=None, service="test", action="trajectory.read",
                 outcome="allowed", client_id=f"c{n}")


def writer(coll: FakeCollection, **kw: Any) -> AuditLog:
    settings: dict[str, Any] = {"flush_interval_seconds": 3600.0, "batch_max_entries": 1000,
                                "queue_max_entries": 10_000, "close_timeout_seconds": 5.0}
    return AuditLog(coll, "test", **{**settings, **kw})


async def test_a_full_batch_is_written_without_waiting_for_the_interval() -> None:
    coll = FakeCollection()
    log = writer(coll, batch_max_entries=3)
    for n in range(3):
        log.append(some_entry(n))
    await eventually(lambda: _async(len(coll.docs) == 3), timeout=10, interval=0.01)
    assert coll.calls == [3]
    await log.close()


async def test_entries_below_a_batch_are_written_after_the_interval() -> None:
    coll = FakeCollection()
    log = writer(coll, flush_interval_seconds=0.05)
    log.append(some_entry())
    await eventually(lambda: _async(len(coll.docs) == 1), timeout=10, interval=0.01)
    await log.close()


async def test_close_writes_every_queued_entry() -> None:
    coll = FakeCollection()
    log = writer(coll, batch_max_entries=4)
    queued = [some_entry(n) for n in range(10)]
    for doc in queued:
        log._queue.append(doc)  # queued without waking the task: only close writes them
    await log.close()
    assert [coll.docs[d["_id"]] for d in queued] == queued
    assert log.pending == 0


async def test_close_retries_a_failing_store_and_loses_nothing() -> None:
    coll = FakeCollection(fail_calls=2)
    log = writer(coll)
    queued = [some_entry(n) for n in range(5)]
    for doc in queued:
        log.append(doc)
    await log.close()
    assert set(coll.docs) == {d["_id"] for d in queued}


async def test_a_batch_retried_after_a_lost_answer_stores_each_entry_once() -> None:
    coll = FakeCollection(fail_calls=1, write_before_failing=True)
    log = writer(coll)
    queued = [some_entry(n) for n in range(4)]
    for doc in queued:
        log.append(doc)
    with pytest.raises(AutoReconnect):
        await log.flush()
    assert log.pending == 4  # not known to be written: kept
    assert await log.flush() == 4  # the retry's duplicates count as written
    assert len(coll.docs) == 4 and log.pending == 0
    await log.close()


async def test_a_full_queue_refuses_the_entry() -> None:
    log = writer(FakeCollection(), queue_max_entries=2)
    log.append(some_entry(1))
    log.append(some_entry(2))
    with pytest.raises(AuditFull):
        log.append(some_entry(3))
    await log.close()


async def test_a_route_answers_503_when_the_trail_is_full() -> None:
    log = writer(FakeCollection(), queue_max_entries=1)
    auditor = Auditor(log, "test", lambda _: _async(None))
    p = Principal("k1", "t1", "read")
    auditor.record(p, "trajectory.read", client_id="c1")
    with pytest.raises(HTTPException) as refused:
        auditor.record(p, "trajectory.read", client_id="c2")
    assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "5"}
    await log.close()


async def test_an_entry_carries_who_what_and_the_outcome() -> None:
    coll = FakeCollection()
    log = writer(coll)
    Auditor(log, "reporting", lambda _: _async(None)).record(
        Principal("k9", "t2", "read", "north"), "fhir.read", "denied", client_id="c7")
    await log.close()
    (doc,) = coll.docs.values()
    assert {k: v for k, v in doc.items() if k not in ("_id", "at")} == {
        "tenant_id": "t2", "key_id": "k9", "role": "read", "site": "north", "service": "reporting",
        "action": "fhir.read", "outcome": "denied", "client_id": "c7"}


async def _async(value: Any) -> Any:
    return value
