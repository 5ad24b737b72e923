"""Two scoring processes in one consumer group; one is killed (-9) mid-stream and restarted.

Every submission must be scored exactly once in effect: each scored event id and alert id is
published with one content only (a redelivery republishes the same bytes), every submission has
its scored event (revision 1: nothing is corrected here, so nothing is ever re-scored), and the
alerts are exactly the ones the rules call for - none missing, none twice with different content.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.scoring.rules import TenantRules, score
from shared import ids
from tests.support.services import Namespace, ServiceProcess
from tests.support.wait import eventually
from tools.loadgen import BASE, publish, series_total, start_producer, submission
from tools.recorder import TopicRecorder
from tools.stack import free_port

TENANT = "acme"
CLIENTS = 400
SESSIONS = 5
KILL_AFTER = 2 * CLIENTS + 1  # the first records of the burst of session 3: batches are in flight
EPISODE = f"auto/{(BASE + timedelta(days=7)).date().isoformat()}/1"  # derived: session 1 is on BASE + 7 days


def expected_alert_sessions() -> set[tuple[int, int]]:
    """(client, session) of every session that alerts when it is scored (each is the latest then)."""
    out = set()
    for c in range(CLIENTS):
        for s in range(1, SESSIONS + 1):
            prev = series_total(c, s - 1) if s > 1 else None
            if score(series_total(c, s), None, prev, True, TenantRules()).alert is not None:
                out.add((c, s))
    return out


def expected_alerts() -> set[str]:
    return {ids.alert_id(TENANT, f"client-{c}", "SRS", EPISODE, s) for c, s in expected_alert_sessions()}


async def _reemitted(proc: ServiceProcess) -> float:
    """Submissions a process found already scored in the state (written before a crash or by the
    other process) and re-published."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(proc.url + "/metrics")).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "alliance_scoring_reemitted_total")


def by_event_id(values: list[bytes]) -> dict[str, set[bytes]]:
    out: dict[str, set[bytes]] = defaultdict(set)
    for v in values:
        out[json.loads(v)["event_id"]].add(v)
    return out


async def test_one_of_two_processes_killed_mid_stream_every_submission_scored_once_in_effect(
        namespace: Namespace, tmp_path: Path) -> None:
    topics = namespace.kafka().topics()
    a = ServiceProcess("scoring", free_port(), namespace.env(), tmp_path / "scoring-a.log")
    b = ServiceProcess("scoring", free_port(), namespace.env(), tmp_path / "scoring-b.log")
    scored = await TopicRecorder(namespace.stack.bootstrap, topics.scored).start(background=True)
    alerts = await TopicRecorder(namespace.stack.bootstrap, topics.deterioration).start(background=True)
    statuses = await TopicRecorder(namespace.stack.bootstrap, topics.alert_status).start(background=True)
    producer = await start_producer(namespace.stack.bootstrap)
    try:
        a.start()
        b.start()
        await asyncio.gather(asyncio.to_thread(a.wait_ready), asyncio.to_thread(b.wait_ready))
        total = CLIENTS * SESSIONS

        async def feed() -> None:
            # One burst per session number, so each client's sessions are in order on its partition
            # and the processes have whole batches in flight when the kill comes.
            for s in range(1, SESSIONS + 1):
                await publish(producer, topics.submitted, [
                    submission(TENANT, f"client-{c}", s, series_total(c, s), submission_id=f"client-{c}-s{s}")
                    for c in range(CLIENTS)])
                await asyncio.sleep(1.0)

        feeding = asyncio.create_task(feed())

        async def burst_under_way() -> bool:
            return len(by_event_id(scored.values())) >= KILL_AFTER

        await eventually(burst_under_way, timeout=90, interval=0.01)
        at_kill = len(by_event_id(scored.values()))
        a.kill()  # kill -9, possibly mid-batch
        a.start()  # and back, as a supervisor would: another rebalance
        await feeding

        async def all_scored() -> bool:
            return len(by_event_id(scored.values())) >= total

        await eventually(all_scored, timeout=150, interval=0.5)
        await asyncio.to_thread(a.wait_ready)
        want_alerts = expected_alerts()

        async def all_alerts() -> bool:
            return set(by_event_id(alerts.values())) >= want_alerts

        await eventually(all_alerts, timeout=30)
        # every alert but those of the last session is superseded by the next session
        want_statuses = {ids.alert_status_event_id(TENANT, ids.alert_id(TENANT, f"client-{c}", "SRS", EPISODE, s),
                                                   "superseded", 1)
                         for c, s in expected_alert_sessions() if s < SESSIONS}

        async def all_statuses() -> bool:
            return set(by_event_id(statuses.values())) >= want_statuses

        await eventually(all_statuses, timeout=30)
        reemitted = sum([await _reemitted(p) for p in (a, b)])
    finally:
        await producer.stop()
        await scored.stop()
        await alerts.stop()
        await statuses.stop()
        a.stop()
        b.stop()

    scored_ids = by_event_id(scored.values())
    alert_ids = by_event_id(alerts.values())
    print(f"\nkilled at {at_kill}/{total} scored; scored records {len(scored.records)} for {len(scored_ids)} ids; "
          f"alert records {len(alerts.records)} for {len(alert_ids)} ids; "
          f"outcomes re-published from stored state: {reemitted:.0f}")
    assert 0 < at_kill < total
    assert set(scored_ids) == {ids.scored_event_id(TENANT, f"client-{c}-s{s}")
                               for c in range(CLIENTS) for s in range(1, SESSIONS + 1)}
    assert [k for k, v in scored_ids.items() if len(v) > 1] == [], "a submission was scored twice, differently"
    assert set(alert_ids) == want_alerts
    assert [k for k, v in alert_ids.items() if len(v) > 1] == [], "an alert was raised twice, differently"
    status_ids = by_event_id(statuses.values())
    assert set(status_ids) == want_statuses
    assert [k for k, v in status_ids.items() if len(v) > 1] == [], "an alert was ended twice, differently"
