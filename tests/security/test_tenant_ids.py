"""Tenant isolation does not depend on how ids are concatenated (issue 12, finding 7: directory
`_id`s were `tenant:clinician` and tenant ids were not validated, so tenant `t` registering
clinician `x:c1` was read by tenant `t:x` as clinician `c1`).

Tenant ids are 1-64 characters of A-Za-z0-9._- (no ':'), checked where keys are made; clinician
ids in the alerts API follow intake's id rule; directory documents are keyed by a JSON array
`["tenant", "clinician"]` (`services.alerts.store.clinician_key`), which no two pairs share.
Through the real alerts API (in-process, lifespan run) on the real broker and store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pymongo import AsyncMongoClient

from services.alerts.app import AlertsConfig, create_app
from services.alerts.settings import AlertsSettings, SmtpSettings
from services.alerts.store import clinician_key
from shared.auth import create_key, hash_key
from shared.auth import new_key as new_api_key
from shared.mongo import Document
from tests.support.apps import new_key, serving
from tests.support.services import Namespace


@dataclass
class Alerts:
    app: FastAPI
    http: httpx.AsyncClient
    db: Any


@pytest.fixture(scope="module")
async def alerts(namespace_m: Namespace) -> AsyncIterator[Alerts]:
    app = create_app(AlertsConfig(kafka=namespace_m.kafka(), mongo=namespace_m.mongo(), smtp=SmtpSettings(host=""),
                                  alerts=AlertsSettings(allow_private_targets=True, dev_mode=True)))
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    try:
        async with serving(app) as http:
            yield Alerts(app, http, mongo[namespace_m.database])
    finally:
        await mongo.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def legacy_key(db: Any, tenant_id: str, role: str) -> dict[str, str]:
    """A key stored the way `create_key` did before tenant ids were validated (a tenant `t:x` can
    only exist from then)."""
    key = new_api_key()
    await db["api_keys"].insert_one({"_id": hash_key(key), "key_id": hash_key(key)[:16], "tenant_id": tenant_id,
                                     "role": role, "site_id": None, "label": "", "revoked": False})
    return bearer(key)


@pytest.mark.parametrize("tenant", ["t:x", "", "a b", "t/x", "x" * 65, "é"])
async def test_a_tenant_id_outside_the_id_rule_cannot_be_created(tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant id"):
        await create_key(None, tenant, "admin")  # type: ignore[arg-type]  # refused before any store access


async def test_tenant_t_x_does_not_read_tenant_ts_clinician_x_c1_as_its_clinician_c1(alerts: Alerts,
                                                                                     namespace_m: Namespace) -> None:
    """The attack from the issue: `t` registers `x:c1`; `t:x` asks for `c1`. With `tenant:clinician`
    ids both named the same document."""
    t = "iso-t"
    victim = bearer(await new_key(namespace_m, "admin", tenant=t))
    put = await alerts.http.put("/v1/clinicians/x:c1", json={"site_id": "north", "email": "victim@clinic.test"},
                                headers=victim)
    assert put.status_code == 201, put.text
    attacker = await legacy_key(alerts.db, f"{t}:x", "admin")

    got = await alerts.http.get("/v1/clinicians/c1", headers=attacker)
    assert got.status_code == 404, got.text
    listed = await alerts.http.get("/v1/clinicians", headers=attacker)
    assert listed.status_code == 200 and listed.json() == []


async def test_tenant_t_x_writing_clinician_c1_does_not_overwrite_tenant_ts_clinician_x_c1(
        alerts: Alerts, namespace_m: Namespace) -> None:
    t = "iso-w"
    victim = bearer(await new_key(namespace_m, "admin", tenant=t))
    await alerts.http.put("/v1/clinicians/x:c1", json={"site_id": "north", "email": "victim@clinic.test"},
                          headers=victim)
    attacker = await legacy_key(alerts.db, f"{t}:x", "admin")

    put = await alerts.http.put("/v1/clinicians/c1", json={"site_id": "s", "email": "evil@attacker.test"},
                                headers=attacker)
    assert put.status_code == 201  # a new entry of its own, not an overwrite of t's
    mine = await alerts.http.get("/v1/clinicians/x:c1", headers=victim)
    assert mine.status_code == 200 and mine.json()["email"] == "victim@clinic.test"


def test_directory_keys_of_pairs_that_concatenate_alike_differ() -> None:
    assert clinician_key("t", "x:c1") != clinician_key("t:x", "c1")
    assert clinician_key("t", "x:c1") == '["t","x:c1"]'


@pytest.mark.parametrize("bad", ["a b", "x" * 129, "c!1", "é"])
async def test_a_clinician_id_outside_the_intake_id_rule_is_refused_in_the_path(alerts: Alerts, bad: str,
                                                                                 namespace_m: Namespace) -> None:
    admin = bearer(await new_key(namespace_m, "admin", tenant="ids"))
    r = await alerts.http.put(f"/v1/clinicians/{bad}", json={"site_id": "s", "email": "a@b.test"}, headers=admin)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "clinician_id"


async def test_a_clinician_id_outside_the_id_rule_is_refused_as_an_alert_filter(alerts: Alerts,
                                                                               namespace_m: Namespace) -> None:
    read = bearer(await new_key(namespace_m, "read", tenant="ids"))
    r = await alerts.http.get("/v1/alerts", params={"clinician_id": "a b"}, headers=read)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "clinician_id"


async def test_directory_entries_under_the_old_key_form_are_migrated(alerts: Alerts, namespace_m: Namespace) -> None:
    t = "migrate"
    read = bearer(await new_key(namespace_m, "read", tenant=t))
    await alerts.db["clinicians"].insert_one({"_id": f"{t}:old-c", "tenant_id": t, "clinician_id": "old-c",
                                              "site_id": "s", "email": "old@clinic.test", "webhook_url": None,
                                              "supervisor_id": None})
    assert await alerts.app.state.alerts.store.migrate_clinician_keys() >= 1
    got = await alerts.http.get("/v1/clinicians/old-c", headers=read)
    assert got.status_code == 200 and got.json()["email"] == "old@clinic.test"
    assert await alerts.db["clinicians"].find_one({"_id": f"{t}:old-c"}) is None


@pytest.mark.parametrize("field", ["site_id", "supervisor_id"])
async def test_a_site_or_supervisor_id_outside_the_id_rule_is_refused_in_a_directory_entry(
        alerts: Alerts, namespace_m: Namespace, field: str) -> None:
    admin = bearer(await new_key(namespace_m, "admin", tenant="ids"))
    body = {"site_id": "north", "email": "a@b.test", field: "north site"}
    r = await alerts.http.put("/v1/clinicians/c-rule", json=body, headers=admin)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field
