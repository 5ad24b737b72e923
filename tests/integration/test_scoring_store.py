"""Scoring's state and rules stores against the real local store, and the rules CLI end to end."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pymongo import AsyncMongoClient

from services.scoring.history import History, Submission
from services.scoring.rules import InstrumentOverride, TenantRules
from services.scoring.store import RULES, STATES, RulesStore, StateStore, series_key
from shared.events import Instrument, Items
from shared.mongo import Document
from tests.support.services import Namespace

NOW = datetime(2026, 2, 3, 10, 11, 12, 345678, tzinfo=UTC)
KEY = series_key("acme", "client-1", Instrument.SRS, None)
ROOT = Path(__file__).resolve().parents[2]


def history_with(*totals: float) -> History:
    h = History()
    for i, t in enumerate(totals, start=1):
        h.apply(Submission(f"s{i}", i, Instrument.SRS, NOW + timedelta(seconds=i), None, t), TenantRules(),
                NOW + timedelta(microseconds=i))
    return h


async def test_unknown_series_load_as_empty_histories(namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    loaded = await StateStore(mongo[namespace.database]).load([KEY])
    assert loaded[KEY].entries == {} and loaded[KEY].version == 0


async def test_saved_series_load_back_with_identical_outcomes(namespace: Namespace,
                                                              mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    h = history_with(38.0, 34.5)
    h.apply(Submission("kid", 1, Instrument.YCSRS, NOW, Items(relationship=1, goals=2, approach=3, overall=4)),
            TenantRules(), NOW)
    assert await store.save({KEY: h}) == set()
    loaded = (await store.load([KEY]))[KEY]
    assert loaded.outcomes == h.outcomes and loaded.entries == h.entries
    assert loaded.version == 1 and loaded.outcomes["s2"].scored_at.microsecond == 345680  # not cut to milliseconds


async def test_a_write_based_on_a_stale_read_is_a_conflict_and_changes_nothing(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    other = series_key("acme", "client-2", Instrument.SRS, "ep-1")
    assert await store.save({KEY: history_with(38.0)}) == set()
    mine = (await store.load([KEY]))[KEY]
    theirs = (await store.load([KEY]))[KEY]
    theirs.apply(Submission("theirs", 2, Instrument.SRS, NOW, None, 30.0), TenantRules(), NOW)
    assert await store.save({KEY: theirs}) == set()
    mine.apply(Submission("mine", 2, Instrument.SRS, NOW, None, 37.0), TenantRules(), NOW)
    assert await store.save({KEY: mine, other: history_with(36.0)}) == {KEY}
    stored = await store.load([KEY, other])
    assert set(stored[KEY].entries) == {"s1", "theirs"} and stored[KEY].version == 2
    assert set(stored[other].entries) == {"s1"}  # the rest of the bulk write still applied


async def test_two_first_writes_of_one_series_conflict(namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    assert await store.save({KEY: history_with(38.0)}) == set()
    assert await store.save({KEY: history_with(30.0)}) == {KEY}


async def test_one_find_loads_many_series(namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    keys = [series_key("acme", f"c{i}", Instrument.SRS, None) for i in range(40)]
    assert await store.save({k: history_with(37.0, 38.0) for k in keys}) == set()
    loaded = await store.load(keys)
    assert all(len(loaded[k].entries) == 2 for k in keys)
    assert await mongo[namespace.database][STATES].count_documents({}) == 40


async def test_a_clients_series_are_found_by_tenant_and_client(namespace: Namespace,
                                                               mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    mine = [series_key("acme", "c1", Instrument.SRS, None), series_key("acme", "c1", Instrument.CSRS, "ep-2")]
    others = [series_key("acme", "c10", Instrument.SRS, None), series_key("acme", "c", Instrument.SRS, None),
              series_key("beta", "c1", Instrument.SRS, None)]
    assert await store.save({k: history_with(37.0) for k in mine + others}) == set()
    found = await store.client_series("acme", "c1")
    assert sorted(d["instrument"] for d in found) == ["CSRS", "SRS"]


async def test_rules_default_until_stored_and_are_cached_for_the_ttl(namespace: Namespace,
                                                                     mongo: AsyncMongoClient[Document]) -> None:
    now = [0.0]
    store = RulesStore(mongo[namespace.database], ttl_seconds=5.0, clock=lambda: now[0])
    writer = RulesStore(mongo[namespace.database])
    assert (await store.get_many(["acme", "beta"])) == {"acme": TenantRules(), "beta": TenantRules()}
    strict = TenantRules(cutoff=34.0, instruments={"CSRS": InstrumentOverride(cutoff=30.0)})
    await writer.put("acme", strict)
    assert await store.get("acme") == TenantRules()  # cached
    now[0] = 5.1
    assert await store.get("acme") == strict


async def test_invalid_stored_rules_fall_back_to_the_defaults(namespace: Namespace,
                                                              mongo: AsyncMongoClient[Document]) -> None:
    await mongo[namespace.database][RULES].insert_one({"_id": "acme", "cutoff": 400})
    assert await RulesStore(mongo[namespace.database]).get("acme") == TenantRules()


async def alliance(namespace: Namespace, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, cwd=ROOT, env={**os.environ, **namespace.env()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_set_rules_command_stores_rules_that_show_rules_prints(namespace: Namespace,
                                                                     mongo: AsyncMongoClient[Document]) -> None:
    code, out, err = await alliance(namespace, "tenants", "set-rules", "--tenant", "acme", "--cutoff", "34.5",
                                    "--operator", "<=")
    assert code == 0, err
    code, out, err = await alliance(namespace, "tenants", "set-rules", "--tenant", "acme", "--instrument", "CSRS",
                                    "--cutoff", "31")
    assert code == 0, err
    stored = await RulesStore(mongo[namespace.database]).stored("acme")
    assert stored == TenantRules(cutoff=34.5, operator="<=", instruments={"CSRS": InstrumentOverride(cutoff=31.0)})
    code, out, _ = await alliance(namespace, "tenants", "show-rules", "--tenant", "acme")
    shown = json.loads(out)
    assert code == 0 and shown["source"] == "stored" and shown["rules"]["instruments"] == {"CSRS": {"cutoff": 31.0}}


async def test_set_rules_command_refuses_an_invalid_operator_and_stores_nothing(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    code, _, err = await alliance(namespace, "tenants", "set-rules", "--tenant", "acme", "--operator", ">")
    assert code == 2 and "operator" in err
    assert await mongo[namespace.database][RULES].count_documents({}) == 0
