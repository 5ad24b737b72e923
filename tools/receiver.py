"""The webhook receiver of the benches and the tests: a threaded HTTP server on 127.0.0.1.

It records every request whose body arrived whole, and answers per path: succeed (with a chosen
status, headers and body size), fail the first N times, always fail, wait a while, or hold the
request until released (a slow receiver). HTTPS with a server `ssl.SSLContext`.

A request whose body is shorter than its `Content-Length` (the sender hung up mid-request, e.g.
a `kill -9` of alerts) is a failed request: it is counted in `cut`, never answered and never a
delivery - the sender saw no answer, so it will send that delivery again.

One receiver for every user, the benches and the tests alike (tools never import tests, so it lives here).
"""

from __future__ import annotations

import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

DEFAULT_PATH = "/hook"
_CHUNK = b"x" * 65536


@dataclass(frozen=True)
class Received:
    """One request whose body arrived whole, and the status it was answered with."""

    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int
    at: float  # time.time() when its body had arrived
    failed: bool = False  # answered 500 on purpose (`fail_first`, `always_fail`)

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass
class Behaviour:
    """How one path answers."""

    fail_first: int = 0  # answer 500 to the first N requests
    always_fail: bool = False
    status: int = 200  # the answer when not failing on purpose
    headers: dict[str, str] = field(default_factory=dict)  # sent with that answer (e.g. a Location)
    body_bytes: int = 0  # answer with a body of this many bytes instead (a receiver that sends too much)
    delay: float = 0.0  # answer after this many seconds
    hold: threading.Event | None = None  # block requests after the first `hold_after` until set
    hold_after: int = 0
    hold_max: float = 30.0
    seen: int = 0  # requests with a whole body so far
    held_now: int = 0


class _QuietServer(ThreadingHTTPServer):
    """A sender that gave up (its timeout) leaves a held request writing to a closed socket, and a
    client refusing the certificate breaks a handshake: expected here, not worth a traceback."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError):
            super().handle_error(request, client_address)


@dataclass
class WebhookReceiver:
    """Requests per path; thread-safe. `on_request` is called from the server thread."""

    tls: ssl.SSLContext | None = None
    default: Behaviour = field(default_factory=Behaviour)  # copied for every path without its own
    on_request: Callable[[Received], None] | None = None
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Received] = field(default_factory=list)  # whole requests, in arrival order
    cut: list[str] = field(default_factory=list)  # paths of requests whose body was cut short
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    tls_server_names: list[str | None] = field(default_factory=list)  # SNI of each TLS handshake
    body_bytes_sent: int = 0  # of answer bodies, what the senders took before they hung up
    bodies_finished: int = 0  # answer bodies that ended (written whole, or cut off by the sender)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def url(self) -> str:
        """The URL of the default path."""
        return self.url_for(DEFAULT_PATH)

    def url_for(self, path: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def behave(self, path: str, **kwargs: Any) -> str:
        """Set how `path` answers (fields of `Behaviour`); returns its URL."""
        with self._lock:
            self.behaviours[path] = Behaviour(**kwargs)
        return self.url_for(path)

    @property
    def attempts(self) -> int:
        """Requests whose body arrived whole (answered, successfully or not)."""
        with self._lock:
            return len(self.requests)

    def at(self, path: str) -> list[Received]:
        """Whole requests to `path` so far, failed ones included (a copy)."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def successes(self, path: str | None = None) -> list[Received]:
        """Requests answered with their path's own status, i.e. not failed on purpose: deliveries."""
        with self._lock:
            return [r for r in self.requests if not r.failed and (path is None or r.path == path)]

    def held(self, path: str) -> int:
        with self._lock:
            b = self.behaviours.get(path)
            return b.held_now if b else 0

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.cut.clear()

    def _behaviour(self, path: str) -> Behaviour:
        """The path's behaviour, made from `default` on its first request (caller holds the lock)."""
        b = self.behaviours.get(path)
        if b is None:
            d = self.default
            b = self.behaviours[path] = Behaviour(d.fail_first, d.always_fail, d.status, dict(d.headers),
                                                  d.body_bytes, d.delay, d.hold, d.hold_after, d.hold_max)
        return b

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length)
        path = handler.path.split("?", 1)[0]
        if len(body) < length:
            # The sender died mid-request: a failed request, not a delivery; nobody reads an answer.
            with self._lock:
                self.cut.append(path)
            handler.close_connection = True
            return
        with self._lock:
            b = self._behaviour(path)
            b.seen += 1
            n = b.seen
            hold = b.hold if n > b.hold_after else None
            if hold is not None:
                b.held_now += 1
        if hold is not None:
            hold.wait(b.hold_max)
            with self._lock:
                b.held_now -= 1
        if b.delay:
            time.sleep(b.delay)
        failing = b.always_fail or n <= b.fail_first
        status = 500 if failing else b.status
        rec = Received(path, {k.lower(): v for k, v in handler.headers.items()}, body, status, time.time(), failing)
        with self._lock:
            self.requests.append(rec)
        if self.on_request is not None:
            self.on_request(rec)
        handler.send_response(status)
        if not failing:
            for name, value in b.headers.items():
                handler.send_header(name, value)
        if b.body_bytes and not failing:
            handler.send_header("content-length", str(b.body_bytes))
            handler.end_headers()
            self._stream(handler, b.body_bytes)
            return
        payload = b"" if status == 204 else b'{"ok":false}' if failing else b'{"ok":true}'
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _stream(self, handler: BaseHTTPRequestHandler, size: int) -> None:
        left = size
        try:
            while left > 0:
                n = min(left, len(_CHUNK))
                handler.wfile.write(_CHUNK[:n])
                left -= n
                with self._lock:
                    self.body_bytes_sent += n
        except OSError:  # the sender hung up before the end (what a sender with a size cap does)
            handler.close_connection = True
        with self._lock:
            self.bodies_finished += 1

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = _QuietServer((self.host, self.port), Handler)
        if self.tls is not None:
            def sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext) -> None:
                with self._lock:
                    self.tls_server_names.append(name)
            self.tls.sni_callback = sni
            # Handshake in the request's thread, so a client that refuses the certificate holds nobody up.
            server.socket = self.tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self.port = int(server.server_address[1])
        threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            for b in list(self.behaviours.values()):
                if b.hold is not None:
                    b.hold.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextmanager
def webhook_receiver(fail_first: int = 0, delay_seconds: float = 0.0, status: int = 204, body_bytes: int = 0,
                     tls: ssl.SSLContext | None = None, headers: dict[str, str] | None = None
                     ) -> Iterator[WebhookReceiver]:
    """A receiver for the block whose every path answers `status` (after `fail_first` 500s)."""
    default = Behaviour(fail_first=fail_first, delay=delay_seconds, status=status, body_bytes=body_bytes,
                        headers=dict(headers or {}))
    with WebhookReceiver(tls=tls, default=default) as receiver:
        yield receiver
