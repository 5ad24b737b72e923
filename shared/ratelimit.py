"""Rate limits shared by every replica of a service: the `limits` library's sliding-window-counter
strategy over a storage that lives in MongoDB (or in the process, for one-process setups and tests).

Why not `limits`' own MongoDB storage: its async variant needs Motor (end-of-life, not used here)
and updates with aggregation pipelines. `SlotStorage` implements the same storage interface
(`limits.aio.storage.Storage` + `SlidingWindowCounterSupport`) with two primitives any MongoDB-protocol
store answers, `find` over `_id $in` and an upserting `$inc`, on PyMongo's async API.

The model: a limit of `burst` per window of `ceil(burst / rate)` seconds, counted per key in
wall-clock-aligned slots of one window each. The count a request is checked against is the current
slot's plus the previous slot's weighted by how much of it the sliding window still covers (the
strategy of `limits.aio.strategies.SlidingWindowCounterRateLimiter`). Replicas that share the store
share the counts, so N replicas do not multiply the limit (their clocks must agree to well under
a window, as NTP keeps them).

`Limiter` is what the services use:

- `wait(key)`: seconds until one more unit would be admitted (0.0 now); spends nothing.
- `take(key, cost)`: admits and spends `cost` (capped at the burst), or answers the seconds to wait.
- `charge(key, cost)`: spends `cost` even when over the limit (work already done is paid for after the
  fact), up to a debt of one burst: the weighted count goes no higher than twice the burst.

A reservation is added, then checked: past the limit it is taken back. Two replicas racing for the
last units both add, see the sum over the limit, and take their units back, so the limit is never
exceeded (under contention a request may be refused that a serial order would have admitted). A
slot that is no longer current is read once per process (alongside the slot's first add), so an
admitted request costs one round trip (an upserting `$inc`) and a check before the body is read
another (a `find`).

A per-key limit with a lease (`ALLIANCE_<SERVICE>_RATE_LIMIT_LEASE`, see `Limiter`) counts several
units at once and admits from them in memory: on a busy key about one request in `lease` reaches the
store (the rest cost nothing there), which is what kept the rate limit from doubling the store's
load per request. The next lease is counted in the background before the held one runs out, and
again just after a slot turns for a key that was busy in the slot before, so on a steadily busy key
requests do not wait for the store at all (issue 11: the POST p99 had doubled since the limit moved
into the store). A request that finds no units held counts the lease itself - also the check
before the body is read (`wait`), which then reads nothing: the units it counts are the ones the
request's `take` spends - and requests of the key arriving meanwhile wait for that one count rather
than each counting their own. Only a key whose lease the store refused in the current slot (one
near its limit, or in debt) is checked by reading its window, as without a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from limits import RateLimitItemPerSecond
from limits.aio.storage import Storage
from limits.aio.storage.base import SlidingWindowCounterSupport
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from shared.mongo import Document, ping

log = logging.getLogger("alliance.ratelimit")

Backend = Literal["mongodb", "memory"]
COLLECTION = "rate_limits"


class Counters(Protocol):
    """Integer counters by name, each forgotten after its `expires_at` (a wall-clock timestamp)."""

    async def counts(self, names: Sequence[str]) -> dict[str, int]: ...

    async def add(self, name: str, amount: int, expires_at: float) -> int: ...

    async def delete(self, prefix: str) -> None: ...

    async def ping(self) -> bool: ...


class MemoryCounters:
    """Counters in this process (one replica; tests). At most `max_names`: the oldest are dropped first,
    so a flood of new keys costs bounded memory (a dropped key starts again from zero)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_names: int = 100_000) -> None:
        self._clock = clock
        self._max = max_names
        self._values: dict[str, tuple[int, float]] = {}

    async def counts(self, names: Sequence[str]) -> dict[str, int]:
        now = self._clock()
        return {n: v[0] for n in names if (v := self._values.get(n)) is not None and v[1] > now}

    async def add(self, name: str, amount: int, expires_at: float) -> int:
        now = self._clock()
        value = self._values.get(name)
        count = amount if value is None or value[1] <= now else value[0] + amount
        if value is None and len(self._values) >= self._max:
            # dicts keep insertion order: drop the oldest half in one go
            for old in list(self._values)[: self._max // 2]:
                del self._values[old]
        self._values[name] = (count, expires_at if value is None or value[1] <= now else value[1])
        return count

    async def delete(self, prefix: str) -> None:
        for name in [n for n in self._values if n.startswith(prefix)]:
            del self._values[name]

    async def ping(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._values)


class MongoCounters:
    """Counters in a MongoDB collection shared by every replica: `{_id, n, expire_at}`, a TTL index
    removing old slots (`ensure_indexes`)."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self._coll = collection

    async def ensure_indexes(self) -> None:
        await self._coll.create_index("expire_at", expireAfterSeconds=0)

    async def counts(self, names: Sequence[str]) -> dict[str, int]:
        return {str(d["_id"]): int(d["n"]) async for d in self._coll.find({"_id": {"$in": list(names)}})}

    async def add(self, name: str, amount: int, expires_at: float) -> int:
        expire_at = datetime.fromtimestamp(expires_at, UTC)
        doc = await self._coll.find_one_and_update(
            {"_id": name}, {"$inc": {"n": amount}, "$setOnInsert": {"expire_at": expire_at}},
            upsert=True, return_document=ReturnDocument.AFTER)
        return int(doc["n"]) if doc is not None else amount

    async def delete(self, prefix: str) -> None:
        await self._coll.delete_many({"_id": {"$regex": f"^{_escape(prefix)}"}})

    async def ping(self) -> bool:
        return await ping(self._coll.database.client)


def _escape(text: str) -> str:
    return "".join(f"\\{c}" if not c.isalnum() else c for c in text)


def weighted(previous: int, previous_share: float, current: int) -> float:
    """The sliding window's count: the previous slot's count times the share of it the window still
    covers (1.0 at the start of the current slot, 0.0 at its end), plus the current slot's."""
    return previous * previous_share + current


def seconds_until(cost: int, limit: int, window: float, previous: int, previous_share: float, current: int) -> float:
    """Seconds until `cost` more fit under `limit` (0.0 when they fit now), counting as the
    sliding-window-counter strategy does: admitted while `floor(weighted) + cost <= limit`."""
    room = limit - cost + 1  # admitted while weighted < room
    if weighted(previous, previous_share, current) < room:
        return 0.0
    if current < room:
        # The previous slot's share shrinks linearly with time within this slot.
        return max(0.0, window * previous_share - window * (room - current) / previous) if previous else 0.0
    # Not before the next slot, where this slot's count becomes the shrinking previous one.
    return window * previous_share + max(0.0, window - window * room / current)


class SlotStorage(Storage, SlidingWindowCounterSupport):
    """A `limits` async storage over `Counters`: fixed windows and sliding window counters in
    clock-aligned slots (`<key>@<slot number>`), so it needs no atomic read-modify-write beyond `$inc`."""

    STORAGE_SCHEME: list[str] | None = ["alliance-slots"]  # noqa: RUF012 (the base class declares it so)

    def __init__(self, counters: Counters, clock: Callable[[], float] = time.time, max_closed: int = 100_000) -> None:
        super().__init__()
        self.counters = counters
        self._clock = clock
        # Counts of slots that are no longer current: nothing adds to them any more (but for a
        # race's give-back), so each is read once per process rather than once per request.
        self._closed: dict[str, int] = {}
        self._max_closed = max_closed

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return PyMongoError

    async def ensure_indexes(self) -> None:
        """The store's TTL index, when the counters live in MongoDB (a start-up step)."""
        if isinstance(self.counters, MongoCounters):
            await self.counters.ensure_indexes()

    def now(self) -> float:
        """The wall-clock time slots are counted in."""
        return self._clock()

    def current_slot(self, expiry: int) -> int:
        """The number of the slot counts are added to now."""
        return self._slot(expiry)[0]

    def _slot(self, expiry: int) -> tuple[int, float]:
        """The current slot number and the share of the previous slot the window still covers."""
        now = self._clock()
        slot = math.floor(now / expiry)
        return slot, ((slot + 1) * expiry - now) / expiry

    async def _window(self, key: str, expiry: int) -> tuple[int, float, int, int]:
        """(previous slot's count, its share, current slot's count, current slot): one round trip."""
        slot, share = self._slot(expiry)
        previous, current = f"{key}@{slot - 1}", f"{key}@{slot}"
        known = self._closed.get(previous)
        got = await self.counters.counts([current] if known is not None else [previous, current])
        if known is None:
            known = self._remember(previous, got.get(previous, 0))
        return known, share, got.get(current, 0), slot

    def _remember(self, name: str, count: int) -> int:
        if len(self._closed) >= self._max_closed:
            for old in list(self._closed)[: self._max_closed // 2]:
                del self._closed[old]
        self._closed[name] = count
        return count

    async def _add(self, key: str, slot: int, expiry: int, amount: int) -> int:
        # A slot is read while it is current and while it is the previous one: kept for two windows.
        return await self.counters.add(f"{key}@{slot}", amount, (slot + 2) * expiry + 1.0)

    # --- sliding window counter -------------------------------------------------------------------

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        # Add first, then check (one round trip when admitted): a count past the limit is given
        # back, whether it was this request's own or a race with another replica that made it so.
        slot, share = self._slot(expiry)
        name = f"{key}@{slot - 1}"
        previous = self._closed.get(name)
        if previous is None:
            # The first add of a slot: the previous slot's count is read alongside (one round trip
            # of waiting, not two); the check below needs both. Should the read fail after the add
            # went through, the unit stays counted unused: conservative, never an admission too many.
            got, now_current = await asyncio.gather(self.counters.counts([name]),
                                                    self._add(key, slot, expiry, amount))
            previous = self._remember(name, got.get(name, 0))
        else:
            now_current = await self._add(key, slot, expiry, amount)
        if math.floor(weighted(previous, share, now_current)) > limit:
            await self._add(key, slot, expiry, -amount)
            return False
        return True

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        previous, share, current, _ = await self._window(key, expiry)
        return previous, share * expiry, current, share * expiry + expiry

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        await self.clear(key)

    async def force(self, key: str, limit: int, expiry: int, amount: int) -> None:
        """Add `amount` whatever the count, up to a weighted count of `2 * limit` (a debt of one limit)."""
        previous, share, current, slot = await self._window(key, expiry)
        room = 2 * limit - math.ceil(weighted(previous, share, current))
        if (spent := min(amount, room)) > 0:
            await self._add(key, slot, expiry, spent)

    # --- fixed window (the base interface) --------------------------------------------------------

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        slot, _ = self._slot(expiry)
        return await self._add(key, slot, expiry, amount)

    async def get(self, key: str) -> int:
        raise NotImplementedError("SlotStorage counts in slots: use the sliding window counter strategy")

    async def get_expiry(self, key: str) -> float:
        raise NotImplementedError("SlotStorage counts in slots: use the sliding window counter strategy")

    async def check(self) -> bool:
        return await self.counters.ping()

    async def reset(self) -> int | None:
        self._closed.clear()
        await self.counters.delete("")
        return None

    async def clear(self, key: str) -> None:
        for name in [n for n in self._closed if n.startswith(f"{key}@")]:
            del self._closed[name]
        await self.counters.delete(f"{key}@")


@dataclass
class _Held:
    """Units this process counted in the shared store ahead of use, in one slot."""

    slot: int
    units: int


class Limiter:
    """`burst` units per `ceil(burst / rate)` seconds per key, in `namespace` (e.g. `intake:submissions`),
    on a shared `SlotStorage`. See the module docstring for `wait`, `take` and `charge`.

    With a `lease` above 1 a replica counts up to `lease` units in the shared store at once and
    admits from them without a round trip until they are spent (a lease is only ever taken whole
    when it fits under the limit, else just what the request needs). Units counted are never
    more than the limit, so replicas still never admit more than it together; the price is that a
    replica's unspent units count against the key until their slot ends (they are dropped when it
    turns), so N replicas may refuse up to N x 1.5 x `lease` units early (a replica holds at most
    half a lease when it counts the next one). The lease is capped at a twentieth of the burst:
    small limits (the failed-authentication one) stay exact.

    Refills ahead of need (only with a lease above 1): when a request leaves half a lease or less
    held and the key's pace in this slot would spend what is held before the slot ends, the next
    lease is counted by a background task, and a request finding too few units while that task runs
    waits for it rather than asking the store itself. A key that spent half a lease or more in a
    slot gets one lease counted right after the next slot begins (held units of an ended slot are
    dropped, so without it the first requests of every slot would wait for the store). The two
    conditions keep a slow key from counting leases it will not use (each a store write). A request
    (`wait` or `take`) that finds too few units held and no count under way counts a lease itself
    and waits for it, so concurrent requests of a key count one lease, not one each (`_lease_now`).
    A refill the store refuses or does not answer (within `count_timeout` seconds: the count is
    shared, so no one request's timeout ends it) is dropped: the request path then asks the store
    as without refills (for the rest of the slot when it refused), and reports its outage.
    """

    def __init__(self, storage: SlotStorage, namespace: str, rate: float, burst: float, lease: int = 1,
                 count_timeout: float = 3.0) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.window = max(1, math.ceil(burst / rate))
        self.item = RateLimitItemPerSecond(int(burst), self.window, namespace=namespace)
        self.lease = max(1, min(lease, int(burst) // 20))
        # A lease count is shared by every request of the key that waits for it, so no request's own
        # timeout ends it: without this bound a store connection that hangs (no answer, no error)
        # would keep the key waiting on that one count, every request of it refused with 503.
        self.count_timeout = count_timeout
        self.storage = storage
        self._strategy = SlidingWindowCounterRateLimiter(storage)
        self._held: dict[str, _Held] = {}
        self._max_held = 100_000
        self._refills: dict[str, asyncio.Task[None]] = {}
        # Keys that spent half a lease or more in a slot, by slot: refilled as the next slot begins.
        self._busy: dict[int, set[str]] = {}
        # Units this process admitted per key in the current slot: (slot, units).
        self._used: dict[str, tuple[int, int]] = {}
        # Keys whose lease the store refused (the key near its limit), by slot: until the slot
        # ends, requests short of units ask for what they need instead of a lease first.
        self._refused: dict[str, int] = {}

    def _cost(self, cost: float) -> int:
        return min(max(math.ceil(cost), 0), self.item.amount)

    def _holding(self, key: str) -> _Held | None:
        """This process's unspent units for `key` in the current slot (units of an ended slot are dropped)."""
        held = self._held.get(key)
        if held is None:
            return None
        if held.slot != self.storage.current_slot(self.window) or held.units <= 0:
            del self._held[key]
            return None
        return held

    def _hold(self, key: str, units: int, slot: int) -> None:
        """Keep `units` counted in `slot` for later requests (dropped if that slot has ended)."""
        if units <= 0 or slot != self.storage.current_slot(self.window):
            return
        held = self._held.get(key)
        if held is not None and held.slot == slot:
            held.units += units
            return
        if held is None and len(self._held) >= self._max_held:
            for old in list(self._held)[: self._max_held // 2]:
                del self._held[old]
        self._held[key] = _Held(slot, units)

    async def take(self, key: str, cost: float = 1.0) -> float:
        """0.0 when admitted (`cost` spent), else the seconds until `cost` would be."""
        units = self._cost(cost)
        if units == 0:
            return 0.0
        held = await self._refilled(key, units)
        if (held is None or held.units < units) and units <= self.lease:
            held = await self._lease_now(key, units)
        if held is not None and held.units >= units:
            held.units -= units
            self._refill_if_low(key, held, self._spent(key, held.slot, units))
            return 0.0
        # Claim what is held before the round trip (another request of this process may run
        # meanwhile), and put it back if the store refuses the rest.
        have, have_slot = (held.units, held.slot) if held is not None else (0, 0)
        if held is not None:
            held.units = 0
        need = units - have
        # A whole lease when it fits, else exactly what this request lacks; only the latter once the
        # store refused a lease of the key in this slot (asking again would be an add and a give-back).
        refused = self._refused.get(key) == self.storage.current_slot(self.window)
        for ask in dict.fromkeys((need,) if refused else (min(max(need, self.lease), self.item.amount), need)):
            slot = self.storage.current_slot(self.window)
            if await self._strategy.hit(self.item, key, cost=ask):
                self._hold(key, ask - need, slot)
                self._spent(key, slot, units)
                return 0.0
        self._hold(key, have, have_slot)
        return max(await self._seconds_until(key, units), 1e-3)

    async def wait(self, key: str) -> float:
        """0.0 when one unit would be admitted now, else the seconds until it would; spends nothing.
        (The strategy's `test` with the same arithmetic, from one read of the window; no read at
        all while this process holds units of the key. Holding none, it counts a lease for the
        request's `take` to spend, as `take` would have: one round trip instead of a read and a
        count; the read only when the store refused a lease of the key in this slot.)"""
        if await self._refilled(key, 1) is not None or await self._lease_now(key, 1) is not None:
            return 0.0
        wait = await self._seconds_until(key, 1)
        return 0.0 if wait <= 0 else max(wait, 1e-3)

    async def charge(self, key: str, cost: float) -> None:
        """Spend `cost` (capped at the burst) even when over the limit, down to a debt of one burst;
        units this process holds are spent first (they are counted already)."""
        units = self._cost(cost)
        held = self._holding(key)
        if held is not None:
            spent = min(held.units, units)
            held.units -= spent
            units -= spent
        if units > 0:
            await self.storage.force(self.item.key_for(key), self.item.amount, self.window, units)

    async def _lease_now(self, key: str, units: int) -> _Held | None:
        """Count one lease for `key` now and wait for it, unless one is being counted (then wait for
        that one) or the store refused one in this slot: concurrent requests finding too few units
        count one lease between them, not one each. Returns what is held after (maybe fewer than `units`)."""
        slot = self.storage.current_slot(self.window)
        if self.lease <= 1 or self._refused.get(key) == slot:
            return self._holding(key)
        self._refill(key, slot)
        return await self._refilled(key, units)

    # --- refills ahead of need --------------------------------------------------------------------

    async def _refilled(self, key: str, units: int) -> _Held | None:
        """The units held for `key`, after waiting for a refill under way when they are fewer than `units`."""
        held = self._holding(key)
        if (held is None or held.units < units) and (task := self._refills.get(key)) is not None:
            # Shielded: a request given up on (its timeout) must not cancel the refill others wait for.
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
            held = self._holding(key)
        return held

    def _spent(self, key: str, slot: int, units: int) -> int:
        """Count `units` admitted for `key` in `slot`; the units admitted in the slot so far. The
        key becomes busy (a lease as the next slot begins) once they reach half a lease."""
        before = self._used.get(key)
        used = units + (before[1] if before is not None and before[0] == slot else 0)
        if before is None and len(self._used) >= self._max_held:
            for old in list(self._used)[: self._max_held // 2]:
                del self._used[old]
        self._used[key] = (slot, used)
        if self.lease > 1 and used >= self.lease // 2 > used - units:
            self._mark_busy(key, slot)
        return used

    def _refill_if_low(self, key: str, held: _Held, used: int) -> None:
        """Refill when half a lease or less is held and, at the pace of the slot so far (`used`
        units), more than that would be spent before the slot ends."""
        if self.lease <= 1 or held.units > self.lease // 2:
            return
        elapsed = self.storage.now() - held.slot * self.window
        if used * (self.window - elapsed) > held.units * max(elapsed, 1e-3):
            self._refill(key, held.slot)

    def _refill(self, key: str, slot: int) -> None:
        """Count one lease for `key` in `slot` in the background (at most one refill per key at a time)."""
        if key in self._refills or slot != self.storage.current_slot(self.window):
            return
        task = asyncio.get_running_loop().create_task(self._count_lease(key, slot), name=f"ratelimit-refill:{key}")
        self._refills[key] = task
        task.add_done_callback(lambda _t: self._refills.pop(key, None))

    async def _count_lease(self, key: str, slot: int) -> None:
        try:
            if slot != self.storage.current_slot(self.window):
                return
            # Given up after `count_timeout`: the units may still be counted by the store, which
            # only makes the key refused a little early in this slot, never admitted over its limit.
            async with asyncio.timeout(self.count_timeout):
                counted = await self._strategy.hit(self.item, key, cost=self.lease)
            if counted:
                self._hold(key, self.lease, slot)
            else:
                if len(self._refused) >= self._max_held:
                    for old in list(self._refused)[: self._max_held // 2]:
                        del self._refused[old]
                self._refused[key] = slot
        except Exception as exc:  # the request path asks the store itself and reports its outage
            log.debug("rate-limit refill not counted: %s", type(exc).__name__)

    def _mark_busy(self, key: str, slot: int) -> None:
        """Remember `key` as busy in `slot`: one lease is counted for it as soon as the next slot begins."""
        busy = self._busy.get(slot)
        if busy is None:
            if len(self._busy) > 2:  # only the current slot's (and a just-ended one's) matter
                for old in [s for s in self._busy if s < slot]:
                    del self._busy[old]
            busy = self._busy[slot] = set()
            self._at_slot_end(slot)
        if len(busy) < self._max_held:
            busy.add(key)

    def _at_slot_end(self, slot: int) -> None:
        # The loop's timer runs on the monotonic clock, slots on the wall clock: just past the end.
        delay = (slot + 1) * self.window - self.storage.now() + 0.001
        asyncio.get_running_loop().call_later(max(delay, 0.0), self._slot_turned, slot)

    def _slot_turned(self, ended: int) -> None:
        if self.storage.current_slot(self.window) <= ended:
            self._at_slot_end(ended)  # early by the wall clock (it was adjusted): again at its end
            return
        for key in self._busy.pop(ended, ()):
            self._refill(key, ended + 1)

    async def _seconds_until(self, key: str, cost: int) -> float:
        previous, previous_ttl, current, _ = await self.storage.get_sliding_window(self.item.key_for(key), self.window)
        return seconds_until(cost, self.item.amount, self.window, previous, previous_ttl / self.window, current)


def slot_storage(backend: Backend, collection: AsyncCollection[Document] | None,
                 clock: Callable[[], float] = time.time) -> SlotStorage:
    """The storage for `backend`: `mongodb` (shared by replicas; `collection` required) or `memory`."""
    if backend == "mongodb":
        if collection is None:
            raise ValueError("the mongodb rate-limit backend needs a collection")
        return SlotStorage(MongoCounters(collection), clock)
    return SlotStorage(MemoryCounters(clock), clock)


def retry_after_header(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
