"""Which broker and store the tests use, in this order:

1. URLs from the environment: `ALLIANCE_TEST_KAFKA_BOOTSTRAP` and `ALLIANCE_TEST_MONGO_URL`
   (`ALLIANCE_TEST_KAFKA_IDEMPOTENCE=true` when that broker supports it);
2. testcontainers (Apache Kafka and MongoDB images) when a Docker engine answers;
3. the local binaries (Tansu, SecantusDB) on free ports.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
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

LOCAL_GROUP_TIMING = (3_000, 300)


@dataclass
class StackUnderTest:
    """Connection facts of the broker and store for this test run."""

    kind: str
    bootstrap: str
    mongo_url: str
    idempotence: bool
    local: LocalStack | None = None
    # Consumer group timing of the services under test, (session timeout, heartbeat) in ms; None
    # keeps the production defaults. The local Tansu holds every group join for half the session
    # timeout (10 s by default: 5 s a consumer; a service's consumers join together, see
    # `shared.kafka.start_broker`), so the suite's own local stack shortens it. 3 s still leaves
    # ten heartbeats per session on a loaded machine; Apache Kafka refuses sessions under 6 s and
    # is left alone, and so are the fault tests' stacks.
    group_timing: tuple[int, int] | None = None


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
        yield StackUnderTest("local", local.bootstrap, local.mongo_url, False, local, group_timing=LOCAL_GROUP_TIMING)
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


@contextmanager
def own_store(stack: StackUnderTest) -> Iterator[StackUnderTest]:
    """`stack` with a local store of its own (the broker is shared), for a test that rewrites
    documents near the 16 MiB limit hundreds of times.

    Why: SecantusDB holds one lock while a write waits for WiredTiger to evict, and its TTL sweeper
    waits for that lock with an old read snapshot pinned, so history it pins cannot be evicted: with
    the suite's data already in the shared store's cache, the 19,000-session test deadlocked that
    store for good (seen twice in full runs; alone it always passed). A store of its own starts with
    an empty cache. A store the run did not start (environment, testcontainers) is used as it is.
    """
    if stack.local is None:
        yield stack
        return
    with _store_of_its_own(stack) as own:
        yield own


@contextmanager
def failpoint_store(stack: StackUnderTest) -> Iterator[StackUnderTest]:
    """`stack` with a local store of its own whose test commands are on (`configureFailPoint`, see
    `tests.support.stall`), whatever store the run uses: a failpoint holds server threads and
    applies server-wide, so it never goes on the store the other tests share."""
    with _store_of_its_own(stack, test_commands=True) as own:
        yield own


@contextmanager
def _store_of_its_own(stack: StackUnderTest, test_commands: bool = False) -> Iterator[StackUnderTest]:
    data = Path(tempfile.mkdtemp(prefix="alliance-own-store-"))
    own = LocalStack(data, mongo_port=free_port(), test_commands=test_commands)
    own.start_mongo()
    try:
        yield dataclasses.replace(stack, mongo_url=own.mongo_url)
    finally:
        own.stop()
        shutil.rmtree(data, ignore_errors=True)
