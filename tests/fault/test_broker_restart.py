"""The broker is killed (-9) and comes back after 20 s, in the durable local mode: intake answers
503 fast while it is down, every service reconnects by itself, and nothing acknowledged before the
kill is lost end to end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from shared.topic_admin import ensure_topics
from tests.fault.helpers import make_tenant, post_batch, submission, trajectory_sessions
from tests.support.reporting import assert_counters_agree
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually

CLIENTS = 50


async def test_broker_killed_for_20s_loses_nothing_and_intake_fails_fast(durable_stack: StackUnderTest,
                                                                         log_dir: Path) -> None:
    ns = Namespace.fresh(durable_stack)
    await ensure_topics(ns.kafka())
    keys = await make_tenant(ns, "acme")
    local = durable_stack.local
    assert local is not None
    with running(["intake", "scoring", "reporting"], ns, log_dir,
                 extra_env={"ALLIANCE_INTAKE_PUBLISH_TIMEOUT_SECONDS": "2"}) as procs:
        intake, reporting = procs["intake"].url, procs["reporting"].url
        async with httpx.AsyncClient(timeout=30) as http:
            before = await post_batch(http, intake, keys.submit, [submission(i, 1) for i in range(CLIENTS)])
            assert len(before) == CLIENTS

            local.kill("kafka")
            down_at = time.monotonic()
            answers = []
            while time.monotonic() - down_at < 20:
                started = time.monotonic()
                try:
                    r = await http.post(f"{intake}/v1/submissions", json=submission(999, 1),
                                        headers={"Authorization": f"Bearer {keys.submit}"}, timeout=10)
                    answers.append((r.status_code, time.monotonic() - started, r.headers.get("retry-after")))
                except httpx.TimeoutException:
                    answers.append((0, time.monotonic() - started, None))
                await asyncio.sleep(2)
            local.start_kafka()

            print("\nanswers while the broker was down (status, seconds, Retry-After):", answers)
            assert answers, "intake was never asked while the broker was down"
            assert all(status == 503 and retry for status, _, retry in answers), answers

            after = await post_batch(http, intake, keys.submit, [submission(i, 2) for i in range(CLIENTS)])
            assert len(after) == CLIENTS

            async def all_visible() -> bool:
                for i in range(CLIENTS):
                    sessions = await trajectory_sessions(http, reporting, keys.read, f"client-{i}")
                    if sessions != [1, 2]:
                        return False
                return True

            await eventually(all_visible, timeout=180, interval=2)
            await assert_counters_agree(ns.mongo(), timeout=60)
        for p in procs.values():
            assert p.proc is not None and p.proc.poll() is None, f"{p.name} died instead of reconnecting"
