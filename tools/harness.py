"""Tools to drive the alerts service from the outside, shared by its benchmark and its tests.

- `WebhookReceiver`: a small threaded HTTP server on 127.0.0.1 that records every request and
  answers per path: succeed, fail the first N times, always fail, or hold the request until
  released (a slow receiver).
- `EventPublisher`: publishes contract events straight onto a topic, keyed like production.
- `deterioration` / `scored`: valid events for a tenant, clinician and client; `revised` and
  `ended` build the later revisions and the superseded / withdrawn statuses of an alert the way
  scoring does.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import BaseModel

from shared import ids
from shared.events import AlertStatusChanged, AllianceDeterioration, Flag, Severity, SrsScored


@dataclass
class Received:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float  # time.time() when it arrived

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass
class Behaviour:
    """How a path answers."""

    fail_first: int = 0  # answer 500 to the first N requests
    always_fail: bool = False
    hold: threading.Event | None = None  # block requests after the first `hold_after` until set
    hold_after: int = 0
    delay: float = 0.0  # answer after this many seconds
    hold_max: float = 30.0
    seen: int = 0
    held_now: int = 0


class _QuietServer(ThreadingHTTPServer):
    """A sender that gave up (its timeout) leaves a held request writing to a closed socket:
    expected with slow receivers, not worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class WebhookReceiver:
    """Records requests per path; thread-safe."""

    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    on_request: Any = None  # optional callable(Received), called from the server thread

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                path = self.path.split("?", 1)[0]
                with receiver._lock:
                    b = receiver.behaviours.setdefault(path, Behaviour())
                    b.seen += 1
                    n = b.seen
                    hold = b.hold if n > b.hold_after else None
                    if hold is not None:
                        b.held_now += 1
                if hold is not None:
                    hold.wait(b.hold_max)
                    with receiver._lock:
                        b.held_now -= 1
                if b.delay:
                    time.sleep(b.delay)
                status = 500 if b.always_fail or n <= b.fail_first else 200
                rec = Received(path, {k.lower(): v for k, v in self.headers.items()}, body, status, time.time())
                with receiver._lock:
                    receiver.requests.append(rec)
                if receiver.on_request is not None:
                    receiver.on_request(rec)
                payload = b'{"ok":true}' if status == 200 else b'{"ok":false}'
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        self._server = _QuietServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            for b in self.behaviours.values():
                if b.hold is not None:
                    b.hold.set()
            self._server.shutdown()
            self._server.server_close()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def behave(self, path: str, **kwargs: Any) -> str:
        """Set how `path` answers; returns its URL."""
        with self._lock:
            self.behaviours[path] = Behaviour(**kwargs)
        return self.url(path)

    def at(self, path: str) -> list[Received]:
        """Requests to `path` so far (a copy)."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def held(self, path: str) -> int:
        with self._lock:
            b = self.behaviours.get(path)
            return b.held_now if b else 0


class TopicReader:
    """Reads a whole topic from the beginning (no consumer group), accumulating what it saw."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                          auto_offset_reset="earliest")
        self._topic = topic
        self.records: list[tuple[bytes | None, bytes, dict[str, str]]] = []

    async def start(self) -> None:
        await self._consumer.start()
        await self._consumer.topics()  # fetches cluster metadata
        partitions = self._consumer.partitions_for_topic(self._topic) or set()
        if not partitions:
            raise RuntimeError(f"topic {self._topic} does not exist")
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)

    async def poll(self) -> list[tuple[bytes | None, bytes, dict[str, str]]]:
        """Fetch what arrived since the last poll; returns everything read so far."""
        batches = await self._consumer.getmany(timeout_ms=200, max_records=1000)
        for recs in batches.values():
            for r in recs:
                headers = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                           for k, v in (r.headers or ())}
                self.records.append((r.key, r.value, headers))
        return self.records

    async def stop(self) -> None:
        await self._consumer.stop()


class EventPublisher:
    """Publishes events the way scoring does: JSON, key `tenant:client`, correlation id header."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, topic: str, event: BaseModel, tenant_id: str, client_id: str,
                      correlation_id: str | None = None) -> None:
        await self._producer.send_and_wait(
            topic, event.model_dump_json().encode(), key=ids.partition_key(tenant_id, client_id),
            headers=[("correlation_id", (correlation_id or str(uuid.uuid4())).encode()),
                     ("content-type", b"application/json")])

    async def publish_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        await self._producer.send_and_wait(topic, value, key=key)


def deterioration(tenant_id: str, clinician_id: str, client_id: str, submission_id: str | None = None,
                  site_id: str = "site-a", accepted_at: datetime | None = None, episode_id: str | None = None,
                  session_number: int = 3) -> AllianceDeterioration:
    """A valid deterioration event (revision 1; ids derived like scoring derives them).

    Without `episode_id` every call is its own episode, hence its own alert: the alert id derives
    from the session (tenant, client, instrument, episode, session number).
    """
    sid = submission_id or uuid.uuid4().hex
    episode = episode_id or f"ep-{sid[:12]}"
    now = datetime.now(UTC)
    alert = ids.alert_id(tenant_id, client_id, "SRS", episode, session_number)
    return AllianceDeterioration(
        event_id=ids.alert_event_id(alert, 1), tenant_id=tenant_id, occurred_at=now, submission_id=sid,
        site_id=site_id, clinician_id=clinician_id, client_id=client_id, episode_id=episode,
        session_number=session_number, administered_at=now, alert_id=alert,
        triggers=[Flag.BELOW_CUTOFF, Flag.DROP_FROM_PREVIOUS], severity=Severity.WARNING, total=31.2,
        previous_total=36.5, change_from_previous=-5.3, cutoff=36.0, accepted_at=accepted_at or now)


def revised(alert: AllianceDeterioration, revision: int, **changes: Any) -> AllianceDeterioration:
    """Revision `revision` of an alert (what scoring publishes after a correction), with `changes`."""
    return alert.model_copy(update={"revision": revision, "event_id": ids.alert_event_id(alert.alert_id, revision),
                                    "occurred_at": datetime.now(UTC), **changes})


def ended(alert: AllianceDeterioration, status: str, revision: int | None = None) -> AlertStatusChanged:
    """Scoring's `superseded` / `withdrawn` of an alert, ending `revision` (default: the alert's)."""
    rev = alert.revision if revision is None else revision
    return AlertStatusChanged.model_validate({
        "event_id": ids.alert_status_event_id(alert.tenant_id, alert.alert_id, status, rev),
        "tenant_id": alert.tenant_id, "occurred_at": datetime.now(UTC), "alert_id": alert.alert_id,
        "site_id": alert.site_id, "clinician_id": alert.clinician_id, "status": status, "revision": rev,
        "client_id": alert.client_id, "instrument": alert.instrument, "episode_id": alert.episode_id,
        "session_number": alert.session_number})


def scored(tenant_id: str, clinician_id: str, client_id: str, submission_id: str | None = None,
           site_id: str = "site-a") -> SrsScored:
    """A valid scored event."""
    sid = submission_id or uuid.uuid4().hex
    now = datetime.now(UTC)
    return SrsScored(
        event_id=ids.scored_event_id(tenant_id, sid), tenant_id=tenant_id, occurred_at=now, submission_id=sid,
        site_id=site_id, clinician_id=clinician_id, client_id=client_id, session_number=2, administered_at=now,
        total=38.0, cutoff=36.0, scored_at=now, accepted_at=now)
