"""The test kit's webhook receiver: what it counts as a delivery."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx

from tools.receiver import webhook_receiver


def _send_cut_request(port: int, declared: int, sent: bytes) -> None:
    """A POST that declares `declared` body bytes, sends `sent`, and hangs up (a sender killed mid-request)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     + f"content-length: {declared}\r\n\r\n".encode() + sent)


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the receiver did not see the request in time"
        time.sleep(0.01)


def test_a_body_shorter_than_its_content_length_is_a_failed_request_not_a_delivery() -> None:
    with webhook_receiver() as receiver:
        _send_cut_request(receiver.port, declared=100, sent=b'{"alert_id": "a-')
        _wait_for(lambda: receiver.cut == ["/hook"])
        assert receiver.successes() == [] and receiver.attempts == 0


def test_a_whole_body_is_a_delivery() -> None:
    with webhook_receiver() as receiver:
        r = httpx.post(receiver.url, content=b'{"alert_id": "a-1"}', headers={"webhook-id": "msg_1"})
        assert r.status_code == 204
        [got] = receiver.successes()
        assert (got.body, got.webhook_id, receiver.cut) == (b'{"alert_id": "a-1"}', "msg_1", [])


def test_a_request_failed_on_purpose_is_answered_500_and_is_not_a_delivery() -> None:
    with webhook_receiver(fail_first=1) as receiver:
        assert httpx.post(receiver.url, content=b"{}").status_code == 500
        assert receiver.successes() == [] and receiver.attempts == 1
        assert httpx.post(receiver.url, content=b"{}").status_code == 204
        assert len(receiver.successes()) == 1
