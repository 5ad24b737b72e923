"""Webhook target checks: scheme and, unless allowed, no loopback/private/link-local address.

Host names are resolved, and every address they resolve to must be public, so a DNS name
cannot smuggle a request into the internal network. The check runs when a URL is registered
and again before each attempt (the name may resolve differently later).
"""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlsplit

from services.alerts.rules import is_public_address, url_problem


async def target_problem(url: str, allow_private: bool) -> str | None:
    """Why `url` must not receive webhooks, or None."""
    problem = url_problem(url)
    if problem is not None or allow_private:
        return problem
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        addresses = [host] if _is_ip(host) else await _resolve(host, parts.port or 443)
    except OSError:
        return f"the host {host!r} does not resolve"
    if not addresses:
        return f"the host {host!r} does not resolve"
    if not all(is_public_address(a) for a in addresses):
        return "the URL points to a loopback, private or link-local address"
    return None


def _is_ip(host: str) -> bool:
    try:
        return is_public_address(host) or True
    except ValueError:
        return False


async def _resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), 5.0)
    return [str(info[4][0]) for info in infos]
