"""What every end-to-end test module runs against: the four services as processes, the webhook
receiver the clinicians' webhooks point at, and API keys of tenant `acme` (one of each per module)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from pymongo import AsyncMongoClient

from shared import auth
from shared.mongo import Document
from tests.support.reporting import counters_verified
from tests.support.services import Namespace, ServiceProcess, running
from tools.receiver import WebhookReceiver, webhook_receiver

# `alliance reporting verify` after every end-to-end scenario (each drives reporting).
counters_agree_after_each_scenario = counters_verified()


@pytest.fixture(scope="module")
def services(namespace_m: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    logs = tmp_path_factory.mktemp("e2e-logs")
    with running(["intake", "scoring", "alerts", "reporting"], namespace_m, logs) as procs:
        yield procs


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture(scope="module")
async def keys(namespace_m: Namespace) -> AsyncIterator[dict[str, str]]:
    """A key of each role (submit, read, admin) for tenant `acme`, by role."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    db = client[namespace_m.database]
    out = {}
    for role in ("submit", "read", "admin"):
        out[role], _ = await auth.create_key(db, "acme", role)  # type: ignore[arg-type]
    yield out
    await client.close()
