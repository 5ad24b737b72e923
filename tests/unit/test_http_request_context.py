"""`shared.http.RequestContext`, which `service_api` puts in front of every API: the request's
correlation id (header, logs, routes) and its HTTP metrics, labelled by route template."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request
from prometheus_client import REGISTRY

from shared.http import Runtime, authenticate_first, service_api
from shared.logs import JsonFormatter

SERVICE = "probe-context"
log = logging.getLogger("alliance.probe-context")


def probe_app() -> FastAPI:
    app = service_api(Runtime(SERVICE), title="probe", max_body_bytes=1_000)

    @app.get("/v1/things/{thing_id}")
    async def thing(thing_id: str, request: Request) -> dict[str, str]:
        log.warning("serving a thing")
        return {"correlation_id": request.scope["state"]["correlation_id"]}

    async def nobody(_: str) -> None:
        return None

    authenticate_first(app, nobody, prefix="/v1/locked/")
    return app


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=probe_app()), base_url="http://probe") as c:
        yield c


def counted(method: str, route: str, status: str) -> float:
    value = REGISTRY.get_sample_value("alliance_http_requests_total",
                                      {"service": SERVICE, "method": method, "route": route, "status": status})
    return value or 0.0


async def test_the_clients_correlation_id_reaches_the_route_and_the_response(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/things/t-1", headers={"X-Correlation-ID": "corr-1.a"})
    assert r.headers["x-correlation-id"] == "corr-1.a" == r.json()["correlation_id"]


async def test_a_correlation_id_header_is_accepted_too(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/things/t-1", headers={"correlation_id": "corr-2"})
    assert r.headers["x-correlation-id"] == "corr-2"


@pytest.mark.parametrize("sent", [b"has space", b"x" * 129, "é".encode()])
async def test_an_invalid_correlation_id_is_replaced_by_a_new_one(http: httpx.AsyncClient, sent: bytes) -> None:
    r = await http.get("/v1/things/t-1", headers={b"X-Correlation-ID": sent})
    assert uuid.UUID(r.headers["x-correlation-id"])


async def test_log_records_written_while_serving_carry_the_correlation_id(http: httpx.AsyncClient) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(SERVICE))
    log.addHandler(handler)
    try:
        await http.get("/v1/things/t-1", headers={"X-Correlation-ID": "corr-logged"})
    finally:
        log.removeHandler(handler)
    assert json.loads(out.getvalue().splitlines()[-1])["correlation_id"] == "corr-logged"


async def test_requests_are_counted_by_route_template_never_by_concrete_path(http: httpx.AsyncClient) -> None:
    before = counted("GET", "/v1/things/{thing_id}", "200")
    await http.get("/v1/things/t-1")
    await http.get("/v1/things/t-2")
    assert counted("GET", "/v1/things/{thing_id}", "200") == before + 2
    assert REGISTRY.get_sample_value("alliance_http_request_seconds_count",
                                     {"service": SERVICE, "method": "GET", "route": "/v1/things/{thing_id}"})


async def test_a_path_no_route_matches_is_counted_as_other(http: httpx.AsyncClient) -> None:
    before = counted("GET", "other", "404")
    assert (await http.get("/nowhere/42")).status_code == 404
    assert counted("GET", "other", "404") == before + 1


async def test_a_method_outside_the_known_ones_is_counted_as_other(http: httpx.AsyncClient) -> None:
    before = counted("other", "/v1/things/{thing_id}", "405")
    assert (await http.request("BREW", "/v1/things/t-1")).status_code == 405
    assert counted("other", "/v1/things/{thing_id}", "405") == before + 1


async def test_answers_given_by_a_middleware_are_counted_and_carry_the_id(http: httpx.AsyncClient) -> None:
    too_large = await http.post("/v1/things/t-1", content=b"x" * 2_000, headers={"X-Correlation-ID": "corr-413"})
    assert too_large.status_code == 413 and too_large.headers["x-correlation-id"] == "corr-413"
    before = counted("GET", "other", "401")
    locked = await http.get("/v1/locked/x")
    assert locked.status_code == 401 and locked.headers["x-correlation-id"]
    assert counted("GET", "other", "401") == before + 1
