"""New deliveries are inserted already leased to this process's worker and attempted at once.

Before, a delivery the consumer scheduled cost the store an insert, then the worker's read of the
due deliveries (`find`) and its lease (`update`), then the record of the attempt: the `find` and
`update` of `deliveries` were 2.8 s of the store's time in one `alliance bench` run. The worker now
leases what its free slots and each tenant's share allow in the inserted documents themselves
(`DeliveryWorker.hand_off`), so a new delivery costs the insert and the record. Against the real
store, counting its commands.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.monitoring import CommandFailedEvent, CommandListener, CommandStartedEvent, CommandSucceededEvent

from services.alerts.handlers import Handlers
from services.alerts.rules import Clinician
from services.alerts.settings import AlertsSettings
from services.alerts.store import EPOCH, AlertsStore
from services.alerts.worker import DeliveryWorker
from shared.events import AllianceDeterioration
from shared.kafka import Decoded
from shared.mongo import Document
from tests.integration.test_alerts_outcome import decoded
from tests.support.fakes import TOPICS, Sink
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually
from tools.harness import deterioration

TENANT = "acme"
T = TypeVar("T")


class DeliveryCommands(CommandListener):
    """The store commands on the `deliveries` collection, in order (a cross-collection `bulkWrite`
    among them when it writes to `deliveries`)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: CommandStartedEvent) -> None:
        if event.command.get(event.command_name) == "deliveries" or (
                event.command_name == "bulkWrite"
                and any(str(n.get("ns", "")).endswith(".deliveries") for n in event.command.get("nsInfo", ()))):
            self.names.append(event.command_name)

    def succeeded(self, event: CommandSucceededEvent) -> None:
        pass

    def failed(self, event: CommandFailedEvent) -> None:
        pass


@dataclass
class Receiver:
    """A webhook sender that answers 200 once `release` is set; it keeps which delivery it was
    asked to send and the store commands on `deliveries` made by then."""

    commands: DeliveryCommands
    release: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[str] = field(default_factory=list)
    commands_at_send: list[int] = field(default_factory=list)

    async def send(self, d: Document) -> int:
        self.sent.append(str(d["_id"]))
        self.commands_at_send.append(len(self.commands.names))
        await self.release.wait()
        return 200


@pytest.fixture
def commands() -> DeliveryCommands:
    return DeliveryCommands()


@pytest.fixture
async def db_name(stack: StackUnderTest) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url)
    await client.drop_database(name)
    await client.close()


@pytest.fixture
async def store(stack: StackUnderTest, commands: DeliveryCommands, db_name: str) -> AsyncIterator[AlertsStore]:
    """The store the handlers and workers use, its commands counted."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True, event_listeners=[commands])
    s = AlertsStore(client[db_name])
    await s.ensure_indexes()
    await s.put_clinician(Clinician(TENANT, "c1", "site-a", webhook_url="https://example.org/hook"))
    yield s
    await client.close()


@pytest.fixture
async def deliveries(stack: StackUnderTest, db_name: str) -> AsyncIterator[AsyncCollection[Document]]:
    """The same deliveries as the test reads them (on a client of its own: not counted)."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True)
    yield client[db_name]["deliveries"]
    await client.close()


@pytest.fixture
def receiver(commands: DeliveryCommands) -> Iterator[Receiver]:
    r = Receiver(commands)
    yield r
    r.release.set()


def settings(**changes: float) -> AlertsSettings:
    return AlertsSettings(**{"concurrency": 8, "tenant_concurrency": 8, "poll_seconds": 30.0, **changes})


@asynccontextmanager
async def running(store: AlertsStore, receiver: Receiver, s: AlertsSettings) -> AsyncIterator[DeliveryWorker]:
    """A worker on `store`, past its first claim (which found nothing due)."""
    worker = DeliveryWorker(store, {"webhook": receiver}, Sink(), TOPICS, s)
    finds = receiver.commands.names.count("find")
    task = asyncio.create_task(worker.run())
    await eventually(_async(lambda: receiver.commands.names.count("find") > finds), interval=0.02)
    await asyncio.sleep(0.1)  # the claim's answer reaches the loop
    try:
        yield worker
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _async(check: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    async def run() -> T:
        return check()
    return run


def batch(count: int) -> list[Decoded[AllianceDeterioration]]:
    return [decoded("alliance.deterioration.v1", deterioration(TENANT, "c1", f"client-{i}")) for i in range(count)]


async def stored(deliveries: AsyncCollection[Document]) -> list[Document]:
    return await deliveries.find({}).sort("_id").to_list()


async def delivered(deliveries: AsyncCollection[Document], count: int) -> list[Document]:
    return await eventually(lambda: deliveries.find({"status": "delivered"}).to_list(),
                            until=lambda docs: len(docs) == count, interval=0.05)


async def test_a_scheduled_batch_is_attempted_with_no_read_or_claim_of_its_deliveries(
        store: AlertsStore, deliveries: AsyncCollection[Document], receiver: Receiver,
        commands: DeliveryCommands) -> None:
    async with running(store, receiver, settings()) as worker:
        handlers = Handlers(store, False, worker.wake, Sink(), TOPICS, hand_off=worker)
        before = len(commands.names)
        await handlers.on_deterioration(batch(4))
        await eventually(_async(lambda: len(receiver.sent) == 4), interval=0.02)
        assert commands.names[before:max(receiver.commands_at_send)] == ["insert"]
        receiver.release.set()
        await delivered(deliveries, 4)
    # Then the record of the attempts (one bulk write with their status outbox entries, or a few as
    # they finish): nothing else.
    assert commands.names[before] == "insert" and set(commands.names[before + 1:]) == {"bulkWrite"}
    assert {d["claimed_by"] for d in await stored(deliveries)} == {worker.instance}


async def test_a_redelivered_batch_is_attempted_once(store: AlertsStore, deliveries: AsyncCollection[Document],
                                                     receiver: Receiver) -> None:
    async with running(store, receiver, settings()) as worker:
        handlers = Handlers(store, False, worker.wake, Sink(), TOPICS, hand_off=worker)
        events = batch(3)
        await handlers.on_deterioration(events)
        await handlers.on_deterioration(events)  # while the first attempts hang
        await eventually(_async(lambda: len(receiver.sent) == 3), interval=0.02)
        receiver.release.set()
        await delivered(deliveries, 3)
        await handlers.on_deterioration(events)  # and once they are recorded
        await asyncio.sleep(0.3)
    assert sorted(Counter(receiver.sent).values()) == [1, 1, 1]


async def test_a_tenant_past_its_share_gets_the_rest_inserted_unleased_and_claimed_as_slots_free(
        store: AlertsStore, deliveries: AsyncCollection[Document], receiver: Receiver) -> None:
    async with running(store, receiver, settings(tenant_concurrency=2)) as worker:
        handlers = Handlers(store, False, worker.wake, Sink(), TOPICS, hand_off=worker)
        await handlers.on_deterioration(batch(5))
        await asyncio.sleep(0.3)
        docs = await stored(deliveries)
        assert len(receiver.sent) == 2
        assert sorted(str(d["_id"]) for d in docs if d["claimed_until"] > EPOCH) == sorted(receiver.sent)
        assert sum(d["claimed_until"] == EPOCH for d in docs) == 3
        receiver.release.set()
        await delivered(deliveries, 5)
    assert sorted(Counter(receiver.sent).values()) == [1] * 5
    assert worker.peak_by_tenant[TENANT] == 2


async def test_a_lease_left_by_a_process_that_died_ends_and_another_worker_sends_the_delivery(
        store: AlertsStore, deliveries: AsyncCollection[Document], receiver: Receiver,
        commands: DeliveryCommands) -> None:
    lease = settings(lease_seconds=1.5, attempt_timeout_seconds=1.0, poll_seconds=0.1)
    async with running(store, receiver, lease) as dead:
        handlers = Handlers(store, False, dead.wake, Sink(), TOPICS, hand_off=dead)
        await handlers.on_deterioration(batch(1))
        await eventually(_async(lambda: len(receiver.sent) == 1), interval=0.02)
    # Gone mid-attempt: nothing recorded, the lease left in the store.
    [left] = await stored(deliveries)
    assert left["status"] == "pending" and left["claimed_by"] == dead.instance
    other = Receiver(commands)
    other.release.set()
    async with running(store, other, lease) as alive:
        [done] = await delivered(deliveries, 1)
        sent_at: datetime = done["delivered_at"]
    assert other.sent == [left["_id"]]
    assert done["claimed_by"] == alive.instance
    assert sent_at >= left["claimed_until"]
