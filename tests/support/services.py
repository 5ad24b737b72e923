"""Run services as separate processes, the way they run in production."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from shared.settings import KafkaSettings, MongoSettings
from tests.support.stack import StackUnderTest
from tools.processes import ServiceProcess
from tools.stack import free_port

# Every in-process test client calls from the same address, and many tests send missing or wrong
# keys on purpose or read in loops with one key: the suite lifts the failed-authentication and
# per-key read limits (tests/conftest.py sets these for the session). tests/security sets its own
# limits explicitly and tests them; settings passed to a config beat these variables.
SUITE_LIMITS: dict[str, str] = {
    f"ALLIANCE_{service}_{name}": "1000000"
    for service in ("INTAKE", "ALERTS", "REPORTING")
    for name in ("AUTH_FAILURE_BURST", "AUTH_FAILURE_RATE_PER_SECOND", "READ_RATE_BURST", "READ_RATE_PER_SECOND")
}


@dataclass
class Namespace:
    """A private slice of the broker and store: its own topic prefix and database."""

    stack: StackUnderTest
    prefix: str
    database: str
    partitions: int = 6
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fresh(cls, stack: StackUnderTest, partitions: int = 6) -> Namespace:
        tag = uuid.uuid4().hex[:10]
        return cls(stack, f"t{tag}.", f"t_{tag}", partitions)

    @property
    def fetch_max_wait_ms(self) -> int:
        local = self.stack.local
        return local.fetch_max_wait_ms if local is not None else 500

    def kafka(self) -> KafkaSettings:
        return KafkaSettings(bootstrap=self.stack.bootstrap, idempotence=self.stack.idempotence,
                             topic_prefix=self.prefix, partitions=self.partitions,
                             fetch_max_wait_ms=self.fetch_max_wait_ms, **self._group_timing())

    def _group_timing(self) -> dict[str, int]:
        timing = self.stack.group_timing
        return {} if timing is None else {"session_timeout_ms": timing[0], "heartbeat_interval_ms": timing[1]}

    def mongo(self) -> MongoSettings:
        return MongoSettings(url=self.stack.mongo_url, database=self.database)

    def env(self) -> dict[str, str]:
        return {
            "ALLIANCE_KAFKA_BOOTSTRAP": self.stack.bootstrap,
            "ALLIANCE_KAFKA_IDEMPOTENCE": str(self.stack.idempotence).lower(),
            "ALLIANCE_KAFKA_TOPIC_PREFIX": self.prefix,
            "ALLIANCE_KAFKA_PARTITIONS": str(self.partitions),
            "ALLIANCE_KAFKA_FETCH_MAX_WAIT_MS": str(self.fetch_max_wait_ms),
            **{f"ALLIANCE_KAFKA_{name.upper()}": str(ms) for name, ms in self._group_timing().items()},
            "ALLIANCE_MONGO_URL": self.stack.mongo_url,
            "ALLIANCE_MONGO_DATABASE": self.database,
            "ALLIANCE_ALERTS_ALLOW_PRIVATE_TARGETS": "true",
            # The test kit runs alerts as a local run does: dev mode, no keyring required.
            "ALLIANCE_ALERTS_DEV_MODE": "true",
            **self.extra_env,
        }

    async def produce(self, topic: str, count: int, partition: int = 0) -> None:
        """`count` records (`record-0`, ...) to one partition of `topic`, each acknowledged."""
        producer = AIOKafkaProducer(bootstrap_servers=self.stack.bootstrap)
        await producer.start()
        try:
            for i in range(count):
                await producer.send_and_wait(topic, f"record-{i}".encode(), partition=partition)
        finally:
            await producer.stop()


@contextmanager
def running(names: list[str], ns: Namespace, log_dir: Path, extra_env: dict[str, str] | None = None,
            wait: bool = True) -> Iterator[dict[str, ServiceProcess]]:
    """Start the named services against a namespace; stop them afterwards."""
    procs = {n: ServiceProcess(n, free_port(), {**ns.env(), **(extra_env or {})}, log_dir / f"{n}.log")
             for n in names}
    try:
        for p in procs.values():
            p.start()
        if wait:
            for p in procs.values():
                p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def service_fixture(name: str, extra_env: dict[str, str] | None = None) -> Any:
    """A module-scoped fixture: service `name` running against the module's namespace (`namespace_m`)."""
    @pytest.fixture(scope="module")
    def service(namespace_m: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
        with running([name], namespace_m, tmp_path_factory.mktemp(f"{name}-logs"), extra_env) as procs:
            yield procs[name]
    return service
