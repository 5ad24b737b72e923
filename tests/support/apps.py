"""The three HTTP apps built in-process against a namespace, and clients that call them as one peer.

For tests of what happens in front of the routes (keys, limits): no broker or consumer is needed,
so the apps' lifespans are not run; the store is reached lazily by each request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from fastapi import FastAPI
from pymongo import AsyncMongoClient

from services.alerts.app import AlertsConfig
from services.alerts.app import create_app as create_alerts
from services.alerts.settings import SmtpSettings
from services.intake.app import IntakeConfig
from services.intake.app import create_app as create_intake
from services.intake.settings import IntakeSettings
from services.reporting.app import ReportingConfig
from services.reporting.app import create_app as create_reporting
from shared import auth
from shared.mongo import Document
from shared.settings import AlertsHttp, IntakeHttp, ReportingHttp
from tests.support.services import Namespace
from tests.support.wait import eventually

HttpService = Literal["intake", "alerts", "reporting"]
HTTP_SERVICES: tuple[HttpService, ...] = ("intake", "alerts", "reporting")


def build_app(service: HttpService, ns: Namespace, intake: dict[str, Any] | None = None, **http: Any) -> FastAPI:
    """`service`'s app on `ns`, with `http` as its `ALLIANCE_<SERVICE>_*` HTTP settings (limits, proxies)
    and for intake `intake` as its own settings (an effectively unlimited submission rate by default)."""
    if service == "intake":
        settings = IntakeSettings(**{"rate_per_second": 1_000_000, "rate_burst": 1_000_000, **(intake or {})})
        return create_intake(IntakeConfig(kafka=ns.kafka(), mongo=ns.mongo(), intake=settings, http=IntakeHttp(**http)))
    if service == "alerts":
        return create_alerts(AlertsConfig(kafka=ns.kafka(), mongo=ns.mongo(), smtp=SmtpSettings(host=""),
                                          http=AlertsHttp(**http)))
    return create_reporting(ReportingConfig(kafka=ns.kafka(), mongo=ns.mongo(), http=ReportingHttp(**http)))


@asynccontextmanager
async def serving(app: FastAPI, peer: str = "203.0.113.7") -> AsyncIterator[httpx.AsyncClient]:
    """`app` with its lifespan run (broker connected, consumers and workers started) and a client
    calling it from `peer`, once `/readyz` answers 200: for tests that need more than the routes."""
    async with app.router.lifespan_context(app), client(app, peer) as http:
        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await eventually(ready, timeout=60)
        yield http


def client(app: FastAPI, peer: str = "203.0.113.7") -> httpx.AsyncClient:
    """A client whose requests reach `app` from the TCP peer `peer`."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(peer, 40_000)), base_url="http://test")


@dataclass(frozen=True)
class Probe:
    """A cheap request every key of the right role gets through authentication with."""

    method: str
    path: str
    role: auth.Role
    answer: int  # the status a key of `role` gets
    body: bytes | None = None

    async def send(self, http: httpx.AsyncClient, key: str | None, **headers: str) -> httpx.Response:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        if self.body is not None:
            headers["Content-Type"] = "application/json"
        return await http.request(self.method, self.path, content=self.body, headers=headers)


# intake answers a known key's malformed body with 422 (no broker needed), alerts lists the
# directory, reporting says the submission is unknown (404).
PROBES: dict[HttpService, Probe] = {
    "intake": Probe("POST", "/v1/submissions", "submit", 422, b"{not json"),
    "alerts": Probe("GET", "/v1/clinicians", "admin", 200),
    "reporting": Probe("GET", "/v1/submissions/no-such-submission", "read", 404),
}


async def new_key(ns: Namespace, role: auth.Role, tenant: str = "acme") -> str:
    """A fresh API key of `role` in `ns`'s store."""
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(ns.stack.mongo_url, tz_aware=True)
    try:
        key, _ = await auth.create_key(mongo[ns.database], tenant, role)
    finally:
        await mongo.close()
    return key
