"""Bounded requests on alerts and reporting (issue 12, finding 3: an unauthenticated 150 MB PUT was
parsed before its key was checked): a key is checked before a body is read, and a body past
`ALLIANCE_<SERVICE>_MAX_BODY_BYTES` (1 MiB by default) is refused with 413 — without reading it when
`Content-Length` says so, as soon as it grows past the limit when chunked. What that saves a real
process is measured in test_peak_memory.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pymongo import AsyncMongoClient

from services.alerts.app import AlertsConfig
from services.alerts.app import create_app as create_alerts
from services.alerts.settings import SmtpSettings
from services.reporting.app import ReportingConfig
from services.reporting.app import create_app as create_reporting
from shared import auth
from shared.mongo import Document
from tests.support.limits import call_without_reading
from tests.support.services import Namespace

LIMIT = 1024 * 1024
CLINICIAN = {"site_id": "north", "email": "c1@clinic.example"}


@pytest.fixture
async def admin_key(namespace: Namespace, mongo: AsyncMongoClient[Document]) -> str:
    key, _ = await auth.create_key(mongo[namespace.database], "acme", "admin")
    return key


@pytest.fixture
def alerts(namespace: Namespace) -> FastAPI:
    return create_alerts(AlertsConfig(kafka=namespace.kafka(), mongo=namespace.mongo(), smtp=SmtpSettings(host="")))


@pytest.fixture
def reporting(namespace: Namespace) -> FastAPI:
    return create_reporting(ReportingConfig(kafka=namespace.kafka(), mongo=namespace.mongo()))


async def chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """A body without `Content-Length` (sent chunked), `total` bytes long."""
    yield b'{"site_id": "'
    for _ in range(total // size):
        yield b"x" * size


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_alerts_refuses_a_declared_oversize_body_with_413_without_reading_it(alerts: FastAPI,
                                                                                  admin_key: str) -> None:
    r = await call_without_reading(alerts, "PUT", "/v1/clinicians/c1", {
        **bearer(admin_key), "Content-Type": "application/json", "Content-Length": str(150 * 1024 * 1024)})
    assert (r.status, r.body_reads) == (413, 0)
    assert r.body == {"errors": [{"field": "body", "message": f"the body must not exceed {LIMIT} bytes"}]}


async def test_alerts_refuses_a_chunked_body_with_413_once_it_grows_past_the_limit(alerts: FastAPI,
                                                                                   admin_key: str) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=alerts), base_url="http://alerts") as http:
        r = await http.put("/v1/clinicians/c1", content=chunks(2 * LIMIT),
                           headers={**bearer(admin_key), "Content-Type": "application/json"})
        assert r.status_code == 413
        assert r.json()["errors"][0]["field"] == "body"
        # a body within the limit is untouched
        ok = await http.put("/v1/clinicians/c1", json=CLINICIAN, headers=bearer(admin_key))
        assert ok.status_code in (200, 201), ok.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer ak_not-a-key"}], ids=["missing", "unknown"])
async def test_alerts_answers_401_without_a_known_key_before_reading_any_body(alerts: FastAPI,
                                                                              headers: dict[str, str]) -> None:
    r = await call_without_reading(alerts, "PUT", "/v1/clinicians/c1", {
        **headers, "Content-Type": "application/json", "Content-Length": str(150 * 1024 * 1024)})
    assert (r.status, r.body_reads) == (401, 0)
    assert r.body["errors"][0]["field"] == "Authorization"
    assert r.headers["www-authenticate"] == "Bearer"


BIG = {"Content-Type": "application/json", "Content-Length": str(10 * LIMIT)}


async def test_reporting_answers_401_without_a_known_key_before_reading_any_body(reporting: FastAPI) -> None:
    unauthenticated = await call_without_reading(reporting, "GET", "/v1/summary", BIG)
    assert (unauthenticated.status, unauthenticated.body_reads) == (401, 0)


async def test_reporting_refuses_a_declared_oversize_body_with_413_without_reading_it(reporting: FastAPI,
                                                                                    admin_key: str) -> None:
    oversize = await call_without_reading(reporting, "GET", "/v1/summary", {**bearer(admin_key), **BIG})
    assert (oversize.status, oversize.body_reads) == (413, 0)
    assert oversize.body["errors"][0]["field"] == "body"
