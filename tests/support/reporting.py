"""`alliance reporting verify` after every scenario that drives reporting.

Every test that makes reporting write (its service process, its handlers or its store) ends by
checking that the incremental indices (the counters summaries and trends read) equal what the
records say: `verify_generation`, the function behind the command, on every read-model generation
of the test's database. Reporting's consumers may still be folding a batch when a test's own
assertions pass, so the check is polled until it holds or `timeout` passes, and then fails naming
the counters that differ.

- `assert_counters_agree(mongo)`: the check itself, for a test that builds its namespace inside
  (the fault suite): call it before the services stop.
- `counters_verified()` / `counters_verified_in_db()`: an autouse fixture for a module whose
  scenarios share the module's namespace (`namespace_m`), or write into a scratch database (`db`);
  assign it to a module-level name (`counters_agree_after_each_scenario = counters_verified()`),
  in the module or in its conftest.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.reporting.cli import verify_generation
from shared.mongo import Document
from shared.settings import MongoSettings
from tests.support.services import Namespace
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually

_GENERATION = re.compile(r"^reporting_([^_]+)_(clients|alerts|counters|outcomes)$")
Differences = dict[str, dict[str, tuple[dict[str, int], dict[str, int]]]]


async def generations(mongo: MongoSettings) -> list[str]:
    """The read-model generations that hold records, alerts or counters in `mongo`'s database."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(mongo.url, tz_aware=True)
    try:
        names = await client[mongo.database].list_collection_names()
    finally:
        await client.close()
    return sorted({m.group(1) for name in names if (m := _GENERATION.match(name))})


async def differences(mongo: MongoSettings) -> Differences:
    """Per generation whose counters differ from its records, what `alliance reporting verify`
    reports for it (counter id: (from the records, held)); empty when every generation agrees."""
    out: Differences = {}
    for gen in await generations(mongo):
        _, found = await verify_generation(mongo, gen)
        if found:
            out[gen] = found
    return out


async def assert_counters_agree(mongo: MongoSettings, timeout: float = 30.0) -> None:
    """Fail unless, within `timeout`, every generation's counters agree with its records."""
    last: Differences = {}

    async def agree() -> bool:
        nonlocal last
        last = await differences(mongo)
        return not last

    try:
        await eventually(agree, timeout=timeout, interval=0.5)
    except AssertionError:
        raise AssertionError(f"`alliance reporting verify` found counters that differ from the records: "
                             f"{last!r}") from None


def counters_verified(timeout: float = 30.0) -> Any:
    """An autouse fixture: after each test, the counters in the database of the module's
    namespace (`namespace_m`) agree with the records."""
    @pytest.fixture(autouse=True)
    async def counters_agree_after_each_scenario(namespace_m: Namespace) -> AsyncIterator[None]:
        yield
        await assert_counters_agree(namespace_m.mongo(), timeout)
    return counters_agree_after_each_scenario


def counters_verified_in_db(timeout: float = 30.0) -> Any:
    """`counters_verified` for tests that write through reporting's store or handlers into a
    scratch database of their own (their `db` fixture, on the store under test)."""
    @pytest.fixture(autouse=True)
    async def counters_agree_after_each_scenario(stack: StackUnderTest,
                                                 db: AsyncDatabase[Document]) -> AsyncIterator[None]:
        yield
        await assert_counters_agree(MongoSettings(url=stack.mongo_url, database=db.name), timeout)
    return counters_agree_after_each_scenario
