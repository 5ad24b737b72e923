"""The simulator's sender against a scripted HTTP transport (the real intake is in tests/integration)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx

from tools.simulate import Mix, PlannedSubmission, plan, send

NOW = datetime.now(UTC)


def fake_intake(seen: list[tuple[str, str, dict[str, Any]]], throttle_first: int = 0) -> httpx.MockTransport:
    """Accepts valid-looking bodies (invalid ones carry a planner-made defect we can spot by id)."""
    calls = Counter[str]()

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        key = request.headers["authorization"]
        seen.append((request.url.path, key, body))
        calls[request.url.path] += 1
        if calls[request.url.path] <= throttle_first:
            return httpx.Response(429, headers={"Retry-After": "0.05"}, json={"errors": []})
        if request.url.path == "/v1/submissions/batch":
            results = [{"index": i, "submission_id": s.get("submission_id"),
                        "status": "rejected" if s.get("_bad") else "accepted", "errors": []}
                       for i, s in enumerate(body["submissions"])]
            return httpx.Response(200, json={"results": results})
        if body.get("_bad"):
            return httpx.Response(422, json={"errors": [{"field": "x", "message": "bad"}]})
        return httpx.Response(202, json={"submission_id": body.get("submission_id"), "status": "accepted"})

    return httpx.MockTransport(handler)


def marked(planned: list[PlannedSubmission]) -> list[PlannedSubmission]:
    """Mark invalid bodies so the fake intake can reject exactly those."""
    for p in planned:
        if not p.valid:
            p.body["_bad"] = True
    return planned


async def test_send_counts_accepted_rejected_duplicates_and_late() -> None:
    planned = marked(plan(2, 2, 4, 30, 600, seed=5, now=NOW))
    seen: list[tuple[str, str, dict[str, Any]]] = []
    stats = await send(planned, "http://intake", ["k0", "k1"], rate=100_000, duration=60,
                       transport=fake_intake(seen))
    kinds = Counter(p.kind for p in planned)
    assert stats.sent == 600
    assert stats.accepted == 600 - kinds["invalid"]
    assert sum(stats.rejected.values()) == kinds["invalid"]
    assert stats.duplicates == kinds["duplicate"] and stats.late == kinds["late"]
    assert stats.unexpected == 0


async def test_send_uses_each_tenants_own_key_and_the_batch_endpoint_for_batches() -> None:
    planned = marked(plan(2, 2, 4, 30, 600, seed=5, now=NOW))
    seen: list[tuple[str, str, dict[str, Any]]] = []
    await send(planned, "http://intake", ["k0", "k1"], rate=100_000, duration=60, transport=fake_intake(seen))
    tenant_of = {p.submission_id: p.tenant for p in planned}
    batches = [b for path, _, b in seen if path == "/v1/submissions/batch"]
    assert batches
    for path, key, body in seen:
        subs: list[dict[str, Any]] = body["submissions"] if path.endswith("/batch") else [body]
        for s in subs:
            sid = s.get("submission_id")
            if sid in tenant_of:
                assert key == f"Bearer k{tenant_of[sid]}"


async def test_send_retries_throttled_requests_with_the_same_submission() -> None:
    planned = plan(1, 1, 1, 5, 1, seed=1, now=NOW, mix=Mix(duplicate=0, late=0, invalid=0, batch_steps=0))
    seen: list[tuple[str, str, dict[str, Any]]] = []
    stats = await send(planned, "http://intake", ["k"], rate=1000, duration=30,
                       transport=fake_intake(seen, throttle_first=2))
    assert stats.retried == 2
    assert stats.accepted == 1 and stats.accepted_ids == {planned[0].submission_id}
    assert [b["submission_id"] for _, _, b in seen] == [planned[0].submission_id] * 3


async def test_send_stops_by_itself_after_the_duration() -> None:
    planned = plan(1, 1, 1, 5, 10_000, seed=1, now=NOW)
    seen: list[tuple[str, str, dict[str, Any]]] = []
    stats = await send(planned, "http://intake", ["k"], rate=200, duration=0.5, transport=fake_intake(seen))
    assert 0 < stats.sent < 10_000
