"""Fixtures shared by every test: one broker and one store per test run, private namespaces."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from shared.mongo import Document
from shared.topic_admin import ensure_topics
from tests.support.services import SUITE_LIMITS, Namespace
from tests.support.stack import StackUnderTest, stack_under_test

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="session", autouse=True)
def suite_limits() -> Iterator[None]:
    """The request limits lifted for the suite (see `SUITE_LIMITS`), processes it starts included."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in SUITE_LIMITS.items():
            env.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def stack() -> Iterator[StackUnderTest]:
    """The real broker and store for this run (started once)."""
    with stack_under_test() as s:
        yield s


@pytest.fixture
async def namespace(stack: StackUnderTest) -> Namespace:
    """A fresh topic prefix (topics created) and database for one test."""
    ns = Namespace.fresh(stack)
    await ensure_topics(ns.kafka())
    return ns


@pytest.fixture(scope="module")
async def namespace_m(stack: StackUnderTest) -> Namespace:
    """A namespace shared by one test module (for services started once per module)."""
    ns = Namespace.fresh(stack)
    await ensure_topics(ns.kafka())
    return ns


@pytest.fixture
async def mongo(stack: StackUnderTest) -> AsyncIterator[AsyncMongoClient[Document]]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True)
    yield client
    await client.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def log_dir(request: pytest.FixtureRequest) -> Path:
    """Service logs of one test, kept under test-artifacts/logs/ for after the run."""
    d = ARTIFACTS / "logs" / request.node.name[:120]
    d.mkdir(parents=True, exist_ok=True)
    return d

