"""Clinical record integrity through the four real services (docs/clinical-records.md): each of the
eight defects reported in the integrity issue, reproduced as a user meets it — posting to intake,
reading reporting, listing alerts, receiving webhooks — and what the contract says instead.

One tenant per module, one client per test, so the tests do not see each other's data.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from services.scoring.rules import TenantRules
from services.scoring.store import RulesStore
from shared import auth, ids
from shared.events import OrsItems, OrsSubmitted
from shared.mongo import Document
from tests.support.services import Namespace, ServiceProcess
from tests.support.wait import eventually
from tools.loadgen import client_transfer, publish, start_producer
from tools.receiver import WebhookReceiver

pytestmark = pytest.mark.asyncio(loop_scope="session")

TENANT = "acme"
STRICT_TENANT = "strict"  # its own rules: cutoff 30 with `<=`, drop 2.0
SEPT = datetime(2026, 9, 1, 10, 0, tzinfo=UTC)
NOV = datetime(2026, 11, 3, 10, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
async def keys(namespace_m: Namespace) -> AsyncIterator[dict[str, str]]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    db = client[namespace_m.database]
    out: dict[str, str] = {}
    for role in ("submit", "read", "admin"):
        out[role], _ = await auth.create_key(db, TENANT, role)  # type: ignore[arg-type]
        for site in ("north", "south"):
            out[f"{role}@{site}"], _ = await auth.create_key(db, TENANT, role, site)  # type: ignore[arg-type]
        out[f"strict:{role}"], _ = await auth.create_key(db, STRICT_TENANT, role)  # type: ignore[arg-type]
    await RulesStore(db).put(STRICT_TENANT, TenantRules(cutoff=30.0, operator="<=", drop=2.0))
    yield out
    await client.close()


@pytest.fixture(scope="module")
async def http(services: dict[str, ServiceProcess], keys: dict[str, str],
               receiver: WebhookReceiver) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        for tenant_admin in (keys["admin"], keys["strict:admin"]):
            headers = _auth(tenant_admin)
            (await client.post(f"{services['alerts'].url}/v1/webhook-secret", headers=headers)).raise_for_status()
            for clinician, site in (("c-north", "north"), ("c-south", "south")):
                (await client.put(f"{services['alerts'].url}/v1/clinicians/{clinician}", headers=headers, json={
                    "site_id": site, "email": f"{clinician}@clinic.example",
                    "webhook_url": receiver.url})).raise_for_status()
        yield client


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _items(*values: float) -> dict[str, float]:
    r, g, a, o = values if len(values) == 4 else (values[0],) * 4
    return {"relationship": r, "goals": g, "approach": a, "overall": o}


def _session(client: str, n: int, at: datetime, *, items: dict[str, float] | None = None,
             total: float | None = None, sid: str | None = None, site: str = "north",
             clinician: str = "c-north", episode: str | None = None) -> dict[str, Any]:
    rating = {"items": items} if items is not None else {"total": total}
    given = {"submission_id": sid, "episode_id": episode}
    return {"client_id": client, "clinician_id": clinician, "site_id": site, "session_number": n,
            "administered_at": at.isoformat(), **rating, **{k: v for k, v in given.items() if v is not None}}


async def _post(http: httpx.AsyncClient, services: dict[str, ServiceProcess], key: str,
                body: dict[str, Any]) -> str:
    r = await http.post(f"{services['intake'].url}/v1/submissions", headers=_auth(key), json=body)
    assert r.status_code == 202, r.text
    sid: str = r.json()["submission_id"]
    return sid


async def _transfer(http: httpx.AsyncClient, services: dict[str, ServiceProcess], admin_key: str, client: str,
                    site: str) -> None:
    r = await http.post(f"{services['intake'].url}/v1/clients/{client}/transfer", headers=_auth(admin_key),
                        json={"site_id": site})
    assert r.status_code == 202, r.text


async def _scored_at_north_then_transferred_south(http: httpx.AsyncClient, services: dict[str, ServiceProcess],
                                                  keys: dict[str, str], c: str) -> None:
    """Session 1 of client `c` (submission `<c>-s1`, 38.0) scored at north; then `c` transferred to south."""
    await _post(http, services, keys["submit@north"], _session(c, 1, SEPT, total=38.0, sid=f"{c}-s1"))
    await _status(http, services, keys["read@north"], f"{c}-s1", "scored")
    await _transfer(http, services, keys["admin"], c, "south")


async def _status(http: httpx.AsyncClient, services: dict[str, ServiceProcess], key: str, sid: str,
                  want: str | None = None, revision: int | None = None) -> dict[str, Any]:
    """The submission's status once reporting knows it (and, if asked, has reached `want`)."""
    async def known() -> dict[str, Any] | None:
        r = await http.get(f"{services['reporting'].url}/v1/submissions/{sid}", headers=_auth(key))
        if r.status_code != 200:
            return None
        doc: dict[str, Any] = r.json()
        if want is not None and doc["status"] != want:
            return None
        if revision is not None and doc.get("revision") != revision:
            return None
        return doc

    return await eventually(known, timeout=60)


async def _trajectory(http: httpx.AsyncClient, services: dict[str, ServiceProcess], key: str, client: str,
                      **params: str) -> httpx.Response:
    return await http.get(f"{services['reporting'].url}/v1/clients/{client}/trajectory", headers=_auth(key),
                          params=params)


async def _alerts(http: httpx.AsyncClient, services: dict[str, ServiceProcess], key: str,
                  client: str) -> list[dict[str, Any]]:
    r = await http.get(f"{services['alerts'].url}/v1/alerts", headers=_auth(key), params={"limit": 1000})
    r.raise_for_status()
    return [a for a in r.json() if a.get("client_id") == client]


async def _alert_webhooks(receiver: WebhookReceiver, client: str) -> list[dict[str, Any]]:
    """The raised and revised alerts the clinician's webhook received for a client (for `eventually`)."""
    return [h for h in _webhooks(receiver, client) if h["_event"] == "alliance.deterioration.v1"]


def _webhooks(receiver: WebhookReceiver, client: str) -> list[dict[str, Any]]:
    out = []
    for got in receiver.successes():
        body = json.loads(got.body)
        if body.get("client_id") == client:
            out.append({**body, "_event": got.headers.get("x-alliance-event")})
    return out


async def test_a_correction_under_the_same_submission_id_shows_its_own_items_total_and_flags(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver) -> None:
    c = "case1"
    await _post(http, services, keys["submit"], _session(c, 1, SEPT, items=_items(9.5), sid="case1-s1"))
    await _post(http, services, keys["submit"], _session(c, 2, SEPT + timedelta(days=7), items=_items(8.0),
                                                         sid="case1-s2"))
    await _status(http, services, keys["read"], "case1-s2", "scored", 1)
    await _post(http, services, keys["submit"], _session(c, 2, SEPT + timedelta(days=7), items=_items(9.5),
                                                         sid="case1-s2"))
    status = await _status(http, services, keys["read"], "case1-s2", "scored", 2)
    assert status["total"] == 38.0 and status["flags"] == []

    async def corrected() -> dict[str, Any] | None:
        r = await _trajectory(http, services, keys["read"], c)
        doc: dict[str, Any] = r.json() if r.status_code == 200 else {}
        sessions = doc.get("sessions", [])
        return doc if len(sessions) == 2 and sessions[1]["total"] == 38.0 else None

    traj = await eventually(corrected, timeout=60)
    second = traj["sessions"][1]
    assert second["items"] == _items(9.5)
    assert sum(second["items"].values()) == second["total"]
    assert second["flags"] == [] and second["revision"] == 2
    assert traj["at_risk"] is False


async def test_a_correction_that_clears_the_triggers_withdraws_the_alert_and_tells_the_clinician(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver) -> None:
    c = "case2"
    await _post(http, services, keys["submit"], _session(c, 1, SEPT, total=38.0, sid="case2-s1"))
    await _post(http, services, keys["submit"], _session(c, 2, SEPT + timedelta(days=7), total=32.0,
                                                         sid="case2-s2"))

    async def raised() -> list[dict[str, Any]]:
        return [a for a in await _alerts(http, services, keys["admin"], c) if a["status"] == "open"]

    alert = (await eventually(raised, timeout=60))[0]
    assert alert["severity"] == "critical"
    await _post(http, services, keys["submit"], _session(c, 2, SEPT + timedelta(days=7), total=38.0,
                                                         sid="case2-s2-fixed"))

    async def withdrawn() -> list[dict[str, Any]]:
        return [a for a in await _alerts(http, services, keys["admin"], c) if a["status"] == "withdrawn"]

    assert [a["alert_id"] for a in await eventually(withdrawn, timeout=60)] == [alert["alert_id"]]
    old = await _status(http, services, keys["read"], "case2-s2", "superseded")
    assert old["superseded_by"] == "case2-s2-fixed"

    async def told() -> list[str] | None:
        kinds = [h.get("status") or "raised" for h in _webhooks(receiver, c)]
        return kinds if "withdrawn" in kinds else None

    assert await eventually(told, timeout=60) == ["raised", "withdrawn"]


async def test_an_episode_restart_without_episode_id_keeps_history_and_alerts_on_the_new_drop(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver) -> None:
    c = "case3"
    for n in (1, 2, 3):
        await _post(http, services, keys["submit"], _session(c, n, SEPT + timedelta(days=7 * (n - 1)), total=38.0,
                                                             sid=f"case3-sept-{n}"))
    await _post(http, services, keys["submit"], _session(c, 1, NOV, total=38.0, sid="case3-nov-1"))
    await _post(http, services, keys["submit"], _session(c, 2, NOV + timedelta(days=7), total=30.0,
                                                         sid="case3-nov-2"))
    await _status(http, services, keys["read"], "case3-nov-2", "scored")

    async def current() -> dict[str, Any] | None:
        r = await _trajectory(http, services, keys["read"], c)
        doc: dict[str, Any] = r.json() if r.status_code == 200 else {}
        return doc if len(doc.get("episodes", [])) == 2 and len(doc.get("sessions", [])) == 2 else None

    traj = await eventually(current, timeout=60)
    assert traj["episode_id"] == "auto/2026-11-03/1"
    assert [s["total"] for s in traj["sessions"]] == [38.0, 30.0]
    september = await _trajectory(http, services, keys["read"], c, episode_id="auto/2026-09-01/1")
    assert [s["total"] for s in september.json()["sessions"]] == [38.0, 38.0, 38.0]

    hooks = await eventually(lambda: _alert_webhooks(receiver, c), timeout=60)
    assert hooks[0]["session_number"] == 2 and hooks[0]["episode_id"] == "auto/2026-11-03/1"
    assert hooks[0]["severity"] == "critical"


async def test_a_mistyped_session_number_is_rejected_and_does_not_silence_the_client(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver) -> None:
    c = "case4"
    await _post(http, services, keys["submit"], _session(c, 1, SEPT, total=38.0, sid="case4-s1"))
    await _post(http, services, keys["submit"], _session(c, 100000, SEPT + timedelta(days=7), total=38.0,
                                                         sid="case4-typo"))
    rejected = await _status(http, services, keys["submit"], "case4-typo", "rejected")
    assert rejected["reason"] == "session_gap"
    await _post(http, services, keys["submit"], _session(c, 2, SEPT + timedelta(days=14), total=12.0,
                                                         sid="case4-s2"))

    assert (await eventually(lambda: _alert_webhooks(receiver, c), timeout=60))[0]["submission_id"] == "case4-s2"

    async def listed() -> list[str] | None:
        r = await http.get(f"{services['reporting'].url}/v1/submissions", headers=_auth(keys["read"]),
                           params={"status": "rejected", "since": "2020-01-01T00:00:00+00:00"})
        got = [s["submission_id"] for s in r.json().get("submissions", [])] if r.status_code == 200 else []
        return got if "case4-typo" in got else None

    await eventually(listed, timeout=30)


async def test_another_sites_submission_never_takes_a_client_over(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str]) -> None:
    c = "case5"
    await _post(http, services, keys["submit@north"], _session(c, 1, SEPT, total=38.0, sid="case5-s1"))
    await _status(http, services, keys["read@north"], "case5-s1", "scored")
    await _post(http, services, keys["submit@south"], _session(c, 2, SEPT + timedelta(days=7), total=20.0,
                                                               sid="case5-south", site="south",
                                                               clinician="c-south"))
    rejected = await _status(http, services, keys["submit@south"], "case5-south", "rejected")
    assert rejected["reason"] == "site_conflict"
    north = await _trajectory(http, services, keys["read@north"], c)
    assert north.status_code == 200 and len(north.json()["sessions"]) == 1
    assert (await _trajectory(http, services, keys["read@south"], c)).status_code == 404


async def test_an_admin_transfer_moves_the_client_and_its_reads_to_the_new_site(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str]) -> None:
    c = "case5b"
    await _scored_at_north_then_transferred_south(http, services, keys, c)

    async def moved() -> bool:
        return (await _trajectory(http, services, keys["read@south"], c)).status_code == 200

    await eventually(moved, timeout=60)
    assert (await _trajectory(http, services, keys["read@north"], c)).status_code == 404
    await _post(http, services, keys["submit@south"], _session(c, 2, SEPT + timedelta(days=7), total=38.0,
                                                               sid="case5b-s2", site="south",
                                                               clinician="c-south"))
    assert (await _status(http, services, keys["read@south"], "case5b-s2", "scored"))["session_number"] == 2


async def test_a_site_admin_cannot_register_another_sites_clinician(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str]) -> None:
    r = await http.put(f"{services['alerts'].url}/v1/clinicians/c-north", headers=_auth(keys["admin@south"]),
                       json={"site_id": "south", "email": "thief@clinic.example"})
    assert r.status_code == 403, r.text
    r = await http.put(f"{services['alerts'].url}/v1/clinicians/c-new", headers=_auth(keys["admin@south"]),
                       json={"site_id": "north", "email": "thief@clinic.example"})
    assert r.status_code == 403, r.text


async def test_reimporting_the_same_csv_export_changes_nothing_and_a_changed_row_is_a_correction(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver) -> None:
    header = "client_id,clinician_id,site_id,session_number,administered_at,total\n"
    rows = [f"case6,c-north,north,1,{SEPT.isoformat()},38.0\n",
            f"case6,c-north,north,2,{(SEPT + timedelta(days=7)).isoformat()},31.0\n"]

    async def post_csv(text: str) -> list[str]:
        r = await http.post(f"{services['intake'].url}/v1/submissions/csv", headers={
            **_auth(keys["submit"]), "Content-Type": "text/csv"}, content=text.encode())
        assert r.status_code == 200, r.text
        return [x["submission_id"] for x in r.json()["results"]]

    first = await post_csv(header + "".join(rows))
    await _status(http, services, keys["read"], first[1], "scored", 1)
    again = await post_csv(header + "".join(rows))
    assert again == first

    await eventually(lambda: _alert_webhooks(receiver, "case6"), timeout=60)
    changed = await post_csv(header + rows[0] + rows[1].replace(",31.0", ",30.0"))
    assert changed == first
    corrected = await _status(http, services, keys["read"], first[1], "scored", 2)
    assert corrected["total"] == 30.0
    assert (await _status(http, services, keys["read"], first[0], "scored"))["revision"] == 1

    async def revised() -> list[int] | None:
        revisions = sorted(h["revision"] for h in await _alert_webhooks(receiver, "case6"))
        return revisions if 2 in revisions else None

    # the re-import raised nothing; the correction revised the alert once
    assert await eventually(revised, timeout=60) == [1, 2]


@pytest.mark.parametrize(("client", "totals", "severity"), [
    ("case7-flat", (30.0, 30.0), "warning"),
    ("case7-three-low", (30.0, 30.0, 30.0), "critical"),
    ("case7-small-drop-below", (36.5, 35.4), "critical"),
    ("case7-big-drop", (40.0, 36.5), "critical"),
    ("case7-drop-above", (39.9, 37.0), "warning"),
])
async def test_severity_counts_each_reason_once(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver, client: str, totals: tuple[float, ...], severity: str) -> None:
    for n, total in enumerate(totals, start=1):
        await _post(http, services, keys["submit"], _session(client, n, SEPT + timedelta(days=7 * n), total=total,
                                                             sid=f"{client}-{n}"))

    async def latest_alert() -> dict[str, Any] | None:
        got = [a for a in await _alerts(http, services, keys["admin"], client)
               if a["session_number"] == len(totals) and a["status"] == "open"]
        return got[0] if got else None

    assert (await eventually(latest_alert, timeout=60))["severity"] == severity


async def test_reporting_and_fhir_show_the_flags_scoring_decided_with_the_tenants_rules(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str]) -> None:
    c = "case8"
    read = keys["strict:read"]
    await _post(http, services, keys["strict:submit"], _session(c, 1, SEPT, total=31.5, sid="case8-1"))
    await _post(http, services, keys["strict:submit"], _session(c, 2, SEPT + timedelta(days=7), total=30.0,
                                                                sid="case8-2"))
    await _status(http, services, read, "case8-2", "scored")
    traj = (await _trajectory(http, services, read, c)).json()
    latest = traj["sessions"][-1]
    # cutoff 30 with `<=`: 30.0 is below; a drop of 1.5 is under the tenant's 2.0: not declining
    assert latest["flags"] == ["below_cutoff"] and latest["below_cutoff"] is True
    assert traj["cutoff"] == 30.0 and traj["declining"] is False and traj["at_risk"] is True
    fhir = (await http.get(f"{services['reporting'].url}/v1/clients/{c}/fhir", headers=_auth(read))).json()
    observations = [e["resource"] for e in fhir["entry"] if e["resource"]["resourceType"] == "Observation"]
    codes = [o["interpretation"][0]["coding"][0]["code"] for o in observations]
    assert codes == ["N", "L"]


async def test_a_session_scored_under_changed_rules_supersedes_the_earlier_alert_and_tells_no_withdrawal(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], receiver: WebhookReceiver,
        namespace_m: Namespace) -> None:
    # A tenant of its own: its rules change in the middle of the client's record.
    tenant, c = "rules-change", "case9"
    store: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    db = store[namespace_m.database]
    key = {role: (await auth.create_key(db, tenant, role))[0] for role in ("submit", "admin")}  # type: ignore[arg-type]
    (await http.post(f"{services['alerts'].url}/v1/webhook-secret", headers=_auth(key["admin"]))).raise_for_status()
    (await http.put(f"{services['alerts'].url}/v1/clinicians/c-north", headers=_auth(key["admin"]), json={
        "site_id": "north", "email": "c-north@clinic.example", "webhook_url": receiver.url})).raise_for_status()
    await _post(http, services, key["submit"], _session(c, 1, SEPT, total=36.0, sid="case9-1"))
    await _post(http, services, key["submit"], _session(c, 2, SEPT + timedelta(days=7), total=35.5, sid="case9-2"))
    (alert,) = await eventually(lambda: _alert_webhooks(receiver, c), timeout=60)  # below the cutoff of 36 only

    await RulesStore(db).put(tenant, TenantRules(cutoff=34.0))
    await store.close()
    await asyncio.sleep(6)  # nothing shows when scoring reads them: it does within its rules cache time (5 s)
    await _post(http, services, key["submit"], _session(c, 3, SEPT + timedelta(days=14), total=35.5, sid="case9-3"))

    async def ended() -> list[dict[str, Any]]:
        return [a for a in await _alerts(http, services, key["admin"], c) if a["status"] != "open"]

    assert [(a["alert_id"], a["status"]) for a in await eventually(ended, timeout=60)] == [
        (alert["alert_id"], "superseded")]
    assert [h.get("status") or "raised" for h in _webhooks(receiver, c)] == ["raised"]


async def test_a_submission_reposted_for_another_client_moves_there_with_its_alert(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver) -> None:
    # An EHR rated the wrong patient, moved the rating to the right one and re-exported it under
    # the same submission id (docs/clinical-records.md, "The same id for another client moves the
    # session"). A partner subscribed to srs.scored.v1 sees both clients' events.
    first, second, moved = "case10-a", "case10-b", "case10-moved"
    r = await http.post(f"{services['alerts'].url}/v1/subscriptions", headers=_auth(keys["admin"]),
                        json={"url": receiver.url, "events": ["srs.scored.v1"]})
    assert r.status_code in (200, 201), r.text
    await _post(http, services, keys["submit"], _session(first, 1, SEPT, total=38.0, sid="case10-a1"))
    await _post(http, services, keys["submit"], _session(second, 1, SEPT, total=38.0, sid="case10-b1"))
    await _post(http, services, keys["submit"], _session(first, 2, SEPT + timedelta(days=7), total=32.0, sid=moved))

    async def open_alerts(client: str) -> list[dict[str, Any]]:
        return [a for a in await _alerts(http, services, keys["admin"], client) if a["status"] == "open"]

    (raised,) = await eventually(lambda: open_alerts(first), timeout=60)
    assert raised["severity"] == "critical"
    await _post(http, services, keys["submit"], _session(second, 2, SEPT + timedelta(days=7), total=32.0, sid=moved))

    async def withdrawn() -> list[dict[str, Any]]:
        return [a for a in await _alerts(http, services, keys["admin"], first) if a["status"] == "withdrawn"]

    assert [a["alert_id"] for a in await eventually(withdrawn, timeout=60)] == [raised["alert_id"]]
    (theirs,) = await eventually(lambda: open_alerts(second), timeout=60)
    assert theirs["severity"] == "critical" and theirs["alert_id"] != raised["alert_id"]

    async def sessions_of(client: str, count: int) -> list[str] | None:
        r = await _trajectory(http, services, keys["read"], client)
        shown = [s["submission_id"] for s in r.json()["sessions"]] if r.status_code == 200 else []
        return shown if len(shown) == count else None

    assert await eventually(lambda: sessions_of(first, 1), timeout=60) == ["case10-a1"]
    assert await eventually(lambda: sessions_of(second, 2), timeout=60) == ["case10-b1", moved]
    status = await _status(http, services, keys["read"], moved, "scored")
    assert status["client_id"] == second

    async def scored_ids() -> dict[str, set[str]] | None:
        got: dict[str, set[str]] = {}
        for h in _webhooks(receiver, first) + _webhooks(receiver, second):
            if h["_event"] == "srs.scored.v1" and h["submission_id"] == moved:
                got.setdefault(h["client_id"], set()).add(h["event_id"])
        return got if len(got) == 2 else None

    ids_by_client = await eventually(scored_ids, timeout=60)
    assert not ids_by_client[first] & ids_by_client[second]


async def _evening_episode_with_an_alert(http: httpx.AsyncClient, services: dict[str, ServiceProcess],
                                         keys: dict[str, str], c: str) -> dict[str, Any]:
    """Sessions 1..3 without episode id, session 1 at 23:30 UTC (an evening session in the
    Americas), session 3 dropping: its alert, once it is open."""
    evening = datetime(2026, 11, 3, 23, 30, tzinfo=UTC)
    for n, total in ((1, 38.0), (2, 38.0), (3, 32.0)):
        await _post(http, services, keys["submit"], _session(c, n, evening + timedelta(days=7 * (n - 1)),
                                                             total=total, sid=f"{c}-{n}"))

    async def raised() -> list[dict[str, Any]]:
        return [a for a in await _alerts(http, services, keys["admin"], c) if a["status"] == "open"]

    (alert,) = await eventually(raised, timeout=60)
    assert alert["episode_id"] == "auto/2026-11-03/1" and alert["session_number"] == 3
    return alert


async def _correct_session_1_across_midnight(http: httpx.AsyncClient, services: dict[str, ServiceProcess],
                                             keys: dict[str, str], c: str) -> dict[str, Any]:
    """The EHR fixes session 1's time (23:30 -> 00:30 the next day, UTC) under the same id; the
    trajectory once reporting shows the correction."""
    fixed = datetime(2026, 11, 4, 0, 30, tzinfo=UTC)
    await _post(http, services, keys["submit"], _session(c, 1, fixed, total=38.0, sid=f"{c}-1"))
    status = await _status(http, services, keys["read"], f"{c}-1", "scored", 2)
    assert status["episode_id"] == "auto/2026-11-03/1"

    async def corrected() -> dict[str, Any] | None:
        r = await _trajectory(http, services, keys["read"], c)
        doc: dict[str, Any] = r.json() if r.status_code == 200 else {}
        sessions = doc.get("sessions", [])
        return doc if sessions and datetime.fromisoformat(sessions[0]["administered_at"]) == fixed else None

    traj = await eventually(corrected, timeout=60)
    # Whatever scoring published with the correction (a withdrawal, a raise) is in the alerts
    # service well within this (it is consumed within a second of the scored event).
    await asyncio.sleep(3)
    return traj


async def test_a_time_correction_of_session_1_across_midnight_keeps_the_episode_and_its_acknowledged_alert(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver) -> None:
    c = "case11"
    alert = await _evening_episode_with_an_alert(http, services, keys, c)
    r = await http.post(f"{services['alerts'].url}/v1/alerts/{alert['alert_id']}/ack", headers=_auth(keys["read"]))
    assert r.status_code == 200, r.text

    traj = await _correct_session_1_across_midnight(http, services, keys, c)

    assert [e["episode_id"] for e in traj["episodes"]] == ["auto/2026-11-03/1"]
    assert [s["session_number"] for s in traj["sessions"]] == [1, 2, 3]
    (now,) = await _alerts(http, services, keys["admin"], c)
    assert (now["alert_id"], now["status"], now["revision"]) == (alert["alert_id"], "acknowledged", 1)
    kinds = [h.get("status") or "raised" for h in _webhooks(receiver, c) if h["_event"] != "srs.scored.v1"]
    assert kinds == ["raised"]


async def test_a_time_correction_of_session_1_across_midnight_keeps_an_open_alerts_raise_time(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver) -> None:
    c = "case12"
    alert = await _evening_episode_with_an_alert(http, services, keys, c)

    traj = await _correct_session_1_across_midnight(http, services, keys, c)

    assert [e["episode_id"] for e in traj["episodes"]] == ["auto/2026-11-03/1"]
    (now,) = await _alerts(http, services, keys["admin"], c)
    # The escalation clock runs from the raise: the same alert, raised when it was.
    assert (now["alert_id"], now["status"], now["revision"]) == (alert["alert_id"], "open", 1)
    assert now["created_at"] == alert["created_at"] and not now["escalated"]
    assert len(await _alert_webhooks(receiver, c)) == 1
    assert not [h for h in _webhooks(receiver, c) if h.get("status") == "withdrawn"]


async def test_a_correction_after_a_transfer_revises_the_open_alert_for_the_new_site_and_its_clinician(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver) -> None:
    # An open alert raised at north stays north's through the transfer; the south clinician's
    # correction of that session revises it for south (who submitted it, and owns the client
    # now): not for north's fallbacks, with a south clinician north's routing cannot reach.
    c = "case5c"
    await _post(http, services, keys["submit@north"], _session(c, 1, SEPT, total=38.0, sid="case5c-s1"))
    await _post(http, services, keys["submit@north"], _session(c, 2, SEPT + timedelta(days=7), total=30.0,
                                                               sid="case5c-s2"))
    await eventually(lambda: _alert_webhooks(receiver, c), timeout=60)
    await _transfer(http, services, keys["admin"], c, "south")
    await _status(http, services, keys["read@south"], "case5c-s2", "scored", 2)
    await _post(http, services, keys["submit@south"], _session(c, 2, SEPT + timedelta(days=7), total=28.0,
                                                               sid="case5c-s2", site="south", clinician="c-south"))
    await _status(http, services, keys["read@south"], "case5c-s2", "scored", 3)

    async def revised() -> dict[str, Any] | None:
        return next((h for h in await _alert_webhooks(receiver, c) if h["revision"] == 2), None)

    got = await eventually(revised, timeout=60)
    assert (got["site_id"], got["clinician_id"], got["total"]) == ("south", "c-south", 28.0)
    (listed,) = await _alerts(http, services, keys["read@south"], c)
    assert (listed["revision"], listed["status"]) == (2, "open")
    assert await _alerts(http, services, keys["read@north"], c) == []


async def test_the_new_sites_ors_after_a_transfer_raises_the_old_sites_open_alert_for_the_new_site_only(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        receiver: WebhookReceiver) -> None:
    # North's SRS alert of session 2 is open when the client moves to south; south's ORS of that
    # session deteriorated, so the alert is revised `outcome_at_risk`. That revision is south's
    # news about south's client: not for north's clinician. (c-north is not south's: with no
    # fallback entry at south, it reaches nobody, and says so.)
    c = "case5d"
    week = SEPT + timedelta(days=7)
    await _post(http, services, keys["submit@north"], {**_session(c, 1, SEPT - timedelta(minutes=50), sid="case5d-o1",
                                                                  items=_ors(20.0)), "instrument": "ORS"})
    await _post(http, services, keys["submit@north"], _session(c, 1, SEPT, total=38.0, sid="case5d-s1"))
    await _post(http, services, keys["submit@north"], _session(c, 2, week, total=30.0, sid="case5d-s2"))
    await eventually(lambda: _alert_webhooks(receiver, c), timeout=60)
    await _transfer(http, services, keys["admin"], c, "south")
    await _status(http, services, keys["read@south"], "case5d-s2", "scored", 2)
    await _post(http, services, keys["submit@south"], {
        **_session(c, 2, week - timedelta(minutes=50), items=_ors(13.0), sid="case5d-o2", site="south",
                   clinician="c-south"), "instrument": "ORS"})

    async def at_risk() -> list[dict[str, Any]]:
        return [a for a in await _alerts(http, services, keys["read@south"], c)
                if a["alert_type"] == "alliance" and a["revision"] == 2]

    (alert,) = await eventually(at_risk, timeout=60)
    assert (alert["site_id"], alert["outcome_at_risk"]) == ("south", True)
    assert [a for a in await _alerts(http, services, keys["read@north"], c) if a["alert_type"] == "alliance"] == []
    assert [h["revision"] for h in await _alert_webhooks(receiver, c)] == [1]


def _ors(total: float) -> dict[str, float]:
    quarter = round(total / 4, 1)
    return {"individually": quarter, "interpersonally": quarter, "socially": quarter,
            "overall": round(total - 3 * quarter, 1)}


async def test_the_new_sites_ors_a_transfer_re_judges_into_a_session_gap_is_answered_session_gap(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
        namespace_m: Namespace) -> None:
    # South's ORS, accepted after the transfer but read before it (the transfer written to
    # srs.submitted.v1 alone, as intake did before it wrote both copies), is refused site_conflict;
    # the transfer re-judges it, and its number is 30 above its episode's highest: a session gap.
    # Its submitter must be told that (on main it kept saying site_conflict for ever).
    c, sid = "case5f", "case5f-o31"
    await _post(http, services, keys["submit@north"], {**_session(c, 1, SEPT - timedelta(minutes=50), sid="case5f-o1",
                                                                  items=_ors(20.0)), "instrument": "ORS"})
    await _status(http, services, keys["read@north"], "case5f-o1", "scored")
    topics, moved_at = namespace_m.kafka().topics(), datetime.now(UTC)
    gap = OrsSubmitted(event_id=ids.submitted_event_id(TENANT, sid), tenant_id=TENANT, submission_id=sid,
                       occurred_at=moved_at + timedelta(seconds=1), site_id="south", clinician_id="c-south",
                       client_id=c, session_number=31, administered_at=SEPT + timedelta(days=7 * 30, minutes=-50),
                       items=OrsItems.model_validate(_ors(20.0)), accepted_at=moved_at + timedelta(seconds=1))
    producer = await start_producer(namespace_m.stack.bootstrap)
    try:
        await publish(producer, topics.ors_submitted, [gap])
        refused = await _status(http, services, keys["read@south"], sid, "rejected")
        assert refused["reason"] == "site_conflict"
        await publish(producer, topics.submitted, [client_transfer(TENANT, c, "south", "r-case5f", moved_at)])
    finally:
        await producer.stop()

    async def reason() -> str | None:
        r = await http.get(f"{services['reporting'].url}/v1/submissions/{sid}", headers=_auth(keys["read@south"]))
        return r.json()["reason"] if r.status_code == 200 else None

    await eventually(reason, timeout=30, until=lambda got: got == "session_gap")
    told = await _status(http, services, keys["read"], sid)
    assert (told["status"], told["reason"], told["scale"], told["session_number"]) == (
        "rejected", "session_gap", "outcome", 31)
    assert "31" in told["detail"]
    r = await http.get(f"{services['reporting'].url}/v1/submissions", headers=_auth(keys["read@south"]),
                       params={"status": "rejected", "since": (moved_at - timedelta(minutes=1)).isoformat()})
    assert [s["reason"] for s in r.json()["submissions"] if s["submission_id"] == sid] == ["session_gap"]


async def test_the_old_sites_re_export_after_a_transfer_is_refused_to_it_and_hides_nothing_from_the_new_site(
        http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str]) -> None:
    c = "case5e"
    await _scored_at_north_then_transferred_south(http, services, keys, c)
    await _status(http, services, keys["read@south"], "case5e-s1", "scored", 2)
    await _post(http, services, keys["submit@north"], _session(c, 1, SEPT, total=30.0, sid="case5e-s1"))

    refused = await _status(http, services, keys["submit@north"], "case5e-s1", "rejected")
    assert (refused["reason"], refused["total"]) == ("site_conflict", 30.0)
    owned = await _status(http, services, keys["read@south"], "case5e-s1")
    assert (owned["status"], owned["revision"], owned["total"]) == ("scored", 2, 38.0)
    traj = (await _trajectory(http, services, keys["read@south"], c)).json()
    assert [s["total"] for s in traj["sessions"]] == [38.0]
