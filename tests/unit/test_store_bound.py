"""Every store operation is bounded: a store that stops answering fails the operation instead of
holding a consumer's batch or a request for ever (`ALLIANCE_MONGO_OPERATION_TIMEOUT_MS`), and the
operator's commands and the tools, whose operations legitimately run long, get the admin bound
(`ALLIANCE_MONGO_ADMIN_TIMEOUT_MS`).

These are the rules without a store; a store that stops answering under a consuming service and
an HTTP read is tests/integration/test_store_stall.py.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from fastapi import FastAPI
from pymongo import AsyncMongoClient
from pymongo.errors import (
    AutoReconnect,
    ExecutionTimeout,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from shared.http import install_error_handlers
from shared.mongo import Document, make_client
from shared.settings import MongoSettings
from tools.stack import free_port

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


def socket_timeout(client: AsyncMongoClient[Document]) -> float | None:
    return client.options.pool_options.socket_timeout


async def test_a_services_client_waits_for_each_reply_at_most_the_operation_timeout() -> None:
    client = make_client(MongoSettings(url=URL, operation_timeout_ms=2_500, admin_timeout_ms=90_000))
    try:
        assert socket_timeout(client) == 2.5
    finally:
        await client.close()


async def test_an_admin_client_waits_for_each_reply_at_most_the_admin_timeout() -> None:
    client = make_client(MongoSettings(url=URL, operation_timeout_ms=2_500, admin_timeout_ms=90_000), admin=True)
    try:
        assert socket_timeout(client) == 90.0
    finally:
        await client.close()


async def test_a_bound_of_zero_leaves_replies_unbounded() -> None:
    client = make_client(MongoSettings(url=URL, operation_timeout_ms=0))
    try:
        assert socket_timeout(client) is None
    finally:
        await client.close()


@pytest.mark.parametrize("admin", [False, True], ids=["service", "admin"])
async def test_a_store_that_is_down_still_fails_within_the_server_selection_timeout(admin: bool) -> None:
    # The bounds are on replies: finding a store that is down stays ALLIANCE_MONGO_TIMEOUT_MS, not
    # the operation's 30 s or an operator command's hour (PyMongo's `timeoutMS` would stretch it).
    settings = MongoSettings(url=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", timeout_ms=300,
                             operation_timeout_ms=60_000, admin_timeout_ms=3_600_000)
    client = make_client(settings, admin=admin)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(ServerSelectionTimeoutError):
                await client[settings.database]["c"].find_one({})
    finally:
        await client.close()


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
