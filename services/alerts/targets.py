"""Webhook egress: where a webhook may go, and connecting only to the address that was checked.

Two places look at a target:

- registration (`target_problem`, in the API): the URL's syntax, and every address its host
  resolves to must be public (`rules.address_block_reason`), so a tenant is told at once;
- every attempt (`PinnedBackend`, the network backend of the webhook client): the host is
  resolved ONCE, every address is vetted, and the TCP connection goes to a vetted address. The
  request keeps the URL's host name, so the Host header, TLS SNI and certificate verification are
  those of the name, not of the IP.

Before this, the attempt checked a resolution and httpx then resolved the name again to connect:
a name answering a public address to the check and 127.0.0.1 to the connection (DNS rebinding)
got a signed POST into the internal network. Now there is no second resolution to win.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from httpcore import AnyIOBackend, AsyncNetworkBackend, AsyncNetworkStream

from services.alerts.rules import address_block_reason, url_problem

# (host, port) -> the addresses the host resolves to (IP literals).
Resolver = Callable[[str, int], Awaitable[list[str]]]
RESOLVE_TIMEOUT_SECONDS = 5.0


class EgressBlocked(Exception):
    """The target's host resolves to an address a webhook must not reach (or does not resolve)."""


async def system_resolve(host: str, port: int) -> list[str]:
    """The process resolver (getaddrinfo), deduplicated, in its order."""
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_SECONDS)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _literal(host: str) -> str | None:
    """`host` as an IP literal (brackets and zone kept out of the way), or None for a name."""
    try:
        address_block_reason(host)
    except ValueError:
        return None
    return host.strip("[]")


async def vetted_addresses(host: str, port: int, allow_private: bool, resolve: Resolver) -> list[str]:
    """The addresses a connection to `host` may use: one resolution, every answer vetted.

    Raises `EgressBlocked` when the name does not resolve or any answer is not public (one bad
    answer refuses all: a name that mixes them is either misconfigured or an attack)."""
    literal = _literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = await resolve(host, port)
        except (OSError, TimeoutError) as exc:
            raise EgressBlocked(f"the host {host!r} does not resolve") from exc
        if not addresses:
            raise EgressBlocked(f"the host {host!r} does not resolve")
    if not allow_private:
        for a in addresses:
            if (why := address_block_reason(a)) is not None:
                raise EgressBlocked(f"the URL points to a {why} address")
    return addresses


async def target_problem(url: str, allow_private: bool, resolve: Resolver = system_resolve) -> str | None:
    """Why `url` must not receive webhooks, or None (at registration; attempts vet again)."""
    problem = url_problem(url)
    if problem is not None or allow_private:
        return problem
    parts = urlsplit(url)
    try:
        await vetted_addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80),
                               allow_private, resolve)
    except EgressBlocked as exc:
        return str(exc)
    return None


class PinnedBackend(AsyncNetworkBackend):
    """httpcore network backend that resolves each host once and connects to a vetted address.

    httpcore calls `connect_tcp` with the URL's host and then starts TLS on the returned stream
    with that host as `server_hostname`, so SNI and certificate checks stay on the name."""

    def __init__(self, resolve: Resolver, allow_private: bool, inner: AsyncNetworkBackend | None = None) -> None:
        self._resolve = resolve
        self._allow_private = allow_private
        self._inner = inner or AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> AsyncNetworkStream:
        addresses = await vetted_addresses(host, port, self._allow_private, self._resolve)
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc  # the next vetted address, as getaddrinfo-based clients do
        assert error is not None
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> AsyncNetworkStream:
        raise EgressBlocked("unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx transport over `PinnedBackend`; no proxy from the environment (a proxy would resolve
    the name itself), HTTP/1.1, system CA verification."""

    def __init__(self, resolve: Resolver, allow_private: bool, limits: httpx.Limits,
                 verify: ssl.SSLContext | bool = True) -> None:
        super().__init__(verify=verify, trust_env=False, limits=limits)
        ctx = httpx.create_ssl_context(verify=verify, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ctx, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            http1=True, http2=False, network_backend=PinnedBackend(resolve, allow_private))
