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
    BulkWriteError,
    ClientBulkWriteException,
    DocumentTooLarge,
    DuplicateKeyError,
    ExecutionTimeout,
    InvalidOperation,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
    WriteConcernError,
    WriteError,
    WTimeoutError,
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


# What a store that is down, slow or failing over raises: transient, so a retry after a while can
# succeed. PyMongo's own classification decides (`ConnectionFailure` and its subclasses, an error
# whose `timeout` is true, the retryable labels), plus the server codes the retryable-reads spec
# names as transient (a mongos that could not reach a shard).
TRANSIENT = [
    pytest.param(ServerSelectionTimeoutError("127.0.0.1:27017: connection refused"), id="store-down"),
    pytest.param(AutoReconnect("connection closed"), id="connection-lost"),
    pytest.param(NetworkTimeout("127.0.0.1:27017: timed out"), id="socket-timeout"),
    pytest.param(NotPrimaryError("not primary", {"code": 10107, "errmsg": "not primary"}), id="failover"),
    pytest.param(WaitQueueTimeoutError("timed out waiting for a connection from the pool"), id="pool-exhausted"),
    pytest.param(ExecutionTimeout("operation exceeded time limit", 50), id="execution-timeout"),
    pytest.param(WTimeoutError("waiting for replication timed out", 64,
                               {"code": 64, "errInfo": {"wtimeout": True}}), id="write-concern-timeout"),
    pytest.param(WriteConcernError("shutdown in progress", 91, {"code": 91, "errorLabels": ["RetryableWriteError"]}),
                 id="retryable-write-label"),
    pytest.param(OperationFailure("transaction aborted", 251, {"code": 251, "errorLabels": [
        "TransientTransactionError"]}), id="transient-transaction-label"),
    pytest.param(BulkWriteError({"writeErrors": [{"index": 0, "code": 50, "errmsg": "operation exceeded time limit"}],
                                 "writeConcernErrors": []}), id="bulk-write-timeout"),
    pytest.param(OperationFailure("could not reach shard", 6, {"code": 6}), id="host-unreachable"),
    pytest.param(OperationFailure("exceeded time limit", 262, {"code": 262}), id="exceeded-time-limit"),
    pytest.param(ClientBulkWriteException({"error": AutoReconnect("connection closed"), "writeErrors": {},
                                           "writeConcernErrors": []}, False), id="client-bulk-write-connection-lost"),
]

# What a retry cannot fix: the request, the code or the data is at fault (or a store setting).
DETERMINISTIC = [
    pytest.param(OperationFailure("unknown operator: $nope", 2, {"code": 2}), id="bad-query"),
    pytest.param(DocumentTooLarge("BSON document too large (17000000 bytes)"), id="document-too-large"),
    pytest.param(WriteError("Document failed validation", 121, {"code": 121}), id="write-error"),
    pytest.param(DuplicateKeyError(f"E11000 duplicate key: {{ client_id: \"{SECRET}\" }}", 11000, {"code": 11000}),
                 id="duplicate-key"),
    pytest.param(BulkWriteError({"writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000"}],
                                 "writeConcernErrors": []}), id="bulk-write-duplicate-key"),
    pytest.param(WriteConcernError("unsatisfiable write concern", 100, {"code": 100}),
                 id="write-concern-unsatisfiable"),
    pytest.param(InvalidOperation("cannot use this cursor"), id="invalid-operation"),
    pytest.param(ClientBulkWriteException({"writeErrors": {0: {"code": 11000, "errmsg": "E11000"}},
                                           "writeConcernErrors": []}, False), id="client-bulk-write-duplicate-key"),
]


async def get(app: FastAPI) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://svc") as http:
        return await http.get("/read")


@pytest.mark.parametrize("exc", TRANSIENT)
async def test_a_store_that_is_down_slow_or_failing_over_is_a_503_with_retry_after(exc: PyMongoError) -> None:
    res = await get(app_raising(exc))
    assert res.status_code == 503 and res.headers["retry-after"] == "5"
    assert res.json() == {"errors": [{"field": None, "message": "the store is unavailable; retry shortly"}]}


@pytest.mark.parametrize("exc", DETERMINISTIC)
async def test_a_store_error_a_retry_cannot_fix_is_a_500_without_retry_after(exc: PyMongoError) -> None:
    res = await get(app_raising(exc))
    assert res.status_code == 500 and "retry-after" not in res.headers
    assert res.json() == {"errors": [{"field": None, "message": "internal error: the store refused the operation"}]}


async def test_the_503s_log_line_names_the_store_error_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    app = app_raising(WTimeoutError(f"waiting for replication of {{ client_id: \"{SECRET}\" }}", 64, {"code": 64}))
    with caplog.at_level(logging.WARNING, logger="alliance.runtime"):
        assert (await get(app)).status_code == 503
    (line,) = [r for r in caplog.records if r.name == "alliance.runtime"]
    assert line.levelno == logging.WARNING
    assert "store unavailable answering a request: WTimeoutError(code=64, timeout=True)" in caplog.text
    assert SECRET not in caplog.text


async def test_the_500s_log_line_is_an_error_naming_the_store_error_without_its_text(
        caplog: pytest.LogCaptureFixture) -> None:
    app = app_raising(DuplicateKeyError(f"E11000 duplicate key: {{ client_id: \"{SECRET}\" }}", 11000))
    with caplog.at_level(logging.WARNING, logger="alliance.runtime"):
        res = await get(app)
    assert res.status_code == 500 and SECRET not in res.text
    (line,) = [r for r in caplog.records if r.name == "alliance.runtime"]
    assert line.levelno == logging.ERROR
    assert "store error answering a request: DuplicateKeyError(code=11000, timeout=False)" in caplog.text
    assert SECRET not in caplog.text
