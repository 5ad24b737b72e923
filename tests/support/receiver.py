"""A webhook receiver on 127.0.0.1 that records what it gets (and can fail on purpose)."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Requests received so far; `fail_first` answers 500 to that many requests first."""

    port: int = 0
    fail_first: int = 0
    delay_seconds: float = 0.0
    status: int = 204
    # Answer successes with a body of this many bytes (a receiver that sends too much);
    # `body_bytes_sent` counts what the sender actually took before it hung up.
    body_bytes: int = 0
    body_bytes_sent: int = 0
    bodies_finished: int = 0  # answers with a body that ended (written whole, or cut off by the sender)
    tls_server_names: list[str | None] = field(default_factory=list)  # SNI of each TLS handshake
    headers: dict[str, str] = field(default_factory=dict)  # sent with every answer (e.g. a Location)
    scheme: str = "http"
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/hook"

    def successes(self) -> list[Received]:
        with self.lock:
            return list(self.received)


@contextmanager
def webhook_receiver(fail_first: int = 0, delay_seconds: float = 0.0, status: int = 204,
                     body_bytes: int = 0, tls: ssl.SSLContext | None = None,
                     headers: dict[str, str] | None = None) -> Iterator[Receiver]:
    """Run a receiver in a thread for the duration of the block (HTTPS with the `tls` server context)."""
    state = Receiver(fail_first=fail_first, delay_seconds=delay_seconds, status=status, body_bytes=body_bytes,
                     scheme="https" if tls else "http", headers=dict(headers or {}))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            if len(body) < length:
                # The sender died mid-request (a kill -9 of alerts): nothing was delivered, and the
                # sender never saw an answer, so it will send this delivery again.
                self.close_connection = True
                return
            with state.lock:
                state.attempts += 1
                failing = state.attempts <= state.fail_first
            if state.delay_seconds:
                time.sleep(state.delay_seconds)
            if failing:
                self.send_response(500)
                self.end_headers()
                return
            with state.lock:
                state.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                               body, time.time()))
            self.send_response(state.status)
            for name, value in state.headers.items():
                self.send_header(name, value)
            if state.body_bytes:
                self.send_header("content-length", str(state.body_bytes))
            self.end_headers()
            chunk = b"x" * 65536
            left = state.body_bytes
            try:
                while left > 0:
                    n = min(left, len(chunk))
                    self.wfile.write(chunk[:n])
                    left -= n
                    with state.lock:
                        state.body_bytes_sent += n
            except OSError:  # the sender hung up before the end: what the test wants to see
                self.close_connection = True
            if state.body_bytes:
                with state.lock:
                    state.bodies_finished += 1

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        def sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext) -> None:
            with state.lock:
                state.tls_server_names.append(name)
        tls.sni_callback = sni
        # Handshake in the request's thread, so a client that refuses the certificate holds nobody up.
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
