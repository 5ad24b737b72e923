"""HTTP conventions every API shares: error bodies, ops endpoints, request context, and the service runtime.

Errors are always `{"errors": [{"field": "...", "message": "..."}]}` so clients can show the
failing field and rule.

Bounded requests: every app gets a body-size limit (`BodyLimit`, `ALLIANCE_<SERVICE>_MAX_BODY_BYTES`,
1 MiB by default; intake checks its own, per route) enforced before the app runs and while the body
streams in, and an app whose routes all need an API key can put the key check in front of
everything (`authenticate_first`): FastAPI reads and parses a body before it resolves the
dependency that checks the key, so without it an unauthenticated 150 MB PUT cost alerts 450 MiB
before its 401.

Request context: every app made by `service_api` is a `ServiceApp`, whose outermost layer
(`RequestContext`) gives each request a correlation id (the client's valid `X-Correlation-ID`, or a
new one; echoed on the response and put into log records) and counts it in
`alliance_http_requests_total{service,method,route,status}` and
`alliance_http_request_seconds{service,method,route}`, `route` being the route template.

Service shape: every service's app.py has a `Config` extending `shared.settings.ServiceConfig` and a
`build(config) -> <X>Service`, a `Service` dataclass owning the broker, the store client, the `Runtime`
(start-up steps, store tasks started before the broker, background tasks, stop steps) and the HTTP app;
`create_app` is `build(config).app` and `asyncapi_app` is `stream_app(build(config))`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from bson.errors import BSONError
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import iter_route_contexts
from fastapi.telemetry import TelemetryConfig
from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Mount, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import tracing
from shared.channels import Channel
from shared.kafka import Publisher, make_broker, measure_lag, start_broker
from shared.logs import CORRELATION_ID
from shared.metrics import DEPENDENCY_UP, EVENT_LOOP_LAG, HTTP_REQUESTS, HTTP_SECONDS, READY, THROTTLED
from shared.mongo import Document, client_and_database, ping, store_unavailable
from shared.ratelimit import COLLECTION, Limiter, SlotStorage, retry_after_header, slot_storage
from shared.settings import MONITOR_INTERVAL_SECONDS, SERVICE_PORTS, HttpSettings, KafkaSettings, ServiceConfig
from shared.topics import Topics

log = logging.getLogger("alliance.runtime")


def error_body(errors: Sequence[tuple[str | None, str]]) -> dict[str, Any]:
    """The uniform error document."""
    return {"errors": [{"field": f, "message": m} for f, m in errors]}


def field_path(loc: Sequence[Any]) -> str:
    """`("body", "items", "goals")` -> `items.goals`; list indexes become `[i]`."""
    parts: list[str] = []
    for p in loc:
        if p in ("body", "query", "path", "header") and not parts:
            continue
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "body"


def validation_errors(errors: Sequence[Any]) -> list[tuple[str | None, str]]:
    """pydantic/FastAPI errors as (field, message) pairs."""
    out: list[tuple[str | None, str]] = []
    for e in errors:
        loc = list(e.get("loc", ()))
        # pydantic puts the validator's name (e.g. "function-after[...]") into loc for some errors
        loc = [p for p in loc if not (isinstance(p, str) and "[" in p and p.endswith("]"))]
        msg = str(e.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append((field_path(loc), msg))
    return out


_UNPARSABLE_BODY = "There was an error parsing the body"


# Seconds a client is asked to wait after a 503 for a store that did not answer.
STORE_RETRY_AFTER_SECONDS = 5
# The body of a 500 for a store error a retry cannot fix (or a failed key or rate-limit look-up).
INTERNAL_ERROR_MESSAGE = "internal error: the store refused the operation"


def describe_failure(exc: BaseException) -> str:
    """An error as a log line may name it: type and code only, since a store error's text can quote
    the documents it refused (and a look-up's, the key it looked up)."""
    return f"{type(exc).__name__}(code={getattr(exc, 'code', None)}, timeout={getattr(exc, 'timeout', False)})"


def look_up_unavailable(exc: BaseException) -> bool:
    """Whether a key or rate-limit look-up failed because the store is away - past the look-up's own
    bound (`TimeoutError`) or down, slow or failing over (`store_unavailable`) - so a retry can
    succeed; anything else (a bad query, a bug) would fail the same way again."""
    return isinstance(exc, TimeoutError) or store_unavailable(exc)


def look_up_failed(exc: BaseException, what: str) -> HTTPException:
    """The 500 for a key or rate-limit look-up (`what`) a retry cannot fix: the uniform internal
    error, logged as an error with the type and code only."""
    log.error("%s failed: %s", what, describe_failure(exc))
    return HTTPException(500, error_body([(None, INTERNAL_ERROR_MESSAGE)]))


def install_error_handlers(app: FastAPI) -> None:
    """Make every error answer use the uniform body. A store error is a 503 with Retry-After when
    the store is down, slow or failing over (`shared.mongo.store_unavailable`: e.g. past its
    operation bound, `ALLIANCE_MONGO_OPERATION_TIMEOUT_MS`), and a 500 without one otherwise (a bad
    query, a document too large, a duplicate key that escaped, a BSON error): a retry would fail
    the same way, so clients are not asked to, and operators see a 5xx that is not an outage."""

    async def _store_error(_: Request, exc: Exception) -> JSONResponse:
        # The type and code only: a store error's text can quote the documents it refused.
        what = describe_failure(exc)
        if store_unavailable(exc):
            log.warning("store unavailable answering a request: %s", what)
            return JSONResponse(error_body([(None, "the store is unavailable; retry shortly")]), status_code=503,
                                headers={"Retry-After": str(STORE_RETRY_AFTER_SECONDS)})
        log.error("store error answering a request: %s", what)
        return JSONResponse(error_body([(None, INTERNAL_ERROR_MESSAGE)]), status_code=500)

    app.add_exception_handler(PyMongoError, _store_error)
    app.add_exception_handler(BSONError, _store_error)  # DocumentTooLarge and encoding errors are not PyMongoErrors

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(validation_errors(exc.errors())), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
            # FastAPI's answer to a JSON body that is not UTF-8: a 422 naming the body, like every
            # other malformed body (and like intake), instead of a bare 400 no API documents.
            return JSONResponse(error_body([("body", "invalid JSON: the body must be UTF-8 encoded JSON")]),
                                status_code=422)
        detail = exc.detail
        body = detail if isinstance(detail, dict) and "errors" in detail else error_body([(None, str(detail))])
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


class BodyTooLarge(HTTPException):
    """A request body past the limit: 413 with the uniform error body."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, error_body([("body", f"the body must not exceed {limit} bytes")]))


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, without reading it when `Content-Length`
    says so, and as soon as a chunked (or under-declared) body grows past it.

    The app reads the body through a counting `receive`; past the limit it raises `BodyTooLarge`,
    which FastAPI's error handler turns into the 413 (or this middleware does, when the exception
    reaches it before any answer was sent). At most `max_bytes` plus one chunk is ever buffered.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _answer(send, BodyTooLarge(self.max_bytes))
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _answer(send, exc)


CORRELATION_HEADER = "X-Correlation-ID"
# Request headers a client may name its correlation id in, in order of preference.
_CORRELATION_HEADERS = (b"x-correlation-id", b"correlation_id")
# Methods counted by name; anything else is `other`, so a client cannot mint label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def valid_correlation_id(value: str | None) -> bool:
    """A client's correlation id is kept when it is short and plain (it ends up in headers and logs)."""
    return bool(value) and len(value or "") <= 128 and all(c.isascii() and (c.isalnum() or c in "._:-")
                                                           for c in value or "")


Templates = list[tuple[re.Pattern[str], str]]


def route_templates(routes: Sequence[BaseRoute]) -> Templates:
    """(path pattern, template) of every route of an app, included routers and mounts flattened, in
    routing order."""
    out: Templates = []
    for route in iter_route_contexts(routes):
        path, template = route.path, route.path_format
        if not path or not template:
            continue
        # A mount answers every path under its prefix, as Starlette's `Mount` matches it.
        regex, _, _ = compile_path(path.rstrip("/") + "/{path:path}" if isinstance(route.original_route, Mount)
                                   else path)
        out.append((regex, template))
    return out


def route_template(templates: Templates, path: str) -> str:
    """The metrics label of a request path: the template of the first route whose path matches it
    (`/v1/clients/{client_id}/transfer`), or `other` (bounded cardinality: never the concrete path)."""
    return next((template for regex, template in templates if regex.match(path)), "other")


class RequestContext:
    """ASGI middleware of every API: the correlation id and the HTTP metrics of each request.

    The id is the client's `X-Correlation-ID` (or `correlation_id`) header when it is valid, else a
    new UUID; it is in `scope["state"]["correlation_id"]` for the routes, in `shared.logs.CORRELATION_ID`
    (so every log record written while serving the request carries it) and on the response.
    `alliance_http_requests_total` / `alliance_http_request_seconds` count every request by service,
    method and route template, whoever answers it (a route, an error handler or a middleware).
    """

    def __init__(self, app: ASGIApp, service: str, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.service = service
        # Built with the middleware stack, at the first request: every route is included by then.
        # Matched here rather than read from the scope after routing, so requests a middleware
        # answers (401, 413, 429) are labelled with their route too.
        self.templates = route_templates(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        cid = next((v.decode("latin-1") for h in _CORRELATION_HEADERS if (v := headers.get(h)) is not None), "")
        if not valid_correlation_id(cid):
            cid = str(uuid.uuid4())
        scope.setdefault("state", {})["correlation_id"] = cid
        method = scope.get("method", "")
        method = method if method in _METHODS else "other"
        route = route_template(self.templates, scope.get("path", ""))
        status = 500
        header = (b"x-correlation-id", cid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = CORRELATION_ID.set(cid)
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            CORRELATION_ID.reset(token)
            HTTP_REQUESTS.labels(self.service, method, route, str(status)).inc()
            # With tracing on, the request's trace id rides along as exemplar (Grafana links the sample to it).
            HTTP_SECONDS.labels(self.service, method, route).observe(time.perf_counter() - started,
                                                                     exemplar=tracing.exemplar())


# Not traced: probes and scrapes every few seconds would bury the requests that matter.
_UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in _UNTRACED_PATHS


# FastAPI's own telemetry: a server span per request once `shared.tracing.configure` has set a
# tracer provider (none otherwise: it then costs one check per request). Its metrics and logs stay
# off (the services' metrics are Prometheus'; its logs would export exception messages, which may
# quote a request's values), and so do its per-operation spans (dependencies, serialization): the
# request span and the store, broker and HTTP client spans under it say where the time went.
# `auto_configure` off: the exporter is `shared.tracing`'s, whatever FASTAPI_OTEL_AUTO_CONFIGURE says.
TELEMETRY: TelemetryConfig = {"metrics": False, "logs": False, "operation_spans": False, "exclude": _untraced,
                              "auto_configure": False}


class ServiceApp(FastAPI):
    """A service's FastAPI app: `RequestContext` wraps the whole middleware stack, so it stays the
    outermost layer whatever middleware is added after the app is made (an answer from the key check or
    the body limit, even a 500, is counted and carries the correlation id). With tracing on, FastAPI's
    telemetry wraps it in turn: the request's span is current while it runs (logs carry its ids)."""

    def __init__(self, service: str, **kwargs: Any) -> None:
        super().__init__(telemetry=TELEMETRY, **kwargs)
        self.service = service

    def build_middleware_stack(self) -> ASGIApp:
        return RequestContext(super().build_middleware_stack(), self.service, self.router.routes)


class Identified(Protocol):
    """What a key look-up returns (`shared.auth.Principal`): the key's public id."""

    @property
    def key_id(self) -> str: ...


Lookup = Callable[[str], Awaitable[Identified | None]]
Known = Callable[[str], bool]


def peer_address(scope: Scope, trusted_proxy_hops: int = 0) -> str:
    """Who sent a request, for per-peer limits. With no trusted proxy (the default) it is the TCP
    peer: `X-Forwarded-For` is ignored, since any client can send one. Behind `n` trusted proxies
    that each append the address they saw, it is the n-th address from the right (what the
    outermost trusted proxy saw); a shorter header falls back to its leftmost address."""
    client = scope.get("client")
    direct = str(client[0]) if client else "unknown"
    if trusted_proxy_hops <= 0:
        return direct
    forwarded: list[str] = [a.strip() for n, v in scope.get("headers", ()) if n == b"x-forwarded-for"
                            for a in v.decode("latin-1").split(",") if a.strip()]
    if not forwarded:
        return direct
    return forwarded[-min(trusted_proxy_hops, len(forwarded))][:64]


def too_many(message: str, wait_seconds: float) -> HTTPException:
    """429 with the uniform body and a `Retry-After`."""
    return HTTPException(429, error_body([(None, message)]), headers={"Retry-After": retry_after_header(wait_seconds)})


@dataclass
class Guard:
    """Limits in front of the key check: failed authentications per peer (`failures`), and requests
    per key (`per_key`, none for intake, which meters submissions itself)."""

    failures: Limiter
    per_key: Limiter | None = None
    trusted_proxy_hops: int = 0
    service: str = ""
    # Peers this process has refused, until when (monotonic): a flood from a refused peer is answered
    # without reading the store again until its Retry-After has passed. At most `max_blocked`.
    max_blocked: int = 10_000
    _blocked: dict[str, float] = field(default_factory=dict)

    def peer(self, scope: Scope) -> str:
        return peer_address(scope, self.trusted_proxy_hops)

    async def peer_refusal(self, scope: Scope) -> HTTPException | None:
        """429 when this peer has failed to authenticate too often (checked before a key look-up)."""
        peer, now = self.peer(scope), time.monotonic()
        if (until := self._blocked.get(peer, 0.0)) > now:
            wait = until - now
        else:
            self._blocked.pop(peer, None)
            wait = await self.failures.wait(peer)
            if wait <= 0:
                return None
            if len(self._blocked) >= self.max_blocked:
                for old in list(self._blocked)[: self.max_blocked // 2]:
                    del self._blocked[old]
            self._blocked[peer] = now + wait
        THROTTLED.labels(self.service, "auth_failures").inc()
        return too_many(f"too many failed authentications from this address (at most {self.failures.burst:g}, "
                        f"then {self.failures.rate:g}/s)", wait)

    async def failed(self, scope: Scope) -> None:
        """Count one failed authentication against the request's peer."""
        await self.failures.charge(self.peer(scope), 1)

    async def key_refusal(self, key_id: str) -> HTTPException | None:
        """429 when this key is past its request rate."""
        if self.per_key is None:
            return None
        wait = await self.per_key.take(key_id)
        if wait <= 0:
            return None
        THROTTLED.labels(self.service, "key_rate").inc()
        return too_many(f"rate limit of {self.per_key.rate:g} requests/s (burst {self.per_key.burst:g}) per API key "
                        "exceeded", wait)


def make_guard(settings: HttpSettings, db: AsyncDatabase[Document], service: str,
               per_key: bool = True) -> tuple[Guard, SlotStorage]:
    """The service's guard from its settings, and its storage (whose `ensure_indexes` is a start-up step)."""
    storage = slot_storage(settings.rate_limit_backend, db[COLLECTION])
    failures = Limiter(storage, f"{service}:auth-failures", settings.auth_failure_rate_per_second,
                       settings.auth_failure_burst)
    requests = Limiter(storage, f"{service}:requests", settings.read_rate_per_second,
                       settings.read_rate_burst, settings.rate_limit_lease) if per_key else None
    return Guard(failures, requests, settings.trusted_proxy_hops, service), storage


@dataclass(eq=False)
class AuthenticateFirst:
    """ASGI middleware: requests under `prefix` need a known bearer key before the app sees them.

    A missing or unknown key gets 401 (the same answer as `shared.auth.require`) without the body
    being read; a key or rate-limit store that is away (`look_up_unavailable`) gets 503 with
    `Retry-After: 2`, and a look-up failing otherwise (a bad query, a bug) the uniform 500. Roles
    and sites are still checked by each route's dependency; `lookup` (a `KeyStore`'s) caches, so
    the second look-up costs nothing.

    With a `guard`: a peer past its failed-authentication limit gets 429 before its key is looked
    up (unless the key is one `known` remembers as valid: a valid key behind the same address keeps
    working), each 401 counts against the peer, and a known key past its request rate gets 429.
    """

    app: ASGIApp
    lookup: Lookup
    prefix: str = "/v1/"
    timeout_seconds: float = 3.0
    guard: Guard | None = None
    known: Known | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(self.prefix):
            refusal = await self._refusal(scope)
            if refusal is not None:
                await _answer(send, refusal)
                return
        await self.app(scope, receive, send)

    async def _refusal(self, scope: Scope) -> HTTPException | None:
        header = next((v.decode("latin-1") for n, v in scope.get("headers", ()) if n == b"authorization"), "")
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                known = bool(token) and self.known is not None and self.known(token)
                if self.guard is not None and not known and (refusal := await self.guard.peer_refusal(scope)):
                    return refusal
                principal = await self.lookup(token) if token else None
                if principal is None:
                    if self.guard is not None:
                        await self.guard.failed(scope)
                    return _unauthorized("unknown or revoked API key" if token else "missing bearer API key")
                if self.guard is not None:
                    return await self.guard.key_refusal(principal.key_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not look_up_unavailable(exc):
                return look_up_failed(exc, "API key or rate-limit look-up")
            log.warning("API key or rate-limit store unavailable: %s", describe_failure(exc))
            return HTTPException(503, error_body([(None, "authentication store unavailable, retry later")]),
                                 headers={"Retry-After": "2"})
        return None


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, error_body([("Authorization", message)]), headers={"WWW-Authenticate": "Bearer"})


async def _answer(send: Send, exc: HTTPException) -> None:
    """Answer with `exc` directly (from a middleware, without the app or its body)."""
    body = JSONResponse(exc.detail, status_code=exc.status_code, headers=exc.headers).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items())]
    if exc.status_code == 413:
        # The unread rest of the body is not wanted: the connection ends after this answer.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["errors"],
    "properties": {"errors": {"type": "array", "items": {
        "type": "object", "required": ["field", "message"],
        "properties": {"field": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                       "message": {"type": "string"}}}}}}


def error_response(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OpenAPI response answered with the uniform error body (for `responses=` and documents)."""
    return {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}},
            **({"headers": headers} if headers else {})}


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 1}}}
TOO_MANY_REQUESTS: dict[str, Any] = error_response(
    "too many requests with this API key, or too many failed authentications from this address; retry after "
    "`Retry-After` seconds", _RETRY_AFTER)
UNAUTHORIZED: dict[str, Any] = error_response("missing, unknown or revoked API key (`WWW-Authenticate: Bearer`)")
UNAVAILABLE: dict[str, Any] = error_response(
    "a store the request needs (API keys, rate limits, the audit trail) does not answer, or the audit trail's "
    "queue is full; retry after `Retry-After` seconds", _RETRY_AFTER)
BODY_TOO_LARGE: dict[str, Any] = error_response("the body is larger than the service's limit "
                                                "(`ALLIANCE_<SERVICE>_MAX_BODY_BYTES`)")


BEARER_SCHEME = "bearer"
BEARER: dict[str, Any] = {
    "type": "http", "scheme": "bearer",
    "description": "an API key (`ak_...`, from `alliance keys create`) sent as `Authorization: Bearer <key>`; "
                   "an operation's 403 says which role (and which site binding) it needs"}


def _document_operations(app: FastAPI, prefix: str, edit: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    """Apply `edit(document, operation)` to every operation under `prefix` of `app`'s OpenAPI document
    (at each generation: FastAPI caches the document, and every edit here keeps what is there)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        for path, operations in schema.get("paths", {}).items():
            if path.startswith(prefix):
                for operation in operations.values():
                    if isinstance(operation, dict) and "responses" in operation:
                        edit(schema, operation)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_responses(app: FastAPI, prefix: str, responses: dict[str, dict[str, Any]]) -> None:
    """Add `responses` (by status code) to every operation under `prefix` of `app`'s OpenAPI document
    that does not document that status itself: answers a middleware gives, which no route declares."""

    def edit(_: dict[str, Any], operation: dict[str, Any]) -> None:
        for status, response in responses.items():
            operation["responses"].setdefault(status, response)

    _document_operations(app, prefix, edit)


def document_bearer(app: FastAPI, prefix: str) -> None:
    """Declare the bearer API key scheme and require it on every operation under `prefix` (a route
    declaring its own scheme, such as reporting's `HTTPBearer` with a role in its description, keeps
    it): the key check of `AuthenticateFirst` covers every such route, so the document does too."""

    def edit(schema: dict[str, Any], operation: dict[str, Any]) -> None:
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).setdefault(BEARER_SCHEME, BEARER)
        operation.setdefault("security", [{BEARER_SCHEME: []}])

    _document_operations(app, prefix, edit)


def authenticate_first(app: FastAPI, lookup: Lookup, prefix: str = "/v1/", guard: Guard | None = None,
                       known: Known | None = None) -> None:
    """Check the bearer key of every request under `prefix` before its body is read, and with a
    `guard` the failed-authentication and per-key limits (see `AuthenticateFirst`, whose 429 every
    operation under `prefix` then documents, with the 401, the 503 and the bearer scheme itself);
    added last, so it runs before the body limit."""
    app.add_middleware(AuthenticateFirst, lookup=lookup, prefix=prefix, guard=guard, known=known)
    document_bearer(app, prefix)
    document_responses(app, prefix, {"401": UNAUTHORIZED, "503": UNAVAILABLE,
                                     **({"429": TOO_MANY_REQUESTS} if guard is not None else {})})


Check = Callable[[], Awaitable[bool]]
STOP_TIMEOUT_SECONDS = 5.0
# How often the runtime samples its event loop's lag (`alliance_event_loop_lag_seconds`).
LOOP_LAG_INTERVAL_SECONDS = 0.1
DEPENDENCIES = ("kafka", "mongodb")


@dataclass
class Runtime:
    """What a service runs: its broker, its store client, start-up steps and background tasks.

    Start-up never blocks the HTTP server: the broker is connected by a background task that
    retries until it answers, and `/readyz` says 503 until then. On stop, the background tasks are
    cancelled first, then the on_stop steps run, then the broker and the store client close.

    A monitor loop runs from start to stop, every `monitor_interval_seconds` (a service's from
    `ALLIANCE_MONITOR_INTERVAL_SECONDS`, through `Adapters.runtime`): it sets
    `alliance_ready` / `alliance_dependency_up` from the readiness checks and, once the broker is
    connected, `alliance_consumer_lag_messages` of the partitions this process owns. Alerts then
    see a store or broker outage, and a consumer that stopped committing, without anyone calling
    `/readyz` and whether or not batches succeed. Beside it, the loop's own lag is sampled every
    0.1 s (`alliance_event_loop_lag_seconds`, `_watch_loop`).
    """

    name: str
    broker: KafkaBroker | None = None
    mongo: AsyncMongoClient[Document] | None = None
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Started once every on_start step has succeeded, before the broker connects: jobs that need only
    # the store (alerts' deliveries and escalation) run while the consumer group still rebalances.
    store_tasks: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # Started once the broker is connected.
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    monitor_interval_seconds: float = MONITOR_INTERVAL_SECONDS
    started: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _store_tasks_started: bool = False
    # True while start-up is failing at the broker connection (not at an on_start step): until the
    # broker first connects, `kafka` is known to be down only then.
    _broker_refused: bool = False
    # Set when the lifespan ends: the loops stop at their next turn even when a cancellation did not
    # reach them (PyMongo's server selection can swallow it; see `lifespan`), so a stopped service's
    # start-up never goes on retrying against a closed store client.
    _stopping: bool = False

    async def _start(self) -> None:
        delay = 0.5
        while True:
            try:
                for step in self.on_start:
                    await step()
                # A step that swallowed the stop's cancellation and then succeeded must not go on to
                # start tasks the lifespan no longer cancels (they would run against a closed client).
                if self._stopping:
                    return
                # on_start steps are re-run when the broker start fails; these tasks start once.
                if not self._store_tasks_started:
                    self._store_tasks_started = True
                    for job in self.store_tasks:
                        self._tasks.append(asyncio.create_task(job(), name=f"{self.name}-{job.__name__}"))
                if self.broker is not None:
                    self._broker_refused = True
                    await start_broker(self.broker)
                    self._broker_refused = False
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    return
                log.warning("%s: start-up failed, retrying in %.1fs: %r", self.name, delay, exc)
                if self.broker is not None:
                    try:
                        await self.broker.stop()
                    except Exception:
                        pass
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        if self._stopping:
            return  # stopped while a start-up step that swallowed the cancellation went on
        self.started = True
        log.info("%s: started", self.name)
        for job in self.background:
            self._tasks.append(asyncio.create_task(job(), name=f"{self.name}-bg"))

    async def ready(self) -> dict[str, bool]:
        """Each dependency's state."""
        checks: dict[str, bool] = {"started": self.started}
        if self.broker is not None:
            checks["kafka"] = self.started and await self.broker.ping(timeout=2.0)
        if self.mongo is not None:
            checks["mongodb"] = await ping(self.mongo)
        return checks

    def record(self, checks: dict[str, bool]) -> bool:
        """Set `alliance_ready` and `alliance_dependency_up` from a readiness check; True when ready.

        Before the broker first connects, `kafka` is reported only while its connection is what
        start-up fails at: a start-up step failing on the store says nothing about the broker."""
        ok = all(checks.values())
        READY.labels(self.name).set(1 if ok else 0)
        for dependency in DEPENDENCIES:
            unknown = dependency == "kafka" and not self.started and not self._broker_refused
            if dependency not in checks or unknown:
                continue
            DEPENDENCY_UP.labels(self.name, dependency).set(1 if checks[dependency] else 0)
        return ok

    async def refresh(self) -> dict[str, bool]:
        """Check the dependencies, record readiness and (when the broker answers) consumer lag."""
        checks = await self.ready()
        self.record(checks)
        if self.broker is not None and checks.get("kafka"):
            await measure_lag(self.name, self.broker, timeout_seconds=max(1.0, self.monitor_interval_seconds))
        return checks

    async def _monitor(self) -> None:
        while not self._stopping:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive any one failed check
                log.warning("%s: monitor check failed: %r", self.name, exc)
            await asyncio.sleep(self.monitor_interval_seconds)

    async def _watch_loop(self) -> None:
        """Observe how late a timer runs, every `LOOP_LAG_INTERVAL_SECONDS`. Measured on the loop
        itself: a thread posting to the loop samples mostly while the loop is idle (it needs the
        GIL to post, which a busy loop holds), and so reads far lower than what callbacks meet."""
        loop = asyncio.get_running_loop()
        lag = EVENT_LOOP_LAG.labels(self.name)
        while not self._stopping:
            due = loop.time() + LOOP_LAG_INTERVAL_SECONDS
            await asyncio.sleep(LOOP_LAG_INTERVAL_SECONDS)
            lag.observe(max(0.0, loop.time() - due))

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self._tasks.append(asyncio.create_task(self._start(), name=f"{self.name}-start"))
        self._tasks.append(asyncio.create_task(self._monitor(), name=f"{self.name}-monitor"))
        self._tasks.append(asyncio.create_task(self._watch_loop(), name=f"{self.name}-loop-lag"))
        try:
            yield
        finally:
            self._stopping = True
            for t in self._tasks:
                t.cancel()
            # Bounded: a task cancellation does not reach must not hold the exit for ever. PyMongo's
            # async server selection against a store that never answered keeps waiting after its
            # caller is cancelled (a start-up step stuck so hung every shutdown during an outage).
            if self._tasks:
                _done, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_SECONDS)
                if stuck:
                    log.warning("%s: %d task(s) did not stop within %.0fs; exiting without them", self.name,
                                len(stuck), STOP_TIMEOUT_SECONDS)
            for step in self.on_stop:
                await step()
            if self.broker is not None:
                await self.broker.stop()
            if self.mongo is not None:
                await self.mongo.close()


def service_api(runtime: Runtime, *, title: str, version: str = "1.0.0", description: str = "",
                max_body_bytes: int | None = None) -> FastAPI:
    """A FastAPI app with the runtime's lifespan, uniform errors, /healthz /readyz /metrics, correlation
    ids and HTTP metrics (`RequestContext`), and a body-size limit: `max_body_bytes`, else the service's
    `ALLIANCE_<SERVICE>_MAX_BODY_BYTES` (none for intake, which limits each route itself)."""
    app = ServiceApp(runtime.name, title=title, version=version, description=description, lifespan=runtime.lifespan)
    install_error_handlers(app)
    if max_body_bytes is None and (settings := SERVICE_PORTS.get(runtime.name)) is not None:
        max_body_bytes = settings().max_body_bytes
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
        document_responses(app, "/v1/", {"413": BODY_TOO_LARGE})

    @app.get("/healthz", tags=["ops"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Broker and store answer", responses={503: {"description": "not ready"}})
    async def readyz() -> JSONResponse:
        checks = await runtime.ready()
        ok = runtime.record(checks)
        body = {"status": "ready" if ok else "not ready", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        # OpenMetrics when the scraper asks for it (Prometheus does): only that format carries the
        # histograms' exemplars (trace ids). Otherwise the classic text format.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(REGISTRY), media_type=content_type)

    app.state.runtime = runtime
    return app


@dataclass
class Service:
    """One wired service, as every app.py's `build(config)` returns it (extended with the service's
    own parts): its broker (subscribers and publisher declarations), its store client, its `Runtime`
    (start-up steps, background tasks) and its HTTP app. Building opens no connection; the app's
    lifespan starts and stops everything."""

    broker: KafkaBroker
    mongo: AsyncMongoClient[Document]
    runtime: Runtime
    app: FastAPI
    # The AsyncAPI document's info (FastStream's defaults when no title is given).
    spec_title: str | None = field(default=None, kw_only=True)
    spec_version: str = field(default="0.1.0", kw_only=True)
    spec_description: str | None = field(default=None, kw_only=True)


class Adapters:
    """What every service's `build` starts from, made from its `ServiceConfig` without opening a
    connection: its broker (`kafka`: the config's, unless the service tunes it), its store client
    and database, the deployment's topic names, the publisher its outputs and dead letters go
    through, and (`runtime`) its `Runtime` over that broker and store client."""

    def __init__(self, config: ServiceConfig, kafka: KafkaSettings | None = None) -> None:
        self.service = config.service
        self.config = config
        self.broker = make_broker(kafka or config.kafka, self.service)
        self.mongo, self.db = client_and_database(config.mongo)
        self.topics: Topics = config.kafka.topics()
        self.publisher = Publisher(self.broker, config.kafka.publish_timeout_seconds)

    def runtime(self, *, on_start: Sequence[Callable[[], Awaitable[None]]] = (),
                store_tasks: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
                on_stop: Sequence[Callable[[], Awaitable[None]]] = ()) -> Runtime:
        """The service's runtime, its monitor loop at `ALLIANCE_MONITOR_INTERVAL_SECONDS`."""
        return Runtime(self.service, self.broker, self.mongo, on_start=list(on_start), store_tasks=list(store_tasks),
                       on_stop=list(on_stop), monitor_interval_seconds=self.config.monitor.interval_seconds)

    def declare_output(self, channel: Channel[Any], description: str, *, title: str | None = None) -> None:
        """Put an output into the AsyncAPI document: the deployment's topic of `channel` and the schema
        of the event it carries (records go out through `publisher`; the declaration sends nothing).
        `title` defaults to `<service>:<topic>`."""
        topic = channel.on(self.topics)
        self.broker.publisher(topic, title=title or f"{self.service}:{topic}", schema=channel.model,
                              description=description)


def stream_app(service: Service) -> FastStream:
    """A FastStream app over `service`'s broker, for `faststream docs gen` / `alliance docs gen`: the
    AsyncAPI document of its subscribers and declared publishers."""
    if service.spec_title is None:
        return FastStream(service.broker)
    spec = AsyncAPI(service.broker, title=service.spec_title, version=service.spec_version,
                    description=service.spec_description)
    return FastStream(service.broker, specification=spec)


Config = TypeVar("Config", bound=ServiceConfig)


class Views(Generic[Config]):
    """A service's two entry points, both views of `build(config)` (`config` defaults to the service's
    Config read from the environment): `create_app`, its HTTP app (uvicorn; the lifespan runs its
    consumers and background tasks), and `asyncapi_app`, a FastStream app over the same broker
    (`faststream docs gen services.<name>.app:asyncapi_app`, `alliance docs gen`)."""

    def __init__(self, build: Callable[[Config], Service], default: Callable[[], Config]) -> None:
        self._build = build
        self._default = default

    def create_app(self, config: Config | None = None) -> FastAPI:
        return self._build(config or self._default()).app

    def asyncapi_app(self, config: Config | None = None) -> FastStream:
        return stream_app(self._build(config or self._default()))


def serve(name: str, make_app: Callable[[], FastAPI], host: str, port: int) -> None:
    """Run one service's HTTP server (and with it, its consumers) until SIGTERM/SIGINT. Logging and
    tracing are set up before `make_app` builds the service: PyMongo's clients take the tracing
    listener only when they are made."""
    import uvicorn

    from shared.logs import configure

    configure(name)
    tracing.configure(name)
    try:
        uvicorn.run(make_app(), host=host, port=port, log_config=None, access_log=False,
                    timeout_graceful_shutdown=10)
    finally:
        tracing.shutdown()
