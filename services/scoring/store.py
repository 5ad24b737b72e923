"""Scoring's own collections: per-client state (`scoring_state`) and tenant rules (`scoring_rules`).

One state document per (tenant, client), holding everything `series.ClientState` keeps: every
accepted version of every submission (all instruments, SRS and ORS families, and episodes: episodes are derived across
them, and the client's owning site is one per client), the rejections, and what was published
per session slot and per alert. A batch reads all its documents with one `find` and writes them
back with one unordered `bulk_write` guarded by a version number: a client read at version 0
(new) is an insert, any other a replace-upsert filtered on `{_id, v: <version read>}`. If another
process wrote the document in between, the insert or the upsert collides with the existing `_id`
(E11000) and that document is reported as a conflict instead of being overwritten.

`StateCache` keeps the clients a process has written, so a batch reads from the store only the
clients it has not seen; the version check makes a stale cache entry harmless (see its docs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from typing import Any, Protocol, TypeVar

from pymongo import InsertOne, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from services.scoring.rules import TenantRules
from services.scoring.series import (
    AlertRecord,
    AlertView,
    AnyView,
    ClientState,
    Handover,
    Moved,
    Origin,
    OutcomeView,
    Published,
    Refusal,
    Rejection,
    SessionView,
    Version,
    is_outcome_key,
    record_key,
    submission_of,
)
from shared import ids
from shared.events import Lifecycle, Severity
from shared.mongo import Document, LruCache, TtlCache, bulk_write, write_versioned

log = logging.getLogger("alliance.scoring.store")

_T = TypeVar("_T")

STATES = "scoring_state"
RULES = "scoring_rules"


@dataclass(frozen=True)
class ClientKey:
    """Whose record a submission belongs to; one state document each."""

    tenant_id: str
    client_id: str

    @cached_property  # a JSON encoding, asked for several times per record: kept once made
    def doc_id(self) -> str:
        return ids.store_key(self.tenant_id, self.client_id)


def _iso(dt: datetime) -> str:
    # Kept as text: BSON dates keep milliseconds only, and a re-emitted event must be byte-equal.
    return dt.isoformat()


def _dt(s: str) -> datetime:
    return datetime.fromisoformat(s)


def _version_doc(v: Version) -> Document:
    """Short field names: the document is read and written on every batch. Built once per version
    (versions are immutable and every save writes them all) and never mutated."""
    doc = v.__dict__.get("_doc")
    if doc is None:
        doc = v.__dict__["_doc"] = _new_version_doc(v)
    return doc


def _new_version_doc(v: Version) -> Document:
    doc: Document = {"sid": v.submission_id, "i": v.instrument, "e": v.episode_id, "n": v.session_number,
                     "at": _iso(v.administered_at), "s": v.site_id, "c": v.clinician_id,
                     "it": list(v.items) if v.items is not None else None, "t": v.total, "acc": _iso(v.accepted_at),
                     "d": v.digest}
    if v.client_age is not None:  # ORS family only; absent, SRS documents stay as they were
        doc["ag"] = v.client_age
    if v.origin is not None:  # corrected submissions only; absent, the version is its own first
        doc["og"] = _origin_doc(v.origin)
    return doc


def _origin_doc(o: Origin) -> Document:
    return {"acc": _iso(o.accepted_at), "d": o.digest, "at": _iso(o.administered_at), "i": o.instrument,
            "n": o.session_number, "ed": o.derived}


def _origin_from(o: Document | None) -> Origin | None:
    return None if o is None else Origin(_dt(o["acc"]), o["d"], _dt(o["at"]), o["i"], int(o["n"]), bool(o["ed"]))


def _version_from(d: Document) -> Version:
    items = d.get("it")
    age = d.get("ag")
    o = d.get("og")
    return Version(d["sid"], d["i"], d.get("e"), int(d["n"]), _dt(d["at"]), d["s"], d["c"],
                   (items[0], items[1], items[2], items[3]) if items is not None else None, d.get("t"),
                   _dt(d["acc"]), d["d"], None if age is None else int(age), _origin_from(o))


def _split(keyed: dict[str, _T]) -> tuple[dict[str, _T], dict[str, _T]]:
    """A map keyed by record key as (alliance entries, outcome entries), both by submission id."""
    alliance: dict[str, _T] = {}
    outcome: dict[str, _T] = {}
    for key, value in keyed.items():
        (outcome if is_outcome_key(key) else alliance)[submission_of(key)] = value
    return alliance, outcome


def state_doc(key: ClientKey, st: ClientState, version: int) -> Document:
    """The stored form of a client's state. Submissions are stored by their id; the scale of one is
    its instrument's (versions; published slots name theirs), a refused outcome submission is
    marked `o`, and the outcome half of the per-submission maps is stored apart (`sro`, `rso`),
    only when it holds something: the documents of SRS-only clients are what they always were."""
    revisions, outcome_revisions = _split(st.submission_revision)
    resent, outcome_resent = _split(st.resent)
    return {
        "tenant_id": key.tenant_id, "client_id": key.client_id, "v": version, "updated_at": datetime.now(UTC),
        "owner": st.owner, "sv": st.site_version, "tx": list(st.transfers),
        "subs": [_version_doc(v) for v in st.versions.values()],
        "rej": [{"sid": submission_of(k), "acc": _iso(r.accepted_at), "d": r.digest, "r": r.reason, "x": r.detail,
                 **({"o": True} if is_outcome_key(k) else {}),
                 # The content of a site_conflict refusal a transfer may re-judge (at most
                 # series.MAX_KEPT_REFUSALS per client); absent, the refusal is final.
                 **({"v": _version_doc(r.version)} if r.version is not None else {}),
                 # A transfer's re-judging (series.Rejection.judgement); absent, the refusal when read.
                 **({"j": r.judgement} if r.judgement else {})}
                for k, r in st.rejected.items()],
        "pub": [{"k": slot, "r": p.revision, "sid": submission_of(p.submission_id), "d": p.digest, "at": _iso(p.at),
                 "sup": None if p.supersedes is None else submission_of(p.supersedes), "l": p.latest,
                 "vac": p.vacant} for slot, p in st.published.items()],
        "sr": revisions,
        **({"sro": outcome_revisions} if outcome_revisions else {}),
        "al": [{"id": aid, "r": a.revision, "st": a.state, "d": a.digest, "at": _iso(a.at), "s": a.site_id,
                "c": a.clinician_id, "i": a.instrument, "e": a.episode_id, "n": a.session_number, "k": a.slot,
                # The raise time of an ended alert, only when kept (documents written before it stay as they were).
                **({"ra": _iso(a.raised_at)} if a.raised_at is not None else {}),
                # The raise itself, kept with a withdrawn end only.
                **({"rv": _raised_doc(a.raised)} if a.raised is not None else {})}
               for aid, a in st.alerts.items()],
        # Only when there is one (documents written before it existed stay as they were).
        **({"rs": {sid: _iso(at) for sid, at in resent.items()}} if resent else {}),
        **({"rso": {sid: _iso(at) for sid, at in outcome_resent.items()}} if outcome_resent else {}),
        # Sessions that moved to another client, and submissions first held by another (docs/
        # clinical-records.md); keyed by record key. Only when there are some.
        **({"mv": [_moved_doc(k, m) for k, m in st.moved.items()]} if st.moved else {}),
        **({"fx": sorted(st.foreign)} if st.foreign else {}),
        # The ownership timeline (series.Handover), once a transfer changed the site.
        **({"ho": [{"at": _iso(h.accepted_at), "f": h.from_site, "t": h.to_site, "id": h.event_id,
                    **({"k": list(h.taken)} if h.taken else {}),
                    **({"rf": [_refusal_doc(r) for r in h.refused]} if h.refused else {})}
                   for h in st.handovers]} if st.handovers else {}),
        # The transfers applied from their copy on ors.submitted.v1 (ClientState.outcome_copies).
        **({"txo": list(st.outcome_copies)} if st.outcome_copies else {}),
    }


def _refusal_doc(r: Refusal) -> Document:
    """A refusal a transfer's re-judging decided (series.Refusal): the version, its reason and when."""
    rej = r.rejection
    return {"v": _version_doc(r.version), "r": rej.reason, "x": rej.detail, "j": rej.judgement, "at": _iso(r.at)}


def _refusal_from(d: Document) -> Refusal:
    v = _version_from(d["v"])
    return Refusal(v, Rejection(v.accepted_at, v.digest, d["r"], d["x"], None, int(d["j"])), _dt(d["at"]))


def _moved_doc(key: str, m: Moved) -> Document:
    doc: Document = {"k": key, "acc": _iso(m.accepted_at), "d": m.digest, "to": m.to_client,
                     "v": None if m.shown is None else _version_doc(m.shown), "e": m.episode_id,
                     "ed": m.episode_derived, "r": m.revision, "at": None if m.at is None else _iso(m.at)}
    if m.first is not None:  # only when the record saw a version it did not show (else `v` names it)
        doc["og"] = _origin_doc(m.first)
    return doc


def _moved_from(d: Document) -> Moved:
    shown, at = d.get("v"), d.get("at")
    return Moved(_dt(d["acc"]), d["d"], d["to"], None if shown is None else _version_from(shown), d.get("e") or "",
                 bool(d.get("ed")), int(d.get("r") or 0), None if at is None else _dt(at), _origin_from(d.get("og")))


def _raised_doc(a: AlertView) -> Document:
    """A withdrawn alert's last raise (`AlertRecord.raised`): its session's version and every value
    of its session view by the view's own field names (a few records hold one: withdrawn alerts
    only), its triggers, severity and `outcome_at_risk`; its id and site are the record's. A field
    added to a session view later needs a default in `_raised_from` for the raises stored before."""
    s = a.session
    view = {f.name: _plain(getattr(s, f.name)) for f in fields(s) if f.name != "version"}
    return {"v": _version_doc(s.version), "o": isinstance(s, OutcomeView), "sv": view, "tr": list(a.triggers),
            "sev": str(a.severity), "ar": a.outcome_at_risk}


def _plain(value: object) -> object:
    """A value of a session view as the document holds it: a tuple as a list, a severity as its text."""
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, Severity) else value


def _raised_from(d: Document, alert_id: str, site_id: str) -> AlertView:
    kind: type[SessionView] | type[OutcomeView] = OutcomeView if d["o"] else SessionView
    values: dict[str, Any] = {}
    for f in fields(kind):
        if f.name == "version":
            continue
        value = d["sv"][f.name]
        if isinstance(value, list):
            value = tuple(value)
        elif f.name == "severity" and value is not None:
            value = Severity(value)
        values[f.name] = value
    session: AnyView = kind(version=_version_from(d["v"]), **values)
    return AlertView(alert_id, session, tuple(d["tr"]), Severity(d["sev"]), site_id, bool(d["ar"]))


def _slot_instrument(slot: str) -> str:
    """The instrument of a published slot (`series.slot_key`: instrument first)."""
    return slot.split("\x1f", 1)[0]


def state_from(key: ClientKey, doc: Document) -> ClientState:
    st = ClientState(key.tenant_id, key.client_id, owner=doc.get("owner"), site_version=int(doc.get("sv", 0)),
                     transfers=list(doc.get("tx", ())), version=int(doc.get("v", 0)))
    for d in doc.get("subs", ()):
        v = _version_from(d)
        st.versions[v.key] = v
    for r in doc.get("rej", ()):
        kept = r.get("v")
        st.rejected[record_key(r["sid"], "ORS") if r.get("o") else r["sid"]] = Rejection(
            _dt(r["acc"]), r["d"], r["r"], r["x"], None if kept is None else _version_from(kept), int(r.get("j", 0)))
    outcome_named: set[str] = set()  # ids an outcome version or slot names (for documents written before)
    for p in doc.get("pub", ()):
        instrument = _slot_instrument(p["k"])
        sup = p.get("sup")
        st.published[p["k"]] = Published(int(p["r"]), record_key(p["sid"], instrument), p["d"], _dt(p["at"]),
                                         None if sup is None else record_key(sup, instrument),
                                         bool(p.get("l")), bool(p.get("vac")))
        if is_outcome_key(st.published[p["k"]].submission_id):
            outcome_named.update(s for s in (p["sid"], sup) if s is not None)
    outcome_named.update(v.submission_id for k, v in st.versions.items() if is_outcome_key(k))
    revisions = {str(k): int(v) for k, v in (doc.get("sr") or {}).items()}
    st.submission_revision = dict(revisions)
    # Written before the scale was part of the key, an outcome submission's revision is under its id
    # alone (and no alliance submission has that id: ids were one per record then).
    outcome_revisions = {sid: n for sid, n in revisions.items() if sid in outcome_named and sid not in st.versions}
    for sid, n in (doc.get("sro") or {}).items():
        outcome_revisions[str(sid)] = max(int(n), outcome_revisions.get(str(sid), 0))
    for sid, n in outcome_revisions.items():
        st.submission_revision[record_key(sid, "ORS")] = n
    resent = {str(sid): _dt(at) for sid, at in (doc.get("rs") or {}).items()}
    for sid, at in resent.items():  # before the scale was part of the key: the scale of the version kept
        st.resent[sid if sid in st.versions else record_key(sid, "ORS")] = at
    for sid, at in (doc.get("rso") or {}).items():
        st.resent[record_key(str(sid), "ORS")] = _dt(at)
    st.moved = {str(d["k"]): _moved_from(d) for d in doc.get("mv", ())}
    st.foreign = {str(k) for k in doc.get("fx", ())}
    st.outcome_copies = [str(t) for t in doc.get("txo", ())]
    st.handovers = [Handover(_dt(h["at"]), h.get("f"), h["t"], h["id"], tuple(h.get("k") or ()),
                             tuple(_refusal_from(r) for r in h.get("rf", ())))
                    for h in doc.get("ho", ())]
    for a in doc.get("al", ()):
        raised = a.get("rv")
        st.alerts[a["id"]] = AlertRecord(int(a["r"]), Lifecycle(a["st"]), a["d"], _dt(a["at"]), a["s"], a["c"],
                                         a["i"], a["e"], int(a["n"]), a["k"], _dt(a["ra"]) if "ra" in a else None,
                                         None if raised is None else _raised_from(raised, a["id"], a["s"]))
    return st


class StatePort(Protocol):
    """Where series state lives: `StateStore` (MongoDB), `StateCache` in front of it, or a dict
    in unit tests."""

    async def load(self, keys: Iterable[ClientKey]) -> dict[ClientKey, ClientState]: ...

    async def save(self, changed: dict[ClientKey, ClientState]) -> set[ClientKey]: ...


class StateStore:
    """Reads series state with one query per batch, writes it with one bulk write per chunk."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._col = db[STATES]

    async def client_state(self, tenant_id: str, client_id: str) -> Document | None:
        """The stored state of one client (operators, tests)."""
        return await self._col.find_one({"_id": ClientKey(tenant_id, client_id).doc_id})

    async def load(self, keys: Iterable[ClientKey]) -> dict[ClientKey, ClientState]:
        """The stored state of `keys` (empty ones for clients never seen), in one query."""
        by_id = {k.doc_id: k for k in keys}
        out = {k: ClientState(k.tenant_id, k.client_id) for k in by_id.values()}
        if not by_id:
            return out
        async for doc in self._col.find({"_id": {"$in": list(by_id)}}):
            key = by_id[doc["_id"]]
            out[key] = state_from(key, doc)
        return out

    async def save(self, changed: dict[ClientKey, ClientState]) -> set[ClientKey]:
        """Write the clients' states in one bulk write; returns the ones another writer got to first.

        Written states get their version bumped in memory.
        """
        if not changed:
            return set()
        # Version 0 is a client never stored: an insert.
        conflicts = await write_versioned(self._col, [
            (k, {"_id": k.doc_id, **state_doc(k, h, h.version + 1)}, h.version if h.version else None)
            for k, h in changed.items()])
        for k in changed:
            if k not in conflicts:
                changed[k].version += 1
        return conflicts


def _weight(st: ClientState) -> int:
    """What a cached client costs, in submissions kept (each ~2 KB in memory with its view)."""
    return 1 + len(st.versions) + len(st.rejected)


class StateCache:
    """The clients this process wrote or read last, in front of a `StateStore` (LRU-bounded).

    Safe without invalidation on rebalances: an entry only ever holds a state that was in the
    store at some point. If another process has written the client since (the partition moved
    away and back), a submission applied to the stale entry cannot be published, because the
    write that must precede publishing is filtered on the stale version and conflicts; the
    conflict evicts the entry and the batch re-reads the store. A stale entry can also take a
    redelivered submission for a redelivery and re-emit what the entry shows; what it shows was
    published before, and the revisions the store holds since are greater, so consumers keep them.
    """

    def __init__(self, store: StatePort, max_sessions: int = 100_000) -> None:
        self._store = store
        # Bounded by what the entries hold, not by how many there are: one client may hold
        # thousands of submissions (see `_weight`).
        self._lru: LruCache[ClientKey, ClientState] = LruCache(max_sessions, weight=_weight)

    async def load(self, keys: Iterable[ClientKey]) -> dict[ClientKey, ClientState]:
        """Copies of the cached series; the others read from the store in one query."""
        out: dict[ClientKey, ClientState] = {}
        missing: list[ClientKey] = []
        for k in keys:
            hit = self._lru.get(k)
            if hit is None:
                missing.append(k)
            else:
                out[k] = hit.copy()
        if missing:
            loaded = await self._store.load(missing)
            for k, h in loaded.items():
                self._lru.put(k, h.copy())
            out.update(loaded)
        return out

    async def save(self, changed: dict[ClientKey, ClientState]) -> set[ClientKey]:
        """Write through; written series are remembered, conflicting ones forgotten."""
        try:
            conflicts = await self._store.save(changed)
        except BaseException:
            for k in changed:  # unknown outcome: read the store next time
                self._lru.pop(k)
            raise
        for k, h in changed.items():
            if k in conflicts:
                self._lru.pop(k)
            else:
                self._lru.put(k, h.copy())
        return conflicts

    @property
    def sessions(self) -> int:
        """What the entries hold, as `_weight` counts it."""
        return self._lru.held

    def __len__(self) -> int:
        return len(self._lru)


class RulesStore:
    """Tenant rules, cached in-process for `ttl_seconds` so a batch rarely reads them.

    A change made with `alliance tenants set-rules` applies within `ttl_seconds`.
    """

    def __init__(self, db: AsyncDatabase[Document], ttl_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._col = db[RULES]
        self._cache: TtlCache[str, TenantRules] = TtlCache(ttl_seconds, clock=clock)

    async def get_many(self, tenants: Iterable[str]) -> dict[str, TenantRules]:
        """Rules of each tenant (defaults when it has none); one query for the ones not cached."""
        wanted = set(tenants)
        out: dict[str, TenantRules] = {}
        for t in wanted:
            if (hit := self._cache.fresh(t)) is not None:
                out[t] = hit.value
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
                self._cache.put(t, rules)
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
        self._cache.pop(tenant)


# --- the tenant-wide index of submission ids (docs/clinical-records.md, "The same id for another
# client moves the session") ---------------------------------------------------------------------

INDEX = "scoring_submissions"


@dataclass(frozen=True)
class IndexKey:
    """A submission id on one scale of one tenant: one index document each."""

    tenant_id: str
    scale: str  # "alliance" | "outcome"
    submission_id: str

    @cached_property  # as ClientKey.doc_id
    def doc_id(self) -> str:
        return ids.submission_index_id(self.tenant_id, self.scale, self.submission_id)


@dataclass(frozen=True)
class Held:
    """What the index knows of a submission id: the first client that registered a version of it,
    and per client that did, the newest one's (accepted_at, digest). `v` counts the writes of
    the document (0: there is none), so that a write can be made conditional on what was read."""

    first: str | None = None
    held: dict[str, tuple[datetime, str]] = field(default_factory=dict)
    v: int = 0

    def with_versions(self, versions: dict[str, tuple[datetime, str]]) -> Held:
        """What the document holds after `versions` (client -> order) were registered on it."""
        held = dict(self.held)
        for c, order in versions.items():
            held[c] = max(held.get(c, order), order)
        return Held(self.first or _first_of(versions), held, self.v + 1)


def _first_of(versions: dict[str, tuple[datetime, str]]) -> str:
    """The first client of a new index document registered by several clients at once: the one
    with the oldest version (then the smallest id), so the choice never depends on arrival."""
    return min(versions.items(), key=lambda cv: (cv[1][0].astimezone(UTC), cv[1][1], cv[0]))[0]


class IndexPort(Protocol):
    """Where the index lives: `SubmissionIndex` (MongoDB) or `MemoryIndex`."""

    async def read(self, keys: Iterable[IndexKey]) -> dict[IndexKey, Held]:
        """What the index holds of `keys` (an empty `Held` for an id it does not know)."""
        ...

    async def register(self, versions: dict[tuple[IndexKey, str], tuple[datetime, str]],
                       seen: dict[IndexKey, Held]) -> dict[IndexKey, Held]:
        """Record each (key, client)'s accepted version unless a newer one is recorded (a max), the
        first client of a key being set once, by the write that creates its document; what the
        index holds of every key after it. `seen`: what `read` returned for these keys."""
        ...

    async def forget(self, clients: dict[IndexKey, dict[str, tuple[datetime, str]]]) -> None:
        """Remove each key's listed clients (client -> the version read of it) from the index,
        those of a key only if each still holds exactly that version (a client that registered a
        newer one since may hold the id now): `series.forgettable`, docs/clinical-records.md."""
        ...


def _order_text(accepted_at: datetime, digest: str) -> str:
    """Fixed-width UTC text then the digest, so that the store's `$max` on the text is the order."""
    return f"{accepted_at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}|{digest}"


def _order_from(text: str) -> tuple[datetime, str]:
    at, _, digest = text.partition("|")
    return datetime.strptime(at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC), digest


def _client_field(client_id: str) -> str:
    """A field name for a client (ids may hold '.', which a field path may not)."""
    return ids.derive("index-client", client_id).replace("-", "")


def _held_from(doc: Document) -> Held:
    return Held(doc.get("first"), {h["c"]: _order_from(h["o"]) for h in (doc.get("h") or {}).values()
                                   if h.get("c") is not None and h.get("o")}, int(doc.get("v") or 1))


class SubmissionIndex:
    """The index in `scoring_submissions`, one document per (tenant, scale, submission id).

    A batch costs one read of its ids and one bulk write: an insert for an id the read did not
    find, an update conditional on the document's write count `v` for one it did (the usual case
    is a new id: one insert). What the index holds after is then known without reading it again,
    unless another writer got there in between (an insert collides, or an update matches nothing):
    those ids are written unconditionally and read back."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._col = db[INDEX]

    async def read(self, keys: Iterable[IndexKey]) -> dict[IndexKey, Held]:
        by_id = {k.doc_id: k for k in keys}
        out = {k: Held() for k in by_id.values()}
        if by_id:
            async for doc in self._col.find({"_id": {"$in": list(by_id)}}):
                out[by_id[doc["_id"]]] = _held_from(doc)
        return out

    @staticmethod
    def _identity(k: IndexKey) -> Document:
        return {"tenant_id": k.tenant_id, "scale": k.scale, "submission_id": k.submission_id}

    @staticmethod
    def _fields(versions: dict[str, tuple[datetime, str]]) -> tuple[Document, Document]:
        """The `$set` (client ids) and `$max` (orders) of registering `versions` (client -> order)."""
        sets = {f"h.{_client_field(c)}.c": c for c in versions}
        maxes = {f"h.{_client_field(c)}.o": _order_text(*order) for c, order in versions.items()}
        return sets, maxes

    async def register(self, versions: dict[tuple[IndexKey, str], tuple[datetime, str]],
                       seen: dict[IndexKey, Held]) -> dict[IndexKey, Held]:
        by_key: dict[IndexKey, dict[str, tuple[datetime, str]]] = {}
        for (k, c), order in versions.items():
            by_key.setdefault(k, {})[c] = order
        keys = sorted(by_key, key=lambda k: k.doc_id)
        ops: list[InsertOne[Document] | UpdateOne] = []
        for k in keys:
            was = seen.get(k, Held())
            if not was.v:
                held = was.with_versions(by_key[k])
                ops.append(InsertOne({"_id": k.doc_id, **self._identity(k), "first": held.first, "v": 1, "h": {
                    _client_field(c): {"c": c, "o": _order_text(*o)} for c, o in by_key[k].items()}}))
            else:
                sets, maxes = self._fields(by_key[k])
                ops.append(UpdateOne({"_id": k.doc_id, "v": was.v}, {"$set": sets, "$max": maxes, "$inc": {"v": 1}}))
        written = await bulk_write(self._col, ops)
        updates = sum(1 for op in ops if isinstance(op, UpdateOne))
        raced = {keys[i] for i in written.duplicates}
        if written.modified < updates:  # which update matched nothing is not told: write them all again
            raced |= {k for k, op in zip(keys, ops, strict=True) if isinstance(op, UpdateOne)}
        out = {k: seen.get(k, Held()).with_versions(by_key[k]) for k in keys if k not in raced}
        if raced:
            again = []
            for k in sorted(raced, key=lambda k: k.doc_id):
                sets, maxes = self._fields(by_key[k])
                again.append(UpdateOne({"_id": k.doc_id}, {
                    "$setOnInsert": {**self._identity(k), "first": _first_of(by_key[k])}, "$set": sets,
                    "$max": maxes, "$inc": {"v": 1}}, upsert=True))
            for _ in range(2):  # two inserts of one new document: the loser's E11000 is run again (it exists now)
                result = await bulk_write(self._col, again)
                again = [again[i] for i in result.duplicates]
                if not again:
                    break
            out.update(await self.read(raced))
        return out

    async def register_stored(self, db: AsyncDatabase[Document], chunk: int = 500) -> int:
        """Register the version of every submission every stored client record holds (`alliance
        scoring index-submissions`, once after the upgrade that brought the index: records scored
        before it are not in it). Idempotent; sends no retraction: an id two clients already held
        is settled when a record of it is next applied. Returns how many (submission, client)
        pairs it registered."""
        done = 0
        pending: dict[tuple[IndexKey, str], tuple[datetime, str]] = {}
        async for doc in db[STATES].find({}, {"tenant_id": 1, "client_id": 1, "subs": 1, "rs": 1, "rso": 1}):
            st = state_from(ClientKey(doc["tenant_id"], doc["client_id"]), doc)
            for key in st.versions:
                order = st.newest(key)
                if order is not None:
                    scale = "outcome" if is_outcome_key(key) else "alliance"
                    pending[(IndexKey(st.tenant_id, scale, submission_of(key)), st.client_id)] = order
            if len(pending) >= chunk:
                await self.register(pending, await self.read({k for k, _ in pending}))
                done, pending = done + len(pending), {}
        if pending:
            await self.register(pending, await self.read({k for k, _ in pending}))
        return done + len(pending)

    async def forget(self, clients: dict[IndexKey, dict[str, tuple[datetime, str]]]) -> None:
        # One conditional update per document: when any of its clients registered another version
        # since, none of them is removed now (the next registration of the id decides again).
        await bulk_write(self._col, [UpdateOne(
            {"_id": k.doc_id, **{f"h.{_client_field(c)}.o": _order_text(*o) for c, o in sorted(gone.items())}},
            {"$unset": {f"h.{_client_field(c)}": "" for c in sorted(gone)}, "$inc": {"v": 1}})
            for k, gone in sorted(clients.items(), key=lambda kg: kg[0].doc_id) if gone])


class MemoryIndex:
    """The index in one process's memory (unit tests; a scoring handler without a store)."""

    def __init__(self) -> None:
        self.docs: dict[IndexKey, Held] = {}

    async def read(self, keys: Iterable[IndexKey]) -> dict[IndexKey, Held]:
        return {k: self.docs.get(k, Held()) for k in keys}

    async def register(self, versions: dict[tuple[IndexKey, str], tuple[datetime, str]],
                       seen: dict[IndexKey, Held]) -> dict[IndexKey, Held]:
        by_key: dict[IndexKey, dict[str, tuple[datetime, str]]] = {}
        for (k, c), order in versions.items():
            by_key.setdefault(k, {})[c] = order
        for k, regs in by_key.items():
            self.docs[k] = self.docs.get(k, Held()).with_versions(regs)
        return {k: self.docs[k] for k in by_key}

    async def forget(self, clients: dict[IndexKey, dict[str, tuple[datetime, str]]]) -> None:
        for k, gone in clients.items():
            was = self.docs.get(k)
            if gone and was is not None and all(was.held.get(c) == o for c, o in gone.items()):
                held = {c: o for c, o in was.held.items() if c not in gone}
                self.docs[k] = Held(was.first, held, was.v + 1)


@lru_cache(maxsize=65_536)  # one key per client while it is active: its `doc_id` made once
def client_key(tenant_id: str, client_id: str) -> ClientKey:
    """The record a submission belongs to."""
    return ClientKey(tenant_id, client_id)
