"""MongoDB wiring and the persistence kit every store shares.

One place builds clients, so every service connects the same way; below them, the caches in front
of the store and the one duplicate-key / write-concern policy of bulk writes."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pymongo
from pymongo import AsyncMongoClient, DeleteMany, DeleteOne, InsertOne, ReplaceOne, UpdateMany, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ClientBulkWriteException,
    ConnectionFailure,
    InvalidOperation,
    OperationFailure,
    PyMongoError,
)
from pymongo.results import ClientBulkWriteResult

from shared.settings import MongoSettings

Document = dict[str, Any]
log = logging.getLogger("alliance.mongo")
# The server's answer to dropping an index that does not exist.
INDEX_NOT_FOUND = 27
WriteOp = (InsertOne[Document] | ReplaceOne[Document] | UpdateOne | UpdateMany | DeleteOne | DeleteMany)


def make_client(settings: MongoSettings, *, admin: bool = False) -> AsyncMongoClient[Document]:
    """An async client; it opens no connection until first used.

    Every reply is awaited at most `settings.operation_timeout_ms`, or with `admin` (the operator CLI
    and the tools, whose single operations may legitimately run long) `settings.admin_timeout_ms`:
    unbounded, an operation on a store that stopped answering (a hung server, a half-open
    connection) would wait for ever, and with it the consumer's partition or the request.

    The bound is `socketTimeoutMS`, not PyMongo's client-side operation timeout (`timeoutMS`): that
    one also stretches finding the server to the whole bound, so a store that is down would hold
    every operation 30 s (an operator command an hour) instead of `timeout_ms` (5 s).
    """
    bound = settings.admin_timeout_ms if admin else settings.operation_timeout_ms
    return AsyncMongoClient(
        settings.url,
        serverSelectionTimeoutMS=settings.timeout_ms,
        connectTimeoutMS=settings.timeout_ms,
        socketTimeoutMS=bound or None,
        tz_aware=True,
        uuidRepresentation="standard",
    )


def database(client: AsyncMongoClient[Document], settings: MongoSettings) -> AsyncDatabase[Document]:
    """The configured database."""
    return client[settings.database]


def client_and_database(settings: MongoSettings) -> tuple[AsyncMongoClient[Document], AsyncDatabase[Document]]:
    """A service's client (`make_client`: no connection until first used) and its configured database."""
    client = make_client(settings)
    return client, database(client, settings)


# A readiness check's bound on its ping. A store that stops answering would otherwise hold the
# check for the operation bound (`ALLIANCE_MONGO_OPERATION_TIMEOUT_MS`, 30 s): longer than a
# probe waits (Kubernetes: 1 s by default, then it counts a failure without an answer), and
# `/readyz` and `alliance_dependency_up` would say nothing for that long. The broker's ping has
# the same bound.
PING_TIMEOUT_SECONDS = 2.0


async def ping(client: AsyncMongoClient[Document], timeout: float = PING_TIMEOUT_SECONDS) -> bool:
    """True when the store answers within `timeout` seconds (server selection included)."""
    try:
        # PyMongo's own client-side bound for this one call: a timeout closes the connection it
        # waited on (its late reply can never be read as another command's).
        with pymongo.timeout(timeout):
            await client.admin.command("ping")
    except Exception:
        return False
    return True


# Server codes the retryable-reads and retryable-writes specifications call transient beside the
# "not primary" and shutdown ones (which PyMongo raises as `NotPrimaryError`): HostUnreachable,
# HostNotFound, NetworkTimeout, SocketException, ExceededTimeLimit,
# ReadConcernMajorityNotAvailableYet. PyMongo retries an operation once on them and then raises a
# plain `OperationFailure`, labelled only when it was a retryable write (a mongos that could not
# reach a shard, for a read).
TRANSIENT_SERVER_CODES = frozenset({6, 7, 89, 9001, 262, 134})
# Labels with which the server or PyMongo says an error is worth retrying as it is.
TRANSIENT_LABELS = ("RetryableWriteError", "TransientTransactionError", "RetryableError")


def store_unavailable(exc: BaseException) -> bool:
    """Whether a store error says the store is down, slow or failing over - the same operation can
    succeed later - rather than that the operation itself is at fault (a bad query, a document too
    large, a duplicate key, a write the schema refuses: a retry fails the same way).

    PyMongo's own classification decides: a `ConnectionFailure` (store down or unreachable,
    `ServerSelectionTimeoutError`; a connection lost, `AutoReconnect`; a reply past the operation
    bound, `NetworkTimeout`; an election, `NotPrimaryError`; the pool exhausted,
    `WaitQueueTimeoutError`), an error whose `timeout` is true (`ExecutionTimeout`, `WTimeoutError`,
    a bulk write that timed out), an error labelled retryable (`TRANSIENT_LABELS`), and the
    transient server codes (`TRANSIENT_SERVER_CODES`). A client-level bulk write is judged by its
    top-level error. Anything else - BSON errors included - is not."""
    if isinstance(exc, ClientBulkWriteException) and isinstance(exc.error, BaseException):
        return store_unavailable(exc.error)
    if not isinstance(exc, PyMongoError):
        return False
    if isinstance(exc, ConnectionFailure) or exc.timeout or any(map(exc.has_error_label, TRANSIENT_LABELS)):
        return True
    return isinstance(exc, OperationFailure) and exc.code in TRANSIENT_SERVER_CODES


# Ids per `$in` list when reading documents by id. The local store's `$in` costs more per id the
# longer the list (1,600 ids: 6.0 s in one list, 0.26 s in lists of 25, loaded machine), so a
# batch's documents are read in short lists; MongoDB answers either way alike.
IDS_PER_READ = 25


async def find_by_ids(collection: AsyncCollection[Document], ids: Collection[str],
                      per_read: int = IDS_PER_READ) -> list[Document]:
    """The documents of `collection` with these `_id`s (those that exist), read `per_read` ids at a time."""
    return [d async for d in each_by_ids(collection, ids, per_read=per_read)]


async def each_by_ids(collection: AsyncCollection[Document], ids: Collection[str], projection: Document | None = None,
                      per_read: int = IDS_PER_READ) -> AsyncIterator[Document]:
    """`find_by_ids` one document at a time (fields `projection`), holding one list's documents at most."""
    wanted = sorted(ids)
    for i in range(0, len(wanted), per_read):
        async for d in collection.find({"_id": {"$in": wanted[i:i + per_read]}}, projection):
            yield d


T = TypeVar("T")


async def batches(items: AsyncIterator[T], size: int) -> AsyncIterator[list[T]]:
    """`items` in lists of `size` (the last one shorter, none when there is nothing): a scan
    written back `size` documents per command (a migration's backfill)."""
    batch: list[T] = []
    async for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def given(**fields: Any) -> Document:
    """The fields whose value is not None: the optional parts of a filter or a document, left out
    when not given."""
    return {name: value for name, value in fields.items() if value is not None}


# ---------------------------------------------------------------- the persistence kit
#
# What the services' stores share: in-process caches in front of the store, and how a bulk write
# reads a duplicate key. Every store here writes idempotently (deterministic `_id`s, guarded
# upserts, versioned replaces), so E11000 is an answer ("the document exists, at least as new"),
# while any other write error, or a write concern error (the outcome is unknown), is a failure the
# caller's retry (at-least-once consumer, background loop) must see.

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DUPLICATE_KEY = 11000
# The field a versioned document keeps its version in (see `versioned_op`).
VERSION_FIELD = "v"


class LruCache(Generic[K, V]):
    """At most `capacity` worth of entries, the least recently used dropped first.

    What an entry is worth is `weight(value)` (1 by default), so a cache can be bounded by what its
    entries hold instead of by how many there are. A capacity of 0 or less keeps nothing. A value
    heavier than the whole capacity is not kept either. Not for `None` values: `get` answers
    `None` for a miss.
    """

    def __init__(self, capacity: int, weight: Callable[[V], int] | None = None) -> None:
        self._capacity = capacity
        self._weight = weight
        self._held = 0
        self._entries: OrderedDict[K, V] = OrderedDict()

    def _cost(self, value: V) -> int:
        return 1 if self._weight is None else self._weight(value)

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None when it is not kept."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Keep `value` as the most recently used, dropping the least recently used past capacity."""
        if self._capacity <= 0:
            return
        self.pop(key)
        self._entries[key] = value
        self._held += self._cost(value)
        while self._held > self._capacity and self._entries:
            _, old = self._entries.popitem(last=False)
            self._held -= self._cost(old)

    def pop(self, key: K) -> V | None:
        """Forget `key`; its value, or None when it was not kept."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._held -= self._cost(old)
        return old

    def clear(self) -> None:
        self._entries.clear()
        self._held = 0

    @property
    def held(self) -> int:
        """What the entries are worth together (their count unless a `weight` was given)."""
        return self._held

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class Hit(Generic[V]):
    """A value a `TtlCache` holds, and whether its time to live has passed."""

    value: V
    stale: bool


class TtlCache(Generic[K, V]):
    """Values trusted for `ttl` seconds after they were put, at most `max_entries` of them (the
    least recently used dropped first).

    An expired value is kept until it is replaced or pushed out, so a caller may still serve it
    while it refreshes (`get`), or know a key it has seen (`in`). A `ttl` of 0 or less makes every
    value stale at once. `clock` is injected so the expiry can be tested without waiting.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: LruCache[K, tuple[float, V]] = LruCache(max(1, max_entries))

    def get(self, key: K) -> Hit[V] | None:
        """The value kept for `key`, whatever its age (`Hit.stale` tells); None when none is kept."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        return Hit(value, expires <= self._clock())

    def fresh(self, key: K) -> Hit[V] | None:
        """The value kept for `key` while its time to live lasts; None when missing or stale."""
        hit = self.get(key)
        return None if hit is None or hit.stale else hit

    def put(self, key: K, value: V) -> None:
        """Keep `value` for `ttl` seconds from now."""
        self._entries.put(key, (self._clock() + self.ttl, value))

    def pop(self, key: K) -> None:
        """Forget `key` (a write through this process: the next read goes to the store)."""
        self._entries.pop(key)

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def duplicate_key_indexes(exc: BulkWriteError) -> list[int] | None:
    """The indexes of the ops a bulk write refused for a duplicate key, when that is all it refused;
    None when it also holds another write error or a write concern error — the caller re-raises
    then: a document it cannot write, or writes whose durability is unknown, must be retried, not
    taken for "already there"."""
    details = exc.details or {}
    if details.get("writeConcernErrors"):
        return None
    errors: list[Document] = details.get("writeErrors") or []
    if any(e.get("code") != DUPLICATE_KEY for e in errors):
        return None
    return [int(e["index"]) for e in errors]


@dataclass(frozen=True)
class Written:
    """What an unordered bulk write did; `duplicates` are the indexes of the ops refused for a
    duplicate key (their documents exist already, see `duplicate_key_indexes`)."""

    inserted: int = 0
    upserted: int = 0
    modified: int = 0
    duplicates: tuple[int, ...] = ()


async def bulk_write(collection: AsyncCollection[Document], ops: Sequence[WriteOp]) -> Written:
    """Run `ops` as one unordered bulk write under the duplicate-key policy: a duplicate key is
    reported in `Written.duplicates`, every other failure raises."""
    if not ops:
        return Written()
    try:
        res = await collection.bulk_write(list(ops), ordered=False)
    except BulkWriteError as exc:
        duplicates = duplicate_key_indexes(exc)
        if duplicates is None:
            raise
        d = exc.details
        return Written(int(d.get("nInserted", 0)), int(d.get("nUpserted", 0)), int(d.get("nModified", 0)),
                       tuple(duplicates))
    return Written(res.inserted_count, res.upserted_count, res.modified_count)


async def guarded_upserts(collection: AsyncCollection[Document], ops: Sequence[WriteOp]) -> int:
    """Run upserts guarded by "what is stored is older" filters; a duplicate key means the stored
    document already holds something at least as new: nothing to write.

    Except in one race: two upserts of a document that does not exist yet both try to insert it,
    and one loses with E11000 although its guard would have matched. So the colliding ops are run
    once more: the document exists by then and, as long as documents are not deleted and guards
    only grow, a second E11000 really is a stale write. Returns the documents inserted or changed.
    """
    written, pending = 0, list(ops)
    for _ in range(2):
        if not pending:
            break
        result = await bulk_write(collection, pending)
        written += result.upserted + result.modified
        pending = [pending[i] for i in result.duplicates]
    return written


def versioned_op(doc: Document, read: int | None) -> InsertOne[Document] | ReplaceOne[Document]:
    """The write of `doc` (with its `_id` and its new version) that succeeds only over the version it
    was derived from: an insert when none was stored (`read` None), else a replace-upsert filtered
    on `{_id, v: read}`. When another writer got there first, either collides with the stored
    `_id` (E11000) instead of overwriting it."""
    if read is None:
        return InsertOne(doc)
    return ReplaceOne({"_id": doc["_id"], VERSION_FIELD: read}, doc, upsert=True)


async def write_versioned(collection: AsyncCollection[Document],
                          writes: Sequence[tuple[K, Document, int | None]]) -> set[K]:
    """Write (key, document, version read or None) in one unordered bulk write of `versioned_op`s;
    returns the keys whose version another writer changed first (their documents are not written:
    re-read and merge them again)."""
    written = await bulk_write(collection, [versioned_op(doc, read) for _, doc, read in writes])
    return {writes[i][0] for i in written.duplicates}


# CommandNotFound, and the codes of a server that does not know the command's shape.
_NO_CLIENT_BULK = frozenset({59, 40415, 9})


class ClientBulk:
    """The store's cross-collection `bulkWrite` (MongoDB 8.0+; SecantusDB has it), used until the
    store refuses it: writes to several collections as ONE ordered command."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._db = db
        self.taken = True

    async def ordered(self, writes: Sequence[UpdateOne]) -> ClientBulkWriteResult | None:
        """Run `writes` (each with its `namespace`) in order; None when the command did not apply
        everything - a guard that missed (E11000 stops an ordered command) or any other refusal -
        and the caller makes the writes apart, which repeat nothing already applied. A server
        without the command is remembered and never asked again. A failure to reach the store
        raises, as the separate writes' would."""
        if not self.taken or not writes:
            return None
        try:
            return await self._db.client.bulk_write(list(writes), ordered=True)
        except (InvalidOperation, OperationFailure) as exc:
            if isinstance(exc, InvalidOperation) or exc.code in _NO_CLIENT_BULK:
                self.taken = False
                log.info("the store has no cross-collection bulkWrite: the writes it would join are made apart")
            return None
        except ClientBulkWriteException:
            return None


async def drop_indexes(col: AsyncCollection[Document], names: Sequence[str]) -> None:
    """Drop these indexes of `col` in this order (a migration's last step); one already gone (another
    process migrating at the same time dropped it first) is no error."""
    for name in names:
        try:
            await col.drop_index(name)
        except OperationFailure as exc:
            if exc.code != INDEX_NOT_FOUND:
                raise


def namespace_of(col: AsyncCollection[Document]) -> str:
    return f"{col.database.name}.{col.name}"
