"""Partner subscriptions are read once per tenant and topic for a few seconds, not once per batch.

Every consumed batch of scored events, raised alerts and statuses asks which partners of its
tenants subscribed to its topic: a store query per batch (1,493 of them in one `alliance bench`
run, 4% of the store's CPU). The alerts store keeps each answer for
`ALLIANCE_ALERTS_SUBSCRIPTION_CACHE_SECONDS` (5 s). A change made through this process (create,
delete) is seen by its next lookup; a change made by another alerts process is seen within that
time. These tests run against the real store; the clock is injected.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from pymongo import AsyncMongoClient
from pymongo.monitoring import CommandFailedEvent, CommandListener, CommandStartedEvent, CommandSucceededEvent

from services.alerts.rules import Subscription
from services.alerts.store import AlertsStore, PartnerSubscriptions
from shared.mongo import Document
from tests.support.stack import StackUnderTest

TOPIC = "srs.scored.v1"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class SubscriptionFinds(CommandListener):
    """Counts the store queries on the subscriptions collection."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, event: CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command.get("find") == "subscriptions":
            self.count += 1

    def succeeded(self, event: CommandSucceededEvent) -> None:
        pass

    def failed(self, event: CommandFailedEvent) -> None:
        pass


@pytest.fixture
def finds() -> SubscriptionFinds:
    return SubscriptionFinds()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def db(stack: StackUnderTest, finds: SubscriptionFinds) -> AsyncIterator[str]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True, event_listeners=[finds])
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    await client.drop_database(name)
    await client.close()


@pytest.fixture
async def stores(stack: StackUnderTest, db: str, finds: SubscriptionFinds,
                 clock: Clock) -> AsyncIterator[tuple[AlertsStore, AlertsStore]]:
    """Two alerts processes' stores on one database, each caching for 5 s."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True, event_listeners=[finds])
    ours = AlertsStore(client[db], subscription_cache_seconds=5.0, clock=clock)
    theirs = AlertsStore(client[db], subscription_cache_seconds=5.0, clock=clock)
    await ours.ensure_indexes()
    yield ours, theirs
    await client.close()


async def subscribe(store: AlertsStore, tenant_id: str) -> str:
    row = await store.create_subscription(tenant_id, "https://partner.test/hook", [TOPIC], "sealed")
    return row.subscription_id


async def test_lookups_within_the_cache_time_read_the_store_once(stores: tuple[AlertsStore, AlertsStore],
                                                                 finds: SubscriptionFinds, clock: Clock) -> None:
    ours, _ = stores
    sid = await subscribe(ours, "t1")
    before = finds.count
    for _ in range(5):
        assert [s.id for s in await ours.subscriptions_for(["t1"], TOPIC)] == [sid]
        clock.now += 0.9
    assert finds.count - before == 1


async def test_a_subscription_created_through_this_process_is_seen_by_its_next_lookup(
        stores: tuple[AlertsStore, AlertsStore]) -> None:
    ours, _ = stores
    assert await ours.subscriptions_for(["t1"], TOPIC) == []
    sid = await subscribe(ours, "t1")
    assert [s.id for s in await ours.subscriptions_for(["t1"], TOPIC)] == [sid]


async def test_a_subscription_deleted_through_this_process_is_gone_from_its_next_lookup(
        stores: tuple[AlertsStore, AlertsStore]) -> None:
    ours, _ = stores
    sid = await subscribe(ours, "t1")
    assert [s.id for s in await ours.subscriptions_for(["t1"], TOPIC)] == [sid]
    assert await ours.delete_subscription("t1", sid)
    assert await ours.subscriptions_for(["t1"], TOPIC) == []


async def test_a_subscription_removed_over_the_cap_is_gone_from_the_next_lookup(
        stores: tuple[AlertsStore, AlertsStore]) -> None:
    ours, _ = stores
    sid = await subscribe(ours, "t1")
    assert await ours.subscriptions_for(["t1"], TOPIC) != []
    await ours.remove_subscription("t1", sid)
    assert await ours.subscriptions_for(["t1"], TOPIC) == []


async def test_another_process_sees_a_new_subscription_once_its_cache_time_has_passed(
        stores: tuple[AlertsStore, AlertsStore], clock: Clock) -> None:
    ours, theirs = stores
    assert await theirs.subscriptions_for(["t1"], TOPIC) == []
    sid = await subscribe(ours, "t1")
    clock.now += 4.9
    assert await theirs.subscriptions_for(["t1"], TOPIC) == []  # the documented bound: up to 5 s
    clock.now += 0.2
    assert [s.id for s in await theirs.subscriptions_for(["t1"], TOPIC)] == [sid]


async def test_tenants_are_cached_apart(stores: tuple[AlertsStore, AlertsStore], finds: SubscriptionFinds) -> None:
    ours, _ = stores
    one, two = await subscribe(ours, "t1"), await subscribe(ours, "t2")
    assert [s.id for s in await ours.subscriptions_for(["t1"], TOPIC)] == [one]
    before = finds.count
    got = await ours.subscriptions_for(["t1", "t2"], TOPIC)
    assert sorted(s.id for s in got) == sorted([one, two])
    assert finds.count - before == 1  # only t2 was read
    await ours.delete_subscription("t1", one)
    assert [s.id for s in await ours.subscriptions_for(["t1", "t2"], TOPIC)] == [two]


async def test_without_a_cache_time_every_lookup_reads_the_store(stack: StackUnderTest, db: str,
                                                                 finds: SubscriptionFinds) -> None:
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True, event_listeners=[finds])
    store = AlertsStore(client[db])
    try:
        before = finds.count
        await store.subscriptions_for(["t1"], TOPIC)
        await store.subscriptions_for(["t1"], TOPIC)
        assert finds.count - before == 2
    finally:
        await client.close()


# ---- the cache alone: a lookup racing a change --------------------------------------------------

class Gate:
    """A loader that waits until released, so a change can land while a lookup is in flight."""

    def __init__(self, answer: list[Subscription]) -> None:
        self.answer = answer
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self, tenant_ids: list[str], topic: str) -> list[Subscription]:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        return [s for s in self.answer if s.tenant_id in tenant_ids]


@pytest.fixture
def new_sub() -> Iterator[Subscription]:
    yield Subscription("s1", "t1", "https://partner.test/hook", frozenset({TOPIC}))


async def test_a_lookup_that_raced_a_change_is_not_kept(clock: Clock, new_sub: Subscription) -> None:
    gate = Gate([])
    cache = PartnerSubscriptions(5.0, gate, clock)
    lookup = asyncio.create_task(cache.for_tenants(["t1"], TOPIC))
    await gate.started.wait()
    cache.forget("t1")  # a subscription created while the lookup read the store
    gate.release.set()
    assert await lookup == []  # what it read (as a batch racing a change may)
    gate.answer = [new_sub]
    assert await cache.for_tenants(["t1"], TOPIC) == [new_sub]  # not the stale answer
    assert gate.calls == 2


async def test_a_lookup_answers_each_tenant_once_and_keeps_each_apart(
        clock: Clock, new_sub: Subscription) -> None:
    other = Subscription("s2", "t2", "https://partner.test/other", frozenset({TOPIC}))
    gate = Gate([new_sub, other])
    gate.release.set()
    cache = PartnerSubscriptions(5.0, gate, clock)
    assert await cache.for_tenants(["t2", "t1", "t2"], TOPIC) == [new_sub, other]
    assert await cache.for_tenants(["t2"], TOPIC) == [other]
    assert gate.calls == 1
