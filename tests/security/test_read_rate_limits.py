"""Alerts and reporting limit requests per API key (issue 12, item 8: they had no rate limit):
past `ALLIANCE_<SERVICE>_READ_RATE_BURST` a key gets 429 with `Retry-After`, other keys are
unaffected. Replicas sharing the store share the limit, so N replicas do not multiply it; intake's
submission limit is shared the same way."""

from __future__ import annotations

import pytest
from pymongo import AsyncMongoClient

from shared.mongo import Document
from shared.ratelimit import MongoCounters
from tests.support.apps import PROBES, HttpService, build_app, client, new_key
from tests.support.services import Namespace
from tools.stack import free_port

# 3 requests per one-day window (slots turn at midnight UTC only: nothing frees up during a test).
READS = {"read_rate_burst": 3, "read_rate_per_second": 3 / 86_400}


@pytest.mark.parametrize("service", ["alerts", "reporting"])
async def test_requests_past_the_per_key_rate_get_429_with_retry_after(service: HttpService,
                                                                         namespace: Namespace) -> None:
    probe = PROBES[service]
    key = await new_key(namespace, probe.role)
    async with client(build_app(service, namespace, **READS)) as http:
        statuses = [(await probe.send(http, key)).status_code for _ in range(3)]
        r = await probe.send(http, key)
    assert statuses == [probe.answer] * 3
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "rate limit of" in r.json()["errors"][0]["message"]


@pytest.mark.parametrize("service", ["alerts", "reporting"])
async def test_the_read_limit_is_per_key(service: HttpService, namespace: Namespace) -> None:
    probe = PROBES[service]
    busy, other = await new_key(namespace, probe.role), await new_key(namespace, probe.role)
    async with client(build_app(service, namespace, **READS)) as http:
        for _ in range(3):
            await probe.send(http, busy)
        assert (await probe.send(http, busy)).status_code == 429
        assert (await probe.send(http, other)).status_code == probe.answer


async def test_two_reporting_replicas_sharing_the_store_share_one_limit(namespace: Namespace) -> None:
    probe = PROBES["reporting"]
    key = await new_key(namespace, probe.role)
    a, b = build_app("reporting", namespace, **READS), build_app("reporting", namespace, **READS)
    async with client(a) as http_a, client(b) as http_b:
        statuses = [(await probe.send(http, key)).status_code for http in (http_a, http_b, http_a)]
        assert statuses == [probe.answer] * 3
        assert (await probe.send(http_b, key)).status_code == 429
        assert (await probe.send(http_a, key)).status_code == 429


async def test_two_intake_replicas_sharing_the_store_share_one_submission_limit(namespace: Namespace) -> None:
    """Rejected bodies are charged to the key (services/intake/ratelimit.py): three charged across the
    two replicas exhaust the key's 3, on both."""
    probe = PROBES["intake"]
    key = await new_key(namespace, probe.role)
    limit = {"rate_per_second": 3 / 86_400, "rate_burst": 3}
    a, b = build_app("intake", namespace, intake=limit), build_app("intake", namespace, intake=limit)
    async with client(a) as http_a, client(b) as http_b:
        statuses = [(await probe.send(http, key)).status_code for http in (http_a, http_b, http_a)]
        assert statuses == [422, 422, 422]
        r = await probe.send(http_b, key)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert (await probe.send(http_a, key)).status_code == 429


async def test_in_memory_counters_are_per_replica(namespace: Namespace) -> None:
    """`ALLIANCE_<SERVICE>_RATE_LIMIT_BACKEND=memory`: each process counts alone (one-replica setups)."""
    probe = PROBES["reporting"]
    key = await new_key(namespace, probe.role)
    a = build_app("reporting", namespace, rate_limit_backend="memory", **READS)
    b = build_app("reporting", namespace, rate_limit_backend="memory", **READS)
    async with client(a) as http_a, client(b) as http_b:
        for _ in range(3):
            await probe.send(http_a, key)
        assert (await probe.send(http_a, key)).status_code == 429
        assert (await probe.send(http_b, key)).status_code == probe.answer


async def test_intake_answers_503_with_retry_after_when_the_limit_store_does_not_answer(namespace: Namespace) -> None:
    probe = PROBES["intake"]
    key = await new_key(namespace, probe.role)
    app = build_app("intake", namespace)
    # The counters' store stops answering (a client of a port nobody listens on) once the key is
    # cached: the key is checked, its limit cannot be.
    dead: AsyncMongoClient[Document] = AsyncMongoClient(f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
                                                        serverSelectionTimeoutMS=200)
    try:
        async with client(app) as http:
            assert (await probe.send(http, key)).status_code == probe.answer
            app.state.intake.limiter.storage.counters = MongoCounters(dead["limits"]["rate_limits"])
            # Units the replica already counted (a lease) are spent without the store; the first
            # request that needs the store gets the 503.
            for _ in range(app.state.intake.limiter.lease + 1):
                if (r := await probe.send(http, key)).status_code != probe.answer:
                    break
    finally:
        await dead.close()
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
