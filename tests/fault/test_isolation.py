"""Tenant and site isolation across every HTTP endpoint of every service, with keys of two tenants
and site-bound keys of two sites. The endpoint list comes from the services' own OpenAPI documents,
so a new endpoint is covered (and must be isolated) as soon as it exists."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
from pymongo import AsyncMongoClient

from shared import auth
from shared.mongo import Document
from shared.topic_admin import ensure_topics
from tests.fault.helpers import post_batch, submission
from tests.support.reporting import assert_counters_agree
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.receiver import webhook_receiver

DOCS = Path(__file__).resolve().parents[2] / "docs" / "openapi"
OPEN = {"/healthz", "/readyz", "/metrics", "/dashboard"}


def operations() -> list[tuple[str, str, str]]:
    """(service, method, path) of every authenticated operation the services document."""
    ops = []
    for doc in sorted(DOCS.glob("*.json")):
        for path, methods in json.loads(doc.read_text())["paths"].items():
            if path not in OPEN:
                ops += [(doc.stem, m.upper(), path) for m in methods]
    return ops


async def _keys(ns: Namespace) -> dict[str, str]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(ns.stack.mongo_url, tz_aware=True)
    try:
        db = ns.mongo().database
        out = {}
        for tenant in ("tenant-a", "tenant-b"):
            for role in ("submit", "read", "admin"):
                out[f"{tenant}:{role}"], _ = await auth.create_key(client[db], tenant, role)  # type: ignore[arg-type]
        out["tenant-a:read@south"], _ = await auth.create_key(client[db], "tenant-a", "read", "south")
        out["tenant-a:submit@south"], _ = await auth.create_key(client[db], "tenant-a", "submit", "south")
    finally:
        await client.close()
    return out


def _fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path)


async def test_every_endpoint_refuses_other_tenants_other_sites_and_missing_keys(
        fault_stack: StackUnderTest, log_dir: Path) -> None:
    ns = Namespace.fresh(fault_stack)
    await ensure_topics(ns.kafka())
    keys = await _keys(ns)
    ops = operations()
    assert {svc for svc, _, _ in ops} >= {"intake", "alerts", "reporting"}
    with webhook_receiver() as receiver, running(["intake", "scoring", "alerts", "reporting"], ns, log_dir) as procs:
        url = {name: p.url for name, p in procs.items()}

        def auth_for(name: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {keys[name]}"}

        async with httpx.AsyncClient(timeout=30) as http:
            # Tenant A's world: a clinician at north, a partner subscription, one deteriorating client.
            admin_a = auth_for("tenant-a:admin")
            (await http.post(f"{url['alerts']}/v1/webhook-secret", headers=admin_a)).raise_for_status()
            (await http.put(f"{url['alerts']}/v1/clinicians/clin-a7", headers=admin_a, json={
                "site_id": "north", "email": "a7@clinic.example", "webhook_url": receiver.url})).raise_for_status()
            (await http.put(f"{url['alerts']}/v1/clinicians/clin-a7/aliases/clin-a7-ehr",
                            headers=admin_a)).raise_for_status()
            sub = await http.post(f"{url['alerts']}/v1/subscriptions", headers=admin_a, json={
                "url": receiver.url, "events": ["alliance.deterioration.v1"]})
            sub.raise_for_status()
            first, falling = submission(4242, 1, clinician="clin-a7"), submission(4242, 2, clinician="clin-a7")
            falling["total"] = 20.0
            await post_batch(http, url["intake"], keys["tenant-a:submit"], [first])
            await post_batch(http, url["intake"], keys["tenant-a:submit"], [falling])

            async def alert_and_delivery() -> tuple[str, str] | None:
                alerts = (await http.get(f"{url['alerts']}/v1/alerts", headers=admin_a)).json()
                deliveries = (await http.get(f"{url['alerts']}/v1/deliveries", headers=admin_a)).json()
                if alerts and deliveries:
                    return alerts[0]["alert_id"], deliveries[0]["delivery_id"]
                return None

            alert_id, delivery_id = await eventually(alert_and_delivery, timeout=90)

            async def visible() -> bool:
                r = await http.get(f"{url['reporting']}/v1/clients/client-4242/trajectory",
                                   headers=auth_for("tenant-a:read"))
                return r.status_code == 200

            await eventually(visible, timeout=90)
            ids = {"client_id": "client-4242", "clinician_id": "clin-a7", "site_id": "north", "alert_id": alert_id,
                   "alias_id": "clin-a7-ehr", "subscription_id": sub.json()["id"], "delivery_id": delivery_id,
                   "submission_id": falling["submission_id"]}
            # tenant B may create its own client-4242 here (its submit key posts one), so the markers
            # are ids only tenant A's data can hold
            markers = [alert_id, sub.json()["id"], delivery_id, "tenant-a", falling["submission_id"]]
            bodies: dict[str, Any] = {
                "/v1/submissions": submission(4242, 3), "/v1/submissions/batch": {"submissions": [submission(4242, 3)]},
                "/v1/clinicians/{clinician_id}": {"site_id": "north", "email": "b@clinic.example"},
                "/v1/clients/{client_id}/transfer": {"site_id": "south"},
            }

            leaks, failures = [], []
            for svc, method, path in ops:
                target = url[svc] + _fill(path, ids)
                body = bodies.get(path)
                anonymous = await http.request(method, target, json=body)
                if anonymous.status_code != 401:
                    failures.append(f"{method} {path} without a key: {anonymous.status_code}")
                bogus = await http.request(method, target, json=body, headers={"Authorization": "Bearer ak_nope"})
                if bogus.status_code != 401:
                    failures.append(f"{method} {path} with an unknown key: {bogus.status_code}")
                for who in ("tenant-b:read", "tenant-b:admin", "tenant-b:submit", "tenant-a:read@south",
                            "tenant-a:submit@south"):
                    r = await http.request(method, target, json=body, headers=auth_for(who))
                    if r.status_code >= 500:
                        failures.append(f"{method} {path} as {who}: {r.status_code}")
                    elif path == "/v1/audit" and r.status_code < 300:
                        # A caller's own audit trail names the ids it asked for (tenant A's among
                        # them, as this test asks for them): what must hold is that it is its own.
                        tenants = {e["tenant_id"] for e in r.json()["entries"]}
                        if tenants - {who.split(":")[0]}:
                            leaks.append(f"{method} {path} as {who}: entries of {sorted(tenants)}")
                    elif r.status_code < 300 and any(m in r.text for m in markers
                                                     if not (m == "tenant-a" and who.startswith("tenant-a:"))):
                        # (a site-bound key of tenant A may see its own tenant's name, e.g. in
                        # `GET /v1/sites`; what it must not see is north's data)
                        leaks.append(f"{method} {path} as {who}: {r.status_code} {r.text[:300]}")
                    elif (svc, method, path) == ("intake", "POST", "/v1/submissions") and \
                            who == "tenant-a:submit@south" and r.status_code != 403:
                        failures.append(f"a south key submitted for north: {r.status_code}")

            # Tenant A's things are intact after tenant B's writes and deletes.
            assert (await http.get(f"{url['alerts']}/v1/subscriptions", headers=admin_a)).json()
            a7 = (await http.get(f"{url['alerts']}/v1/clinicians/clin-a7", headers=admin_a)).json()
            assert a7["site_id"] == "north" and a7["aliases"] == ["clin-a7-ehr"]
            await assert_counters_agree(ns.mongo())
    print(f"\n{len(ops)} operations x 7 callers checked")
    print("\n".join(["failures:", *failures, "leaks:", *leaks, f"tenant A ids: {ids}"]))
    assert not failures, f"{len(failures)} failures (printed above)"
    assert not leaks, f"{len(leaks)} leaks (printed above)"
