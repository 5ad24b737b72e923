"""The intake HTTP API: authenticate, validate, publish to `srs.submitted.v1` (an outcome rating -
ORS, CORS, YCORS - to `ors.submitted.v1`), answer after the ack.

Order of checks for every submission request (the first that fails answers):
429 too many failed authentications from this address (before a key not already cached is looked
up) -> 401/403 key -> 429 the key has no room left (before the body is read) -> 413 `Content-Length` over
the limit -> 415 media type -> 413 actual body size -> 422 malformed JSON / batch envelope / CSV file
(its rows are counted while parsing: the file is refused at the first row past the limit) -> 429
rate limit (the submissions the body holds) -> 422 rules (per item in a batch) -> 403 site (per item
in a batch) -> 503 broker not started / not acknowledging in time -> 202/200.

Rejected work is paid for: a request refused with 413/415/422 before its submissions were counted
spends tokens in proportion to what was read and parsed (services/intake/ratelimit.py), so a client
cannot keep intake busy with invalid bodies for free.

Nothing is half-accepted: a 503 means the client must retry, with the same `submission_id`
(which the 503 body repeats when the server generated it), and downstream dedupes on it.

A client transfer (`POST /v1/clients/{client_id}/transfer`) is checked in the same order: 401/403
key (role `admin`, and not bound to a site) -> 429 no room left -> 413/415 -> 422 JSON and ids (paid for
like a rejected submission) -> 429 -> 503 -> 202.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from fastapi import APIRouter, FastAPI, HTTPException, Path, Request, Response
from opentelemetry.trace import SpanKind
from pydantic_core import from_json, to_json
from pymongo.errors import PyMongoError
from starlette.requests import ClientDisconnect

from services.intake import csvformat, metrics
from services.intake.csvformat import CsvRow, parse_csv, session_submission_id
from services.intake.metrics import Reason
from services.intake.models import (
    ID_PATTERN,
    Accepted,
    BatchIn,
    BatchOut,
    ErrorBody,
    FieldError,
    OrsSubmissionIn,
    Outgoing,
    SubmissionIn,
    TransferAccepted,
    TransferIn,
    check_id,
    check_submission,
    check_transfer,
    claimed_submission_id,
    outgoing,
    transfer_event,
    transfer_records,
)
from services.intake.ratelimit import Limiter, retry_after_header
from services.intake.settings import IntakeSettings
from shared import tracing
from shared.auth import KeyStore, Principal, Role, bearer_token, require
from shared.http import Guard, Runtime, describe_failure, error_body, look_up_failed, look_up_unavailable
from shared.kafka import JSON_HEADERS
from shared.tracing import TRACEPARENT

log = logging.getLogger("alliance.intake")

class PublishFailed(Exception):
    """The broker did not acknowledge (in time)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason: Reason = reason


class SubmissionPublisher:
    """Hands records to the producer and waits, bounded, for every acknowledgement. `publish`
    writes to `srs.submitted.v1`, `publish_outcome` to `ors.submitted.v1` (records with `outcome`)."""

    def __init__(self, runtime: Runtime, publish: Callable[..., Awaitable[Any]], timeout_seconds: float,
                 publish_outcome: Callable[..., Awaitable[Any]]) -> None:
        self._runtime = runtime
        self._publish = publish
        self._publish_outcome = publish_outcome
        self.timeout = timeout_seconds

    async def publish(self, records: Sequence[Outgoing], correlation_id: str, endpoint: str) -> None:
        """Publish all records, then wait for all acks; `PublishFailed` if that takes longer than the bound."""
        if not self._runtime.started:
            raise PublishFailed("not_started", "the broker is not connected yet")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                with tracing.span("publish", kind=SpanKind.PRODUCER,
                                  attributes={"messaging.system": "kafka", "messaging.operation.type": "send",
                                              "messaging.batch.message_count": len(records)}):
                    # Each record carries on the request's trace: scoring's spans continue it.
                    traceparent = tracing.current_traceparent()
                    base = JSON_HEADERS if traceparent is None else {**JSON_HEADERS, TRACEPARENT: traceparent}
                    # One send per record without waiting (no_confirm), then all acks together:
                    # a batch costs one round trip to the broker, not one per record.
                    futures = [
                        await (self._publish_outcome if r.outcome else self._publish)(
                            r.value, key=r.key, headers=base if r.headers is None else {**base, **r.headers},
                            correlation_id=correlation_id, no_confirm=True)
                        for r in records
                    ]
                    await asyncio.gather(*futures)
        except TimeoutError:
            raise PublishFailed("broker_timeout",
                                f"the broker did not acknowledge within {self.timeout:g}s") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise PublishFailed("broker_error", f"the broker refused the write: {type(exc).__name__}") from exc
        metrics.PUBLISH_SECONDS.labels(endpoint).observe(time.perf_counter() - started, exemplar=tracing.exemplar())


# Rejections that come after intake has read or parsed (part of) the body: they are charged.
_WORK_REJECTIONS = frozenset({400, 413, 415, 422})


@dataclass
class Work:
    """What a request has cost so far: bytes of body read and items (or CSV rows) parsed."""

    unit_bytes: int
    bytes: int = 0
    items: int = 0

    @property
    def cost(self) -> int:
        """Tokens: one per item, one per `unit_bytes` read (the weight of one submission), at least one."""
        return max(1, self.items, math.ceil(self.bytes / self.unit_bytes))


@dataclass
class Context:
    """What the routes need."""

    settings: IntakeSettings
    keys: KeyStore
    publisher: SubmissionPublisher
    limiter: Limiter
    guard: Guard

    def __post_init__(self) -> None:
        self._require = {role: require(lambda: self.keys, role) for role in ("submit", "admin")}

    async def authenticate(self, request: Request, role: Role = "submit") -> Principal:
        """The caller's key with `role` (401/403), or 503 when the key store is away (does not answer
        in time, or is down, slow or failing over: `look_up_unavailable`), or 500 when a look-up
        fails otherwise."""
        count = metrics.count if role == "submit" else metrics.count_transfers
        try:
            async with asyncio.timeout(self.settings.auth_timeout_seconds):
                # A peer that failed to authenticate too often is refused before its key is looked
                # up, unless the key is one the cache knows (a valid key behind the same address).
                token = bearer_token(request)
                if (token is None or not self.keys.known(token)) and \
                        (refusal := await self.guard.peer_refusal(request.scope)) is not None:
                    count("rejected", "rate_limited", 1)
                    raise refusal
                try:
                    return await self._require[role](request)
                except HTTPException as exc:
                    if exc.status_code == 401:
                        await self.guard.failed(request.scope)
                    raise
        except HTTPException as exc:
            # 429s are counted where they are decided; a 500 is no outcome of the submission.
            if exc.status_code in (401, 403):
                count("rejected", "unauthorized" if exc.status_code == 401 else "forbidden", 1)
            elif exc.status_code == 503:  # the key look-up's own (`require`)
                count("unavailable", "keystore", 1)
            raise
        except Exception as exc:
            if not look_up_unavailable(exc):
                raise look_up_failed(exc, "API key look-up") from None
            count("unavailable", "keystore", 1)
            log.warning("API key store unavailable: %s", describe_failure(exc),
                        extra={"correlation_id": correlation_id(request)})
            raise HTTPException(503, error_body([("Authorization", "API keys cannot be checked right now")]),
                                headers={"Retry-After": str(self.settings.unavailable_retry_after_seconds)}) from None

    async def rate_limit(self, principal: Principal, cost: int, count: Callable[..., None] = metrics.count) -> None:
        self._refuse_after(await self._limit(self.limiter.take(principal.key_id, cost), cost, count), cost, count)

    async def admit(self, principal: Principal, count: Callable[..., None] = metrics.count) -> None:
        """429 before the body is read when the key has no room left (e.g. in debt for rejected work)."""
        self._refuse_after(await self._limit(self.limiter.wait(principal.key_id), 1, count), 1, count)

    async def submitter(self, request: Request) -> Principal:
        """The caller of a submission route: its key authenticated (`authenticate`) and admitted (`admit`)."""
        principal = await self.authenticate(request)
        await self.admit(principal)
        return principal

    async def _limit(self, check: Awaitable[float], cost: int, count: Callable[..., None]) -> float:
        """A limiter call, bounded: the counters' store being away is our outage, so 503 (not 500);
        a call failing otherwise (a bad query, a bug) would fail again, so 500."""
        try:
            async with asyncio.timeout(self.settings.auth_timeout_seconds):
                return await check
        except Exception as exc:
            if not look_up_unavailable(exc):
                raise look_up_failed(exc, "rate-limit look-up") from None
            count("unavailable", "keystore", cost)
            log.warning("rate-limit store unavailable: %s", describe_failure(exc))
            raise HTTPException(503, error_body([(None, "the rate limit cannot be checked right now; retry")]),
                                headers={"Retry-After": str(self.settings.unavailable_retry_after_seconds)}) from None

    @asynccontextmanager
    async def paid(self, principal: Principal) -> AsyncIterator[Work]:
        """Charge the key for the work done when the block rejects the request (413/415/422)."""
        work = Work(self.settings.max_single_bytes)
        try:
            yield work
        except HTTPException as exc:
            if exc.status_code in _WORK_REJECTIONS:
                try:
                    async with asyncio.timeout(self.settings.auth_timeout_seconds):
                        await self.limiter.charge(principal.key_id, work.cost)
                except (TimeoutError, PyMongoError) as charge_failed:
                    # The rejection stands either way; only its charge is lost. Say which failure it
                    # was (type and code only: a store error's text can quote what it refused).
                    if look_up_unavailable(charge_failed):
                        log.warning("rate-limit store unavailable: a rejected request was not charged: %s",
                                    describe_failure(charge_failed))
                    else:
                        log.error("charging a rejected request failed, it was not charged: %s",
                                  describe_failure(charge_failed))
            raise

    def _refuse_after(self, wait: float, cost: int, count: Callable[..., None]) -> None:
        if wait > 0:
            count("rejected", "rate_limited", cost)
            raise HTTPException(429, error_body([(None, f"rate limit of {self.limiter.rate:g} submissions/s "
                                                        f"(burst {self.limiter.burst:g}) exceeded")]),
                                headers={"Retry-After": retry_after_header(wait)})

    @property
    def max_future(self) -> timedelta:
        return timedelta(seconds=self.settings.max_future_seconds)

    async def publish(self, records: Sequence[Outgoing], request: Request, endpoint: str,
                      ids: Sequence[str | None]) -> None:
        try:
            await self.publisher.publish(records, correlation_id(request), endpoint)
        except PublishFailed as exc:
            metrics.count("unavailable", exc.reason, len(records))
            log.warning("not accepted: %s", exc, extra={"correlation_id": correlation_id(request)})
            raise HTTPException(503, {**error_body([(None, f"{exc}; nothing was accepted, retry with the same "
                                                           "submission_id")]), "submission_ids": list(ids)},
                                headers={"Retry-After": str(self.settings.unavailable_retry_after_seconds)}) from None

    async def publish_transfer(self, records: Sequence[Outgoing], request: Request) -> None:
        """Publish a transfer's records (both copies, `transfer_records`) and wait for every
        acknowledgement: a copy not acknowledged fails the request (503), and its retry is a new
        transfer to the same site, which changes nothing where the first was applied."""
        try:
            await self.publisher.publish(records, correlation_id(request), "transfer")
        except PublishFailed as exc:
            metrics.count_transfers("unavailable", exc.reason, 1)
            log.warning("transfer not accepted: %s", exc, extra={"correlation_id": correlation_id(request)})
            raise HTTPException(503, error_body([(None, f"{exc}; the transfer was not accepted, retry it")]),
                                headers={"Retry-After": str(self.settings.unavailable_retry_after_seconds)}) from None


def correlation_id(request: Request) -> str:
    """The request's correlation id (set by `shared.http.RequestContext`)."""
    cid = request.scope.get("state", {}).get("correlation_id")
    return cid if isinstance(cid, str) else str(uuid.uuid4())


Count = Callable[[metrics.Outcome, Reason, int], None]


def _reject(status: int, reason: Reason, errors: Sequence[FieldError], n: int = 1,
            count: Count = metrics.count) -> NoReturn:
    count("rejected", reason, n)
    raise HTTPException(status, error_body(errors))


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int, media_types: tuple[str, ...], count: Count = metrics.count,
                    work: Work | None = None) -> bytes:
    """The body, checked for size (413, before and while reading) and media type (415); the bytes
    read are added to `work`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        _reject(413, "too_large", [("body", f"the body must not exceed {limit} bytes")], count=count)
    media = _media_type(request)
    if media not in media_types and not ("application/json" in media_types and media.endswith("+json")):
        _reject(415, "media_type", [("Content-Type", f"must be {' or '.join(media_types)}, not '{media or '-'}'")],
                count=count)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if work is not None:
                work.bytes = size
            if size > limit:
                _reject(413, "too_large", [("body", f"the body must not exceed {limit} bytes")], count=count)
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody will read this answer; it only keeps a vanished client from becoming a 500.
        _reject(400, "invalid", [("body", "the client disconnected before sending the whole body")], count=count)
    return b"".join(chunks)


async def read_json(request: Request, limit: int, work: Work) -> Any:
    """A submission route's JSON body, read as `read_body` reads it and parsed (422 when it is not JSON)."""
    return parse_json(await read_body(request, limit, ("application/json",), work=work))


def parse_json(body: bytes, count: Count = metrics.count) -> Any:
    try:
        return from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        _reject(422, "invalid", [("body", f"invalid JSON: {exc}")], count=count)


def _json(content: Any, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(to_json(content), status_code=status, media_type="application/json", headers=headers)


def _errors(errors: Sequence[FieldError]) -> list[dict[str, str | None]]:
    return [{"field": f, "message": m} for f, m in errors]


def _site_error(site_id: str) -> FieldError:
    return ("site_id", f"this key is bound to another site than '{site_id}'")


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or unknown API key"},
    403: {"model": ErrorBody, "description": "the key may not submit (role), or not for this site"},
    413: {"model": ErrorBody, "description": "body too large"},
    415: {"model": ErrorBody, "description": "wrong Content-Type"},
    422: {"model": ErrorBody, "description": "a validation rule failed; each error names its field"},
    429: {"model": ErrorBody, "description": "per-key rate limit exceeded, or too many failed authentications "
                                             "from this address; see Retry-After"},
    503: {"model": ErrorBody, "description": "the broker did not acknowledge in time; retry after Retry-After "
                                             "with the same submission_id"},
}


_TRANSFER_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    403: {"model": ErrorBody, "description": "the key is not an `admin` key, or it is bound to a site (only a "
                                             "tenant-wide admin key may transfer clients)"},
    404: {"model": ErrorBody, "description": "no such route: a `client_id` holding a line break cannot be routed "
                                             "(any other invalid `client_id` is a 422)"},
    422: {"model": ErrorBody, "description": "`client_id` or `site_id` breaks the id rules, or the body is not "
                                             '{"site_id": ...}; each error names its field'},
    503: {"model": ErrorBody, "description": "the broker did not acknowledge in time; nothing was accepted, retry "
                                             "after Retry-After"},
}


def _json_body(ref: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}},
        "security": [{"bearer": []}]}


def _batch_results(ctx: Context, principal: Principal, data: Sequence[Any], now: datetime,
                   rows: Sequence[CsvRow] | None = None) -> tuple[list[dict[str, Any]], list[Outgoing]]:
    """Validate each item: its result (accepted/rejected) and the records of the valid ones."""
    results: list[dict[str, Any]] = []
    records: list[Outgoing] = []
    site = principal.site_id
    rejected_invalid = rejected_site = 0
    for index, item in enumerate(data):
        row = rows[index] if rows is not None else None
        errors: list[FieldError] = list(row.errors) if row is not None else []
        model = None
        if not errors:
            model, errors = check_submission(item, now, ctx.max_future)
        result: dict[str, Any] = {"index": index}
        if row is not None:
            result["row"] = row.line
        if model is not None and site is not None and model.site_id != site:
            errors = [_site_error(model.site_id)]
            model = None
            rejected_site += 1
        elif model is None:
            rejected_invalid += 1
        if model is None:
            result.update(submission_id=claimed_submission_id(item), status="rejected", errors=_errors(errors))
        else:
            sid = None
            if row is not None and model.submission_id is None:
                sid = session_submission_id(principal.tenant_id, model.client_id, model.instrument, model.episode_id,
                                            model.session_number, model.administered_at)
            rec = outgoing(model, principal.tenant_id, now, sid)
            records.append(rec)
            result.update(submission_id=rec.submission_id, status="accepted", errors=[])
        results.append(result)
    metrics.count("rejected", "invalid", rejected_invalid)
    metrics.count("rejected", "site", rejected_site)
    return results, records


async def _publish_batch(ctx: Context, request: Request, endpoint: str, results: list[dict[str, Any]],
                         records: list[Outgoing]) -> Response:
    metrics.BATCH_SIZE.labels(endpoint).observe(len(results))
    if records:
        ids = [r["submission_id"] for r in results]
        await ctx.publish(records, request, endpoint, ids)
        metrics.count("accepted", "ok", len(records))
    cid = correlation_id(request)
    log.info("%s: %d accepted, %d rejected", endpoint, len(records), len(results) - len(records),
             extra={"correlation_id": cid})
    if log.isEnabledFor(logging.DEBUG):
        for r in records:
            log.debug("submission accepted", extra={"submission_id": r.submission_id, "correlation_id": cid})
    return _json({"results": results}, 200)


def build_router(ctx: Context) -> APIRouter:
    """The submission routes and the client transfer route."""
    router = APIRouter()
    settings = ctx.settings

    @router.post(
        "/v1/submissions", status_code=202, response_model=Accepted, responses=_ERRORS, tags=["submissions"],
        summary="Submit one rating (SRS family, or ORS family with `instrument` ORS, CORS or YCORS); 202 once the "
                "broker has acknowledged it",
        openapi_extra={**_json_body("SubmissionIn"), "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/SubmissionIn"},
                                                      {"$ref": "#/components/schemas/OrsSubmissionIn"}]}}}}},
    )
    async def submit(request: Request) -> Response:
        principal = await ctx.submitter(request)
        async with ctx.paid(principal) as work:
            data = await read_json(request, settings.max_single_bytes, work)
        await ctx.rate_limit(principal, 1)
        now = datetime.now(UTC)
        model, errors = check_submission(data, now, ctx.max_future)
        if model is None:
            _reject(422, "invalid", errors)
        if not principal.may_see_site(model.site_id):
            _reject(403, "site", [_site_error(model.site_id)])
        rec = outgoing(model, principal.tenant_id, now)
        await ctx.publish([rec], request, "single", [rec.submission_id])
        metrics.count("accepted", "ok")
        log.info("submission accepted", extra={"submission_id": rec.submission_id,
                                               "correlation_id": correlation_id(request)})
        return _json({"submission_id": rec.submission_id, "status": "accepted"}, 202)

    @router.post(
        "/v1/submissions/batch", response_model=BatchOut, responses=_ERRORS, tags=["submissions"],
        summary=f"Submit up to {settings.max_batch_items} ratings; valid items are accepted even when others "
                "are rejected",
        openapi_extra=_json_body("BatchIn"),
    )
    async def submit_batch(request: Request) -> Response:
        principal = await ctx.submitter(request)
        async with ctx.paid(principal) as work:
            data = await read_json(request, settings.max_batch_bytes, work)
            items = _batch_items(data, settings.max_batch_items, work)
        await ctx.rate_limit(principal, len(items))
        results, records = _batch_results(ctx, principal, items, datetime.now(UTC))
        return await _publish_batch(ctx, request, "batch", results, records)

    @router.post(
        "/v1/submissions/csv", response_model=BatchOut, responses=_ERRORS, tags=["submissions"],
        summary=f"Import an EHR export (text/csv, up to {settings.max_batch_items} rows); a result per row",
        description=csvformat.__doc__ or "",
        openapi_extra={"requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}},
                       "security": [{"bearer": []}]},
    )
    async def submit_csv(request: Request) -> Response:
        principal = await ctx.submitter(request)
        async with ctx.paid(principal) as work:
            body = await read_body(request, settings.max_batch_bytes, ("text/csv",), work=work)
            try:
                text = body.decode("utf-8-sig")
            except UnicodeDecodeError:
                _reject(422, "invalid", [("body", "the file must be UTF-8 text")])
            del body  # the text is all that is needed from here on
            parsed = parse_csv(text, settings.max_batch_items, settings.max_csv_row_chars)
            work.items = len(parsed.rows)
            if parsed.errors:
                _reject(422, "invalid", parsed.errors)
            if not parsed.rows:
                _reject(422, "invalid", [("body", "the file has no data rows")])
            if parsed.too_many_rows:
                _reject(422, "invalid", [("body", f"at most {settings.max_batch_items} rows per request, got "
                                                  "more; `alliance import FILE.csv` sends any size in chunks")],
                        len(parsed.rows))
        await ctx.rate_limit(principal, len(parsed.rows))
        results, records = _batch_results(ctx, principal, [r.data for r in parsed.rows], datetime.now(UTC),
                                          parsed.rows)
        return await _publish_batch(ctx, request, "csv", results, records)

    @router.post(
        "/v1/clients/{client_id:path}/transfer", status_code=202, response_model=TransferAccepted,
        responses=_TRANSFER_ERRORS, tags=["clients"],
        summary="Move a client to another site (tenant-wide admin key); 202 once the broker has acknowledged it",
        description="The client's record follows the new site: scoring re-publishes its current sessions with "
                    "the new `site_id`, in order with the client's submissions (docs/clinical-records.md, "
                    "*Site ownership*): it is published on both submitted topics, and answered 202 once both "
                    "copies are acknowledged. Only an `admin` key that is not bound to a site may do this.",
        openapi_extra=_json_body("TransferIn"),
    )
    async def transfer_client(
        request: Request,
        client_id: str = Path(description="the client to move (1-128 characters of A-Za-z0-9._:-)",
                              json_schema_extra={"minLength": 1, "maxLength": 128, "pattern": ID_PATTERN}),
    ) -> Response:
        count = metrics.count_transfers
        principal = await ctx.authenticate(request, "admin")
        if principal.site_id is not None:
            _reject(403, "forbidden", [("Authorization", f"only a tenant-wide admin key may transfer clients; "
                                                         f"this key is bound to site '{principal.site_id}'")],
                    count=count)
        await ctx.admit(principal, count)
        async with ctx.paid(principal) as work:
            body = await read_body(request, settings.max_single_bytes, ("application/json",), count, work)
            data = parse_json(body, count)
            model, errors = check_transfer(data)
            errors = check_id("client_id", client_id) + errors
            if model is None or errors:
                _reject(422, "invalid", errors, count=count)
        await ctx.rate_limit(principal, 1, count)
        event = transfer_event(principal.tenant_id, client_id, model.site_id, principal.key_id, datetime.now(UTC))
        await ctx.publish_transfer(transfer_records(event), request)
        count("accepted", "ok", 1)
        log.info("client transfer accepted", extra={"event_id": event.event_id, "site_id": model.site_id,
                                                    "correlation_id": correlation_id(request)})
        return _json({"client_id": client_id, "site_id": model.site_id, "status": "accepted"}, 202)

    return router


def _batch_items(data: Any, max_items: int, work: Work) -> list[Any]:
    if not isinstance(data, dict):
        _reject(422, "invalid", [("body", 'must be a JSON object {"submissions": [...]}')])
    unknown = [k for k in data if k != "submissions"]
    errors: list[FieldError] = [(k, "Extra inputs are not permitted") for k in unknown]
    items = data.get("submissions")
    if isinstance(items, list):
        work.items = len(items)
    if not isinstance(items, list):
        errors.append(("submissions", "must be a list of submissions"))
    elif not 1 <= len(items) <= max_items:
        errors.append(("submissions", f"must hold 1 to {max_items} submissions, got {len(items)}"))
    if errors:
        _reject(422, "invalid", errors, len(items) if isinstance(items, list) else 1)
    assert isinstance(items, list)
    return items


def install_openapi(app: FastAPI) -> None:
    """Document the request bodies (parsed by hand for speed and size limits) and the bearer scheme."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for model in (SubmissionIn, OrsSubmissionIn, BatchIn, TransferIn):
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(doc.pop("$defs", {}))
            schemas[model.__name__] = doc
        components["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "an API key: role `submit` for submissions; a tenant-wide (not site-bound) `admin` key "
                           "for client transfers"}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
