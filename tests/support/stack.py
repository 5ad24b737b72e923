"""Which broker and store the tests use, in this order:

1. URLs from the environment: `ALLIANCE_TEST_KAFKA_BOOTSTRAP` and `ALLIANCE_TEST_MONGO_URL`
   (`ALLIANCE_TEST_KAFKA_IDEMPOTENCE=true` when that broker supports it);
2. testcontainers (Apache Kafka and MongoDB images) when a Docker engine answers;
3. the local binaries (Tansu, SecantusDB) on free ports.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from shared.mongo import Document
from tools.stack import LocalStack, free_port


@dataclass
class StackUnderTest:
    """Connection facts of the broker and store for this test run."""

    kind: str
    bootstrap: str
    mongo_url: str
    idempotence: bool
    local: LocalStack | None = None


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@contextmanager
def stack_under_test() -> Iterator[StackUnderTest]:
    """Start (or find) the broker and store once for the whole test run."""
    env_kafka, env_mongo = os.environ.get("ALLIANCE_TEST_KAFKA_BOOTSTRAP"), os.environ.get("ALLIANCE_TEST_MONGO_URL")
    if env_kafka and env_mongo:
        yield StackUnderTest("environment", env_kafka, env_mongo,
                             os.environ.get("ALLIANCE_TEST_KAFKA_IDEMPOTENCE", "false").lower() == "true")
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer  # type: ignore[import-untyped]
        from testcontainers.mongodb import MongoDbContainer  # type: ignore[import-untyped]

        with KafkaContainer("apache/kafka:3.9.1").with_kraft() as kafka, MongoDbContainer("mongo:8.0.4") as mongo:
            yield StackUnderTest("testcontainers", kafka.get_bootstrap_server(),
                                 mongo.get_connection_url() + "/?directConnection=true", True)
        return
    data = Path(os.environ.get("ALLIANCE_TEST_DATA") or tempfile.mkdtemp(prefix="alliance-test-"))
    local = LocalStack(data, kafka_port=free_port(), mongo_port=free_port(), s3_port=free_port())
    local.start()
    try:
        yield StackUnderTest("local", local.bootstrap, local.mongo_url, False, local)
    finally:
        local.stop()


@asynccontextmanager
async def scratch_database(stack: StackUnderTest, prefix: str) -> AsyncIterator[AsyncDatabase[Document]]:
    """A database of its own for one test on the store under test, dropped afterwards."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True)
    name = prefix + uuid.uuid4().hex[:10]
    try:
        yield client[name]
    finally:
        await client.drop_database(name)
        await client.close()
