"""Scoring's own collections: per-series state (`scoring_state`) and tenant rules (`scoring_rules`).

One state document per (tenant, client, instrument, episode), holding every submission of the
series with the outcome computed for it. A batch reads all its documents with one `find` and
writes them back with one unordered `bulk_write` guarded by a version number: a series read at
version 0 (new) is an insert, any other a replace-upsert filtered on `{_id, v: <version read>}`.
If another process wrote the document in between, the insert or the upsert collides with the
existing `_id` (E11000) and that document is reported as a conflict instead of being overwritten.

`StateCache` keeps the series a process has written, so a batch reads from the store only the
series it has not seen; the version check makes a stale cache entry harmless (see its docs).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pymongo import InsertOne, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from services.scoring.history import Entry, History, Outcome
from services.scoring.rules import TenantRules
from shared.events import Instrument
from shared.mongo import Document

log = logging.getLogger("alliance.scoring.store")

STATES = "scoring_state"
RULES = "scoring_rules"
DUPLICATE_KEY = 11000


@dataclass(frozen=True)
class SeriesKey:
    """Which series a submission belongs to; one state document each."""

    tenant_id: str
    client_id: str
    instrument: str
    episode_id: str | None

    @property
    def doc_id(self) -> str:
        # JSON keeps the parts unambiguous whatever characters the ids contain.
        return json.dumps([self.tenant_id, self.client_id, self.instrument, self.episode_id], separators=(",", ":"))


def _iso(dt: datetime) -> str:
    # Kept as text: BSON dates keep milliseconds only, and a re-emitted event must be byte-equal.
    return dt.isoformat()


def _dt(s: str) -> datetime:
    return datetime.fromisoformat(s)


def outcome_doc(o: Outcome) -> Document:
    """Short field names: the document is read and written on every batch."""
    doc: Document = {"s": o.scored, "at": _iso(o.scored_at)}
    if o.total is not None:
        doc["t"] = o.total
    if o.scored:
        doc.update(c=o.cutoff, p=o.previous_total, d=o.change_from_previous, f=list(o.flags), l=o.latest)
        if o.severity is not None:
            doc.update(tr=list(o.triggers), sv=o.severity)
    return doc


def outcome_from(doc: Document) -> Outcome:
    return Outcome(
        scored=bool(doc["s"]), scored_at=_dt(doc["at"]), total=doc.get("t"), cutoff=doc.get("c"),
        previous_total=doc.get("p"), change_from_previous=doc.get("d"), flags=tuple(doc.get("f", ())),
        latest=bool(doc.get("l", False)), triggers=tuple(doc.get("tr", ())), severity=doc.get("sv"),
    )


def history_doc(key: SeriesKey, h: History, version: int) -> Document:
    """The stored form of a series."""
    subs = []
    for sid, e in h.entries.items():
        subs.append({"sid": sid, "n": e.session_number, "t": e.total, "acc": _iso(e.accepted_at),
                     "o": outcome_doc(h.outcomes[sid])})
    return {"tenant_id": key.tenant_id, "client_id": key.client_id, "instrument": key.instrument,
            "episode_id": key.episode_id, "v": version, "updated_at": datetime.now(UTC), "subs": subs}


def history_from(doc: Document) -> History:
    h = History(version=int(doc.get("v", 0)))
    for s in doc.get("subs", ()):
        h.entries[s["sid"]] = Entry(s["sid"], int(s["n"]), s.get("t"), _dt(s["acc"]))
        h.outcomes[s["sid"]] = outcome_from(s["o"])
    return h


class StatePort(Protocol):
    """Where series state lives: `StateStore` (MongoDB), `StateCache` in front of it, or a dict
    in unit tests."""

    async def load(self, keys: Iterable[SeriesKey]) -> dict[SeriesKey, History]: ...

    async def save(self, changed: dict[SeriesKey, History]) -> set[SeriesKey]: ...


class StateStore:
    """Reads series state with one query per batch, writes it with one bulk write per chunk."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._col = db[STATES]

    async def client_series(self, tenant_id: str, client_id: str) -> list[Document]:
        """Every series of one client (operators, tests), by a range scan of `_id`, whose JSON
        form starts with tenant and client. There is no secondary index on purpose: scoring
        reads and writes by `_id` only, and an index costs every state write (~40% of the write
        rate on the local store)."""
        prefix = json.dumps([tenant_id, client_id], separators=(",", ":"))[:-1] + ","
        cursor = self._col.find({"_id": {"$gte": prefix, "$lt": prefix + "\U0010ffff"}})
        return [doc async for doc in cursor]

    async def load(self, keys: Iterable[SeriesKey]) -> dict[SeriesKey, History]:
        """The stored series for `keys` (empty ones for series never seen), in one query."""
        by_id = {k.doc_id: k for k in keys}
        out = {k: History() for k in by_id.values()}
        if not by_id:
            return out
        async for doc in self._col.find({"_id": {"$in": list(by_id)}}):
            out[by_id[doc["_id"]]] = history_from(doc)
        return out

    async def save(self, changed: dict[SeriesKey, History]) -> set[SeriesKey]:
        """Write the series in one bulk write; returns the ones another writer got to first.

        Written series get their version bumped in memory.
        """
        if not changed:
            return set()
        keys = list(changed)
        ops: list[InsertOne[Document] | ReplaceOne[Document]] = []
        for k in keys:
            h = changed[k]
            doc = history_doc(k, h, h.version + 1)
            if h.version == 0:
                ops.append(InsertOne({"_id": k.doc_id, **doc}))
            else:
                ops.append(ReplaceOne({"_id": k.doc_id, "v": h.version}, doc, upsert=True))
        conflicts: set[SeriesKey] = set()
        try:
            await self._col.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            errors: list[dict[str, Any]] = exc.details.get("writeErrors", [])
            other = [e for e in errors if e.get("code") != DUPLICATE_KEY]
            if other or exc.details.get("writeConcernErrors"):
                raise
            conflicts = {keys[e["index"]] for e in errors}
        for k in keys:
            if k not in conflicts:
                changed[k].version += 1
        return conflicts


class StateCache:
    """The series this process wrote or read last, in front of a `StateStore` (LRU-bounded).

    Safe without invalidation on rebalances: an entry only ever holds a state that was in the
    store at some point. If another process has written the series since (the partition moved
    away and back), a submission scored against the stale entry cannot be published, because
    the write that must precede publishing is filtered on the stale version and conflicts; the
    conflict evicts the entry and the batch re-reads the store. A stale entry can also answer a
    redelivered submission from its outcomes, but outcomes are never changed once written, so
    that answer is the one in the store.
    """

    def __init__(self, store: StatePort, max_series: int = 20_000) -> None:
        self._store = store
        self._max = max_series
        self._lru: OrderedDict[SeriesKey, History] = OrderedDict()

    async def load(self, keys: Iterable[SeriesKey]) -> dict[SeriesKey, History]:
        """Copies of the cached series; the others read from the store in one query."""
        out: dict[SeriesKey, History] = {}
        missing: list[SeriesKey] = []
        for k in keys:
            hit = self._lru.get(k)
            if hit is None:
                missing.append(k)
            else:
                self._lru.move_to_end(k)
                out[k] = hit.copy()
        if missing:
            loaded = await self._store.load(missing)
            for k, h in loaded.items():
                self._remember(k, h.copy())
            out.update(loaded)
        return out

    async def save(self, changed: dict[SeriesKey, History]) -> set[SeriesKey]:
        """Write through; written series are remembered, conflicting ones forgotten."""
        try:
            conflicts = await self._store.save(changed)
        except BaseException:
            for k in changed:  # unknown outcome: read the store next time
                self._lru.pop(k, None)
            raise
        for k, h in changed.items():
            if k in conflicts:
                self._lru.pop(k, None)
            else:
                self._remember(k, h.copy())
        return conflicts

    def _remember(self, key: SeriesKey, h: History) -> None:
        if self._max <= 0:
            return
        self._lru[key] = h
        self._lru.move_to_end(key)
        while len(self._lru) > self._max:
            self._lru.popitem(last=False)

    def __len__(self) -> int:
        return len(self._lru)


class RulesStore:
    """Tenant rules, cached in-process for `ttl_seconds` so a batch rarely reads them.

    A change made with `alliance tenants set-rules` applies within `ttl_seconds`.
    """

    def __init__(self, db: AsyncDatabase[Document], ttl_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._col = db[RULES]
        self._ttl = ttl_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, TenantRules]] = {}

    async def get_many(self, tenants: Iterable[str]) -> dict[str, TenantRules]:
        """Rules of each tenant (defaults when it has none); one query for the ones not cached."""
        now = self._clock()
        wanted = set(tenants)
        out: dict[str, TenantRules] = {}
        for t in wanted:
            hit = self._cache.get(t)
            if hit is not None and hit[0] > now:
                out[t] = hit[1]
        missing = wanted - out.keys()
        if missing:
            found: dict[str, TenantRules] = {}
            async for doc in self._col.find({"_id": {"$in": sorted(missing)}}):
                try:
                    found[doc["_id"]] = TenantRules.from_doc(doc)
                except (ValueError, TypeError) as exc:
                    # A hand-edited, invalid document must not stall the partition: use the
                    # defaults (which alert) and say so.
                    log.error("invalid rules stored for a tenant, using defaults: %r", exc,
                              extra={"tenant_id": doc["_id"]})
            for t in missing:
                rules = found.get(t, TenantRules())
                self._cache[t] = (now + self._ttl, rules)
                out[t] = rules
        return out

    async def get(self, tenant: str) -> TenantRules:
        """One tenant's rules."""
        return (await self.get_many([tenant]))[tenant]

    async def stored(self, tenant: str) -> TenantRules | None:
        """The tenant's stored rules, uncached; None when it uses the defaults."""
        doc = await self._col.find_one({"_id": tenant})
        return None if doc is None else TenantRules.from_doc(doc)

    async def put(self, tenant: str, rules: TenantRules) -> None:
        """Store a tenant's rules (validated by `TenantRules` itself)."""
        await self._col.replace_one({"_id": tenant}, {**rules.to_doc(), "updated_at": datetime.now(UTC)},
                                    upsert=True)
        self._cache.pop(tenant, None)


def series_key(tenant_id: str, client_id: str, instrument: Instrument | str, episode_id: str | None) -> SeriesKey:
    """The series of a submission."""
    return SeriesKey(tenant_id, client_id, str(instrument), episode_id)
