"""The simulator's sender against a scripted HTTP transport (the real intake is in tests/integration),
and its connection pools against a local server that holds each answer for a moment, so that
requests pile up (many in flight go through several small pools, never one big one: see `send`)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tools import simulate
from tools.bench.system import bench_plan
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


@dataclass
class SlowIntake:
    """An HTTP/1.1 server answering every request 202 after `delay` seconds (keep-alive), noting
    each connection and the most requests it held at once."""

    delay: float = 0.05
    connections: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    answered: int = 0
    server: asyncio.Server | None = field(default=None, repr=False)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                await asyncio.sleep(self.delay)
                self.in_flight -= 1
                self.answered += 1
                body = b'{"status":"accepted"}'
                writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"


@pytest.fixture
async def intake() -> AsyncIterator[SlowIntake]:
    slow = SlowIntake()
    slow.server = await asyncio.start_server(slow._serve, "127.0.0.1", 0)
    async with slow.server:
        yield slow


def pools_made(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Limits]:
    """The limits of every HTTP client `send` makes (the class itself otherwise unchanged)."""
    made: list[httpx.Limits] = []

    class Recording(httpx.AsyncClient):
        def __init__(self, *args: Any, limits: httpx.Limits, **kwargs: Any) -> None:
            made.append(limits)
            super().__init__(*args, limits=limits, **kwargs)

    monkeypatch.setattr(simulate.httpx, "AsyncClient", Recording)
    return made


async def test_requests_in_flight_are_spread_over_pools_of_at_most_pool_connections_each(
        intake: SlowIntake, monkeypatch: pytest.MonkeyPatch) -> None:
    made = pools_made(monkeypatch)
    planned = bench_plan(96, 24, "pools", 0, datetime.now(UTC))
    stats = await simulate.send(planned, intake.url, ["key"], rate=2_000, duration=5, concurrency=32)
    assert stats.accepted == 96
    assert len(made) == 32 // simulate.POOL_CONNECTIONS
    assert all(limits.max_connections == simulate.POOL_CONNECTIONS for limits in made)
    # the pools were used together: more requests in flight than one pool has connections
    assert simulate.POOL_CONNECTIONS < intake.most_in_flight <= 32
    assert intake.connections <= 32


async def test_the_bound_on_requests_in_flight_is_the_concurrency_asked_for(intake: SlowIntake) -> None:
    planned = bench_plan(60, 20, "bound", 0, datetime.now(UTC))
    stats = await simulate.send(planned, intake.url, ["key"], rate=2_000, duration=5, concurrency=12)
    assert stats.accepted == 60
    assert intake.most_in_flight <= 12
