"""HTTP conventions every API shares: error bodies, ops endpoints, and the service runtime.

Errors are always `{"errors": [{"field": "...", "message": "..."}]}` so clients can show the
failing field and rule.

Bounded requests: every app gets a body-size limit (`BodyLimit`, `ALLIANCE_<SERVICE>_MAX_BODY_BYTES`,
1 MiB by default; intake checks its own, per route) enforced before the app runs and while the body
streams in, and an app whose routes all need an API key can put the key check in front of
everything (`authenticate_first`): FastAPI reads and parses a body before it resolves the
dependency that checks the key, so without it an unauthenticated 150 MB PUT cost alerts 450 MiB
before its 401.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from faststream.kafka import KafkaBroker
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pymongo import AsyncMongoClient
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.metrics import READY
from shared.mongo import Document, ping
from shared.settings import SERVICE_PORTS

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


def install_error_handlers(app: FastAPI) -> None:
    """Make every error answer use the uniform body."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(validation_errors(exc.errors())), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
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


Lookup = Callable[[str], Awaitable[object | None]]


class AuthenticateFirst:
    """ASGI middleware: requests under `prefix` need a known bearer key before the app sees them.

    A missing or unknown key gets 401 (the same answer as `shared.auth.require`) without the body
    being read; a key store that does not answer gets 503. Roles and sites are still checked by each
    route's dependency; `lookup` (a `KeyStore`'s) caches, so the second look-up costs nothing.
    """

    def __init__(self, app: ASGIApp, lookup: Lookup, prefix: str = "/v1/", timeout_seconds: float = 3.0) -> None:
        self.app = app
        self.lookup = lookup
        self.prefix = prefix
        self.timeout = timeout_seconds

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
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized("missing bearer API key")
        try:
            async with asyncio.timeout(self.timeout):
                principal = await self.lookup(token.strip())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("API key store unavailable", exc_info=True)
            return HTTPException(503, error_body([(None, "authentication store unavailable, retry later")]),
                                 headers={"Retry-After": "2"})
        return None if principal is not None else _unauthorized("unknown or revoked API key")


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


def authenticate_first(app: FastAPI, lookup: Lookup, prefix: str = "/v1/") -> None:
    """Check the bearer key of every request under `prefix` before its body is read (see
    `AuthenticateFirst`); added last, so it runs before the body limit."""
    app.add_middleware(AuthenticateFirst, lookup=lookup, prefix=prefix)


Check = Callable[[], Awaitable[bool]]


@dataclass
class Runtime:
    """What a service runs: its broker, its store client, start-up steps and background tasks.

    Start-up never blocks the HTTP server: the broker is connected by a background task that
    retries until it answers, and `/readyz` says 503 until then.
    """

    name: str
    broker: KafkaBroker | None = None
    mongo: AsyncMongoClient[Document] | None = None
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    started: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _start(self) -> None:
        delay = 0.5
        while True:
            try:
                for step in self.on_start:
                    await step()
                if self.broker is not None:
                    await self.broker.start()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: start-up failed, retrying in %.1fs: %r", self.name, delay, exc)
                if self.broker is not None:
                    try:
                        await self.broker.stop()
                    except Exception:
                        pass
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
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

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self._tasks.append(asyncio.create_task(self._start(), name=f"{self.name}-start"))
        try:
            yield
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for step in self.on_stop:
                await step()
            if self.broker is not None:
                await self.broker.stop()
            if self.mongo is not None:
                await self.mongo.close()


def service_api(runtime: Runtime, *, title: str, version: str = "1.0.0", description: str = "",
                max_body_bytes: int | None = None) -> FastAPI:
    """A FastAPI app with the runtime's lifespan, uniform errors, /healthz /readyz /metrics, and a
    body-size limit: `max_body_bytes`, else the service's `ALLIANCE_<SERVICE>_MAX_BODY_BYTES`
    (none for intake, which limits each route itself)."""
    app = FastAPI(title=title, version=version, description=description, lifespan=runtime.lifespan)
    install_error_handlers(app)
    if max_body_bytes is None and (settings := SERVICE_PORTS.get(runtime.name)) is not None:
        max_body_bytes = settings().max_body_bytes
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.get("/healthz", tags=["ops"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Broker and store answer", responses={503: {"description": "not ready"}})
    async def readyz() -> JSONResponse:
        checks = await runtime.ready()
        ok = all(checks.values())
        READY.labels(runtime.name).set(1 if ok else 0)
        body = {"status": "ready" if ok else "not ready", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.state.runtime = runtime
    return app


def serve(name: str, app: FastAPI, host: str, port: int) -> None:
    """Run one service's HTTP server (and with it, its consumers) until SIGTERM/SIGINT."""
    import uvicorn

    from shared.logs import configure

    configure(name)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=10)
