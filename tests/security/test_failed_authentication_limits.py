"""Failed authentications are limited per peer (issue 12, item 8: 300 random keys in 0.8 s, each a
store look-up, were all answered 401). On intake, alerts and reporting alike: after a small burst of
missing or unknown keys one peer gets 429 with `Retry-After`; other peers, and keys already known
from that peer, are unaffected. The peer is the TCP client; `X-Forwarded-For` counts only behind a
configured number of trusted proxies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from shared.http import AuthenticateFirst, Guard, peer_address
from shared.ratelimit import MongoCounters
from tests.support.apps import HTTP_SERVICES, PROBES, HttpService, build_app, client, new_key
from tests.support.services import Namespace

# 3 failures, then one per 8 hours: a one-day window whose slots turn only at midnight UTC, so no
# test here sees the count shrink while it runs.
LIMITED = {"auth_failure_burst": 3, "auth_failure_rate_per_second": 3 / 86_400}


@pytest.mark.parametrize("service", HTTP_SERVICES)
async def test_repeated_unknown_keys_from_one_peer_get_429_with_retry_after(service: HttpService,
                                                                              namespace: Namespace) -> None:
    probe = PROBES[service]
    async with client(build_app(service, namespace, **LIMITED)) as http:
        statuses = [(await probe.send(http, f"ak_wrong-{i}")).status_code for i in range(3)]
        r = await probe.send(http, "ak_wrong-3")
    assert statuses == [401, 401, 401]
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "too many failed authentications" in r.json()["errors"][0]["message"]


@pytest.mark.parametrize("service", HTTP_SERVICES)
async def test_the_429s_are_counted_in_a_metric_by_service_and_limit(service: HttpService,
                                                                    namespace: Namespace) -> None:
    labels = {"service": service, "limit": "auth_failures"}
    before = REGISTRY.get_sample_value("alliance_http_throttled_total", labels) or 0.0
    async with client(build_app(service, namespace, **LIMITED)) as http:
        for i in range(5):
            await PROBES[service].send(http, f"ak_wrong-{i}")
    assert REGISTRY.get_sample_value("alliance_http_throttled_total", labels) == before + 2


@pytest.mark.parametrize("service", HTTP_SERVICES)
async def test_requests_without_a_key_count_as_failed_authentications(service: HttpService,
                                                                     namespace: Namespace) -> None:
    probe = PROBES[service]
    async with client(build_app(service, namespace, **LIMITED)) as http:
        statuses = [(await probe.send(http, None)).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]


@pytest.mark.parametrize("service", HTTP_SERVICES)
async def test_a_peer_with_a_valid_key_is_unaffected_by_another_peers_failures(service: HttpService,
                                                                              namespace: Namespace) -> None:
    probe = PROBES[service]
    key = await new_key(namespace, probe.role)
    app = build_app(service, namespace, **LIMITED)
    async with client(app, "203.0.113.7") as attacker, client(app, "198.51.100.9") as partner:
        for i in range(3):
            await probe.send(attacker, f"ak_wrong-{i}")
        assert (await probe.send(attacker, "ak_wrong")).status_code == 429
        assert (await probe.send(partner, key)).status_code == probe.answer


@pytest.mark.parametrize("service", HTTP_SERVICES)
async def test_a_key_already_known_keeps_working_from_a_limited_peer(service: HttpService,
                                                                    namespace: Namespace) -> None:
    probe = PROBES[service]
    key = await new_key(namespace, probe.role)
    async with client(build_app(service, namespace, **LIMITED)) as http:
        assert (await probe.send(http, key)).status_code == probe.answer
        for i in range(3):
            await probe.send(http, f"ak_wrong-{i}")
        assert (await probe.send(http, "ak_wrong")).status_code == 429
        assert (await probe.send(http, key)).status_code == probe.answer


async def test_x_forwarded_for_is_ignored_without_trusted_proxies(namespace: Namespace) -> None:
    probe = PROBES["reporting"]
    async with client(build_app("reporting", namespace, **LIMITED)) as http:
        statuses = [(await probe.send(http, "ak_wrong", **{"X-Forwarded-For": f"192.0.2.{i}"})).status_code
                    for i in range(4)]
    assert statuses == [401, 401, 401, 429]


async def test_behind_a_trusted_proxy_each_forwarded_client_is_limited_on_its_own(namespace: Namespace) -> None:
    probe = PROBES["reporting"]
    app = build_app("reporting", namespace, trusted_proxy_hops=1, **LIMITED)
    async with client(app, "10.0.0.2") as proxy:  # every request arrives from the proxy
        statuses = [(await probe.send(proxy, "ak_wrong", **{"X-Forwarded-For": "192.0.2.1"})).status_code
                    for _ in range(4)]
        other = await probe.send(proxy, "ak_wrong", **{"X-Forwarded-For": "192.0.2.2"})
    assert statuses == [401, 401, 401, 429]
    assert other.status_code == 401


@pytest.mark.parametrize(("hops", "forwarded", "peer"), [
    (0, "192.0.2.1", "10.0.0.2"),  # not trusted: the TCP peer
    (1, "192.0.2.1", "192.0.2.1"),
    (1, "198.51.100.1, 192.0.2.1", "192.0.2.1"),  # a client-sent first entry is not believed
    (2, "198.51.100.1, 192.0.2.1", "198.51.100.1"),
    (3, "192.0.2.1", "192.0.2.1"),  # fewer entries than hops: the leftmost
    (1, None, "10.0.0.2"),
])
def test_the_peer_is_the_address_the_outermost_trusted_proxy_saw(hops: int, forwarded: str | None,
                                                                   peer: str) -> None:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    assert peer_address({"type": "http", "client": ("10.0.0.2", 5000), "headers": headers}, hops) == peer


def guard_of(app: FastAPI) -> Guard:
    if hasattr(app.state, "intake"):
        return cast(Guard, app.state.intake.guard)
    return cast(Guard, next(m.kwargs["guard"] for m in app.user_middleware if m.cls is AuthenticateFirst))


@pytest.mark.parametrize("service", HTTP_SERVICES)
async def test_a_limited_peer_costs_no_store_reads_until_its_retry_after(service: HttpService,
                                                                        namespace: Namespace) -> None:
    app = build_app(service, namespace, **LIMITED)
    counters = cast(MongoCounters, guard_of(app).failures.storage.counters)
    reads = 0
    counts = counters.counts

    async def counting(names: Sequence[str]) -> dict[str, int]:
        nonlocal reads
        reads += 1
        return await counts(names)

    counters.counts = counting  # type: ignore[method-assign]
    async with client(app) as http:
        for i in range(4):
            await PROBES[service].send(http, f"ak_wrong-{i}")
        before = reads
        statuses = {(await PROBES[service].send(http, f"ak_flood-{i}")).status_code for i in range(20)}
    assert statuses == {429}
    assert reads == before


async def test_a_known_key_keeps_working_from_a_limited_peer_after_its_cache_entry_expired(
        namespace: Namespace) -> None:
    """The cache's time to live only makes a known key be read again (for revocations); it does not
    make it a stranger to the failed-authentication limit (`alliance run`'s simulator got 429s)."""
    probe = PROBES["intake"]
    key = await new_key(namespace, probe.role)
    app = build_app("intake", namespace, intake={"key_cache_seconds": 0}, **LIMITED)
    async with client(app) as http:
        assert (await probe.send(http, key)).status_code == probe.answer
        for i in range(3):
            await probe.send(http, f"ak_wrong-{i}")
        assert (await probe.send(http, "ak_wrong")).status_code == 429
        assert (await probe.send(http, key)).status_code == probe.answer
