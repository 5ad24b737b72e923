"""What every end-to-end test module runs against: the four services as processes, and the
webhook receiver the clinicians' webhooks point at (one of each per module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.services import Namespace, ServiceProcess, running
from tools.receiver import WebhookReceiver, webhook_receiver


@pytest.fixture(scope="module")
def services(namespace_m: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    logs = tmp_path_factory.mktemp("e2e-logs")
    with running(["intake", "scoring", "alerts", "reporting"], namespace_m, logs) as procs:
        yield procs


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as r:
        yield r
