"""The bench's (b) probe polls from a process of its own and reports what it saw to the bench.

A local HTTP server stands in for reporting's trajectory route: a client's session shows up after
a given number of reads. The probe process (`python -m tools.bench.probe`) is the real one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException

from tools.bench.common import until
from tools.bench.system import ProbeProcess
from tools.stack import free_port

KEY = "read-key"


class Reporting:
    """Sessions appear after `reads_until_visible` reads of a client's trajectory; the unknown client 404s."""

    def __init__(self, reads_until_visible: int) -> None:
        self.reads: Counter[str] = Counter()
        self.app = FastAPI()
        self.after = reads_until_visible

        @self.app.get("/v1/clients/{client_id}/trajectory")
        async def trajectory(client_id: str, authorization: str = Header("")) -> dict[str, object]:
            assert authorization == f"Bearer {KEY}"
            if client_id == "nobody":
                raise HTTPException(404)
            self.reads[client_id] += 1
            shown = [{"session_number": 1}] + ([{"session_number": 2}] if self.reads[client_id] >= self.after else [])
            return {"sessions": shown}


@pytest.fixture
async def reporting() -> AsyncIterator[tuple[Reporting, str]]:
    fake = Reporting(reads_until_visible=3)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        return bool(server.started)

    assert await until(started, 10.0, 0.01)
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await serving


async def ended(probe: ProbeProcess, within: float = 20.0) -> None:
    async def none_watched() -> bool:
        return not probe.tasks

    assert await until(none_watched, within, 0.02)


async def test_a_watched_session_is_reported_seen_with_the_time_it_was_seen(
        reporting: tuple[Reporting, str]) -> None:
    fake, url = reporting
    probe = ProbeProcess(url, KEY, interval=0.01, timeout=10.0)
    await probe.start()
    before = time.time()
    probe.watch("s-1", "client-1", 2)
    await ended(probe)
    await probe.stop()
    assert set(probe.first) == {"s-1"} and before < probe.first["s-1"] <= time.time()
    assert fake.reads["client-1"] == 3
    assert len(probe.round_trips) == 3 and probe.statuses == Counter({200: 3})
    assert probe.watched == 1 and probe.tasks == set()


async def test_a_session_that_never_shows_ends_its_watch_unseen(reporting: tuple[Reporting, str]) -> None:
    _, url = reporting
    probe = ProbeProcess(url, KEY, interval=0.01, timeout=0.3)
    await probe.start()
    probe.watch("s-9", "nobody", 1)
    await ended(probe)
    await probe.stop()
    assert probe.first == {} and probe.tasks == set()
    assert probe.statuses[404] >= 1 and set(probe.statuses) == {404}


async def test_watches_past_the_bound_are_skipped_not_sent(reporting: tuple[Reporting, str]) -> None:
    fake, url = reporting
    probe = ProbeProcess(url, KEY, interval=0.05, timeout=10.0, max_in_flight=2)
    await probe.start()
    for i in range(4):
        probe.watch(f"s-{i}", f"client-{i}", 2)
    await ended(probe)
    await probe.stop()
    assert probe.watched == 2 and probe.skipped == 2
    assert set(probe.first) == {"s-0", "s-1"} and set(fake.reads) == {"client-0", "client-1"}


async def test_stopping_twice_is_harmless(reporting: tuple[Reporting, str]) -> None:
    _, url = reporting
    probe = ProbeProcess(url, KEY, interval=0.01, timeout=1.0)
    await probe.start()
    await probe.stop()
    await probe.stop()
    probe.watch("s-late", "client-1", 1)  # after the stop: nothing to send it to
    assert probe.skipped == 1 and probe.watched == 0


def test_the_probe_process_imports_neither_kafka_nor_the_store_nor_the_product() -> None:
    # Its start-up CPU counts as the bench's: what the probe imports, every bench run pays.
    heavy = ("aiokafka", "faststream", "pymongo", "shared", "services")
    shown = subprocess.run(
        [sys.executable, "-c", "import sys, tools.bench.probe; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=str(Path(__file__).resolve().parents[2])).stdout.split()
    assert [m for m in shown if m.split(".")[0] in heavy] == []
