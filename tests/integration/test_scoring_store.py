"""Scoring's state and rules stores against the real local store, and the rules CLI end to end."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pymongo import AsyncMongoClient

from services.scoring.rules import InstrumentOverride, TenantRules
from services.scoring.series import INDEX_FORMER_HOLDERS, ClientState, Version, holder
from services.scoring.store import (
    INDEX,
    RULES,
    STATES,
    ClientKey,
    Held,
    IndexKey,
    RulesStore,
    StateStore,
    SubmissionIndex,
    client_key,
)
from shared.mongo import Document
from tests.support.services import Namespace
from tests.unit.test_scoring_handler import handler
from tests.unit.test_scoring_moves import _final, run_holders

NOW = datetime(2026, 2, 3, 10, 11, 12, 345678, tzinfo=UTC)
KEY = client_key("acme", "client-1")
ROOT = Path(__file__).resolve().parents[2]


def version(sid: str, n: int, total: float | None, *, instrument: str = "SRS", episode: str | None = None,
            items: tuple[float, float, float, float] | None = None, site: str = "north") -> Version:
    return Version(sid, instrument, episode, n, NOW + timedelta(days=n), site, "c-1", items, total,
                   NOW + timedelta(seconds=n, microseconds=n))


def state_with(*totals: float, key: ClientKey = KEY) -> ClientState:
    st = ClientState(key.tenant_id, key.client_id)
    for i, t in enumerate(totals, start=1):
        st.submit(version(f"s{i}", i, t), TenantRules(), NOW + timedelta(microseconds=i))
    return st


async def test_unknown_clients_load_as_empty_states(namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    loaded = await StateStore(mongo[namespace.database]).load([KEY])
    assert loaded[KEY].versions == {} and loaded[KEY].version == 0 and loaded[KEY].owner is None


async def test_a_saved_record_loads_back_equal_and_re_emits_the_same_outputs(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    st = state_with(38.0, 34.5)
    rules = TenantRules()
    st.submit(version("kid", 1, None, instrument="YCSRS", items=(1, 2, 3, 4)), rules, NOW)
    st.submit(version("s2", 2, 30.0), rules, NOW + timedelta(seconds=1))  # a correction: revision 2
    st.submit(version("far", 99, 30.0), rules, NOW)  # refused: session_gap
    st.submit(version("ep", 1, 37.0, episode="ep-1", items=(9.0, 9.5, 9.0, 9.5)), rules, NOW)
    moved_at = NOW + timedelta(seconds=2, microseconds=3)
    st.transfer("tx-1", "south", rules, moved_at)
    assert await store.save({KEY: st}) == set()
    loaded = (await store.load([KEY]))[KEY]
    assert loaded.version == 1 == st.version
    assert loaded == st
    assert loaded.current_outputs(rules) == st.current_outputs(rules)
    assert loaded.published["SRS\x1fauto/2026-02-04/1\x1f1"].at == moved_at  # not cut to milliseconds


async def test_the_raises_withdrawn_alerts_keep_load_back_equal_and_are_re_emitted(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    st, rules = ClientState(KEY.tenant_id, KEY.client_id), TenantRules()
    for instrument, first, low in (("SRS", 38.0, 30.0), ("ORS", 20.0, 15.0)):
        st.submit(version(f"{instrument}-1", 1, first, instrument=instrument), rules, NOW)
        raised = version(f"{instrument}-2", 2, None if instrument == "SRS" else low, instrument=instrument,
                         items=(6.0, 7.5, 8.0, 8.5) if instrument == "SRS" else None)  # low items too
        st.submit(raised, rules, NOW + timedelta(seconds=1))
        # corrected into an episode of its own: the alert of the derived episode is withdrawn
        moved = Version(raised.submission_id, instrument, "ep-2", 2, raised.administered_at, "north", "c-1",
                        raised.items, raised.total, raised.accepted_at + timedelta(minutes=1))
        st.submit(moved, rules, NOW + timedelta(seconds=2))
    kept = {a.instrument: a.raised for a in st.alerts.values() if a.raised is not None}
    assert kept.keys() == {"SRS", "ORS"}
    assert await store.save({KEY: st}) == set()
    loaded = (await store.load([KEY]))[KEY]
    assert loaded.alerts == st.alerts
    assert loaded.current_outputs(rules) == st.current_outputs(rules)


async def test_submission_ids_with_dots_colons_and_dashes_are_stored(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    st = ClientState(KEY.tenant_id, KEY.client_id)
    for i, sid in enumerate(("north.2026-11-25.0001", "a:b", "x-1.fix"), start=1):
        st.submit(version(sid, i, 37.0), TenantRules(), NOW)
    assert await store.save({KEY: st}) == set()
    loaded = (await store.load([KEY]))[KEY]
    assert loaded.submission_revision == st.submission_revision and set(loaded.versions) == set(st.versions)


async def test_a_write_based_on_a_stale_read_is_a_conflict_and_changes_nothing(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    other = client_key("acme", "client-2")
    assert await store.save({KEY: state_with(38.0)}) == set()
    mine = (await store.load([KEY]))[KEY]
    theirs = (await store.load([KEY]))[KEY]
    theirs.submit(version("theirs", 2, 30.0), TenantRules(), NOW)
    assert await store.save({KEY: theirs}) == set()
    mine.submit(version("mine", 2, 37.0), TenantRules(), NOW)
    assert await store.save({KEY: mine, other: state_with(36.0, key=other)}) == {KEY}
    stored = await store.load([KEY, other])
    assert set(stored[KEY].versions) == {"s1", "theirs"} and stored[KEY].version == 2
    assert set(stored[other].versions) == {"s1"}  # the rest of the bulk write still applied


async def test_two_first_writes_of_one_client_conflict(namespace: Namespace,
                                                       mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    assert await store.save({KEY: state_with(38.0)}) == set()
    assert await store.save({KEY: state_with(30.0)}) == {KEY}


async def test_one_find_loads_many_clients(namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    keys = [client_key("acme", f"c{i}") for i in range(40)]
    assert await store.save({k: state_with(37.0, 38.0, key=k) for k in keys}) == set()
    loaded = await store.load(keys)
    assert all(len(loaded[k].versions) == 2 for k in keys)
    assert await mongo[namespace.database][STATES].count_documents({}) == 40


async def test_a_clients_state_is_found_by_tenant_and_client(namespace: Namespace,
                                                             mongo: AsyncMongoClient[Document]) -> None:
    store = StateStore(mongo[namespace.database])
    keys = [client_key("acme", "c1"), client_key("acme", "c10"), client_key("acme", "c"), client_key("beta", "c1")]
    assert await store.save({k: state_with(37.0, key=k) for k in keys}) == set()
    found = await store.client_state("acme", "c1")
    assert found is not None and (found["tenant_id"], found["client_id"]) == ("acme", "c1")
    assert found["owner"] == "north" and [v["sid"] for v in found["subs"]] == ["s1"]
    assert await store.client_state("acme", "nobody") is None


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
                                    "--operator", "<=", "--session-gap", "8")
    assert code == 0, err
    code, out, err = await alliance(namespace, "tenants", "set-rules", "--tenant", "acme", "--instrument", "CSRS",
                                    "--cutoff", "31")
    assert code == 0, err
    stored = await RulesStore(mongo[namespace.database]).stored("acme")
    assert stored == TenantRules(cutoff=34.5, operator="<=", session_gap=8,
                                 instruments={"CSRS": InstrumentOverride(cutoff=31.0)})
    code, out, _ = await alliance(namespace, "tenants", "show-rules", "--tenant", "acme")
    shown = json.loads(out)
    assert code == 0 and shown["source"] == "stored" and shown["rules"]["instruments"] == {"CSRS": {"cutoff": 31.0}}
    assert shown["rules"]["session_gap"] == 8


async def test_set_rules_command_refuses_an_invalid_operator_and_stores_nothing(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    code, _, err = await alliance(namespace, "tenants", "set-rules", "--tenant", "acme", "--operator", ">")
    assert code == 2 and "operator" in err
    assert await mongo[namespace.database][RULES].count_documents({}) == 0


async def test_the_index_keeps_the_first_client_and_the_newest_version_per_client(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    index = SubmissionIndex(mongo[namespace.database])
    m = IndexKey("acme", "alliance", "m")
    assert await index.read([m]) == {m: Held()}
    await index.register({(m, "client.a"): (NOW, "d2")}, await index.read([m]))
    await index.register({(m, "client.a"): (NOW - timedelta(seconds=1), "d9"), (m, "client-b"): (NOW, "d1")},
                         await index.read([m]))
    held = (await index.read([m]))[m]
    assert (held.first, held.held) == ("client.a", {"client.a": (NOW, "d2"), "client-b": (NOW, "d1")})


async def test_a_registration_racing_another_writer_is_written_again_and_read_back(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    index = SubmissionIndex(mongo[namespace.database])
    m, n = IndexKey("acme", "alliance", "m"), IndexKey("acme", "outcome", "m")
    stale = await index.read([m, n])  # both unknown when read
    await index.register({(m, "a"): (NOW, "d"), (n, "a"): (NOW, "d")}, stale)  # another process got there first
    after = await index.register({(m, "b"): (NOW + timedelta(seconds=1), "d")}, stale)
    assert after[m].first == "a" and set(after[m].held) == {"a", "b"}
    moved_on = await index.read([n])
    await index.register({(n, "c"): (NOW, "e")}, moved_on)
    after = await index.register({(n, "b"): (NOW, "f")}, moved_on)  # read before c's write: matches nothing
    assert set(after[n].held) == {"a", "b", "c"} == set((await index.read([n]))[n].held)


async def test_index_submissions_registers_every_stored_records_submissions(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    await StateStore(mongo[namespace.database]).save({KEY: state_with(38.0, 34.5)})
    code, out, err = await alliance(namespace, "scoring", "index-submissions")
    assert code == 0, err
    assert json.loads(out) == {"registered": 2}
    s2 = IndexKey("acme", "alliance", "s2")
    held = (await SubmissionIndex(mongo[namespace.database]).read([s2]))[s2]
    assert (held.first, held.held) == ("client-1", {"client-1": (version("s2", 2, 34.5).accepted_at,
                                                                 version("s2", 2, 34.5).digest)})


async def test_an_id_re_sent_for_many_clients_keeps_one_bounded_index_document_and_the_last_client_holds_it(
        namespace: Namespace, mongo: AsyncMongoClient[Document]) -> None:
    index = SubmissionIndex(mongo[namespace.database])
    h, _, sink = handler(index=index)
    clients = [f"p{i:02d}" for i in range(3 * INDEX_FORMER_HOLDERS)]
    await run_holders(h, sink, clients)
    doc = await mongo[namespace.database][INDEX].find_one({})
    assert doc is not None and len(doc["h"]) == 1 + INDEX_FORMER_HOLDERS
    (held,) = (await index.read([IndexKey("acme", "alliance", "moved")])).values()
    assert holder(held.held)[2] == clients[-1] and held.first == clients[0]  # type: ignore[index]
    assert {k for k in _final(sink)[0] if k[1] == "moved"} == {(clients[-1], "moved")}
