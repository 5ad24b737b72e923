"""Every store operation is bounded: a store that stops answering fails the operation instead of
holding a consumer's batch or a request for ever (`ALLIANCE_MONGO_OPERATION_TIMEOUT_MS`), and the
paths whose operations legitimately run long get the admin bound (`ALLIANCE_MONGO_ADMIN_TIMEOUT_MS`).

These are the rules without a store; a store that stops answering under a consuming service and
an HTTP read is tests/integration/test_store_stall.py.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import pymongo
import pytest
from fastapi import FastAPI
from pymongo import _csot
from pymongo.errors import AutoReconnect, ExecutionTimeout, NetworkTimeout, OperationFailure, PyMongoError

from services.intake.app import IntakeConfig
from shared.http import Adapters, Runtime, install_error_handlers
from shared.mongo import admin_bound, make_client
from shared.settings import MongoSettings
from tests.support.wait import eventually

URL = "mongodb://127.0.0.1:1/?directConnection=true"  # never reached: building a client connects nothing
SECRET = "client-p-8812"  # a value a store error may quote: must never reach a log line


def test_by_default_an_operation_is_bounded_at_30_s_and_an_admin_one_at_an_hour() -> None:
    settings = MongoSettings()
    assert (settings.operation_timeout_ms, settings.admin_timeout_ms) == (30_000, 3_600_000)


def test_the_bounds_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLIANCE_MONGO_OPERATION_TIMEOUT_MS", "1500")
    monkeypatch.setenv("ALLIANCE_MONGO_ADMIN_TIMEOUT_MS", "600000")
    settings = MongoSettings()
    assert (settings.operation_timeout_ms, settings.admin_timeout_ms) == (1_500, 600_000)


async def test_a_services_client_bounds_each_operation_by_the_operation_timeout() -> None:
    client = make_client(MongoSettings(url=URL, operation_timeout_ms=2_500, admin_timeout_ms=90_000))
    try:
        assert client.options.timeout == 2.5
    finally:
        await client.close()


async def test_an_admin_client_bounds_each_operation_by_the_admin_timeout() -> None:
    client = make_client(MongoSettings(url=URL, operation_timeout_ms=2_500, admin_timeout_ms=90_000), admin=True)
    try:
        assert client.options.timeout == 90.0
    finally:
        await client.close()


async def test_a_bound_of_zero_leaves_operations_unbounded() -> None:
    client = make_client(MongoSettings(url=URL, operation_timeout_ms=0))
    try:
        assert client.options.timeout is None
    finally:
        await client.close()


def test_the_admin_bound_replaces_the_clients_bound_inside_its_block() -> None:
    with admin_bound(MongoSettings(admin_timeout_ms=90_000)):
        assert _csot.get_timeout() == 90.0
    assert _csot.get_timeout() is None


def test_an_admin_bound_of_zero_lifts_the_clients_bound_inside_its_block() -> None:
    # PyMongo applies a client's bound only when no block set one; a block of 0 s means none.
    with admin_bound(MongoSettings(admin_timeout_ms=0)):
        assert _csot.get_timeout() == 0
        assert _csot.remaining() is None


async def test_a_services_start_up_steps_get_the_admin_bound() -> None:
    adapters = Adapters(IntakeConfig(mongo=MongoSettings(url=URL, admin_timeout_ms=90_000)))
    try:
        with adapters.runtime().startup_bound():
            assert _csot.get_timeout() == 90.0
    finally:
        await adapters.mongo.close()


async def test_start_up_steps_run_under_the_start_up_bound_and_store_tasks_do_not_inherit_it() -> None:
    seen: dict[str, float | None] = {}

    async def step() -> None:
        seen["step"] = _csot.get_timeout()

    async def store_task() -> None:
        seen["store task"] = _csot.get_timeout()
        await asyncio.Event().wait()

    async def store_task_ran() -> bool:
        return "store task" in seen

    runtime = Runtime("bounded", on_start=[step], store_tasks=[store_task], startup_bound=lambda: pymongo.timeout(90))
    async with runtime.lifespan(FastAPI()):
        await eventually(store_task_ran, timeout=5, interval=0.01)
    assert seen == {"step": 90.0, "store task": None}


def app_raising(exc: PyMongoError) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/read")
    async def read() -> None:
        raise exc

    return app


@pytest.mark.parametrize("exc", [
    NetworkTimeout("127.0.0.1:27017: timed out"),
    ExecutionTimeout("operation exceeded time limit", 50),
    AutoReconnect("connection pool paused"),
], ids=lambda e: type(e).__name__)
async def test_a_store_that_does_not_answer_a_route_is_a_503_with_retry_after(exc: PyMongoError) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app_raising(exc)), base_url="http://svc") as http:
        res = await http.get("/read")
    assert res.status_code == 503 and res.headers["retry-after"] == "5"
    assert res.json() == {"errors": [{"field": None, "message": "the store is unavailable; retry shortly"}]}


async def test_the_503s_log_line_names_the_store_error_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    app = app_raising(OperationFailure(f"E11000 duplicate key: {{ client_id: \"{SECRET}\" }}", 11000))
    with caplog.at_level(logging.WARNING, logger="alliance.runtime"):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://svc") as http:
            assert (await http.get("/read")).status_code == 503
    assert "OperationFailure(code=11000" in caplog.text and SECRET not in caplog.text
