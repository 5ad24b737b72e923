"""A store that stops answering: it still accepts connections and answers `hello` and `ping`, but
the operations of the clients under test get no reply (a lock or disk stall, a hung primary).

This is the silent store no driver notices by itself: its heartbeats succeed, so PyMongo neither
marks it down nor interrupts the operations waiting on it. A killed store resets its sockets and is
covered elsewhere (tests/fault).

It is the store's own `failCommand` failpoint with `blockConnection` (as the MongoDB driver
specifications' tests use it), scoped by `appName` to the clients whose URL names it
(`Stall.client_url`), so the test's own client keeps working and ends the stall. It needs a store
with test commands on: `tests.support.stack.failpoint_store`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from pymongo import AsyncMongoClient

from shared.mongo import Document

# What a service sends for its reads and writes; `hello`, `ping` and the handshake are not held, so
# the store still looks up (readiness, the driver's monitor).
DATA_COMMANDS = ("find", "getMore", "aggregate", "count", "distinct", "insert", "update", "delete",
                 "findAndModify", "bulkWrite", "createIndexes")
FAILPOINT = "failCommand"


@dataclass
class Stall:
    """Makes the store at `mongo_url` (test commands on) stop answering the data commands of the
    clients that connect with `client_url`."""

    mongo_url: str
    app_name: str = field(default_factory=lambda: f"stalled-{uuid.uuid4().hex[:10]}")

    @property
    def client_url(self) -> str:
        """The store's URL naming this stall's application: the clients a stall holds use it."""
        return f"{self.mongo_url}{'&' if '?' in self.mongo_url else '/?'}appName={self.app_name}"

    async def begin(self, hold_seconds: float = 120.0, commands: Sequence[str] = DATA_COMMANDS) -> None:
        """From now on each of `commands` (the data commands, unless told) of those clients waits
        `hold_seconds` before the store runs it: longer than any test waits, so for the client it
        never answers."""
        await self._configure("alwaysOn", {"failCommands": list(commands), "appName": self.app_name,
                                           "blockConnection": True, "blockTimeMS": int(hold_seconds * 1000)})

    async def end(self) -> None:
        """The store answers again (commands already held stay held for their `hold_seconds`)."""
        await self._configure("off", {})

    @asynccontextmanager
    async def stalled(self, hold_seconds: float = 120.0,
                      commands: Sequence[str] = DATA_COMMANDS) -> AsyncIterator[None]:
        await self.begin(hold_seconds, commands)
        try:
            yield
        finally:
            await self.end()

    async def _configure(self, mode: str, data: Document) -> None:
        client: AsyncMongoClient[Document] = AsyncMongoClient(self.mongo_url)
        try:
            await client.admin.command({"configureFailPoint": FAILPOINT, "mode": mode, "data": data})
        finally:
            await client.close()
