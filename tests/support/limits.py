"""Probes for bounded requests: ASGI calls that prove a body was never read, and a process's peak RSS."""

from __future__ import annotations

import json
import select
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message


@dataclass
class Unread:
    """An app's answer to a request whose body it was not allowed to read."""

    status: int
    headers: dict[str, str]
    body: Any
    body_reads: int


async def call_without_reading(app: ASGIApp, method: str, path: str, headers: dict[str, str]) -> Unread:
    """Call `app` directly with `headers` (e.g. a huge `Content-Length`) and count how often it asks
    for the body; the body it would get is never sent."""
    reads = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "scheme": "http", "server": ("test", 80),
             "client": ("127.0.0.1", 1), "root_path": "", "state": {},
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Unread(start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
                  json.loads(body) if body else None, reads)


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def send_large_body(port: int, method: str, path: str, size: int, headers: dict[str, str],
                    chunked: bool = False) -> int:
    """Send a request with a `size`-byte body over a raw socket; the answer's status code.

    With `Content-Length` (the default) a server that answers after the headers alone (refusing
    early) gets no body: its answer is read within a second. Otherwise the body is sent 1 MiB at a
    time (as chunks of `Transfer-Encoding: chunked` when `chunked`, so the server cannot know its
    size in advance), and sending stops as soon as the server has answered.
    """
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(size)}
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "127.0.0.1", **framing,
                                                 "Content-Type": "application/json", **headers}.items())
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode())
        answered, _, _ = select.select([sock], [], [], 0.0 if chunked else 1.0)
        if not answered:
            chunk = b'{"site_id": "' + b"x" * (1024 * 1024 - 13)
            sent = 0
            try:
                while sent < size and not select.select([sock], [], [], 0.0)[0]:
                    part = chunk[: size - sent]
                    sock.sendall(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
                    sent += len(part)
                if chunked and sent >= size:
                    sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the server answered and closed while the body was on its way
        answer = b""
        try:
            while b"\r\n" not in answer:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
        except OSError:
            pass
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
