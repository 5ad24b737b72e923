"""Building blocks of the fault tests: tenants with keys, submission series, trajectory checks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from pymongo import AsyncMongoClient

from shared import auth
from shared.mongo import Document
from tests.support.services import Namespace

# Far enough back that 50 weekly sessions stay in the past (intake refuses the future).
BASE_TIME = (datetime.now(UTC) - timedelta(days=400)).replace(hour=9, minute=0, second=0, microsecond=0)


@dataclass
class TenantKeys:
    tenant: str
    submit: str
    read: str
    admin: str


async def make_tenant(ns: Namespace, tenant: str) -> TenantKeys:
    """A tenant with one key per role, written straight to the namespace's store."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(ns.stack.mongo_url, tz_aware=True)
    try:
        db = client[ns.database]
        keys = {role: (await auth.create_key(db, tenant, role))[0] for role in ("submit", "read", "admin")}
    finally:
        await client.close()
    return TenantKeys(tenant, keys["submit"], keys["read"], keys["admin"])


def series_total(client_index: int, session: int) -> float:
    """A deterministic SRS total per client and session: most clients high and stable,
    every seventh declining, every eleventh low and recovering."""
    if client_index % 7 == 0:
        return max(20.0, 39.0 - 2.5 * (session - 1))
    if client_index % 11 == 0:
        return min(39.0, 28.0 + 1.5 * (session - 1))
    return 38.0 + (client_index + session) % 2 * 0.5


def expected_alert_sessions(client_index: int, sessions: int) -> list[int]:
    """Sessions that must raise an alert under the default rules (issue 4), derived from the spec:
    below 36.0, or a drop of 1.0 or more, or low and not improving; every session here is the
    client's latest when it is scored because each client's sessions are posted in order."""
    out = []
    for s in range(1, sessions + 1):
        total = series_total(client_index, s)
        prev = series_total(client_index, s - 1) if s > 1 else None
        if total < 36.0 or (prev is not None and total - prev <= -1.0):
            out.append(s)
    return out


def administered_at(client_index: int, session: int) -> datetime:
    """When a session of the series was administered: weekly, at a per-client minute of the day."""
    return BASE_TIME + timedelta(days=7 * session, minutes=client_index % 600)


def derived_episode(client_index: int) -> str:
    """The episode id scoring derives for a series posted without one (docs/clinical-records.md:
    `auto/<UTC date of the first session>/<its number>`)."""
    return f"auto/{administered_at(client_index, 1).astimezone(UTC).date().isoformat()}/1"


def submission(client_index: int, session: int, site: str = "north", clinician: str = "c-1") -> dict[str, Any]:
    """A total-only submission (sites with only a total exist; it keeps the series exact)."""
    return {
        "submission_id": f"sub-{client_index}-{session}",
        "client_id": f"client-{client_index}",
        "clinician_id": clinician,
        "site_id": site,
        "instrument": "SRS",
        "session_number": session,
        "administered_at": administered_at(client_index, session).isoformat(),
        "total": series_total(client_index, session),
    }


async def post_batch(http: httpx.AsyncClient, url: str, key: str, items: list[dict[str, Any]]) -> list[str]:
    """Post a batch until the broker acknowledges it; returns the accepted submission ids.

    A 503 (broker not acknowledging) is retried with the same ids, as a real client would.
    """
    for _ in range(120):
        try:
            r = await http.post(f"{url}/v1/submissions/batch", json={"submissions": items},
                                headers={"Authorization": f"Bearer {key}"})
        except httpx.HTTPError:
            await asyncio.sleep(0.5)
            continue
        if r.status_code == 200:
            results = r.json()["results"]
            return [x["submission_id"] for x in results if x["status"] == "accepted"]
        if r.status_code in (429, 503):
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            continue
        raise AssertionError(f"batch answered {r.status_code}: {r.text[:500]}")
    raise AssertionError("batch was never accepted")


async def trajectory_sessions(http: httpx.AsyncClient, url: str, key: str, client_id: str) -> list[int] | None:
    """Session numbers of a client's SRS trajectory as reporting serves them, or None if unknown."""
    r = await http.get(f"{url}/v1/clients/{client_id}/trajectory", params={"instrument": "SRS"},
                       headers={"Authorization": f"Bearer {key}"})
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return [s["session_number"] for s in r.json()["sessions"]]
