"""A webhook receiver on 127.0.0.1 that records what it gets (and can fail on purpose)."""

from __future__ import annotations

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
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def successes(self) -> list[Received]:
        with self.lock:
            return list(self.received)


@contextmanager
def webhook_receiver(fail_first: int = 0, delay_seconds: float = 0.0, status: int = 204) -> Iterator[Receiver]:
    """Run a receiver in a thread for the duration of the block."""
    state = Receiver(fail_first=fail_first, delay_seconds=delay_seconds, status=status)

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
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
