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
from collections.abc import Callable, Sequence
from typing import Any, cast

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
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

from services.intake.api import Context, SubmissionPublisher
from services.intake.settings import IntakeSettings
from shared.auth import KeyStore, Principal, require
from shared.http import AuthenticateFirst, Guard, install_error_handlers
from shared.mongo import Document, make_client
from shared.ratelimit import Limiter, MemoryCounters, SlotStorage
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


# The look-ups in front of the routes classify a store error the same way as the handler above,
# each keeping its own 503: `AuthenticateFirst` (keys and rate limits in front of alerts' and
# reporting's APIs), `shared.auth.require` (a route's key check) and intake's key and rate-limit
# checks. A look-up that fails for any other reason - a bad query, a bug - is the uniform 500.
INTERNAL_ERROR = {"errors": [{"field": None, "message": "internal error: the store refused the operation"}]}
KEYS_UNAVAILABLE = {"errors": [{"field": None, "message": "authentication store unavailable, retry later"}]}
PRINCIPAL = Principal("key-1", "tenant-1", "submit")
LOOKUP_TRANSIENT = [pytest.param(NetworkTimeout("127.0.0.1:27017: timed out"), id="socket-timeout")]
LOOKUP_DETERMINISTIC = [
    pytest.param(OperationFailure(f"unknown operator: $nope near {SECRET}", 2, {"code": 2}), id="bad-query"),
    pytest.param(RuntimeError(f"a bug quoting {SECRET}"), id="bug"),
]


class RaisingKeys(KeyStore):
    """A key store whose look-ups raise `exc` (or find `principal`, when `exc` is None)."""

    def __init__(self, exc: Exception | None, principal: Principal | None = PRINCIPAL) -> None:
        super().__init__(cast(AsyncDatabase[Document], None))
        self.exc, self.principal = exc, principal

    async def lookup(self, key: str) -> Principal | None:
        if self.exc is not None:
            raise self.exc
        return self.principal


class RaisingCounters:
    """Rate-limit counters whose every operation raises `exc`."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def counts(self, names: Sequence[str]) -> dict[str, int]:
        raise self.exc

    async def add(self, name: str, amount: int, expires_at: float) -> int:
        raise self.exc

    async def delete(self, prefix: str) -> None:
        raise self.exc

    async def ping(self) -> bool:
        raise self.exc


def limiter(exc: Exception | None = None) -> Limiter:
    return Limiter(SlotStorage(MemoryCounters() if exc is None else RaisingCounters(exc)), "t", 10, 100)


def behind_authenticate_first(keys: KeyStore, guard: Guard | None = None) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(AuthenticateFirst, lookup=keys.lookup, prefix="/v1/", guard=guard)

    @app.get("/v1/read")
    async def read() -> None:
        return None

    return app


def behind_require(keys: KeyStore) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/read")
    async def read(_: Principal = Depends(require(lambda: keys, "submit"))) -> None:
        return None

    return app


def intake(keys: KeyStore, submissions: Limiter | None = None, failures: Limiter | None = None) -> FastAPI:
    context = Context(IntakeSettings(), keys, cast(SubmissionPublisher, None), submissions or limiter(),
                      Guard(failures or limiter()))
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/read")
    async def read(_: Principal = Depends(context.submitter)) -> None:
        return None

    return app


async def get_with_key(app: FastAPI) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://svc") as http:
        return await http.get("/v1/read", headers={"Authorization": "Bearer ak_some-key"})


# Each path that looks a key or a limit up, with the 503 it answers for a store that is away.
LOOKUPS: dict[str, tuple[Callable[[Exception], FastAPI], dict[str, Any]]] = {
    "authenticate-first-key": (lambda exc: behind_authenticate_first(RaisingKeys(exc)), KEYS_UNAVAILABLE),
    "authenticate-first-rate-limit": (
        lambda exc: behind_authenticate_first(RaisingKeys(None), Guard(limiter(), limiter(exc))), KEYS_UNAVAILABLE),
    "authenticate-first-failed-authentications": (
        lambda exc: behind_authenticate_first(RaisingKeys(None), Guard(limiter(exc))), KEYS_UNAVAILABLE),
    "require-key": (lambda exc: behind_require(RaisingKeys(exc)), KEYS_UNAVAILABLE),
    "intake-key": (lambda exc: intake(RaisingKeys(exc)), KEYS_UNAVAILABLE),
    "intake-failed-authentications": (
        lambda exc: intake(RaisingKeys(None), failures=limiter(exc)),
        {"errors": [{"field": "Authorization", "message": "API keys cannot be checked right now"}]}),
    "intake-rate-limit": (
        lambda exc: intake(RaisingKeys(None), submissions=limiter(exc)),
        {"errors": [{"field": None, "message": "the rate limit cannot be checked right now; retry"}]}),
}


@pytest.mark.parametrize("path", LOOKUPS)
@pytest.mark.parametrize("exc", LOOKUP_TRANSIENT)
async def test_a_key_or_rate_limit_look_up_the_store_does_not_answer_is_a_503_with_retry_after(
        path: str, exc: Exception) -> None:
    build, unavailable = LOOKUPS[path]
    res = await get_with_key(build(exc))
    assert res.status_code == 503 and res.headers["retry-after"] == "2"
    assert res.json() == unavailable


@pytest.mark.parametrize("path", LOOKUPS)
@pytest.mark.parametrize("exc", LOOKUP_DETERMINISTIC)
async def test_a_key_or_rate_limit_look_up_failing_otherwise_is_a_500_without_retry_after(
        path: str, exc: Exception) -> None:
    res = await get_with_key(LOOKUPS[path][0](exc))
    assert res.status_code == 500 and "retry-after" not in res.headers
    assert res.json() == INTERNAL_ERROR


@pytest.mark.parametrize("path", LOOKUPS)
async def test_a_failed_look_ups_500_is_logged_as_an_error_naming_its_type_and_code_only(
        path: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert (await get_with_key(LOOKUPS[path][0](
            OperationFailure(f"unknown operator: $nope near {SECRET}", 2, {"code": 2})))).status_code == 500
    # The look-ups log through the runtime's logger; a background task an earlier test left running
    # (an alerts escalation loop whose client was closed) may log a warning meanwhile (CI, 2026-11-27).
    (line,) = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "alliance.runtime"]
    assert line.levelno == logging.ERROR
    assert "OperationFailure(code=2, timeout=False)" in line.getMessage()
    assert SECRET not in caplog.text and "ak_some-key" not in caplog.text


@pytest.mark.parametrize("path", LOOKUPS)
async def test_a_failed_look_ups_503_is_logged_as_a_warning_naming_its_type_and_code_only(
        path: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert (await get_with_key(LOOKUPS[path][0](
            NetworkTimeout(f"timed out reading {SECRET}")))).status_code == 503
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.levelno >= logging.WARNING)
    assert "NetworkTimeout(code=None, timeout=True)" in caplog.text
    assert SECRET not in caplog.text and "ak_some-key" not in caplog.text



def unavailable_and_forbidden() -> tuple[float, float]:
    """Intake's submissions counted unavailable (key store) and rejected (forbidden) so far."""
    def counted(outcome: str, reason: str) -> float:
        labels = {"outcome": outcome, "reason": reason}
        return REGISTRY.get_sample_value("alliance_intake_submissions_total", labels) or 0.0

    return counted("unavailable", "keystore"), counted("rejected", "forbidden")


async def test_intakes_key_look_up_the_store_does_not_answer_counts_as_unavailable_not_forbidden() -> None:
    unavailable, forbidden = unavailable_and_forbidden()
    assert (await get_with_key(intake(RaisingKeys(NetworkTimeout("timed out"))))).status_code == 503
    assert unavailable_and_forbidden() == (unavailable + 1, forbidden)


async def test_intakes_failed_key_look_up_is_counted_neither_unavailable_nor_forbidden() -> None:
    before = unavailable_and_forbidden()
    assert (await get_with_key(intake(RaisingKeys(RuntimeError("a bug"))))).status_code == 500
    assert unavailable_and_forbidden() == before


async def reject_unprocessable(exc: Exception) -> int:
    """A 422 rejected inside intake's `paid` while charging the key for the work raises `exc`:
    the status the client gets."""
    context = Context(IntakeSettings(), RaisingKeys(None), cast(SubmissionPublisher, None), limiter(exc),
                      Guard(limiter()))
    with pytest.raises(HTTPException) as rejected:
        async with context.paid(PRINCIPAL):
            raise HTTPException(422, f"an invalid submission of {SECRET}")
    return rejected.value.status_code


def intake_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What intake logged (the suite runs in one event loop: another test's service may log meanwhile)."""
    return [r for r in caplog.records if r.name == "alliance.intake"]


async def test_a_rejection_whose_charge_the_store_cannot_take_now_stands_and_is_logged_as_the_store_away(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert await reject_unprocessable(NetworkTimeout(f"timed out reading {SECRET}")) == 422
    (line,) = intake_records(caplog)
    assert line.levelno == logging.WARNING and "unavailable" in line.getMessage()
    assert "NetworkTimeout(code=None, timeout=True)" in line.getMessage() and SECRET not in caplog.text


async def test_a_rejection_whose_charge_fails_otherwise_stands_and_is_logged_as_an_error_not_the_store_away(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert await reject_unprocessable(OperationFailure(f"unknown operator: $nope near {SECRET}", 2,
                                                           {"code": 2})) == 422
    (line,) = intake_records(caplog)
    assert line.levelno == logging.ERROR and "unavailable" not in line.getMessage()
    assert "OperationFailure(code=2, timeout=False)" in line.getMessage() and SECRET not in caplog.text
