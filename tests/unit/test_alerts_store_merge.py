"""How the alerts store reads duplicate-key errors of its guarded lifecycle upserts.

A guarded upsert that collides (E11000) normally means "the alert already holds something at
least as new". The exception is two consumers creating the same alert at once: the loser's
guard would have matched. The store runs colliding ops once more; a second collision is stale.
(The local store serializes writes, so the integration tests cannot produce that race.)
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError

from services.alerts.store import AlertsStore


class FakeAlerts:
    """Answers each bulk_write with the next planned list of (op index, error code)."""

    def __init__(self, *answers: list[tuple[int, int]]) -> None:
        self.answers = list(answers)
        self.calls: list[list[Any]] = []

    async def bulk_write(self, ops: list[Any], ordered: bool = True) -> None:
        self.calls.append(list(ops))
        errors = self.answers.pop(0) if self.answers else []
        if errors:
            raise BulkWriteError({"writeErrors": [{"index": i, "code": c} for i, c in errors],
                                  "writeConcernErrors": [], "nInserted": 0})


def store(alerts: FakeAlerts) -> AlertsStore:
    return AlertsStore(cast(Any, {"clinicians": None, "subscriptions": None, "alert_tenants": None,
                                  "alerts": alerts, "deliveries": None}))


OPS = [UpdateOne({"_id": str(i)}, {"$set": {"x": i}}, upsert=True) for i in range(3)]


async def test_ops_that_collided_are_run_once_more_and_only_they() -> None:
    alerts = FakeAlerts([(1, 11000)], [])
    await store(alerts)._merge(OPS)
    assert alerts.calls == [OPS, [OPS[1]]]


async def test_a_second_collision_is_a_stale_event_and_not_an_error() -> None:
    alerts = FakeAlerts([(0, 11000), (2, 11000)], [(1, 11000)])
    await store(alerts)._merge(OPS)
    assert alerts.calls == [OPS, [OPS[0], OPS[2]]]  # no third try


async def test_any_other_write_error_is_raised() -> None:
    alerts = FakeAlerts([(0, 11000), (1, 121)])
    with pytest.raises(BulkWriteError):
        await store(alerts)._merge(OPS)
