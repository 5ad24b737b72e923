"""The access audit trail (HIPAA audit controls): who read or changed what, when, and with what outcome.

Every read of client-level data and every administrative change appends one entry
`{at, tenant_id, key_id, role, site, service, action, client_id?, target?, outcome}` to one
append-only collection (`ALLIANCE_AUDIT_COLLECTION` in `ALLIANCE_AUDIT_DATABASE`, by default the
services' shared `ALLIANCE_MONGO_DATABASE`), which reporting serves as `GET /v1/audit` and
`alliance audit export` prints. Nothing in the product updates or deletes an entry.

Writes are batched so an audited read does not wait for the store: `AuditLog.append` puts the
entry into a bounded in-memory queue and a background task writes batches (`insert_many`,
unordered) every `flush_interval_seconds` or as soon as `batch_max_entries` are waiting, and
everything left when the service stops. Each entry's `_id` is made here (an ObjectId), so a batch
retried after a failure that did write part of it cannot store an entry twice: the duplicates are
refused by the store and ignored here (at-least-once delivery, idempotent ids).

When the store does not answer for long, the queue fills up; then `append` raises `AuditFull` and
the routes answer 503 instead of serving client data that could not be audited (a clinical
product must not serve unaudited client data). Entries already queued are kept and written once
the store answers again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import getpass
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from bson import ObjectId
from bson.errors import InvalidId
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import Principal, bearer_token
from shared.http import Runtime, error_body
from shared.mongo import Document, duplicate_key_indexes, given, make_client
from shared.settings import AuditSettings, MongoSettings

log = logging.getLogger("alliance.audit")

Outcome = Literal["allowed", "denied", "not_found", "invalid", "error"]
OUTCOMES: tuple[Outcome, ...] = ("allowed", "denied", "not_found", "invalid", "error")
CLI_KEY_ID = "cli"
CLI_ROLE = "operator"

WRITTEN = Counter("alliance_audit_entries_written_total", "Audit entries written to the store.", ["service"])
FLUSH_FAILURES = Counter("alliance_audit_flush_failures_total",
                         "Batches of audit entries the store did not take (retried).", ["service"])
REFUSED = Counter("alliance_audit_refused_total",
                  "Audited requests answered 503 because the audit queue was full.", ["service"])
QUEUED = Gauge("alliance_audit_queue_entries", "Audit entries waiting to be written.", ["service"])


class Inserter(Protocol):
    """What the writer needs of a collection (a fake in unit tests)."""

    async def insert_many(self, documents: Sequence[Document], ordered: bool = ...) -> Any: ...


class AuditFull(Exception):
    """The queue is full: the store has not taken entries for a long time."""


def entry(*, tenant_id: str, key_id: str, role: str, site: str | None, service: str, action: str,
          outcome: Outcome, client_id: str | None = None, target: str | None = None,
          at: datetime | None = None, operator: str | None = None) -> Document:
    """One audit entry with its own id (so a retried batch cannot store it twice). Pure but for the clock."""
    return {"_id": ObjectId(), "at": at or datetime.now(UTC), "tenant_id": tenant_id, "key_id": key_id,
            "role": role, "site": site, "service": service, "action": action, "outcome": outcome,
            **given(client_id=client_id, target=target, operator=operator)}


def outcome_of(status: int) -> Outcome:
    """The outcome an HTTP status stands for."""
    if status < 400:
        return "allowed"
    if status == 403:
        return "denied"
    if status == 404:
        return "not_found"
    if status < 500:
        return "invalid"
    return "error"


def audit_collection(client: AsyncMongoClient[Document], mongo: MongoSettings,
                     settings: AuditSettings) -> AsyncCollection[Document]:
    """The one audit collection every service writes (no connection is opened)."""
    return client[settings.database or mongo.database][settings.collection]


async def ensure_indexes(collection: AsyncCollection[Document]) -> None:
    """Indexes of the read side (GET /v1/audit and the export): by tenant and time, and by client."""
    await collection.create_index([("tenant_id", 1), ("at", 1), ("_id", 1)])
    await collection.create_index([("tenant_id", 1), ("client_id", 1), ("at", 1), ("_id", 1)])


class AuditLog:
    """The batching writer: `append` never waits for the store; a background task writes batches.

    One per process. The task starts with the first entry (there is always a running loop then)
    and `close` writes whatever is left.
    """

    def __init__(self, collection: Inserter, service: str, *, flush_interval_seconds: float = 0.2,
                 batch_max_entries: int = 500, queue_max_entries: int = 50_000,
                 close_timeout_seconds: float = 10.0) -> None:
        self._collection = collection
        self.service = service
        self._interval = flush_interval_seconds
        self._batch = batch_max_entries
        self._max = queue_max_entries
        self._close_timeout = close_timeout_seconds
        self._queue: deque[Document] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, collection: Inserter, service: str, settings: AuditSettings) -> AuditLog:
        return cls(collection, service, flush_interval_seconds=settings.flush_interval_seconds,
                   batch_max_entries=settings.batch_max_entries, queue_max_entries=settings.queue_max_entries,
                   close_timeout_seconds=settings.close_timeout_seconds)

    @property
    def pending(self) -> int:
        """Entries not written yet."""
        return len(self._queue)

    @property
    def full(self) -> bool:
        """True when `append` would refuse an entry."""
        return len(self._queue) >= self._max

    def append(self, doc: Document) -> None:
        """Queue one entry; AuditFull when `queue_max_entries` are already waiting."""
        if len(self._queue) >= self._max:
            REFUSED.labels(self.service).inc()
            raise AuditFull(f"{len(self._queue)} audit entries are waiting for the store")
        self._queue.append(doc)
        QUEUED.labels(self.service).set(len(self._queue))
        if len(self._queue) >= self._batch:
            self._wake.set()
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.service}-audit")

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The entries stay queued and go with the next attempt; back off while the store is down.
                failures += 1
                FLUSH_FAILURES.labels(self.service).inc()
                log.warning("audit entries not written yet (%d waiting): %s", len(self._queue), type(exc).__name__)
                await asyncio.sleep(min(self._interval * 2 ** failures, 5.0))

    async def flush(self) -> int:
        """Write everything queued now, a batch at a time; the count written. Raises when the store
        fails (the unwritten entries stay queued, in order)."""
        written = 0
        async with self._lock:
            while self._queue:
                batch = [self._queue[i] for i in range(min(self._batch, len(self._queue)))]
                try:
                    await self._collection.insert_many(batch, ordered=False)
                except BulkWriteError as exc:
                    # Entries a previous, failed attempt did write come back as duplicates: done.
                    if duplicate_key_indexes(exc) is None:
                        raise
                for _ in batch:
                    self._queue.popleft()
                written += len(batch)
                WRITTEN.labels(self.service).inc(len(batch))
                QUEUED.labels(self.service).set(len(self._queue))
        return written

    async def close(self) -> None:
        """Stop the background task and write what is left (retrying until `close_timeout_seconds`)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout
        while self._queue:
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    await self.flush()
            except Exception as exc:
                if loop.time() >= deadline:
                    log.error("stopping with %d audit entries not written: %s", len(self._queue),
                              type(exc).__name__)
                    return
                await asyncio.sleep(min(self._interval, 0.5))


def note(request: Request, *, client_id: str | None = None, target: str | None = None,
         outcome: Outcome | None = None) -> None:
    """Tell the route's audit entry what the route learned (e.g. the client an alert is about, or that
    a 404 answered a foreign site's client, which the audit records as denied)."""
    notes: dict[str, Any] = getattr(request.state, "audit", None) or {}
    notes.update({k: v for k, v in (("client_id", client_id), ("target", target), ("outcome", outcome))
                  if v is not None})
    request.state.audit = notes


Lookup = Callable[[str], Awaitable[Principal | None]]
Authenticate = Callable[[Request], Awaitable[Principal]]


class Auditor:
    """What a service's routes record with: its `AuditLog` (None: auditing off) and its key look-up."""

    def __init__(self, audit_log: AuditLog | None, service: str, lookup: Lookup) -> None:
        self.log = audit_log
        self.service = service
        self.lookup = lookup

    def record(self, p: Principal, action: str, outcome: Outcome = "allowed", *, client_id: str | None = None,
               target: str | None = None) -> None:
        """Append one entry for `p`; 503 (HTTPException) when the trail cannot take it."""
        if self.log is None:
            return
        try:
            self.log.append(entry(tenant_id=p.tenant_id, key_id=p.key_id, role=p.role, site=p.site_id,
                                  service=self.service, action=action, outcome=outcome, client_id=client_id,
                                  target=target))
        except AuditFull:
            raise HTTPException(503, error_body([(None, "the audit trail cannot be written right now; retry "
                                                        "shortly")]), headers={"Retry-After": "5"}) from None

    def route(self, action: str, authenticate: Authenticate, *, client_param: str | None = "client_id",
              target_param: str | None = None) -> Any:
        """A FastAPI dependency (use as a parameter default) yielding the caller's `Principal`, that
        records one `action` entry per request: `allowed` when the route answers, else the outcome of
        its error status; a key whose role does not allow the route is recorded as `denied`.

        It runs before the answer is sent (function scope), so a full trail refuses the answer."""

        async def dependency(request: Request) -> AsyncIterator[Principal]:
            params = request.path_params
            client_id = params.get(client_param) if client_param else None
            target = params.get(target_param) if target_param else None
            try:
                p = await authenticate(request)
            except HTTPException as exc:
                await self.refused(request, exc, action, client_id=client_id, target=target)
                raise
            with self.around(request, p, action, client_id=client_id, target=target):
                yield p

        return Depends(dependency, scope="function")

    async def refused(self, request: Request, exc: HTTPException, action: str, *, client_id: str | None = None,
                      target: str | None = None) -> None:
        """Record a key whose role does not allow `action` (403 from the key check) as `denied`; a
        request without a valid key (401) has nobody to record."""
        token = bearer_token(request)
        if exc.status_code != 403 or not token:
            return
        try:
            who = await self.lookup(token)  # cached: the key check just looked it up
        except Exception:  # the store stopped answering: the 403 still stands
            log.warning("could not record a denied request: the key store did not answer")
            return
        if who is not None:
            self.record(who, action, "denied", client_id=client_id, target=target)

    @contextmanager
    def around(self, request: Request, p: Principal, action: str, *, client_id: str | None = None,
               target: str | None = None) -> Iterator[None]:
        """`route` for a handler that checks its key itself: records the block's outcome."""
        try:
            yield
        except HTTPException as exc:
            self._record_noted(request, p, action, outcome_of(exc.status_code), client_id, target)
            raise
        except Exception:
            self._record_noted(request, p, action, "error", client_id, target)
            raise
        self._record_noted(request, p, action, "allowed", client_id, target)

    def _record_noted(self, request: Request, p: Principal, action: str, outcome: Outcome, client_id: str | None,
                      target: str | None) -> None:
        notes: dict[str, Any] = getattr(request.state, "audit", None) or {}
        self.record(p, action, notes.get("outcome", outcome), client_id=notes.get("client_id", client_id),
                    target=notes.get("target", target))


AuditedRoute = tuple[str, re.Pattern[str], str]  # (method, path with an optional client_id group, action)


class AuditRoutes:
    """ASGI middleware auditing routes whose handlers check their key themselves (intake's): one
    entry per request with a known key, its outcome taken from the answer's status.

    A full trail refuses the request (503) before the handler runs, so no change goes unaudited.
    """

    def __init__(self, app: ASGIApp, auditor: Auditor, routes: Sequence[AuditedRoute]) -> None:
        self.app = app
        self.auditor = auditor
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._match(scope) if scope["type"] == "http" and self.auditor.log is not None else None
        p = await self._principal(scope) if found is not None else None
        if found is None or p is None:  # not audited, or nobody to record (the handler answers 401/503)
            await self.app(scope, receive, send)
            return
        action, client_id = found
        if self.auditor.log is not None and self.auditor.log.full:
            REFUSED.labels(self.auditor.service).inc()
            body = error_body([(None, "the audit trail cannot be written right now; retry shortly")])
            await JSONResponse(body, status_code=503, headers={"Retry-After": "5"})(scope, receive, send)
            return
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            try:
                self.auditor.record(p, action, outcome_of(status), client_id=client_id)
            except HTTPException:  # full since the check above: the answer is already out
                log.error("an audit entry was dropped: the trail is full")

    def _match(self, scope: Scope) -> tuple[str, str | None] | None:
        for method, pattern, action in self.routes:
            if scope.get("method") == method and (m := pattern.fullmatch(scope.get("path", ""))):
                return action, m.groupdict().get("client_id")
        return None

    async def _principal(self, scope: Scope) -> Principal | None:
        header = next((v.decode("latin-1") for n, v in scope.get("headers", ()) if n == b"authorization"), "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        try:
            return await self.auditor.lookup(token.strip())
        except Exception:  # the key store not answering: the handler answers 503 itself
            return None


# --- reading -----------------------------------------------------------------------------------


class BadCursor(ValueError):
    """A cursor this API did not issue."""


def encode_cursor(doc: Document) -> str:
    """An opaque cursor pointing after `doc` (entries are ordered by time, then id)."""
    raw = json.dumps({"at": doc["at"].isoformat(), "id": str(doc["_id"])}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, ObjectId]:
    """The (time, id) a cursor points after; BadCursor when it is not one of ours."""
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(value["at"]), ObjectId(value["id"])
    except (binascii.Error, ValueError, KeyError, TypeError, InvalidId) as exc:
        raise BadCursor("not a cursor issued by this API") from exc


def query(tenant_id: str | None, client_id: str | None = None, since: datetime | None = None,
          after: tuple[datetime, ObjectId] | None = None) -> Document:
    """The filter of a page of entries (tenant None: every tenant, for the operator's export). Pure."""
    q: Document = given(tenant_id=tenant_id, client_id=client_id)
    if since is not None:
        q["at"] = {"$gte": since}
    if after is not None:
        at, oid = after
        q["$or"] = [{"at": {"$gt": at}}, {"at": at, "_id": {"$gt": oid}}]
    return q


async def read_page(collection: AsyncCollection[Document], q: Document, limit: int) -> tuple[list[Document], bool]:
    """Up to `limit` entries in (time, id) order, and whether more follow."""
    docs = await collection.find(q).sort([("at", 1), ("_id", 1)]).limit(limit + 1).to_list()
    return docs[:limit], len(docs) > limit


def view(doc: Document) -> Document:
    """An entry as the API and the export show it. Pure."""
    out: Document = {"id": str(doc["_id"]), "at": doc["at"].astimezone(UTC).isoformat().replace("+00:00", "Z")}
    for name in ("tenant_id", "key_id", "role", "site", "service", "action", "client_id", "target", "outcome",
                 "operator"):
        if name in doc:
            out[name] = doc[name]
    return out


async def write_now(collection: AsyncCollection[Document], *, tenant_id: str, action: str,
                    outcome: Outcome = "allowed", client_id: str | None = None, target: str | None = None,
                    service: str = "cli") -> None:
    """Record one operator command at once (CLI processes are short-lived; no batching)."""
    try:
        operator = getpass.getuser()
    except Exception:  # no user name in some containers
        operator = "unknown"
    await collection.insert_one(entry(tenant_id=tenant_id, key_id=CLI_KEY_ID, role=CLI_ROLE, site=None,
                                      service=service, action=action, outcome=outcome, client_id=client_id,
                                      target=target, operator=operator))


async def record_cli(*, tenant_id: str, action: str, outcome: Outcome = "allowed", client_id: str | None = None,
                     target: str | None = None) -> None:
    """`write_now` through the environment's settings (for the operator commands)."""
    mongo, settings = MongoSettings(), AuditSettings()
    client = make_client(mongo, admin=True)
    try:
        await write_now(audit_collection(client, mongo, settings), tenant_id=tenant_id, action=action,
                        outcome=outcome, client_id=client_id, target=target)
    finally:
        await client.close()


def audit_log_for(client: AsyncMongoClient[Document], mongo: MongoSettings, service: str,
                  settings: AuditSettings | None = None) -> AuditLog | None:
    """The service's batching writer into the shared trail; None when auditing is off."""
    settings = settings or AuditSettings()
    if not settings.enabled:
        return None
    return AuditLog.from_settings(audit_collection(client, mongo, settings), service, settings)


def install_audit_routes(app: FastAPI, runtime: Runtime, mongo: MongoSettings, lookup: Lookup,
                         routes: Sequence[AuditedRoute], settings: AuditSettings | None = None) -> Auditor:
    """Audit `routes` of a service whose handlers check keys themselves (`AuditRoutes`); the writer
    is flushed when the service stops."""
    assert runtime.mongo is not None
    audit_log = audit_log_for(runtime.mongo, mongo, runtime.name, settings)
    if audit_log is not None:
        runtime.on_stop.append(audit_log.close)
    auditor = Auditor(audit_log, runtime.name, lookup)
    app.add_middleware(AuditRoutes, auditor=auditor, routes=routes)
    return auditor
