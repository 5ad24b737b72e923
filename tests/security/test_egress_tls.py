"""Issue 12, item 4: the pinned connection keeps the target's host name for HTTP and TLS.

The webhook client's transport (`targets.PinnedTransport`) connects to the address its resolver
vetted, while the Host header, TLS SNI and certificate verification stay those of the URL's name:
here `hooks.test` resolves (through the injected resolver) to a local HTTPS receiver whose
certificate a throwaway CA issued.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from services.alerts.targets import EgressBlocked, PinnedTransport
from tests.support.tls import LocalCA
from tools.receiver import webhook_receiver

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=0)


class Resolver:
    """Answers every name with `answer`; counts the questions."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return [self.answer]


async def test_https_to_a_pinned_address_keeps_host_header_sni_and_certificate_name(tmp_path: Path) -> None:
    ca = LocalCA.create(tmp_path)
    resolve = Resolver("127.0.0.1")
    with webhook_receiver(tls=ca.server_context("hooks.test")) as receiver:
        transport = PinnedTransport(resolve, allow_private=True, limits=LIMITS, verify=ca.client_context())
        async with httpx.AsyncClient(transport=transport) as client:
            r = await client.post(f"https://hooks.test:{receiver.port}/hook", content=b"{}")
        assert r.status_code == 204
        assert resolve.asked == ["hooks.test"]
        assert receiver.tls_server_names == ["hooks.test"]
        assert receiver.successes()[0].headers["host"] == f"hooks.test:{receiver.port}"


async def test_a_certificate_for_another_name_is_refused_at_the_pinned_address(tmp_path: Path) -> None:
    ca = LocalCA.create(tmp_path)
    with webhook_receiver(tls=ca.server_context("other.test")) as receiver:
        transport = PinnedTransport(Resolver("127.0.0.1"), allow_private=True, limits=LIMITS,
                                    verify=ca.client_context())
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
                await client.post(f"https://hooks.test:{receiver.port}/hook", content=b"{}")
        assert receiver.successes() == []


async def test_with_the_guard_on_a_name_answering_loopback_is_never_connected(tmp_path: Path) -> None:
    with webhook_receiver() as receiver:
        transport = PinnedTransport(Resolver("127.0.0.1"), allow_private=False, limits=LIMITS)
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(EgressBlocked, match="loopback"):
                await client.post(f"http://hooks.test:{receiver.port}/hook", content=b"{}")
        assert receiver.attempts == 0
