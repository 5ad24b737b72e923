"""A clinician id the EHR spells differently, made an alias of the right directory entry
(`PUT /v1/clinicians/{clinician_id}/aliases/{alias_id}`), through the real alerts service, broker and
store: alerts naming it reach that entry's clinician by the site rule, putting it delivers the stranded
open alerts naming it, and an id is one entry's or one alias in a tenant (docs/partners.md, "Alerts
that reach no clinician").

One alerts instance serves the module; each test has its own tenant.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from shared import ids
from shared.auth import create_key
from tests.integration.test_alerts_delivery import (
    Env,
    Tenant,
    _async,
    _metrics,
    bearer,
    env_with,
    new_tenant,
    path,
    put_clinician,
)
from tests.integration.test_alerts_reroute import SWEEPING, alerts_at, rerouted, stranded
from tests.integration.test_alerts_unrouted import alert_row, put_fallback
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.harness import deterioration


@pytest.fixture(scope="module")
async def env(stack: StackUnderTest) -> AsyncIterator[Env]:
    async with env_with(stack, SWEEPING) as e:
        yield e


async def put_alias(env: Env, t: Tenant, cid: str, alias: str, headers: dict[str, str] | None = None) -> int:
    r = await env.client.put(f"/v1/clinicians/{cid}/aliases/{alias}", headers=headers or t.admin)
    return r.status_code


async def test_an_alert_naming_an_alias_reaches_the_entrys_clinician_as_their_own_alert(env: Env) -> None:
    t = await new_tenant(env, "alias")
    hook = path(t, "c-17")
    await put_clinician(env, t, "c-17", env.receiver.behave(hook))
    assert await put_alias(env, t, "c-17", "c-17x") == 201
    ev = deterioration(t.id, "c-17x", "client-1")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    [req] = await eventually(lambda: _async(env.receiver.at(hook)))
    assert json.loads(req.body)["clinician_id"] == "c-17x"  # the alert as raised
    assert req.headers["webhook-id"] == ids.delivery_id(ev.alert_id, "clinician:c-17", "webhook")
    assert "x-alliance-routed" not in req.headers
    row = await eventually(lambda: alert_row(env, t, ev.alert_id), until=lambda r: r["routing"] is not None)
    assert (row["routing"], row["routing_reason"]) == ("clinician", None)


async def test_putting_an_alias_delivers_the_stranded_open_alerts_naming_it_once(env: Env) -> None:
    t = await new_tenant(env, "aliasfix")
    fallback = await put_fallback(env, t, "duty")
    hook = path(t, "c-17")
    await put_clinician(env, t, "c-17", env.receiver.behave(hook))
    ev = await stranded(env, t, "c-17x", "client-2")  # the EHR's typo: to the fallback
    await eventually(lambda: _async(alerts_at(env, fallback, ev.alert_id)))
    before = await _metrics(env)

    assert await put_alias(env, t, "c-17", "c-17x") == 201
    assert await put_alias(env, t, "c-17", "c-17x") == 200  # again: nothing more

    [body] = await eventually(lambda: _async(alerts_at(env, hook, ev.alert_id)))
    assert (body["alert_id"], body["revision"]) == (ev.alert_id, 1)
    row = await alert_row(env, t, ev.alert_id)
    assert (row["routing"], row["routing_reason"]) == ("clinician", None)
    after = await _metrics(env)
    assert rerouted(after, "no_directory_entry") - rerouted(before, "no_directory_entry") == 1
    entry = (await env.client.get("/v1/clinicians/c-17", headers=t.read)).json()
    assert entry["aliases"] == ["c-17x"]


async def test_an_id_is_one_entrys_or_one_alias_in_a_tenant(env: Env) -> None:
    t = await new_tenant(env, "aliasunique")
    for cid in ("c1", "c2"):
        await put_clinician(env, t, cid, env.receiver.behave(path(t, cid)))
    assert await put_alias(env, t, "c1", "c1x") == 201

    assert await put_alias(env, t, "c2", "c1x") == 409  # another entry's alias
    assert await put_alias(env, t, "c2", "c1") == 409  # another entry's id
    assert await put_alias(env, t, "c1", "c1") == 422
    r = await env.client.put("/v1/clinicians/c1x", json={"site_id": "site-a", "email": "x@clinic.test"},
                             headers=t.admin)
    assert r.status_code == 409 and (await env.client.get("/v1/clinicians/c1x", headers=t.read)).status_code == 404
    assert await put_alias(env, t, "nobody", "c3x") == 404
    other = await new_tenant(env, "aliasother")  # ids are per tenant
    await put_clinician(env, other, "c2", env.receiver.behave(path(other, "c2")))
    assert await put_alias(env, other, "c2", "c1x") == 201


async def test_an_alias_reaches_nobody_at_another_site_than_its_entrys(env: Env) -> None:
    t = await new_tenant(env, "aliassite")
    fallback = await put_fallback(env, t, "duty", site="site-a")
    hook = path(t, "c-b")
    await put_clinician(env, t, "c-b", env.receiver.behave(hook), site="site-b")
    assert await put_alias(env, t, "c-b", "c-bx") == 201
    ev = deterioration(t.id, "c-bx", "client-3", site_id="site-a")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    [req] = await eventually(lambda: _async(env.receiver.at(fallback)))
    assert req.headers["x-alliance-routed-reason"] == "other_site"
    assert env.receiver.at(hook) == []


async def test_a_site_bound_admin_manages_only_its_own_sites_aliases(env: Env) -> None:
    t = await new_tenant(env, "aliasscope")
    site_admin, _ = await create_key(env.db, t.id, "admin", site_id="site-a")
    await put_clinician(env, t, "a1", env.receiver.behave(path(t, "a1")), site="site-a")
    await put_clinician(env, t, "b1", env.receiver.behave(path(t, "b1")), site="site-b")

    assert await put_alias(env, t, "b1", "b1x", bearer(site_admin)) == 403
    assert await put_alias(env, t, "a1", "a1x", bearer(site_admin)) == 201
    r = await env.client.delete("/v1/clinicians/b1/aliases/b1x", headers=bearer(site_admin))
    assert r.status_code == 403


async def test_removing_an_alias_leaves_alerts_naming_it_to_the_fallback_again(env: Env) -> None:
    t = await new_tenant(env, "aliasgone")
    fallback = await put_fallback(env, t, "duty")
    hook = path(t, "c1")
    await put_clinician(env, t, "c1", env.receiver.behave(hook))
    assert await put_alias(env, t, "c1", "c1x") == 201
    assert (await env.client.delete("/v1/clinicians/c1/aliases/c1x", headers=t.admin)).status_code == 204
    assert (await env.client.delete("/v1/clinicians/c1/aliases/c1x", headers=t.admin)).status_code == 404
    ev = deterioration(t.id, "c1x", "client-4")
    await env.publisher.publish(env.topics.deterioration, ev, t.id, ev.client_id)

    await eventually(lambda: _async(alerts_at(env, fallback, ev.alert_id)))
    assert alerts_at(env, hook, ev.alert_id) == []
    assert (await env.client.get("/v1/clinicians/c1", headers=t.read)).json()["aliases"] == []
