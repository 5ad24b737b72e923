"""HTTP conventions every API shares: error bodies, ops endpoints, and the service runtime.

Errors are always `{"errors": [{"field": "...", "message": "..."}]}` so clients can show the
failing field and rule.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from faststream.kafka import KafkaBroker
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pymongo import AsyncMongoClient
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.metrics import READY
from shared.mongo import Document, ping

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


def service_api(runtime: Runtime, *, title: str, version: str = "1.0.0", description: str = "") -> FastAPI:
    """A FastAPI app with the runtime's lifespan, uniform errors and /healthz /readyz /metrics."""
    app = FastAPI(title=title, version=version, description=description, lifespan=runtime.lifespan)
    install_error_handlers(app)

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
