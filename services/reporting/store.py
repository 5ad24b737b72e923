"""MongoDB adapter of reporting: generations of read models, batch writes, and the API's queries.

Collections (all prefixed `reporting_`):

- `reporting_meta`: one document `{_id: "generation", active, building, previous, seq}` — the
  pointer the API reads (cached briefly) and the consumers write through. A rebuild writes a
  new generation next to the live one and flips `active` in one single-document update.
- `reporting_<gen>_trajectories`: one document per (tenant, client, instrument, episode); its
  sessions are a map keyed by session number (see rules.py). Indexes, and the query each serves:
    * `_id` (derived trajectory id) — the consumer's batch read and conditional replace;
    * `(tenant_id, client_id, instrument, latest_administered_at -1)` — GET trajectory / fhir
      (the most recent episode of one client and instrument);
    * `(tenant_id, clinician_id, caseload_key)` — GET caseload: equality on the clinician, then
      a range scan from the cursor in sort order (at-risk first), no in-memory sort;
    * `(tenant_id, site_id, instrument)` — site and tenant summaries ($match, then $group by
      instrument; `distinct` client counts).
- `reporting_<gen>_alerts`: one document per alert id, merged from deterioration and alert
  status events (either may come first). Indexes:
    * `(tenant_id, trajectory_id)` — the alert marks of one trajectory or of a caseload page;
    * `(tenant_id, site_id, raised)` and `(tenant_id, site_id, acknowledged)` — alert counts.

Concurrency: a batch takes the trajectories it touches from a write-through cache (or one `find`
of the misses), merges in Python (pure rules), and writes them in ONE unordered `bulk_write`:
inserts for new trajectories, replaces conditioned on the version merged from (`{_id, v}` with
upsert) for known ones. A concurrent writer (two consumers around a rebalance; the live consumer
and a rebuild both filling a new generation) makes the condition miss; the upsert (or insert)
then hits the unique `_id` and fails with E11000 for that document only, and just those
trajectories are re-read and re-merged. Because the merge is a commutative max, the retry
converges to the same result whoever wins. (Filters are `_id`-led so the store uses its
primary-key path.)
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pymongo import ASCENDING, DESCENDING, InsertOne, ReplaceOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from services.reporting import rules
from shared.events import AlertStatusChanged, AllianceDeterioration, SrsScored
from shared.mongo import Document

META = "reporting_meta"
POINTER_ID = "generation"
FIRST_GENERATION = "g1"
_GEN_COLLECTION = re.compile(r"^reporting_(g\d+)_(trajectories|alerts)$")
DUPLICATE_KEY = 11000


class RebuildInProgress(RuntimeError):
    """Another rebuild holds the `building` slot."""


@dataclass(frozen=True)
class GenerationState:
    """The pointer document: which generation the API reads, and which one is being built."""

    active: str
    building: str | None = None
    previous: str | None = None
    seq: int = 1

    @property
    def write_targets(self) -> tuple[str, ...]:
        """Where consumers write: the active generation, and during a rebuild the new one too."""
        if self.building and self.building != self.active:
            return (self.active, self.building)
        return (self.active,)


def trajectories_name(gen: str) -> str:
    return f"reporting_{gen}_trajectories"


def alerts_name(gen: str) -> str:
    return f"reporting_{gen}_alerts"


class Generations:
    """Reads and flips the generation pointer; the read is cached for `ttl` seconds."""

    def __init__(self, db: AsyncDatabase[Document], ttl: float) -> None:
        self._db = db
        self._ttl = ttl
        self._cached: tuple[float, GenerationState] | None = None

    @property
    def ttl(self) -> float:
        return self._ttl

    @staticmethod
    def _state(doc: Document) -> GenerationState:
        return GenerationState(doc["active"], doc.get("building"), doc.get("previous"), int(doc.get("seq", 1)))

    async def ensure(self) -> GenerationState:
        """Create the pointer (first generation) if missing; return it fresh."""
        doc = await self._db[META].find_one_and_update(
            {"_id": POINTER_ID},
            {"$setOnInsert": {"active": FIRST_GENERATION, "building": None, "previous": None, "seq": 1,
                              "switched_at": datetime.now(UTC)}},
            upsert=True, return_document=ReturnDocument.AFTER)
        assert doc is not None  # an upsert returning the document after the update always has one
        state = self._state(doc)
        self._cached = (time.monotonic() + self._ttl, state)
        return state

    async def current(self) -> GenerationState:
        """The pointer, at most `ttl` seconds old."""
        now = time.monotonic()
        if self._cached is not None and self._cached[0] > now:
            return self._cached[1]
        doc = await self._db[META].find_one({"_id": POINTER_ID})
        state = self._state(doc) if doc is not None else await self.ensure()
        self._cached = (now + self._ttl, state)
        return state

    async def begin_rebuild(self, force: bool = False) -> tuple[GenerationState, str]:
        """Claim the `building` slot for a new generation; RebuildInProgress when taken (unless force)."""
        state = await self.ensure()
        if state.building and not force:
            raise RebuildInProgress(f"generation {state.building} is being built (use --force if that run died)")
        new = f"g{state.seq + 1}"
        cond: Document = {"_id": POINTER_ID, "seq": state.seq}
        res = await self._db[META].update_one(cond, {"$set": {"building": new, "seq": state.seq + 1,
                                                             "building_since": datetime.now(UTC)}})
        if res.modified_count != 1:
            raise RebuildInProgress("the generation pointer changed under this rebuild; try again")
        self._cached = None
        return state, new

    async def switch(self, new: str) -> GenerationState:
        """Make `new` the active generation, in one single-document update."""
        doc = await self._db[META].find_one({"_id": POINTER_ID})
        if doc is None or doc.get("building") != new:
            raise RebuildInProgress(f"generation {new} no longer holds the building slot")
        res = await self._db[META].update_one(
            {"_id": POINTER_ID, "building": new},
            {"$set": {"active": new, "previous": doc["active"], "building": None, "switched_at": datetime.now(UTC)}})
        if res.modified_count != 1:
            raise RebuildInProgress(f"generation {new} no longer holds the building slot")
        self._cached = None
        return await self.current()

    async def abandon(self, new: str) -> None:
        """Give up a failed rebuild: free the slot (the live generation was never touched)."""
        await self._db[META].update_one({"_id": POINTER_ID, "building": new}, {"$set": {"building": None}})
        self._cached = None

    async def drop_unused(self) -> list[str]:
        """Drop generations other than the active, previous and building ones. Returns them."""
        state = await self.ensure()
        keep = {state.active, state.previous, state.building}
        dropped: set[str] = set()
        for name in await self._db.list_collection_names():
            m = _GEN_COLLECTION.match(name)
            if m and m.group(1) not in keep:
                await self._db.drop_collection(name)
                dropped.add(m.group(1))
        return sorted(dropped)


@dataclass
class ApplyReport:
    """What one batch did to one generation."""

    outcomes: Counter[str] = field(default_factory=Counter)
    visible: list[SrsScored] = field(default_factory=list)  # events whose point is now readable
    conflicts: int = 0


def to_stored(doc: Document) -> Document:
    """A trajectory as written: sessions packed into one text field (see rules.pack_sessions)."""
    return {**doc, "sessions": rules.pack_sessions(doc["sessions"])}


def from_stored(doc: Document) -> Document:
    """A trajectory as read back, sessions unpacked."""
    if isinstance(doc.get("sessions"), str):
        doc["sessions"] = rules.unpack_sessions(doc["sessions"])
    return doc


class DocCache:
    """Trajectories this process wrote or read last, keyed by (generation, id); least recently used go first.

    Only an optimisation: every write is conditioned on the cached version, so a stale entry
    (another writer got there first) fails that one write, is dropped, and is re-read.
    """

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._docs: OrderedDict[tuple[str, str], Document] = OrderedDict()

    def get(self, gen: str, tid: str) -> Document | None:
        doc = self._docs.get((gen, tid))
        if doc is not None:
            self._docs.move_to_end((gen, tid))
        return doc

    def put(self, gen: str, tid: str, doc: Document) -> None:
        if self._max <= 0:
            return
        self._docs[(gen, tid)] = doc
        self._docs.move_to_end((gen, tid))
        while len(self._docs) > self._max:
            self._docs.popitem(last=False)

    def drop(self, gen: str, tid: str) -> None:
        self._docs.pop((gen, tid), None)

    def __len__(self) -> int:
        return len(self._docs)


class ReportingStore:
    """Batch writes and queries of the reporting read models."""

    def __init__(self, db: AsyncDatabase[Document], decline_threshold: float = rules.DEFAULT_DECLINE_THRESHOLD,
                 max_conflict_retries: int = 8, cache_entries: int = 0) -> None:
        self.db = db
        self._threshold = decline_threshold
        self._retries = max_conflict_retries
        self._indexed: set[str] = set()
        self.cache = DocCache(cache_entries)

    def trajectories(self, gen: str) -> AsyncCollection[Document]:
        return self.db[trajectories_name(gen)]

    def alerts(self, gen: str) -> AsyncCollection[Document]:
        return self.db[alerts_name(gen)]

    async def ensure_indexes(self, gen: str) -> None:
        """Create one generation's query indexes (idempotent; done once per process and generation).

        Writers need only `_id`; a rebuild creates these after its bulk load, before the switch.
        """
        if gen in self._indexed:
            return
        t = self.trajectories(gen)
        await t.create_index([("tenant_id", ASCENDING), ("client_id", ASCENDING), ("instrument", ASCENDING),
                              ("latest_administered_at", DESCENDING)], name="by_client")
        await t.create_index([("tenant_id", ASCENDING), ("clinician_id", ASCENDING), ("caseload_key", ASCENDING)],
                             name="caseload")
        await t.create_index([("tenant_id", ASCENDING), ("site_id", ASCENDING), ("instrument", ASCENDING)],
                             name="by_site")
        a = self.alerts(gen)
        await a.create_index([("tenant_id", ASCENDING), ("trajectory_id", ASCENDING)], name="by_trajectory")
        await a.create_index([("tenant_id", ASCENDING), ("site_id", ASCENDING), ("raised", ASCENDING)],
                             name="raised")
        await a.create_index([("tenant_id", ASCENDING), ("site_id", ASCENDING), ("acknowledged", ASCENDING)],
                             name="acknowledged")
        self._indexed.add(gen)

    # ------------------------------------------------------------------ writes

    async def apply_scored(self, gen: str, events: Sequence[SrsScored], *, fresh: bool = False) -> ApplyReport:
        """Merge scored events into their trajectories with one bulk write per round.

        Current documents come from the cache, else from one `find` of the misses; with `fresh`
        (a generation being rebuilt, where almost nothing exists yet) a miss is taken as absent
        and written as an insert — if it did exist, the insert fails on `_id` and that one
        trajectory is read and merged again. New trajectories are inserts, known ones replaces
        conditioned on the version they were merged from.
        """
        report = ApplyReport()
        groups = rules.group_by_trajectory(events)
        pending = set(groups)
        must_read: set[str] = set()
        col = self.trajectories(gen)
        for attempt in range(self._retries + 1):
            if not pending:
                break
            existing: dict[str, Document] = {}
            misses: list[str] = []
            for tid in pending:
                cached = None if tid in must_read else self.cache.get(gen, tid)
                if cached is not None:
                    existing[tid] = cached
                elif fresh and tid not in must_read:
                    continue
                else:
                    misses.append(tid)
            if misses:
                async for d in col.find({"_id": {"$in": sorted(misses)}}):
                    existing[d["_id"]] = from_stored(d)
            ops: list[InsertOne[Document] | ReplaceOne[Document]] = []
            op_ids: list[str] = []
            merged: dict[str, rules.MergeResult] = {}
            for tid in sorted(pending):
                old = existing.get(tid)
                result = rules.merge(old, groups[tid], self._threshold)
                merged[tid] = result
                if result.doc is None:
                    if old is not None:
                        self.cache.put(gen, tid, old)
                    continue
                result.doc["updated_at"] = datetime.now(UTC)
                if old is None:
                    ops.append(InsertOne(to_stored(result.doc)))
                else:
                    ops.append(ReplaceOne({"_id": tid, "v": old.get("v", 0)}, to_stored(result.doc), upsert=True))
                op_ids.append(tid)
            failed: set[str] = set()
            if ops:
                try:
                    await col.bulk_write(ops, ordered=False)
                except BulkWriteError as exc:
                    for err in exc.details.get("writeErrors", []):
                        if err.get("code") != DUPLICATE_KEY:
                            raise
                        failed.add(op_ids[err["index"]])
            for tid, result in merged.items():
                if tid in failed:
                    self.cache.drop(gen, tid)
                    continue
                if result.doc is not None:
                    self.cache.put(gen, tid, result.doc)
                for event, outcome in result.outcomes:
                    report.outcomes[outcome] += 1
                    if outcome in ("applied", "corrected"):
                        report.visible.append(event)
            report.conflicts += len(failed)
            pending = failed
            must_read |= failed
            if pending and attempt:
                await asyncio.sleep(0.01 * attempt)
        if pending:
            raise RuntimeError(f"{len(pending)} trajectories kept conflicting; the batch will be retried")
        return report

    async def apply_deterioration(self, gen: str, events: Sequence[AllianceDeterioration]) -> int:
        """Record raised alerts (keyed by alert id: a redelivery changes nothing). One bulk write."""
        if not events:
            return 0
        ops = [UpdateOne({"_id": e.alert_id},
                         {"$set": rules.alert_fields(e), "$setOnInsert": {"acknowledged": False}}, upsert=True)
               for e in events]
        await self.alerts(gen).bulk_write(ops, ordered=False)
        return len(ops)

    async def apply_alert_status(self, gen: str, events: Sequence[AlertStatusChanged]) -> int:
        """Record what happened to alerts; may arrive before the alert itself. One bulk write.

        Every update is a monotone fact (a flag turning true, the earliest time per status), so
        the order of arrival does not matter.
        """
        if not events:
            return 0
        ops = []
        for e in events:
            update: Document = {
                "$set": {"tenant_id": e.tenant_id, "site_id": e.site_id, "clinician_id": e.clinician_id},
                "$min": {f"status_at.{e.status}": e.occurred_at},
                "$setOnInsert": {"raised": False},
            }
            if e.status == "acknowledged":
                update["$set"]["acknowledged"] = True
            else:
                update["$setOnInsert"]["acknowledged"] = False
            ops.append(UpdateOne({"_id": e.alert_id, "tenant_id": e.tenant_id}, update, upsert=True))
        await self.alerts(gen).bulk_write(ops, ordered=False)
        return len(ops)

    # ------------------------------------------------------------------ reads

    @staticmethod
    def _scope(tenant_id: str, site_id: str | None) -> Document:
        q: Document = {"tenant_id": tenant_id}
        if site_id is not None:
            q["site_id"] = site_id
        return q

    async def trajectory(self, gen: str, tenant_id: str, client_id: str, instrument: str,
                         episode_id: str | None = None, site_id: str | None = None) -> Document | None:
        """The trajectory of a client and instrument (its most recent episode unless one is named)."""
        q = {**self._scope(tenant_id, None), "client_id": client_id, "instrument": instrument}
        if episode_id is not None:
            q["episode_id"] = episode_id
        if site_id is not None:
            q["site_id"] = site_id
        docs = await self.trajectories(gen).find(q).sort([("latest_administered_at", DESCENDING)]).limit(1).to_list()
        return from_stored(docs[0]) if docs else None

    async def alerts_for(self, gen: str, tenant_id: str, trajectory_ids: Sequence[str]) -> dict[str, list[Document]]:
        """Alerts of some trajectories, grouped by trajectory id (one query)."""
        out: dict[str, list[Document]] = {t: [] for t in trajectory_ids}
        if not trajectory_ids:
            return out
        cursor = self.alerts(gen).find({"tenant_id": tenant_id, "trajectory_id": {"$in": list(trajectory_ids)}})
        async for a in cursor:
            out.setdefault(a["trajectory_id"], []).append(a)
        return out

    async def caseload(self, gen: str, tenant_id: str, clinician_id: str, site_id: str | None,
                       after: str | None, limit: int) -> list[Document]:
        """One page (limit + 1 to tell whether more follow) of a clinician's trajectories, at-risk first."""
        q: Document = {"tenant_id": tenant_id, "clinician_id": clinician_id}
        if after is not None:
            q["caseload_key"] = {"$gt": after}
        if site_id is not None:
            q["site_id"] = site_id
        docs = await self.trajectories(gen).find(q).sort([("caseload_key", ASCENDING)]).limit(limit + 1).to_list()
        return [from_stored(d) for d in docs]

    async def summary(self, gen: str, tenant_id: str, site_id: str | None) -> Document | None:
        """The PCOMS summary of a tenant or site; None when the scope has no data at all."""
        scope = self._scope(tenant_id, site_id)
        col = self.trajectories(gen)
        pipeline: list[Document] = [
            {"$match": scope},
            {"$group": {
                "_id": "$instrument",
                "trajectories": {"$sum": 1},
                "sessions": {"$sum": "$session_count"},
                "below": {"$sum": "$sessions_below_cutoff"},
                "first": {"$sum": "$first_total"},
                "latest": {"$sum": "$latest_total"},
                "at_risk": {"$sum": {"$cond": ["$at_risk", 1, 0]}},
            }},
        ]
        rows = await (await col.aggregate(pipeline)).to_list()
        totals = [rules.GroupTotals(r["_id"], int(r["trajectories"]), int(r["sessions"]), int(r["below"]),
                                    float(r["first"]), float(r["latest"]), int(r["at_risk"])) for r in rows]
        alerts = self.alerts(gen)
        raised = await alerts.count_documents({**scope, "raised": True})
        acknowledged = await alerts.count_documents({**scope, "acknowledged": True})
        if not totals and not raised and not acknowledged:
            return None
        # Distinct client counts: `distinct` is linear in the store in use, where $addToSet in a
        # $group is not. One call per scope, plus one per instrument and band only when a scope
        # mixes them (a client may use two instruments; the counts are of distinct clients).
        clients = len(await col.distinct("client_id", scope))
        at_risk = len(await col.distinct("client_id", {**scope, "at_risk": True}))
        present = [t.key for t in totals]
        by_instrument: dict[str, int] = {}
        for inst in present:
            by_instrument[inst] = clients if len(present) == 1 else len(
                await col.distinct("client_id", {**scope, "instrument": inst}))
        by_band: dict[str, int] = {}
        for band in {rules.age_band(i) for i in present}:
            members = [i for i in present if rules.age_band(i) == band]
            if len(members) == len(present):
                by_band[band] = clients
            elif len(members) == 1:
                by_band[band] = by_instrument[members[0]]
            else:
                by_band[band] = len(await col.distinct("client_id", {**scope, "instrument": {"$in": members}}))
        return rules.summarize(totals, clients, at_risk, by_instrument, by_band, raised, acknowledged)

