"""The simulated clinic network with the ORS through real intake and scoring processes: every form it
posts is scored (none is dead-lettered), and its correlated trajectories produce what PCOMS is for -
reliable improvement and deterioration, outcome alerts, and alliance alerts in sessions where the
client is off track too (`outcome_at_risk`)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from shared.auth import create_key
from shared.topic_admin import ensure_topics
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest
from tools.recorder import Record, TopicRecorder
from tools.simulate import run_simulation

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Pipeline:
    ors_scored: list[dict[str, Any]]
    alliance_alerts: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    accepted_ors: set[str]


def values(records: list[Record]) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in records]


@pytest.fixture(scope="module")
async def pipeline(stack: StackUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    ns = Namespace.fresh(stack)
    await ensure_topics(ns.kafka())
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(stack.mongo_url)
    try:
        key, _ = await create_key(client[ns.database], "sim-p", "submit")
    finally:
        await client.close()
    topics = ns.kafka().topics()
    with running(["intake", "scoring"], ns, tmp_path_factory.mktemp("simulate-pipeline-logs")) as procs:
        planned, stats = await run_simulation(1, 2, 4, 30, rate=40, duration=6, url=procs["intake"].url, keys=[key],
                                              seed=4, quiet=True, keep=True, ors=True)
        is_ors = {p.submission_id: p.ors for p in planned}
        accepted_ors = {s for s in stats.accepted_ids if is_ors[s]}

        def all_of(ids: set[str]) -> Callable[[list[Record]], bool]:
            return lambda records: ids <= {json.loads(r.value)["submission_id"] for r in records}

        async with TopicRecorder(stack.bootstrap, topics.ors_scored) as scored:
            ors_scored = values(await scored.until(all_of(accepted_ors), timeout=90))
        async with TopicRecorder(stack.bootstrap, topics.scored) as scored:
            await scored.until(all_of(stats.accepted_ids - accepted_ors), timeout=90)
        # Every form is scored: the alerts and dead letters scoring wrote with them are on their
        # topics by now (a moment's grace for the last batch's).
        async with TopicRecorder(stack.bootstrap, topics.deterioration) as alerts:
            alliance_alerts = values(await alerts.poll(timeout_ms=2000))
        async with TopicRecorder(stack.bootstrap, topics.deadletter) as dead:
            dead_letters = values(await dead.poll(timeout_ms=2000))
    return Pipeline(ors_scored, alliance_alerts, dead_letters, accepted_ors)


async def test_every_accepted_ors_is_scored_and_nothing_is_dead_lettered(pipeline: Pipeline) -> None:
    assert len(pipeline.accepted_ors) > 50
    assert pipeline.dead_letters == []


async def test_the_trajectories_give_reliable_improvement_and_reliable_deterioration(pipeline: Pipeline) -> None:
    changes = Counter(e["change"] for e in pipeline.ors_scored)
    assert changes["reliable_improvement"] > 0 and changes["reliable_deterioration"] > 0
    assert any(e["triggers"] for e in pipeline.ors_scored)


async def test_a_falling_alliance_meets_a_client_off_track_in_some_sessions(pipeline: Pipeline) -> None:
    assert any(a.get("outcome_at_risk") for a in pipeline.alliance_alerts)
