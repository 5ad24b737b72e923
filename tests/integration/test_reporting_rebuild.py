"""`alliance reporting rebuild` on the real broker and store, with the live service running.

The live API must keep answering from the old generation until the switch, events that arrive
during the rebuild must not be lost, and after the switch the API answers from the new one.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from services.reporting.cli import verify_generation
from services.reporting.rebuild import rebuild
from services.reporting.settings import ReportingSettings
from services.reporting.store import META, POINTER_ID, clients_name, counters_name, rollup_id, rollups_name, stamp_id
from shared.auth import create_key
from shared.events import SrsScored
from shared.mongo import Document
from tests.support.reporting import counters_verified
from tests.support.services import Namespace, ServiceProcess, service_fixture
from tests.support.wait import eventually
from tools.demo import BASE, deterioration_for, publish, revised, scored
from tools.processes import ROOT

T = "tenant-rebuild"


@dataclass
class Live:
    ns: Namespace
    proc: ServiceProcess
    http: httpx.AsyncClient
    mongo: AsyncMongoClient[Document]
    key: str

    async def trajectory(self, client: str) -> httpx.Response:
        return await self.http.get(f"/v1/clients/{client}/trajectory", headers={"Authorization": f"Bearer {self.key}"})

    async def pointer(self) -> Document:
        doc = await self.mongo[self.ns.database][META].find_one({"_id": POINTER_ID})
        assert doc is not None
        return doc


reporting = service_fixture("reporting")
counters_agree_after_each_scenario = counters_verified()


@pytest.fixture(scope="module")
async def live(namespace_m: Namespace, reporting: ServiceProcess) -> AsyncIterator[Live]:
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    key, _ = await create_key(mongo[namespace_m.database], T, "read")
    async with httpx.AsyncClient(base_url=reporting.url, timeout=30) as http:
        yield Live(namespace_m, reporting, http, mongo, key)
    await mongo.close()


def sessions(client: str, totals: list[float]) -> list[SrsScored]:
    out, prev = [], None
    for n, t in enumerate(totals, start=1):
        out.append(scored(T, client, n, t, previous_total=prev))
        prev = t
    return out


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(args: list[str], env: dict[str, str]) -> Done:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from services.cli import main; main()", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def visible(live: Live, client: str, count: int) -> httpx.Response:
    async def check() -> httpx.Response | None:
        res = await live.trajectory(client)
        return res if res.status_code == 200 and len(res.json()["sessions"]) == count else None

    return await eventually(check, timeout=60)


async def test_rebuild_replays_into_a_new_generation_and_switches_while_the_api_keeps_answering(
        live: Live) -> None:
    events = [*sessions("c1", [38.0, 36.5, 33.0]), *sessions("c2", [39.0, 39.5])]
    alert = deterioration_for(events[2])
    assert alert is not None
    # a correction under a new id and an earlier episode: the replay goes through the same merge
    fix = revised(events[1], submission_id="c1-fix", total=37.0)
    earlier = scored(T, "c1", 1, 30.0, episode_id="earlier", administered_at=BASE - timedelta(days=120))
    await publish(live.ns.kafka(), [*events, alert, fix, earlier])

    async def settled() -> httpx.Response | None:
        res = await visible(live, "c1", 3)
        body = res.json()
        # the alert comes through its own topic and consumer: wait for it too
        done = body["sessions"][1]["submission_id"] == "c1-fix" and len(body["episodes"]) == 2 and body["alerts"]
        return res if done else None

    before = await eventually(settled, timeout=60)
    await visible(live, "c2", 2)
    old_gen = before.headers["x-reporting-generation"]
    assert before.json()["alerts"]

    during: list[tuple[str, dict[str, Any]]] = []
    late = scored(T, "c2", 3, 31.0, previous_total=39.5)

    async def after_claim(new: str) -> None:
        # Arrives while the replay runs: only the live consumer's double write can bring it over.
        await publish(live.ns.kafka(), [late])

    async def before_switch(new: str) -> None:
        res = await live.trajectory("c1")
        during.append((res.headers["x-reporting-generation"], res.json()))
        # the new generation is complete before anyone reads it
        count = await live.mongo[live.ns.database][clients_name(new)].count_documents({"tenant_id": T})
        assert count == 2
        # and so is the tenant's roll-up (its summary and trends read one document from the start)
        rollup = await live.mongo[live.ns.database][rollups_name(new)].find_one({"_id": rollup_id(T)})
        assert rollup is not None and sum(c.get("sessions", 0) for c in rollup["cur"].values()) >= 3 + 2

    progress: list[tuple[int, int]] = []
    result = await rebuild(live.ns.kafka(), live.ns.mongo(), ReportingSettings(), after_claim=after_claim,
                           before_switch=before_switch, progress=lambda d, t: progress.append((d, t)),
                           idle_seconds=5)
    assert result.switched and result.previous == old_gen and result.generation != old_gen
    assert result.events >= len(events) + 1
    assert during == [(old_gen, before.json())]  # the API answered from the old generation until the switch
    assert progress and progress[-1][0] == progress[-1][1] > 0

    async def switched() -> httpx.Response | None:
        res = await live.trajectory("c1")
        return res if res.headers["x-reporting-generation"] == result.generation else None

    after = await eventually(switched, timeout=10)
    assert after.json() == before.json()
    c2 = await visible(live, "c2", 3)  # the event published during the rebuild is there
    assert c2.headers["x-reporting-generation"] == result.generation
    assert c2.json()["latest_total"] == 31.0
    pointer = await live.pointer()
    assert (pointer["active"], pointer["previous"], pointer["building"]) == (result.generation, old_gen, None)
    # the counters came with the records, replay and live double write alike
    assert await eventually(lambda: counters_agree(live, result.generation), timeout=30)
    assert await eventually(lambda: counters_agree(live, old_gen), timeout=30)
    current = await live.mongo[live.ns.database][counters_name(result.generation)].find(
        {"tenant_id": T}).to_list()
    assert sum(c.get("sessions", 0) for c in current) == 3 + 3  # c1's current episode, c2 with the late one
    # and the alert's monthly figures, rebuilt from the alert topics
    assert sum(m.get("alerts_raised", 0) for c in current for m in (c.get("mo") or {}).values()) == 1


async def counters_agree(live: Live, gen: str) -> bool:
    _, differences = await verify_generation(live.ns.mongo(), gen)
    return not differences


async def test_the_cli_rebuilds_with_a_progress_bar_and_refuses_a_second_concurrent_rebuild(live: Live) -> None:
    await publish(live.ns.kafka(), sessions("c3", [37.0]))
    await visible(live, "c3", 1)
    start = (await live.pointer())["active"]
    env = {**os.environ, **live.ns.env(), "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    cmd = ["reporting", "rebuild", "--idle-seconds", "5"]
    done = await run_cli(cmd, env)
    assert done.returncode == 0, done.stderr
    assert "replaying" in done.stdout and "replayed" in done.stdout
    pointer = await live.pointer()
    assert pointer["previous"] == start and pointer["active"] != start
    assert f"switched: {start} -> {pointer['active']}" in done.stdout
    # generations older than the previous one are gone
    names = await live.mongo[live.ns.database].list_collection_names()
    gens = {n.split("_")[1] for n in names if n.startswith("reporting_g")}
    assert gens == {pointer["active"], pointer["previous"]}

    # a rebuild holding the slot (e.g. one that died) blocks another, unless forced
    await live.mongo[live.ns.database][META].update_one({"_id": POINTER_ID}, {"$set": {"building": "g999"}})
    refused = await run_cli(cmd, env)
    assert refused.returncode == 2 and "rebuild refused" in refused.stderr
    forced = await run_cli([*cmd, "--force"], env)
    assert forced.returncode == 0, forced.stderr
    assert (await visible(live, "c3", 1)).json()["latest_total"] == 37.0


async def test_the_cli_verify_passes_on_agreeing_counters_and_exits_1_naming_a_counter_that_differs(
        live: Live) -> None:
    await publish(live.ns.kafka(), sessions("c4", [36.0, 38.0]))
    await visible(live, "c4", 2)
    env = {**os.environ, **live.ns.env(), "PYTHONPATH": str(ROOT), "COLUMNS": "100"}

    async def agreed() -> bool:
        return (await run_cli(["reporting", "verify"], env)).returncode == 0

    assert await eventually(agreed, timeout=30)
    gen = (await live.pointer())["active"]
    counters = live.mongo[live.ns.database][counters_name(gen)]
    tampered = await counters.find_one_and_update({"tenant_id": T}, {"$inc": {"sessions": 1}})
    assert tampered is not None
    found = await run_cli(["reporting", "verify"], env)
    assert found.returncode == 1 and tampered["_id"] in found.stdout and "differ" in found.stderr
    await counters.update_one({"_id": tampered["_id"]}, {"$inc": {"sessions": -1}})
    # A counter write bumps the tenant's stamp, as the store's do: a roll-up refreshed from the
    # tampered counter meanwhile is then refreshed again.
    await live.mongo[live.ns.database][rollups_name(gen)].update_one({"_id": stamp_id(T)}, {"$inc": {"changed": 1}})
