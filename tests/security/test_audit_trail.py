"""The access audit trail through the real APIs, broker and store (issue 12, audit trail).

Reporting, alerts and intake run as processes for the whole module; each test has its own tenant.
What they record is read back through `GET /v1/audit` on reporting (entries are written in
batches, so each check polls) and through `alliance audit export`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from shared import audit
from shared.auth import create_key
from shared.mongo import Document
from tests.support.services import Namespace, running
from tests.support.wait import eventually
from tools.demo import publish, scored
from tools.harness import deterioration
from tools.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    ns: Namespace
    procs: dict[str, ServiceProcess]
    mongo: AsyncMongoClient[Document]

    async def key(self, tenant: str, role: str = "read", site: str | None = None) -> tuple[str, str]:
        """A new key and its public id."""
        key, principal = await create_key(self.mongo[self.ns.database], tenant, role, site)  # type: ignore[arg-type]
        return key, principal.key_id

    async def call(self, service: str, method: str, path: str, key: str, **kw: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.procs[service].url, timeout=30) as http:
            return await http.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw)

    async def audit(self, admin: str, **params: Any) -> httpx.Response:
        return await self.call("reporting", "GET", "/v1/audit", admin, params=params)

    async def trail(self, admin: str, **params: Any) -> list[dict[str, Any]]:
        """Every entry the admin key may see (all pages)."""
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            res = await self.audit(admin, **params, **({"cursor": cursor} if cursor else {}))
            assert res.status_code == 200, res.text
            body = res.json()
            out.extend(body["entries"])
            cursor = body["next_cursor"]
            if cursor is None:
                return out

    async def recorded(self, admin: str, action: str, count: int = 1, outcome: str | None = None,
                       **params: Any) -> list[dict[str, Any]]:
        """The `action` entries (with `outcome`, if given) once there are `count` of them."""
        async def check() -> list[dict[str, Any]]:
            found = [e for e in await self.trail(admin, **params)
                     if e["action"] == action and outcome in (None, e["outcome"])]
            return found if len(found) >= count else []

        return await eventually(check, timeout=30)


@pytest.fixture(scope="module")
def processes(namespace_m: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    with running(["reporting", "alerts", "intake"], namespace_m, tmp_path_factory.mktemp("audit-logs")) as procs:
        yield procs


@pytest.fixture(scope="module")
async def stack_(namespace_m: Namespace, processes: dict[str, ServiceProcess]) -> AsyncIterator[Stack]:
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    yield Stack(namespace_m, processes, mongo)
    await mongo.close()


def tenant() -> str:
    return "t-" + uuid.uuid4().hex[:8]


async def visible_trajectory(s: Stack, key: str, client: str) -> None:
    async def check() -> bool:
        res = await s.call("reporting", "GET", f"/v1/clients/{client}/trajectory", key)
        return res.status_code == 200

    await eventually(check, timeout=60)


# ---------------------------------------------------------------------------------------------
# What is recorded


async def test_a_trajectory_read_appends_an_entry_naming_the_key_the_client_and_the_outcome(stack_: Stack) -> None:
    t = tenant()
    await publish(stack_.ns.kafka(), [scored(t, "c1", 1, 38.0, site_id="north")])
    (reader, reader_id), (admin, _) = await stack_.key(t, "read", "north"), await stack_.key(t, "admin")
    await visible_trajectory(stack_, reader, "c1")
    (entry,) = await stack_.recorded(admin, "trajectory.read", outcome="allowed", client_id="c1")
    assert {k: entry[k] for k in ("tenant_id", "key_id", "role", "site", "service", "client_id", "outcome")} == {
        "tenant_id": t, "key_id": reader_id, "role": "read", "site": "north", "service": "reporting",
        "client_id": "c1", "outcome": "allowed"}
    assert datetime.fromisoformat(entry["at"]).tzinfo is not None


@pytest.mark.parametrize("view", ["fhir", "trajectory"])
async def test_a_site_bound_key_reading_another_sites_client_is_answered_404_and_recorded_as_denied(
        stack_: Stack, view: str) -> None:
    t = tenant()
    await publish(stack_.ns.kafka(), [scored(t, "c1", 1, 38.0, site_id="north")])
    north, (south, south_id), (admin, _) = (await stack_.key(t, "read", "north"))[0], await stack_.key(
        t, "read", "south"), await stack_.key(t, "admin")
    await visible_trajectory(stack_, north, "c1")
    res = await stack_.call("reporting", "GET", f"/v1/clients/c1/{view}", south)
    assert res.status_code == 404
    # (the north key's reads, waiting for the record, are `allowed` entries of their own)
    (entry,) = await stack_.recorded(admin, f"{view}.read", outcome="denied", client_id="c1")
    assert (entry["key_id"], entry["site"]) == (south_id, "south")


async def test_a_read_of_a_client_nobody_has_is_recorded_as_not_found(stack_: Stack) -> None:
    t = tenant()
    (reader, _), (admin, _) = await stack_.key(t, "read"), await stack_.key(t, "admin")
    assert (await stack_.call("reporting", "GET", "/v1/clients/ghost/trajectory", reader)).status_code == 404
    (entry,) = await stack_.recorded(admin, "trajectory.read", client_id="ghost")
    assert entry["outcome"] == "not_found"


async def test_a_clinician_registration_is_recorded_with_the_clinician(stack_: Stack) -> None:
    t = tenant()
    admin, admin_id = await stack_.key(t, "admin")
    res = await stack_.call("alerts", "PUT", "/v1/clinicians/dr-a", admin,
                            json={"site_id": "north", "email": "dr-a@example.org"})
    assert res.status_code == 201, res.text
    (entry,) = await stack_.recorded(admin, "clinician.put")
    assert (entry["service"], entry["key_id"], entry["target"], entry["outcome"]) == (
        "alerts", admin_id, "dr-a", "allowed")


async def test_a_read_key_changing_the_directory_is_recorded_as_denied(stack_: Stack) -> None:
    t = tenant()
    (reader, reader_id), (admin, _) = await stack_.key(t, "read"), await stack_.key(t, "admin")
    res = await stack_.call("alerts", "PUT", "/v1/clinicians/dr-a", reader,
                            json={"site_id": "north", "email": "dr-a@example.org"})
    assert res.status_code == 403
    (entry,) = await stack_.recorded(admin, "clinician.put")
    assert (entry["key_id"], entry["outcome"]) == (reader_id, "denied")


async def test_an_acknowledgement_is_recorded_with_the_alert_and_its_client(stack_: Stack) -> None:
    t = tenant()
    (reader, reader_id), (admin, _) = await stack_.key(t, "read"), await stack_.key(t, "admin")
    ev = deterioration(t, "dr-a", "c7", site_id="north")
    await publish(stack_.ns.kafka(), [ev])

    async def raised() -> bool:
        return (await stack_.call("alerts", "GET", f"/v1/alerts/{ev.alert_id}", reader)).status_code == 200

    await eventually(raised, timeout=60)
    res = await stack_.call("alerts", "POST", f"/v1/alerts/{ev.alert_id}/ack", reader)
    assert res.status_code == 200, res.text
    (entry,) = await stack_.recorded(admin, "alert.acknowledge")
    assert (entry["key_id"], entry["target"], entry["client_id"], entry["outcome"]) == (
        reader_id, ev.alert_id, "c7", "allowed")


async def test_an_alert_list_is_recorded(stack_: Stack) -> None:
    t = tenant()
    (reader, reader_id), (admin, _) = await stack_.key(t, "read", "north"), await stack_.key(t, "admin")
    assert (await stack_.call("alerts", "GET", "/v1/alerts", reader)).status_code == 200
    (entry,) = await stack_.recorded(admin, "alerts.list")
    assert (entry["service"], entry["key_id"], entry["site"], entry["outcome"]) == (
        "alerts", reader_id, "north", "allowed")


async def test_a_client_transfer_through_intake_is_recorded(stack_: Stack) -> None:
    t = tenant()
    admin, admin_id = await stack_.key(t, "admin")
    res = await stack_.call("intake", "POST", "/v1/clients/c9/transfer", admin, json={"site_id": "south"})
    assert res.status_code == 202, res.text
    (entry,) = await stack_.recorded(admin, "client.transfer")
    assert (entry["service"], entry["key_id"], entry["client_id"], entry["outcome"]) == (
        "intake", admin_id, "c9", "allowed")


# ---------------------------------------------------------------------------------------------
# GET /v1/audit


async def reads_of(s: Stack, t: str, clients: list[str]) -> str:
    """An admin key of `t`, once one not-found trajectory read per client is recorded (in order)."""
    (reader, _), (admin, _) = await s.key(t, "read"), await s.key(t, "admin")
    for c in clients:
        await s.call("reporting", "GET", f"/v1/clients/{c}/trajectory", reader)
    await s.recorded(admin, "trajectory.read", count=len(clients))
    return admin


async def test_the_trail_comes_in_pages_oldest_first_each_entry_once(stack_: Stack) -> None:
    t = tenant()
    clients = [f"p{i}" for i in range(5)]
    admin = await reads_of(stack_, t, clients)
    first = (await stack_.audit(admin, limit=2)).json()
    assert len(first["entries"]) == 2 and first["next_cursor"] is not None
    entries = await stack_.trail(admin, limit=2)
    assert [e["client_id"] for e in entries if e["action"] == "trajectory.read"] == clients
    assert len({e["id"] for e in entries}) == len(entries)
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)


async def test_the_trail_filters_by_client(stack_: Stack) -> None:
    t = tenant()
    admin = await reads_of(stack_, t, ["a", "b", "a"])
    assert [e["client_id"] for e in await stack_.trail(admin, client_id="a")] == ["a", "a"]


async def test_the_trail_filters_by_time(stack_: Stack) -> None:
    t = tenant()
    admin = await reads_of(stack_, t, ["s0", "s1", "s2"])
    reads = [e for e in await stack_.trail(admin) if e["action"] == "trajectory.read"]
    later = await stack_.trail(admin, since=reads[1]["at"])
    assert [e["client_id"] for e in later if e["action"] == "trajectory.read"] == ["s1", "s2"]


async def test_a_tenant_reads_only_its_own_trail(stack_: Stack) -> None:
    mine, theirs = tenant(), tenant()
    admin = await reads_of(stack_, mine, ["mine"])
    await reads_of(stack_, theirs, ["theirs"])
    assert {e["tenant_id"] for e in await stack_.trail(admin)} == {mine}


async def test_the_trail_needs_an_admin_key(stack_: Stack) -> None:
    reader, _ = await stack_.key(tenant(), "read")
    res = await stack_.audit(reader)
    assert res.status_code == 403 and res.json()["errors"][0]["field"] == "Authorization"


async def test_the_trail_needs_a_key_not_bound_to_a_site(stack_: Stack) -> None:
    admin, _ = await stack_.key(tenant(), "admin", "north")
    assert (await stack_.audit(admin)).status_code == 403


async def test_a_cursor_the_api_did_not_issue_is_refused(stack_: Stack) -> None:
    admin, _ = await stack_.key(tenant(), "admin")
    res = await stack_.audit(admin, cursor="bogus")
    assert res.status_code == 422 and res.json()["errors"][0]["field"] == "cursor"


# ---------------------------------------------------------------------------------------------
# Operator commands


def alliance(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ns.env(), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)


async def test_a_key_created_with_the_cli_is_recorded_and_the_export_prints_json_lines(stack_: Stack) -> None:
    t = tenant()
    await reads_of(stack_, t, ["x1"])
    created = alliance(stack_.ns, "keys", "create", "--tenant", t, "--role", "read")
    key_id = created.stderr.split()[2]
    out = alliance(stack_.ns, "audit", "export", "--tenant", t, "--since", "2020-01-01").stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert {(e["action"], e.get("client_id"), e.get("target")) for e in lines} >= {
        ("trajectory.read", "x1", None), ("keys.create", None, key_id)}
    cli = next(e for e in lines if e["action"] == "keys.create")
    assert (cli["key_id"], cli["role"], cli["tenant_id"]) == ("cli", "operator", t)
    assert {e["tenant_id"] for e in lines} == {t}


async def test_tenant_rules_set_with_the_cli_are_recorded(stack_: Stack) -> None:
    t = tenant()
    admin, _ = await stack_.key(t, "admin")
    alliance(stack_.ns, "tenants", "set-rules", "--tenant", t, "--cutoff", "35")
    (entry,) = await stack_.recorded(admin, "tenant_rules.set")
    assert (entry["key_id"], entry["role"], entry["outcome"]) == ("cli", "operator", "allowed")


# ---------------------------------------------------------------------------------------------
# The writer on the real store


async def test_a_batch_written_again_stores_each_entry_once(stack_: Stack) -> None:
    trail = stack_.mongo[stack_.ns.database]["audit_retry_check"]
    docs = [audit.entry(tenant_id=tenant(), key_id="k", role="read", site=None, service="test",
                        action="trajectory.read", outcome="allowed", client_id=f"c{n}") for n in range(3)]
    log = audit.AuditLog(trail, "test", flush_interval_seconds=3600)
    for doc in docs[:2]:
        log.append(doc)
    await log.flush()
    for doc in docs:  # a retry of the first two (their answer lost), and a new one
        log.append(doc)
    assert await log.flush() == 3
    assert sorted(d["client_id"] for d in await trail.find().to_list()) == ["c0", "c1", "c2"]
    await log.close()

