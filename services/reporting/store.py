"""MongoDB adapter of reporting: generations of read models, batch writes, and the API's queries.

Collections (all prefixed `reporting_`):

- `reporting_meta`: one document `{_id: "generation", active, building, previous, seq}` — the
  pointer the API reads (cached briefly) and the consumers write through. A rebuild writes a
  new generation next to the live one and flips `active` in one single-document update.
- `reporting_<gen>_clients`: one *record* per (tenant, client, instrument) holding every episode;
  its entries are a map keyed by submission id (see rules.py), packed as one JSON text; the
  query fields (owning site, clinician, current episode's figures) are top-level. Index: `_id`
  only (derived from tenant, client, instrument) — GET trajectory / fhir (one primary-key read,
  then the owning site is checked), the consumer's batch read and conditional replace, and the
  caseload's records once its directory has found them.
- `reporting_<gen>_client_directory` and `reporting_<gen>_outcome_directory`: the record
  directories, one small entry per alliance (outcome) record: `_id` the record's, its
  `tenant_id`, `clinician_id`, `caseload_key`, `site_id`, `instrument`, and `v`, the version of
  the record it was taken from (its guard: an older record write never overwrites a newer entry).
  Indexes, and the query each serves:
    * `(tenant_id, clinician_id, caseload_key)` (both) — GET caseload: equality on the clinician,
      then a range scan from the cursor in sort order (at-risk first), no in-memory sort; then the
      page's records by `_id` (`ReportingStore._directory_page`);
    * `(tenant_id, site_id, instrument)` (alliance) — a scope's records (summaries read the
      counters; kept for operators' scans of one site).
  Why apart: the local store maintains every secondary index on every document write, even when
  the indexed fields do not change (+0.15-0.4 ms per index and document written), and a record is
  rewritten by every session of its client, while its indexed fields change rarely (a new client,
  a transfer, a new clinician, `at_risk` turning, which changes `caseload_key`). An entry is
  written after its record, in the same ordered command as the batch's counters (last in it), and
  only when the record is new, its indexed fields changed, or it was read from the store rather
  than this process's cache (the repair of a crash between the two writes:
  `directory_entries` tells it step by step). One directory per record collection, not one for
  both: the caseload scans the alliance and the outcome records apart (see `caseload`), so each
  scan keeps the index it had, with no field to tell the two kinds apart. A generation from before
  the directories is upgraded by `ensure_indexes`; a rebuild's records are entered as they are
  written, so its directories are complete before the switch.
- `reporting_<gen>_alerts`: one document per alert id, merged from deterioration and alert
  status events (either may come first; every update is a max, see rules.py), and what it
  contributes to the monthly counters (`counted`, `cv`, `pending`: see `count_alerts`). Indexes:
    * `(tenant_id, record_id)` — the alert marks of one record or of a caseload page. (Alert
      counts come from the counters: no index per count.)
- `reporting_<gen>_outcomes` and `reporting_<gen>_outcome_alerts`: the outcome (ORS) half, the
  same shapes and merges as `clients` and `alerts`, apart so that caseloads and the alliance alert
  counts read exactly what they did. Outcome records are read by `_id` (beside the alliance
  record of the same client) and through their directory's `(tenant_id, clinician_id,
  caseload_key)` — the caseload's clients with no alliance record (see `caseload`; records
  written before they had a
  `caseload_key` are listed after one `alliance reporting rebuild`); their alerts by
  `(tenant_id, record_id)`. An outcome record moves
  the counters as an alliance record does (`pending`, markers), into the current bucket of its
  outcome instrument, with its own fields (`rules.outcome_contribution`: the outcome indices).
- `reporting_submissions` (not per generation: a rebuild does not replay the dead-letter topic):
  one document per (tenant, scale, submission id) with the parts `scored`, `superseded` and `rejected`
  (see rules.py). Index: `_id` only — GET /v1/submissions/{id}, and every write.
- `reporting_rejections`: the rejections page's listing, one document per status document with a
  `rejected` part: its `_id` and `tenant_id`, and the part's `site_id`, `sort` and `key` (the key
  guards the listing as it guards the part). Indexes: `(tenant_id, sort)` and
  `(tenant_id, site_id, sort)` — the rejections page of a tenant or a site (then its status
  documents by `_id`). Apart because the local store maintains every secondary index on every
  write of a document, sparse or not, whether or not the indexed fields are there or changed:
  the two indexes on the status documents cost every scored submission's write (2.03 against
  1.17 ms of store time per status document at `alliance bench --burst 0`), and only the rare
  rejected ones need them. A part and its listing are written in one ordered command, the part
  first (`SubmissionStore._write`); status documents from before the listing are listed, and the
  old indexes dropped, at the first `ensure_indexes` (`SubmissionStore._migrate`) A scored batch's
  status writes go last in the command of its counters (`Ride`: one command fewer per batch),
  or apart after it when that command did not take them.

Concurrency: a batch takes the records it touches from a write-through cache (or one `find` of
the misses; a new client's first session is not looked for: it is inserted, and read only if the
insert finds the record there), merges in Python (pure rules), and writes them in ONE unordered `bulk_write`:
inserts for new records, replaces conditioned on the version merged from (`{_id, v}` with
upsert) for known ones. A concurrent writer (two consumers around a rebalance; the live consumer
and a rebuild both filling a new generation) makes the condition miss; the upsert (or insert)
then hits the unique `_id` and fails with E11000 for that document only, and just those
records are re-read and re-merged. Because the merge is a commutative max, the retry converges
to the same result whoever wins. (Filters are `_id`-led so the store uses its primary-key path.)
Size: a record holds every session of its client on one instrument, so it is the document that
grows without bound. Before a write its encoded size is compared with `max_record_bytes`
(ALLIANCE_REPORTING_MAX_RECORD_BYTES, 15 MiB by default, below MongoDB's 16 MiB): a merge that
would pass it is not written, and the batch's events that would have changed that record come
back as *refused* (the handler dead-letters them as `record_too_large`); the record keeps what
it had and every other record of the batch is written. So no client's history can stall its
partition; should a write still be refused by the store, `shared.kafka.subscribe_batch`
isolates and dead-letters the record that caused it.
Counters (`reporting_<gen>_counters`, one document per `(tenant, site, clinician, instrument)`
holding the current-episode fields top-level and the monthly ones under `mo.<YYYY-MM>`: the
buckets of rules.py, nested so that one record's moves touch one document): every
record write carries in `pending` the moves
`diff(contribution(old), contribution(new))` tagged with the record's new version `v`; after the
record bulk write, the moves of the records written are applied in ONE unordered bulk of `$inc`s,
each filtered on the counter's marker of the record (`marker`) being below `v` and setting it
to `v`.
What a crash leaves behind, step by step:
  1. before the record write: nothing; the batch is redelivered and merged again;
  2. after the record write, before (or during) the counter write: records at `v` whose moves
     are applied on none or some of their counters. The redelivered batch finds those records
     in the store (the process's cache is gone; a failed counter write also drops them from
     the cache), and every record read from the store has its `pending` applied before
     anything else is written — the markers skip the counters that took it already;
  3. after the counter write: everything is applied; the redelivery merges to "duplicate",
     re-applies the carried moves (markers: no-op) and writes nothing.
So moves of version `v` are on every counter before version `v + 1` of the record can be
written (a writer either applied them itself, or read the record and applied them), and a
marker never passes a version whose moves it has not taken. `pending` is never cleared (that
would cost a write); it is replaced with the next version. Index: `_id` only. Summaries, trends
and roll-up refreshes read every counter document of a scope (one per site, clinician and
instrument, whatever the number of clients; trends project the months asked), found through the
counter directory (`reporting_<gen>_counter_directory`): one small document per counter document
(`_id` the counter's, tenant_id, site_id, clinician_id, instrument), with the indexes
`(tenant, site)` and `(tenant, clinician)`; a read takes the scope's ids there, then the counters
by `_id` (`_scope_counters`), and `sites` is a distinct on it. Why apart: the local store
maintains every secondary index on every document write, even when the indexed fields do not
change (+0.15-0.4 ms per index and document written), and a counter document is rewritten by
every batch that touches its bucket, while its entry is written once, when the bucket first
appears (a new site, clinician or instrument of a tenant). Every path that creates a counter
lists it in the directory first (`apply_counters` explains the order and what a crash leaves; a
rebuild's `CounterTally.flush` does the same); a generation from before the directory is
upgraded by `ensure_indexes`.
A counter document's markers grow with the records that ever counted in it (a clinician's
caseload on one instrument).
Alerts count in the same counter documents (the monthly `alerts_raised`, `alerts_acknowledged`
and ack-delay histogram of rules.py, and all-time `alerts_raised` / `alerts_acknowledged` in the
current bucket for the summaries: `rules.alert_share`), with the same markers keyed by the alert
id, through a versioned `counted` contribution on each alert document (`ReportingStore.count_alerts`),
whose `pending` moves, like a record's, are never cleared (a reader applies them again: no-op).
Records and alerts written before counters existed carry no share: run `alliance reporting
rebuild` once.

Tenant roll-ups (`reporting_<gen>_rollups`, issue 15): a tenant's summary and trends read the
tenant's roll-up, ONE document holding the sum of all its counter documents (`cur.<instrument>`:
the current buckets per instrument; `mo.<YYYY-MM>`: every instrument's monthly buckets added;
`rollup_of`), instead of one counter document per site, clinician and instrument (at 2,000
clinicians, 2,000+ documents per read: 218 ms cold on the local store, growing with clinicians).
It is maintained *asynchronously from the counters*, not by the writers' `$inc`s:
- the writers' way would need the same exactly-once guard on the roll-up, a marker per record
  of the whole tenant in one document (200,000 at 200,000 clients: megabytes rewritten by every
  batch, past 16 MiB at about half a million records), or a transaction; every batch of every
  writer would also wait on that one document, and each record write would cost one more
  counter update (the rebuild's write rate);
- here a writer only bumps the tenant's change *stamp* (`s|<tenant>`: `$inc changed`) once per
  batch, after its counter write: both in ONE ordered command, the store's cross-collection
  `bulkWrite` (`_counters_then_stamps`: the counter updates first, the bumps last; a store
  without that command, or a command that stops early on a counter guard that missed, gets the
  two writes apart, the bump second: `_stamp`); a refresh (`refresh_rollups`: every
  ALLIANCE_REPORTING_ROLLUP_REFRESH_SECONDS in each consuming process, and by the rebuild before
  its switch) reads the stamp (`c0`), notes the time (`as_of`), sums every counter document of
  the tenant and writes the roll-up (`r|<tenant>`) with `rolled` = c0, guarded on the stored
  `rolled` being lower. A recomputation, not a delta: idempotent, and any number of refreshes in
  any order leave the newest.
What is served, and how stale: a roll-up is *up to date* when `rolled` >= the stamp's
`changed`: every counter write stamped before its refresh read the stamp was applied before the
refresh read the counters, so it holds them all. One that is not is served while its `as_of` is
less than ALLIANCE_REPORTING_ROLLUP_MAX_AGE_SECONDS old (default 15 s, the summary cache's
period); past that, or without a roll-up (a generation from before them, a tenant not refreshed
yet), the read sums the counters as before. So a tenant read is at most that old whether or not
a refresher runs, and `as_of` says up to when it counts every counter write (a summary or trend
from the counters has `as_of` now). A roll-up holds integer sums, so its summary and trends are
those of the counters it summed. Crashes: a refresh that dies leaves the previous roll-up, still
out of date; a writer that dies between its counter write and its stamp leaves an up-to-date
looking roll-up without that batch's moves until the batch is redelivered (its offsets were not
committed) and stamps again - the same window in which, before roll-ups, the records were ahead
of the counters (step 2 above). `verify` compares every up-to-date roll-up with the sum of what
the records say. Sites and clinicians keep reading their counters: a site's reads cost its own
clinicians (tens), not the network's, and stay exact.
A rebuild's replay skips all of this for its own writes (`CounterTally`): its records carry no
`pending`, its moves are summed in memory and written once per counter document (an insert,
then `$inc`s; no markers), and its alerts are held in memory, their events folded, and each
inserted once with its `counted` share (`HeldAlerts`). Live consumers writing the same generation
meanwhile use the markers as above; a dead rebuild's generation is never switched to.
Submission parts are written with the same trick: an update conditioned on the stored part's key
being lower (or absent), with upsert; E11000 means the document exists with a key at least as
high (the update is tried once more in case that document was created concurrently).
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import re
from array import array
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import bson
from pymongo import ASCENDING, InsertOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure, PyMongoError

from services.reporting import rules
from shared.events import (
    AlertStatusChanged,
    AllianceDeterioration,
    DeadLetter,
    OrsScored,
    OutcomeAlert,
    OutcomeAlertStatusChanged,
    SrsScored,
)
from shared.mongo import (
    VERSION_FIELD,
    ClientBulk,
    Document,
    LruCache,
    TtlCache,
    batches,
    bulk_write,
    drop_indexes,
    each_by_ids,
    find_by_ids,
    guarded_upserts,
    namespace_of,
    write_versioned,
)

log = logging.getLogger("alliance.reporting")

META = "reporting_meta"
POINTER_ID = "generation"
FIRST_GENERATION = "g1"
# `trajectories` (one document per episode) is the shape before records; dropped with its generation.
_GEN_COLLECTION = re.compile(
    r"^reporting_(g\d+)_(clients|trajectories|alerts|counters|counter_directory|outcomes|outcome_alerts|rollups|client_directory|outcome_directory)$")
SUBMISSIONS = "reporting_submissions"
REJECTIONS = "reporting_rejections"
# The listing's indexes (after `tenant_id`); the status documents carried them under these names
# before the listing (`SubmissionStore._migrate`).
_REJECTION_INDEXES = (("rejections", ("sort",)), ("site_rejections", ("site_id", "sort")))
_OLD_REJECTION_INDEXES = ("rejections", "site_rejections")
# Documents per write of a migration's backfill (`SubmissionStore._migrate`, `ReportingStore._backfill_directory`,
# `ReportingStore._backfill_record_directory`).
MIGRATION_BATCH = 1_000
MONGO_MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_RECORD_BYTES = 15 * 1024 * 1024


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


def clients_name(gen: str) -> str:
    return f"reporting_{gen}_clients"


def alerts_name(gen: str) -> str:
    return f"reporting_{gen}_alerts"


def counters_name(gen: str) -> str:
    return f"reporting_{gen}_counters"


def counter_directory_name(gen: str) -> str:
    return f"reporting_{gen}_counter_directory"


def outcomes_name(gen: str) -> str:
    return f"reporting_{gen}_outcomes"


def client_directory_name(gen: str) -> str:
    return f"reporting_{gen}_client_directory"


def outcome_directory_name(gen: str) -> str:
    return f"reporting_{gen}_outcome_directory"


def outcome_alerts_name(gen: str) -> str:
    return f"reporting_{gen}_outcome_alerts"


def rollups_name(gen: str) -> str:
    return f"reporting_{gen}_rollups"


def generation_collections(gen: str) -> tuple[str, ...]:
    """Every collection of one generation (what an abandoned rebuild drops)."""
    return (clients_name(gen), client_directory_name(gen), alerts_name(gen), counters_name(gen),
            counter_directory_name(gen), outcomes_name(gen), outcome_directory_name(gen), outcome_alerts_name(gen),
            rollups_name(gen))


PENDING = "pending"
COUNTED = "counted"  # on an alert document: the contribution the counters hold (see count_alerts)
COUNTED_VERSION = "cv"
SHARE = "_share"
MARKS = "m"
MONTHS = "mo"
_COUNTER_FIELDS = ("tenant_id", "site_id", "clinician_id", "instrument")
Bucket = tuple[str, str, str, str]  # (tenant, site, clinician, instrument): one counter document


def counter_place(key: rules.CounterKey) -> tuple[Bucket, str]:
    """(counter document, field prefix) of a bucket: a record's monthly buckets are nested in the
    document of its current one (`mo.<YYYY-MM>.<field>`), so one record's moves touch one document."""
    tenant, site, clinician, instrument, month = key
    return (tenant, site, clinician, instrument), (f"{MONTHS}.{month}." if month else "")


def marker(record_id: str) -> str:
    """The field of a counter document holding a record's applied version: 64 bits of the record
    id (short names cost the store less to match and set; a clash among the records of one
    clinician's caseload has odds of about n^2 / 2^65)."""
    return f"{MARKS}.{record_id.replace('-', '')[:16]}"


def counter_doc_id(bucket: Bucket) -> str:
    return rules.counter_id((*bucket, rules.CURRENT))


def directory_document(bucket: Bucket) -> Document:
    """The counter directory's entry of a counter document: its `_id` and the bucket's identity."""
    return {"_id": counter_doc_id(bucket), **dict(zip(_COUNTER_FIELDS, bucket, strict=True))}


async def list_counters(directory: AsyncCollection[Document], entries: Iterable[Document]) -> None:
    """Make sure the counter directory holds these entries (`directory_document`): one unordered
    bulk insert, an entry already there (E11000) left as it is (an entry never changes)."""
    await bulk_write(directory, [InsertOne(e) for e in entries])


def flat_counters(counters: rules.Counters) -> dict[Bucket, dict[str, int]]:
    """Counters as the documents hold them: per document, its fields by dotted name."""
    out: dict[Bucket, dict[str, int]] = {}
    for key, fields in counters.items():
        bucket, prefix = counter_place(key)
        held = out.setdefault(bucket, {})
        for name, n in fields.items():
            held[prefix + name] = held.get(prefix + name, 0) + n
    return out


def counter_document(bucket: Bucket, fields: dict[str, int]) -> Document:
    """A counter document holding `fields` (dotted names), without markers (a bulk load's)."""
    doc: Document = {"_id": counter_doc_id(bucket), **dict(zip(_COUNTER_FIELDS, bucket, strict=True)),
                     "age_band": rules.age_band(bucket[3])}
    for name, n in fields.items():
        *path, leaf = name.split(".")
        at = doc
        for part in path:
            at = at.setdefault(part, {})
        at[leaf] = n
    return doc


def month_rows(doc: Document) -> list[Document]:
    """The monthly buckets of a counter document, each as `{month, <fields>}`."""
    return [{"month": month, **fields} for month, fields in (doc.get(MONTHS) or {}).items()]


def pack_counters(version: int, counters: rules.Counters) -> str:
    """Counter moves (or a contribution) and the version they belong to, as one stored text (the
    store writes and skips a string faster than nested arrays)."""
    return json.dumps([int(version), [[*key, fields] for key, fields in sorted(counters.items())]],
                      separators=(",", ":"))


def unpack_counters(text: str | None) -> tuple[int, rules.Counters]:
    """(version, counters) of a `pack_counters` text; (0, {}) for none."""
    if not text:
        return 0, {}
    version, ops = json.loads(text)
    return int(version), {tuple(op[:5]): dict(op[5]) for op in ops}


def pending_of(doc: Document) -> tuple[int, rules.Counters] | None:
    """(version, counter moves) a record (or an alert) carries in `pending`; None when it carries none."""
    version, moves = unpack_counters(doc.get(PENDING))
    return (version, moves) if moves else None


def with_pending(doc: Document, old: Document | None,
                 groups: dict[str | None, list[Document]] | None = None) -> Document:
    """`doc` (a merge result) carrying the counter moves from `old`'s contribution to its own.

    The contribution is kept on the in-memory document (`SHARE`, never stored), so the next merge
    of a cached record does not compute its old share again."""
    was = old.get(SHARE) if old is not None else None
    if was is None:
        was = rules.contribution(old or {})
    doc[SHARE] = now = rules.contribution(doc, groups)
    doc[PENDING] = pack_counters(int(doc["v"]), rules.diff(was, now))
    return doc


def counter_values(doc: Document) -> dict[str, int]:
    """The counted fields of a counter document by dotted name (identity, markers and zeros left out)."""
    skip = {"_id", MARKS, MONTHS, "age_band", *_COUNTER_FIELDS}
    out = {k: int(v) for k, v in doc.items() if k not in skip and v}
    for row in month_rows(doc):
        out.update({f"{MONTHS}.{row['month']}.{k}": int(v) for k, v in row.items() if k != "month" and v})
    return out


# ------------------------------------------------------------------ tenant roll-ups (see the module docs)

STAMP_PREFIX, ROLLUP_PREFIX = "s|", "r|"
CHANGED, ROLLED, AS_OF, ROLLUP_CURRENT = "changed", "rolled", "as_of", "cur"
# What a roll-up sums of each counter document's current bucket (a summary's fields; the months are summed whole).
_ROLLED_FIELDS = (*rules.SUMMARY_FIELDS, *rules.SUMMARY_ALERT_FIELDS, *rules.OUTCOME_FIELDS)


def stamp_id(tenant_id: str) -> str:
    """The `_id` of a tenant's change stamp (`changed`: bumped after every counter write of the tenant)."""
    return STAMP_PREFIX + tenant_id


def rollup_id(tenant_id: str) -> str:
    """The `_id` of a tenant's roll-up document."""
    return ROLLUP_PREFIX + tenant_id


class RollupSum:
    """A roll-up being summed one counter document at a time (`rollup_of`): it holds the sums,
    never the documents (a tenant's counters are one document per site, clinician and
    instrument, each with its months: tens of MiB once read whole)."""

    def __init__(self) -> None:
        self.cur: dict[str, dict[str, int]] = {}
        self.months: dict[str, dict[str, int]] = {}

    def add(self, d: Document) -> None:
        held = self.cur.setdefault(str(d["instrument"]), {})
        for f in _ROLLED_FIELDS:
            if n := int(d.get(f) or 0):
                held[f] = held.get(f, 0) + n
        for month, fields in (d.get(MONTHS) or {}).items():
            at = self.months.setdefault(month, {})
            for f, n in fields.items():
                if n:
                    at[f] = at.get(f, 0) + int(n)

    def document(self) -> Document:
        """The sums as the roll-up document holds them (zeros left out)."""
        return {ROLLUP_CURRENT: {i: c for i, c in self.cur.items() if c},
                MONTHS: {m: {f: n for f, n in c.items() if n} for m, c in self.months.items() if any(c.values())}}


def rollup_of(counter_docs: Iterable[Document]) -> Document:
    """The sum of a tenant's counter documents as a roll-up holds it: `cur.<instrument>.<field>`
    (the current buckets per instrument, what a summary groups by) and `mo.<YYYY-MM>.<field>`
    (every instrument's monthly buckets added, what a trend point is); zeros left out. Integer
    sums in any grouping, so a summary or trend from these equals one from the documents."""
    total = RollupSum()
    for d in counter_docs:
        total.add(d)
    return total.document()


def rollup_values(doc: Document) -> dict[str, int]:
    """The summed fields of a roll-up by dotted name (what the checker compares)."""
    return {f"{part}.{group}.{f}": int(n) for part in (ROLLUP_CURRENT, MONTHS)
            for group, fields in (doc.get(part) or {}).items() for f, n in fields.items() if n}


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


Folded = dict[str, tuple[Bucket, dict[str, int], dict[str, int]]]
Shares = dict[tuple[str, Bucket], dict[str, int]]


def fold_moves(moves: Sequence[tuple[str, int, rules.Counters]]) -> tuple[Folded, Shares]:
    """Moves of (record or alert id, version, moves) folded per counter document: (counter id ->
    (bucket, summed `$inc`s, marker versions)), and each id's own share per bucket (for the
    one-by-one retry of a folded update that missed)."""
    folded: Folded = {}
    flat: Shares = {}
    for rid, version, counters in moves:
        for bucket, fields in flat_counters(counters).items():
            flat[(rid, bucket)] = fields
            _, incs, marks = folded.setdefault(counter_doc_id(bucket), (bucket, {}, {}))
            for name, n in fields.items():
                incs[name] = incs.get(name, 0) + n
            marks[rid] = version
    return folded, flat


def counter_update(cid: str, bucket: Bucket, incs: dict[str, int], marks: dict[str, int],
                   namespace: str | None = None) -> UpdateOne:
    """One counter document's guarded `$inc` (see `ReportingStore.apply_counters`)."""
    guard = {marker(rid): {"$not": {"$gte": v}} for rid, v in sorted(marks.items())}
    identity = dict(zip(_COUNTER_FIELDS, bucket, strict=True))
    return UpdateOne({"_id": cid, **guard},
                     {"$inc": incs, "$set": {marker(rid): v for rid, v in marks.items()},
                      "$setOnInsert": {**identity, "age_band": rules.age_band(bucket[3])}}, upsert=True,
                     namespace=namespace)


# What a tally holds per counter document besides its array (the array object, its dictionary
# entry and the bucket's tuple), to bound its memory (`CounterTally.held_bytes`).
TALLY_DOCUMENT_BYTES = 400


class CounterTally:
    """Counter moves a rebuild holds in memory, summed per counter document, then written ONCE per
    document (no markers) when flushed: an insert of the whole document the first time, a `$inc`
    after that.

    Held compactly so that a rebuild can hold all of them until its end: each field name gets a
    place (`_slots`, shared by every document: months x fields, a few hundred), and each document
    an array of 8-byte sums over those places (a few KB a document, where a dictionary of named
    fields took ~10 times that). Held that way, a network's moves take MiBs, and the replay writes
    each counter document once instead of once per flush (2,000 documents of a growing number of
    month fields rewritten every few tens of thousands of events).

    Only for a generation being rebuilt: its moves are neither carried in the documents' `pending`
    nor marked on the counters, so nothing else can apply them; live consumers writing the same
    generation meanwhile apply their own moves (diffs from what is stored) with markers, and `$inc`
    commutes, so the sum is the same in any order (an insert that finds the document created by a
    live consumer is made a `$inc`). Held moves are lost if the rebuild dies, but so is the
    generation: a failed rebuild drops it, and one killed is abandoned by the next (`--force`
    claims a new generation; `drop_unused` removes the old one).
    """

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}  # dotted field name -> its place in every document's array
        self._names: list[str] = []  # the reverse
        self._held: dict[Bucket, array[int]] = {}
        self._written: set[Bucket] = set()  # documents flushed before (one per site, clinician and instrument)
        self.held_bytes = 0  # what the held sums take, to bound the memory between flushes

    def add(self, counters: rules.Counters) -> None:
        for bucket, fields in flat_counters(counters).items():
            sums = self._held.get(bucket)
            if sums is None:
                sums = self._held[bucket] = array("q")
                self.held_bytes += TALLY_DOCUMENT_BYTES
            for name, n in fields.items():
                slot = self._slots.get(name)
                if slot is None:
                    slot = self._slots[name] = len(self._names)
                    self._names.append(name)
                if slot >= len(sums):
                    grow = slot + 1 - len(sums)
                    sums.frombytes(bytes(grow * sums.itemsize))
                    self.held_bytes += grow * sums.itemsize
                sums[slot] += n

    def tenants(self) -> set[str]:
        """The tenants whose counters are held."""
        return {bucket[0] for bucket in self._held}

    async def flush(self, col: AsyncCollection[Document], directory: AsyncCollection[Document]) -> int:
        """Write what is held (one write per counter document) and forget it; returns the documents written.

        The documents this tally has not written yet are listed in the counter `directory` first
        (`list_counters`; see `ReportingStore.apply_counters` for why before).

        A document this tally has not written yet is inserted whole (the store inserts several
        times faster than it upserts), even when its moves summed to nothing (it exists as it
        would after a `$inc`); one a live consumer created meanwhile refuses the insert on `_id`
        and takes the same moves as a `$inc`. Fields whose moves summed to zero are left out:
        a `$inc` of 0 changes nothing, and readers take a missing field as 0."""
        def inc(bucket: Bucket, incs: dict[str, int]) -> UpdateOne:
            identity = {**dict(zip(_COUNTER_FIELDS, bucket, strict=True)), "age_band": rules.age_band(bucket[3])}
            return UpdateOne({"_id": counter_doc_id(bucket)}, {"$inc": incs, "$setOnInsert": identity}, upsert=True)

        names = self._names
        held = sorted((bucket, {names[i]: n for i, n in enumerate(sums) if n}) for bucket, sums in self._held.items())
        self._held, self.held_bytes = {}, 0
        known = [inc(bucket, incs) for bucket, incs in held if bucket in self._written and incs]
        new = [(bucket, incs) for bucket, incs in held if bucket not in self._written]
        await list_counters(directory, (directory_document(bucket) for bucket, _ in new))
        inserted = await bulk_write(col, [InsertOne(counter_document(bucket, incs)) for bucket, incs in new])
        self._written.update(bucket for bucket, _ in new)
        ops = [*known, *(inc(*new[i]) for i in inserted.duplicates if new[i][1])]
        # A duplicate key here is only the race of two first upserts of one document: run once more.
        return inserted.inserted + await guarded_upserts(col, ops)


class HeldAlerts:
    """Alert documents a rebuild holds in memory, each as the ONE update its events make together
    (`rules.combine_updates`), written once: inserted whole and, for alliance alerts, counted in
    the same write (`counted` and `cv` 1 on the document, its share added to the tally) - when it
    is pushed out (the alerts touched last are held, `capacity` bytes of them) or at the end
    (`write_oldest`). Held pickled: half the memory of the dictionaries, so twice the alerts whose
    events fold before they are written.

    Only for a generation being rebuilt. When the insert finds the document there (a live
    consumer wrote the alert meanwhile, or this replay pushed it out before: its events far apart
    in the log), the update is applied as a live consumer applies its events (the operators
    commute), and the alert is counted as live consumers count (`ReportingStore.count_alerts`, read
    back, `cv` the guard), its moves going to the tally.
    """

    def __init__(self, store: ReportingStore, gen: str, *, outcome: bool, capacity: int,
                 tally: CounterTally | None = None) -> None:
        self.store, self.gen, self.outcome, self.capacity, self.tally = store, gen, outcome, capacity, tally
        self._held: OrderedDict[str, bytes] = OrderedDict()
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, alert_id: str, update: rules.AlertUpdate) -> None:
        """Fold one event's update into what is held for its alert (now the alert touched last)."""
        held = self._held.pop(alert_id, None)
        if held is not None:
            self.held_bytes -= len(held)
            update = rules.combine_updates(pickle.loads(held), update)
        self._held[alert_id] = packed = pickle.dumps(update, protocol=pickle.HIGHEST_PROTOCOL)
        self.held_bytes += len(packed)

    async def write_overflow(self) -> int:
        """Write the alerts touched least recently beyond `capacity`; returns the alerts written."""
        out: list[tuple[str, bytes]] = []
        while self.held_bytes > self.capacity and self._held:
            out.append(self._held.popitem(last=False))
            self.held_bytes -= len(out[-1][1])
        return await self._write(out)

    async def write_oldest(self, n: int) -> int:
        """Write the `n` alerts touched least recently (or all held, when fewer; the end of a
        replay writes them all a chunk at a time); returns the alerts written."""
        out = [self._held.popitem(last=False) for _ in range(min(n, len(self._held)))]
        self.held_bytes -= sum(len(packed) for _, packed in out)
        return await self._write(out)

    async def _write(self, packed: list[tuple[str, bytes]]) -> int:
        if not packed:
            return 0
        held: list[tuple[str, rules.AlertUpdate]] = [(alert_id, pickle.loads(p)) for alert_id, p in packed]
        col = self.store.outcome_alerts(self.gen) if self.outcome else self.store.alerts(self.gen)
        docs: list[Document] = []
        shares: list[rules.Counters] = []
        for alert_id, update in held:
            doc = rules.updated(None, update, alert_id)
            share = {} if self.outcome else rules.alert_share(doc)
            if share:  # as `count_alerts` counts it
                doc.update({COUNTED_VERSION: 1, COUNTED: pack_counters(0, share)})
            docs.append(doc)
            shares.append(share)
        written = await bulk_write(col, [InsertOne(d) for d in docs])
        there = set(written.duplicates)
        if self.tally is not None:
            for i, share in enumerate(shares):
                if i not in there:
                    self.tally.add(share)
        if there:
            again = [held[i] for i in sorted(there)]
            await bulk_write(col, [UpdateOne({"_id": alert_id, "tenant_id": update["$set"]["tenant_id"]}, update,
                                             upsert=True) for alert_id, update in again])
            if not self.outcome:
                await self.store.count_alerts(self.gen, [alert_id for alert_id, _ in again], self.tally)
        return len(held)


class Generations:
    """Reads and flips the generation pointer; the read is cached for `ttl` seconds.

    Callers that find the cache expired while a read is under way share that read (every read
    endpoint and the handlers ask for the pointer: when it expired, each of them read it again,
    twice the reads of the cache's period - issue 11). A flip (`ensure`, `begin_rebuild`,
    `switch`) starts a new epoch: a read begun before it is neither shared nor cached after it.
    """

    def __init__(self, db: AsyncDatabase[Document], ttl: float) -> None:
        self._db = db
        # One entry: the pointer document.
        self._cached: TtlCache[str, GenerationState] = TtlCache(ttl, max_entries=1)
        self._epoch = 0
        self._reading: tuple[int, asyncio.Task[GenerationState]] | None = None

    @property
    def ttl(self) -> float:
        return self._cached.ttl

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
        self._flipped()
        self._cached.put(POINTER_ID, state)
        return state

    def _flipped(self) -> None:
        """The pointer may have changed here: forget it, and leave reads under way unshared."""
        self._epoch += 1
        self._reading = None
        self._cached.clear()

    async def current(self) -> GenerationState:
        """The pointer, at most `ttl` seconds old (or as old as a read under way when the cache expired)."""
        if (hit := self._cached.fresh(POINTER_ID)) is not None:
            return hit.value
        if self._reading is None or self._reading[0] != self._epoch:
            self._reading = (self._epoch, asyncio.get_running_loop().create_task(self._read(self._epoch)))
        # Shielded: a caller given up on must not cancel the read others wait for.
        return await asyncio.shield(self._reading[1])

    async def _read(self, epoch: int) -> GenerationState:
        try:
            doc = await self._db[META].find_one({"_id": POINTER_ID})
            state = self._state(doc) if doc is not None else await self.ensure()
            if epoch == self._epoch:
                self._cached.put(POINTER_ID, state)
            return state
        finally:
            if self._reading is not None and self._reading[0] == epoch:
                self._reading = None

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
        self._flipped()
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
        self._flipped()
        return await self.current()

    async def abandon(self, new: str) -> None:
        """Give up a failed rebuild: free the slot (the live generation was never touched)."""
        await self._db[META].update_one({"_id": POINTER_ID, "building": new}, {"$set": {"building": None}})
        self._flipped()

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
class Ride:
    """Writes of another collection that join a scored batch's counter command when there is one
    (`ReportingStore.apply_counters`): the submissions' statuses (`SubmissionStore.ride`), so a
    batch makes one round trip to the store fewer. The local store spends ~0.6-1.2 ms of CPU per
    command whatever it holds (measured 2026-11-27 against a bare SecantusDB: updates of one
    small document per command 1.2-1.8 ms each, twelve per command 0.65 ms each), and every
    scored batch sent its statuses as a command of their own.

    `taken` is set when that command applied them all. Otherwise (no counter command in this batch:
    nothing moved, e.g. a redelivery; a guard that missed stopped the command; a store without
    the cross-collection command; a generation being rebuilt) they were not all applied, and
    their owner writes them apart, after the records: the writes are idempotent (each part
    guarded by its key), so what the stopped command did apply is not applied twice."""

    ops: Sequence[UpdateOne]
    taken: bool = False


@dataclass
class ApplyReport:
    """What one batch did to one generation."""

    outcomes: Counter[str] = field(default_factory=Counter)
    visible: list[rules.Scored] = field(default_factory=list)  # events whose session is now readable
    conflicts: int = 0
    # events that would have grown their record past `max_record_bytes`, with that size
    refused: list[tuple[rules.Scored, int]] = field(default_factory=list)


def to_stored(doc: Document) -> Document:
    """A record as written: entries packed into one text field (see rules.pack_entries)."""
    stored = {**doc, "entries": rules.pack_entries(doc["entries"])}
    stored.pop(SHARE, None)
    return stored


def from_stored(doc: Document) -> Document:
    """A record as read back, entries unpacked."""
    if isinstance(doc.get("entries"), str):
        doc["entries"] = rules.unpack_entries(doc["entries"])
    return doc


# The fields of a record its directory entry holds (`record_entry`): what the record directories
# index. A record write that changes none of them writes no entry (see `_apply_records`).
_RECORD_IDENTITY = ("tenant_id", "clinician_id", "caseload_key", "site_id", "instrument")


def record_identity(doc: Document) -> tuple[object, ...]:
    return tuple(doc.get(f) for f in _RECORD_IDENTITY)


def record_entry(doc: Document) -> Document:
    """A record's directory entry: its `_id`, indexed fields and version (`v`, the entry's guard)."""
    return {"_id": doc["_id"], **{f: doc.get(f) for f in _RECORD_IDENTITY},
            VERSION_FIELD: int(doc.get(VERSION_FIELD) or 0)}


def entry_op(entry: Document, namespace: str | None = None) -> UpdateOne:
    """The write of a directory entry when the stored one is of an older record version (or there
    is none): an older record write never overwrites a newer entry (E11000: `guarded_upserts`)."""
    return UpdateOne({"_id": entry["_id"], VERSION_FIELD: {"$not": {"$gte": entry[VERSION_FIELD]}}},
                     {"$set": {k: v for k, v in entry.items() if k != "_id"}}, upsert=True, namespace=namespace)


def directory_entries(existing: dict[str, Document], read: Collection[str],
                      writes: Sequence[tuple[str, Document, int | None]], failed: Collection[str]) -> list[Document]:
    """The directory entries one round of `ReportingStore._apply_records` writes, after its records:

    - a record written (not `failed`) that is new, or whose indexed fields (`_RECORD_IDENTITY`)
      differ from the version it was merged from: its new entry;
    - a record read from the store this round (`read`, not from this process's cache): the entry
      of the newest version the round has of it (the one written, or the one read when nothing
      was written), whether or not anything changed;
    - nothing else: a record from the cache written with the same indexed fields (the common
      case: a new session moves none of them; that is the saving) or not written at all.

    Why the records read from the store: that is how a crash between a record write and its
    entry write is repaired. What a crash leaves behind, step by step:

      1. before the record write: nothing; the batch is redelivered and merged again;
      2. after the record write, before (or during) its entry write: a record at `v` whose entry
         is older (or missing). The process's cache is gone (a failed entry or counter write also
         drops these records from it: `_apply_records`), so whoever takes the record next - the
         redelivery, whose merge finds the record already written and writes nothing, or any
         later batch, or another writer whose cached version is now stale and whose write fails
         and re-reads - reads it from the store and writes its entry, guarded by the version: an
         entry is never stale past the next batch that touches the record;
      3. after the entry write: both hold `v`; the redelivery's entry write is a no-op (E11000).

    Comparing against the record merged from would not do: in step 2 the redelivered batch merges
    to "duplicate" against the record already written and would skip the stale entry for good.
    Between 2 and the repair, the caseload lists the record where its entry says (`caseload`).
    """
    written = {rid for rid, _, _ in writes}
    out: list[Document] = []
    for rid, stored, _ in writes:
        old = existing.get(rid)
        if rid not in failed and (old is None or rid in read or record_identity(old) != record_identity(stored)):
            out.append(record_entry(stored))
    out.extend(record_entry(existing[rid]) for rid in sorted(read) if rid not in written)
    return out


async def enter_records(directory: AsyncCollection[Document] | None, entries: Sequence[Document]) -> None:
    """Write these record directory entries apart (one guarded bulk write: `entry_op`)."""
    if directory is not None and entries:
        await guarded_upserts(directory, [entry_op(e) for e in entries])


# (name, fields after `tenant_id`) of each generation collection's query indexes (see the module docs).
# The records' are on their directories (`reporting_<gen>_client_directory`, `_outcome_directory`);
# a generation from before them had these on the records themselves (`ReportingStore.ensure_indexes`).
_RECORD_INDEXES = (("caseload", ("clinician_id", "caseload_key")), ("by_site", ("site_id", "instrument")))
# The counters' scopes are looked up in their directory (`list_counters`), the counters themselves by `_id`.
_DIRECTORY_INDEXES = (("by_site", ("site_id",)), ("by_clinician", ("clinician_id",)))
_ALERT_INDEXES = (("by_record", ("record_id",)),)
# Outcome records are read by `_id` (beside their alliance record), and by caseload for the
# clients with no alliance record; their alerts by record.
_OUTCOME_INDEXES = (("caseload", ("clinician_id", "caseload_key")),)
_OUTCOME_ALERT_INDEXES = (("by_record", ("record_id",)),)


# What a cached record holds in memory (tracemalloc over merged records with their share and
# pending: 3.9 KB with 1 entry, 8.6 KB with 5, 76 KB with 60): about this much, plus this per entry.
RECORD_BASE_BYTES = 2_700
ENTRY_BYTES = 1_250
# Alerts whose applied `pending` a store remembers (an entry is an id and a version: ~1 MB in all).
APPLIED_ALERTS = 10_000
# Counter documents whose directory entry a store knows is written, per generation (an id: ~100 bytes).
LISTED_COUNTERS = 100_000
# Generations whose listed counters a store remembers: the ones consumers write (the active one and
# a rebuild's); a third means a rebuild switched, and the oldest is no longer written (then dropped).
LISTED_GENERATIONS = 2
def record_weight(doc: Document) -> int:
    """The memory a cached record takes, estimated from its number of entries (see above)."""
    return RECORD_BASE_BYTES + ENTRY_BYTES * len(doc.get("entries") or ())


class DocCache(LruCache[tuple[str, str], Document]):
    """Records this process wrote or read last, keyed by (generation, id); least recently used go first.

    Only an optimisation: every write is conditioned on the cached version, so a stale entry
    (another writer got there first) fails that one write, is dropped, and is re-read.
    """


class ReportingStore:
    """Batch writes and queries of the reporting read models."""

    def __init__(self, db: AsyncDatabase[Document], max_conflict_retries: int = 8, cache_entries: int = 0,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, cache_bytes: int | None = None,
                 rollup_max_age: float = 0.0) -> None:
        """`cache_bytes`, when given, bounds the record cache by the memory its records take
        (`record_weight`) instead of by `cache_entries`. `rollup_max_age`: how old (seconds) a
        tenant roll-up that misses counter writes may be and still be served (0: only an
        up-to-date one; see the module docs)."""
        self.db = db
        self.rollup_max_age = rollup_max_age
        self._retries = max_conflict_retries
        self.max_record_bytes = max_record_bytes
        self._indexed: set[str] = set()
        self._client_bulk = ClientBulk(db)  # `_counters_then_stamps`
        self.cache = DocCache(cache_entries) if cache_bytes is None else DocCache(cache_bytes, record_weight)
        # (generation, alert id) -> the `cv` whose `pending` this process applied (see `count_alerts`)
        self._applied: LruCache[tuple[str, str], int] = LruCache(APPLIED_ALERTS)
        # generation -> counter ids whose directory entry is written (see `apply_counters`)
        self._listed: LruCache[str, LruCache[str, bool]] = LruCache(LISTED_GENERATIONS)

    def clients(self, gen: str) -> AsyncCollection[Document]:
        return self.db[clients_name(gen)]

    def alerts(self, gen: str) -> AsyncCollection[Document]:
        return self.db[alerts_name(gen)]

    def counters(self, gen: str) -> AsyncCollection[Document]:
        return self.db[counters_name(gen)]

    def counter_directory(self, gen: str) -> AsyncCollection[Document]:
        return self.db[counter_directory_name(gen)]

    def outcomes(self, gen: str) -> AsyncCollection[Document]:
        return self.db[outcomes_name(gen)]

    def outcome_alerts(self, gen: str) -> AsyncCollection[Document]:
        return self.db[outcome_alerts_name(gen)]

    def client_directory(self, gen: str) -> AsyncCollection[Document]:
        return self.db[client_directory_name(gen)]

    def outcome_directory(self, gen: str) -> AsyncCollection[Document]:
        return self.db[outcome_directory_name(gen)]

    def _directory_of(self, gen: str, records: AsyncCollection[Document]) -> AsyncCollection[Document]:
        """The directory of a record collection (`clients` or `outcomes`) of `gen`."""
        return self.outcome_directory(gen) if records.name == outcomes_name(gen) else self.client_directory(gen)

    def rollups(self, gen: str) -> AsyncCollection[Document]:
        return self.db[rollups_name(gen)]

    def _records(self, gen: str, instrument: str) -> AsyncCollection[Document]:
        return self.outcomes(gen) if rules.is_outcome(instrument) else self.clients(gen)

    async def ensure_indexes(self, gen: str) -> None:
        """Create one generation's query indexes (idempotent; done once per process and generation).

        Writers need only `_id`; a rebuild creates these after its bulk load, before the switch
        (its counter directory is complete by then: every counter write lists its document first).

        A generation from before the counter directory has the scope indexes on its counters
        (`by_site`, `by_clinician`): it is upgraded here, once. Its directory is filled from the
        counter documents (`_backfill_directory`: one scan of the four identity fields), its
        indexes created, and then the two counter indexes dropped, `by_site` last: that drop marks
        the upgrade done. A crash (or a second process upgrading at the same time) before it
        repeats the backfill, which is idempotent; a counter created meanwhile is listed by its
        writer. Every reporting process must run this code before any of them does (they are
        upgraded together): one from before would create counters without their directory
        entries, which no query would find.

        A generation from before the record directories has the caseload index (and, on the
        alliance records, `by_site`) on its records: upgraded the same way, each record collection
        on its own. Its directory is filled from the records' identities (`_backfill_record_directory`,
        guarded by the record version: idempotent, and never over a newer entry a writer made
        meanwhile), its indexes created, then the record indexes dropped, `caseload` last (the mark
        that it is done). A reporting process from before, started after, would recreate the
        record indexes and write records without entries: a new client, or a moved one, would be
        missing from (or misplaced in) the caseload until the next start of a process of this
        version upgrades again.
        """
        if gen in self._indexed:
            return
        upgrade = "by_site" in await self.counters(gen).index_information()
        if upgrade:
            await self._backfill_directory(gen)
        # each record collection's old indexes, in the order they are dropped: `caseload` last
        records = ((self.clients(gen), ("by_site", "caseload")), (self.outcomes(gen), ("caseload",)))
        upgrades = [(col, old) for col, old in records if "caseload" in await col.index_information()]
        for col, _ in upgrades:
            await self._backfill_record_directory(gen, col)
        for col, indexes in ((self.client_directory(gen), _RECORD_INDEXES),
                             (self.counter_directory(gen), _DIRECTORY_INDEXES),
                             (self.alerts(gen), _ALERT_INDEXES), (self.outcome_directory(gen), _OUTCOME_INDEXES),
                             (self.outcome_alerts(gen), _OUTCOME_ALERT_INDEXES)):
            for name, fields in indexes:
                await col.create_index([("tenant_id", ASCENDING), *((f, ASCENDING) for f in fields)], name=name)
        if upgrade:
            await drop_indexes(self.counters(gen), ("by_clinician", "by_site"))
        for col, old in upgrades:
            await drop_indexes(col, old)
        self._indexed.add(gen)

    async def _backfill_record_directory(self, gen: str, records: AsyncCollection[Document]) -> None:
        """Enter every record of `records` in its directory (an upgrade: `ensure_indexes`), one
        guarded upsert per record (`entry_op`), `MIGRATION_BATCH` per write."""
        directory = self._directory_of(gen, records)
        async for batch in batches(records.find({}, dict.fromkeys((*_RECORD_IDENTITY, VERSION_FIELD), 1)),
                                   MIGRATION_BATCH):
            await guarded_upserts(directory, [entry_op(record_entry(d)) for d in batch])
        log.info("records of %s entered in %s; their indexes are dropped next", records.name, directory.name)

    async def _backfill_directory(self, gen: str) -> None:
        """List every counter document of `gen` in its directory (an upgrade: `ensure_indexes`),
        `MIGRATION_BATCH` entries per insert. The projection of a counter document on its identity
        is its directory entry."""
        async for batch in batches(self.counters(gen).find({}, dict.fromkeys(_COUNTER_FIELDS, 1)), MIGRATION_BATCH):
            await list_counters(self.counter_directory(gen), batch)

    async def _list(self, gen: str, buckets: Iterable[Bucket]) -> None:
        """List these buckets' counter documents in the directory of `gen` before they are written
        (see `apply_counters`), skipping those this process listed (or found listed) before."""
        listed = self._listed.get(gen)
        if listed is None:
            listed = LruCache(LISTED_COUNTERS)
            self._listed.put(gen, listed)
        new = {cid: b for b in buckets if listed.get(cid := counter_doc_id(b)) is None}
        if new:
            await list_counters(self.counter_directory(gen), map(directory_document, new.values()))
            for cid in new:
                listed.put(cid, True)

    # ------------------------------------------------------------------ writes

    async def apply_scored(self, gen: str, events: Sequence[SrsScored], *, fresh: bool = False,
                           tally: CounterTally | None = None, ride: Ride | None = None) -> ApplyReport:
        """Merge scored SRS-family events into their records (`_apply_records`), with their
        counter moves (and `ride` in their command: `Ride`)."""
        return await self._apply_records(gen, self.clients(gen), events, fresh=fresh, tally=tally, ride=ride)

    async def apply_outcomes(self, gen: str, events: Sequence[OrsScored], *, fresh: bool = False,
                             tally: CounterTally | None = None, ride: Ride | None = None) -> ApplyReport:
        """Merge scored ORS-family events into their outcome records (`reporting_<gen>_outcomes`):
        the same merge, writes, size cap and counter moves (their outcome indices,
        `rules.outcome_contribution`) as the alliance records."""
        return await self._apply_records(gen, self.outcomes(gen), events, fresh=fresh, tally=tally, ride=ride)

    async def _apply_records(self, gen: str, col: AsyncCollection[Document], events: Sequence[rules.Scored], *,
                             fresh: bool, tally: CounterTally | None = None, ride: Ride | None = None) -> ApplyReport:
        """Merge scored events into their records with one bulk write per round.

        Current documents come from the cache, else from one `find` of the misses; with `fresh`
        (a generation being rebuilt, where almost nothing exists yet), and for a record whose
        events are its client's first session (`rules.opens_record`: a new client), a miss is
        taken as absent and written as an insert — if it did exist, the insert fails on `_id`
        and that one record is read and merged again (nothing was written: a crash leaves what a
        crash before the write leaves). New records are inserts, known ones replaces
        conditioned on the version they were merged from. A record whose merge would encode to
        more than `max_record_bytes` is not written; the events that would have changed it come
        back in `report.refused`.

        With `tally` (a rebuild's generation, see `CounterTally`) the moves of the records written
        are added to it instead of carried in `pending` and applied: the rebuild writes them later,
        one `$inc` per counter document. Moves carried by records read from the store (another
        writer's) are still applied first, with their markers.
        """
        report = ApplyReport()
        groups = rules.group_by_record(events)
        pending = set(groups)
        must_read: set[str] = set()
        for attempt in range(self._retries + 1):
            if not pending:
                break
            existing: dict[str, Document] = {}
            read: set[str] = set()  # records read from the store this round: their entries are made good
            misses: list[str] = []
            for rid in pending:
                cached = None if rid in must_read else self.cache.get((gen, rid))
                if cached is not None:
                    existing[rid] = cached
                elif (fresh or rules.opens_record(groups[rid])) and rid not in must_read:
                    continue  # taken as absent: written as an insert, read and merged again on E11000
                else:
                    misses.append(rid)
            if misses:
                # A record read from the store may carry moves a writer never applied (it died
                # between the record write and the counter write): apply them first, before any
                # newer version of the record can be written (see the module docs).
                unsure: list[tuple[str, int, rules.Counters]] = []
                for d in await find_by_ids(col, misses):
                    existing[d["_id"]] = from_stored(d)
                    read.add(d["_id"])
                    if (carried := pending_of(d)) is not None:
                        unsure.append((d["_id"], *carried))
                await self.apply_counters(gen, unsure)
            writes: list[tuple[str, Document, int | None]] = []
            moves: dict[str, tuple[int, rules.Counters]] = {}
            merged: dict[str, rules.MergeResult] = {}
            for rid in sorted(pending):
                old = existing.get(rid)
                result = rules.merge(old, groups[rid])
                merged[rid] = result
                if result.doc is None:
                    if old is not None:
                        self.cache.put((gen, rid), old)
                    continue
                result.doc["updated_at"] = datetime.now(UTC)
                with_pending(result.doc, old, result.groups)
                if (carried := pending_of(result.doc)) is not None:
                    moves[rid] = carried
                stored = to_stored(result.doc)
                if tally is not None:
                    del stored[PENDING]  # held by the tally, applied by nobody else
                size = len(bson.encode(stored))
                if size > self.max_record_bytes:
                    # Not written: the record keeps what it has; the events that changed it are refused.
                    merged[rid] = rules.MergeResult(None, [(e, o) for e, o in result.outcomes
                                                           if o not in ("applied", "corrected")])
                    refused = [e for e, o in result.outcomes if o in ("applied", "corrected")]
                    report.refused.extend((e, size) for e in refused)
                    report.outcomes["refused"] += len(refused)
                    if old is not None:
                        self.cache.put((gen, rid), old)
                    continue
                writes.append((rid, stored, None if old is None else old.get("v", 0)))
            failed = await write_versioned(col, writes)
            written = [(rid, *moves[rid]) for rid, _, _ in writes if rid not in failed and rid in moves]
            entries = directory_entries(existing, read, writes, failed)
            try:
                if tally is not None:
                    for _, _, counters in written:
                        tally.add(counters)
                    await enter_records(self._directory_of(gen, col), entries)
                else:
                    await self.apply_counters(gen, written, entries=(self._directory_of(gen, col), entries),
                                              ride=ride if ride is not None and not ride.taken else None)
            except BaseException:
                # The records are written, their moves and entries maybe not: forget them here, so
                # that the retry reads them back and applies what they carry (and makes their
                # entries good). The same for the records read whose entries were to be made good.
                for rid in (*(rid for rid, _, _ in writes), *(e["_id"] for e in entries)):
                    self.cache.pop((gen, rid))
                raise
            for rid, result in merged.items():
                if rid in failed:
                    self.cache.pop((gen, rid))
                    continue
                if result.doc is not None:
                    self.cache.put((gen, rid), result.doc)
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
            raise RuntimeError(f"{len(pending)} records kept conflicting; the batch will be retried")
        return report

    async def apply_counters(self, gen: str, moves: Sequence[tuple[str, int, rules.Counters]], *,
                             documents: Sequence[tuple[AsyncCollection[Document], Document, Document]] = (),
                             entries: tuple[AsyncCollection[Document], Sequence[Document]] | None = None,
                             ride: Ride | None = None) -> int | None:
        """Apply records' counter moves, given as (record id, record version, moves), exactly once.

        Each counter document keeps, per record, the version whose moves it took last
        (`marker`: `m.` and 64 bits of the record id); an update is filtered on it being lower,
        so a repeat does nothing. The moves of one batch are folded into one update per counter document (the
        filter names every record in it) and sent as one unordered bulk write; a folded update
        whose filter misses (some record in it was applied already: a retry) is split and each
        record's share retried alone, where a miss really means "already applied". The counter
        updates and the stamps go as one command when the store takes it (`_counters_then_stamps`).

        `documents` (collection, filter, update): upserts of the documents that carry these moves
        (an alert's new `counted`), written in the same ordered command ahead of the counters.
        Returns None when that command did not apply everything: the caller then writes the
        documents and the counters apart (`_count_alert_docs`); without `documents`, never None.

        Before any of that, each counter document is listed in the generation's counter directory
        (`_list`: one insert of the entries this process has not listed yet, none at all once a
        tenant's buckets are known). Readers find a scope's counters there: the directory holds the
        scope indexes, which the store would otherwise maintain on every counter write although
        a counter's scope never changes. Directory BEFORE counter, never with or after it. What a
        crash leaves behind:

        - before or during the directory insert: some entries, no counter write; the batch is
          redelivered (or the record read back with its `pending`) and lists them again (E11000:
          left as they are);
        - after it, before (or during) the counter write: entries whose counter document may not
          exist yet. A reader finds the id and no document under it, which reads as zero - as the
          counter would have before its first move; a tenant's `sites` may name that site. The
          moves are applied by the redelivery (step 2 of the module docs), which creates the counter;
        - after the counter write: both exist.

        So a counter document is never without its entry, which would leave it out of every
        summary, trend and roll-up for good.

        `entries` (a record directory, entries): the directory entries of the records that carry
        these moves (`_apply_records`), written LAST in the same ordered command, after the stamps:
        one round trip for the batch's counters, stamps and entries. When that command does not
        apply everything (or is not taken), the counters and stamps are written apart, then the
        entries (`enter_records`); an entry is never written before its record, which is written
        before this call.

        `ride` (`Ride`: the batch's submission statuses) goes last in that command, after the
        entries, and is marked `taken` when the command applied everything; never written here
        otherwise (its owner writes it apart).
        """
        folded, flat = fold_moves(moves)
        directory, listed = entries or (None, ())
        if not folded and not documents:
            await enter_records(directory, listed)
            return 0
        ids = sorted(folded)
        await self._list(gen, (folded[cid][0] for cid in ids))
        tenants = {bucket[0] for bucket, _, _ in folded.values()}
        after = [entry_op(e, namespace_of(directory)) for e in listed] if directory is not None else []
        riding = list(ride.ops) if ride is not None else []
        together = await self._counters_then_stamps(
            gen, [*(UpdateOne(f, u, upsert=True, namespace=namespace_of(col)) for col, f, u in documents),
                  *(counter_update(cid, *folded[cid], namespace=namespace_of(self.counters(gen)))
                    for cid in ids)], tenants, [*after, *riding])
        if together is not None and ride is not None:
            ride.taken = True
        if together is not None or documents:
            return together  # None with `documents`: the caller writes them and then the counters apart
        written = await bulk_write(self.counters(gen), [counter_update(cid, *folded[cid]) for cid in ids])
        done = written.upserted + written.modified
        missed = [ids[i] for i in written.duplicates]
        if missed:
            alone: list[UpdateOne] = []
            for cid in missed:
                bucket, _, marks = folded[cid]
                alone.extend(counter_update(cid, bucket, flat[(rid, bucket)], {rid: v})
                             for rid, v in sorted(marks.items()))
            done += await guarded_upserts(self.counters(gen), alone)
        # After the counters, never before or with them: a refresh that read the stamp before
        # this bump may have missed these moves, and the bump marks its roll-up out of date.
        await self._stamp(gen, tenants)
        await enter_records(directory, listed)
        return done

    async def _stamp(self, gen: str, tenants: Collection[str]) -> None:
        """Bump the change stamp of tenants whose counters were just written (one bulk write)."""
        await guarded_upserts(self.rollups(gen), self._stamp_ops(tenants))

    @staticmethod
    def _stamp_ops(tenants: Collection[str], namespace: str | None = None) -> list[UpdateOne]:
        """Bumps of the change stamp of tenants whose counters were just written. Two first bumps
        of a tenant both upsert and one loses with E11000: `guarded_upserts` runs it once more, so
        no bump is lost."""
        return [UpdateOne({"_id": stamp_id(t)}, {"$inc": {CHANGED: 1}, "$setOnInsert": {"tenant_id": t}}, upsert=True,
                          namespace=namespace) for t in sorted(tenants)]

    async def _counters_then_stamps(self, gen: str, writes: Sequence[UpdateOne], tenants: Collection[str],
                                    after: Sequence[UpdateOne] = ()) -> int | None:
        """`writes` (counter updates; for alerts, first the alert documents that carry their
        moves), then the stamp bumps of their tenants, as ONE ordered command (the cross-collection
        `bulkWrite` of MongoDB 8.0+; SecantusDB has it): one round trip where two or three followed
        each other on every batch's critical path (issue 11), and the bumps still come after every
        counter update (ordered), as the roll-ups need (module docs). Returns the documents
        written, stamps not counted; None when the command did not apply everything - a guard
        that missed (a redelivery, a concurrent writer: E11000 stops an ordered command) or any
        other refusal - and the caller runs the separate writes, which repeat nothing already
        applied (markers, `cv`) and bump the stamps (a bump too many only costs one more
        refresh). A server without the command is remembered and never asked again (`ClientBulk`).
        A failure to reach the store raises, as the separate writes' would: the batch is retried.
        `after` (record directory entries and a `Ride`, `apply_counters`) go last, and are not
        counted either."""
        if not writes:
            return None
        stamps = self._stamp_ops(tenants, namespace_of(self.rollups(gen)))
        result = await self._client_bulk.ordered([*writes, *stamps, *after])
        if result is None:
            return None
        return max(0, result.upserted_count + result.modified_count - len(stamps) - len(after))

    async def refresh_rollups(self, gen: str) -> int:
        """Rebuild the roll-up of every tenant whose counters changed since its roll-up was made
        (its stamp's `changed` above the roll-up's `rolled`); returns the roll-ups written.

        Per tenant: the stamp as read (`c0`), then the time (`as_of`), then every counter
        document of the tenant; the sum is written with `rolled` = c0, guarded on the stored
        `rolled` being lower, so a slower refresh (another replica's, or one that read an older
        stamp) never replaces a newer roll-up. A crash anywhere leaves the previous roll-up,
        still marked out of date; the next refresh starts over. It reads O(clinicians) counter
        documents, once per tenant and refresh period instead of once per tenant read.
        """
        col = self.rollups(gen)
        changed: dict[str, int] = {}
        rolled: dict[str, int] = {}
        async for d in col.find({}, {"tenant_id": 1, CHANGED: 1, ROLLED: 1}):
            if str(d["_id"]).startswith(STAMP_PREFIX):
                changed[str(d["tenant_id"])] = int(d.get(CHANGED) or 0)
            else:
                rolled[str(d["tenant_id"])] = int(d.get(ROLLED) or 0)
        shown = {"instrument": 1, MONTHS: 1, **dict.fromkeys(_ROLLED_FIELDS, 1)}
        ops: list[UpdateOne] = []
        for tenant, c0 in sorted(changed.items()):
            if rolled.get(tenant, 0) >= c0:
                continue
            as_of = datetime.now(UTC)
            total = RollupSum()
            async for d in self._scope_counters(gen, {"tenant_id": tenant}, shown):
                total.add(d)
            ops.append(UpdateOne({"_id": rollup_id(tenant), ROLLED: {"$not": {"$gte": c0}}},
                                 {"$set": {"tenant_id": tenant, ROLLED: c0, AS_OF: as_of, **total.document()}},
                                 upsert=True))
        return await guarded_upserts(col, ops)

    async def _rollup(self, gen: str, tenant_id: str, shown: Document) -> Document | None:
        """The tenant's roll-up (fields `shown`) when it may be served: up to date with the
        counters, or made less than `rollup_max_age` seconds ago; else None (read the counters)."""
        found = {d["_id"]: d async for d in self.rollups(gen).find(
            {"_id": {"$in": [stamp_id(tenant_id), rollup_id(tenant_id)]}}, {CHANGED: 1, ROLLED: 1, AS_OF: 1, **shown})}
        rollup, stamp = found.get(rollup_id(tenant_id)), found.get(stamp_id(tenant_id)) or {}
        if rollup is None or not isinstance(rollup.get(AS_OF), datetime):
            return None
        if int(rollup.get(ROLLED) or 0) >= int(stamp.get(CHANGED) or 0):
            return rollup
        age = (datetime.now(UTC) - _aware(rollup[AS_OF])).total_seconds()
        return rollup if age <= self.rollup_max_age else None

    async def apply_deterioration(self, gen: str, events: Sequence[AllianceDeterioration]) -> int:
        """Record raised (or revised) alliance alerts (`rules.raise_update`), then count them. (A
        rebuild holds its alerts and counts each as it inserts it: `HeldAlerts`.)"""
        written = await self._write_alerts(self.alerts(gen), [self._raise_op(e) for e in events], read_back=True)
        await self.count_alerts(gen, {e.alert_id for e in events}, written=written)
        return len(events)

    async def apply_outcome_alerts(self, gen: str, events: Sequence[OutcomeAlert]) -> int:
        """Record raised (or revised) outcome alerts in their own collection (so the alliance
        alert counts of summaries stay what they were), merged the same way."""
        await self._write_alerts(self.outcome_alerts(gen), [self._raise_op(e) for e in events])
        return len(events)

    async def apply_outcome_alert_status(self, gen: str, events: Sequence[OutcomeAlertStatusChanged]) -> int:
        """Record what happened to outcome alerts (`rules.status_update`)."""
        await self._write_alerts(self.outcome_alerts(gen), [self._status_op(e) for e in events])
        return len(events)

    async def apply_alert_status(self, gen: str, events: Sequence[AlertStatusChanged]) -> int:
        """Record what happened to alliance alerts (`rules.status_update`), then count them."""
        written = await self._write_alerts(self.alerts(gen), [self._status_op(e) for e in events], read_back=True)
        await self.count_alerts(gen, {e.alert_id for e in events}, written=written)
        return len(events)

    @staticmethod
    def _raise_op(e: rules.AlertRaise) -> tuple[Document, Document]:
        """(filter, update) of a raised (or revised) alert. Every update is a max (the lifecycle key
        with `$max`, the earliest raise time with `$min`, a raise stored under its own revision),
        so redeliveries and any order agree."""
        return {"_id": e.alert_id}, rules.raise_update(e)

    @staticmethod
    def _status_op(e: AlertStatusChanged) -> tuple[Document, Document]:
        """(filter, update) of what happened to an alert; may arrive before the alert itself. Every
        update is a monotone fact (a flag turning true, the earliest time per status, the
        lifecycle key of scoring's `superseded`/`withdrawn` with `$max`), so the order of arrival
        does not matter."""
        return {"_id": e.alert_id, "tenant_id": e.tenant_id}, rules.status_update(e)

    @staticmethod
    async def _write_alerts(col: AsyncCollection[Document], updates: Sequence[tuple[Document, Document]],
                            read_back: bool = False) -> list[Document]:
        """Run alert upserts (`_raise_op`, `_status_op`) in one unordered bulk write; returns
        nothing. With `read_back` (the alert is counted next) a batch of ONE update (the usual
        batch at a steady rate) runs as one find-and-modify instead and returns the document it
        left, so the count does not read it: the write and the read are one round trip. Should
        the store refuse that update, the bulk write repeats it (every update is idempotent), so
        a refusal reaches the subscriber as a bulk write error, classified as ever; a crash
        leaves what the bulk write's would."""
        if not updates:
            return []
        if read_back and len(updates) == 1:
            try:
                doc = await col.find_one_and_update(*updates[0], upsert=True, return_document=ReturnDocument.AFTER)
                return [doc] if doc is not None else []
            except OperationFailure:
                pass
        await col.bulk_write([UpdateOne(f, u, upsert=True) for f, u in updates], ordered=False)
        return []

    async def count_alerts(self, gen: str, alert_ids: Collection[str], tally: CounterTally | None = None, *,
                           written: Sequence[Document] = ()) -> int:
        """Bring the counters in line with what these alert documents contribute now
        (`rules.alert_share`), each change applied exactly once; returns the alerts moved.

        An alert document is written by update operators (any order, any writer), so its counting
        is a separate step after each write, versioned on the document itself: `counted` holds the
        contribution the counters have (with its version `cv`). An alert whose contribution
        differs gets, in one conditional update on `cv`, the new contribution, `cv` + 1 and in
        `pending` the moves between the two; those moves are then applied with the records'
        markers (`apply_counters`, keyed by the alert id). As for records, `pending` is never
        cleared (that was one more write per batch), only replaced by the next version's: this
        process remembers which version it applied (`_applied`, bounded) and does not apply it
        again; a reader that does not know (another process, this one after a restart or once
        the alert is forgotten) applies it again, which the markers make a no-op. A concurrent
        counter of the same alert makes the condition miss (E11000 on the upsert): that alert is
        read and counted again. What a crash leaves: after the conditional update, before (or
        during) the counter write, `pending` holds moves some counters lack and nobody remembers
        applying it: the redelivered batch reads it back and applies it first (the markers skip
        the counters that took it); after the counter write, moves applied and `pending` still
        there: applied again by whoever reads it next, a no-op. So the moves of version `cv` are
        on every counter before `cv` + 1 is written, as for records.

        With `tally` (a rebuild's generation, see `CounterTally`) the conditional update clears
        `pending` instead of setting it, and the moves go to the tally. `written`: documents of
        these alerts as the caller's write left them (`_write_alerts`), not read again.
        """
        todo, moved = set(alert_ids), 0
        known = [d for d in written if d["_id"] in todo]
        for attempt in range(self._retries + 1):
            if not todo:
                return moved
            unknown = todo - {d["_id"] for d in known}
            docs = [*known, *(await find_by_ids(self.alerts(gen), unknown) if unknown else [])]
            known = []  # a retry reads what another writer changed
            done, todo = await self._count_alert_docs(gen, docs, tally)
            moved += done
            if todo and attempt:
                await asyncio.sleep(0.01 * attempt)
        if todo:
            raise RuntimeError(f"{len(todo)} alerts kept being counted concurrently; the batch will be retried")
        return moved

    async def flush_tally(self, gen: str, tally: CounterTally) -> int:
        """Write a rebuild's held counter moves into its generation (`CounterTally.flush`), then
        bump the stamps of their tenants as every counter write does (a roll-up refreshed before
        this write must not look up to date after it)."""
        tenants = tally.tenants()
        written = await tally.flush(self.counters(gen), self.counter_directory(gen))
        await self._stamp(gen, tenants)
        return written

    async def _count_alert_docs(self, gen: str, docs: Sequence[Document],
                                tally: CounterTally | None) -> tuple[int, set[str]]:
        """One round of `count_alerts` over these alert documents as read: (alerts moved, ids
        another writer counted first, to read and count again)."""
        col = self.alerts(gen)
        await self.apply_counters(gen, [(d["_id"], *p) for d in docs if (p := pending_of(d)) is not None
                                        and self._applied.get((gen, d["_id"])) != p[0]])
        writes: list[tuple[str, int, rules.Counters]] = []
        specs: list[tuple[Document, Document]] = []
        for d in docs:
            _, was = unpack_counters(d.get(COUNTED))
            now = rules.alert_share(d)
            if now == was:
                continue
            version, moves = int(d.get(COUNTED_VERSION) or 0) + 1, rules.diff(was, now)
            writes.append((d["_id"], version, moves))
            # "not counted yet" as `$not $gt 0`: matches a document without `cv`
            held = version - 1 if version > 1 else {"$not": {"$gt": 0}}
            # `counted` without its version (that is `cv`): two arrival orders of the same events
            # leave the same `counted`
            counted: Document = {COUNTED_VERSION: version, COUNTED: pack_counters(0, now)}
            update: Document = ({"$set": counted, "$unset": {PENDING: ""}} if tally is not None
                                else {"$set": {**counted, PENDING: pack_counters(version, moves)}})
            specs.append(({"_id": d["_id"], COUNTED_VERSION: held}, update))
        ops = [UpdateOne(f, u, upsert=True) for f, u in specs]
        if tally is None and specs:
            # The documents' new contributions, their counter moves and their tenants' stamps in
            # one ordered command: the counters after the documents that carry their moves, as
            # below. When it does not apply everything, the writes below run: a document it did
            # write misses its `cv` condition there and is read and counted again (its `pending`
            # applied, a no-op on the counters that took it), as after a crash.
            if await self.apply_counters(gen, writes, documents=[(col, f, u) for f, u in specs]) is not None:
                for aid, v, _ in writes:
                    self._applied.put((gen, aid), v)
                return len(writes), set()
        written = await bulk_write(col, ops)
        lost = {writes[i][0] for i in written.duplicates}
        done = [w for w in writes if w[0] not in lost]
        if tally is not None:
            for _, _, moves in done:
                tally.add(moves)
        else:
            await self.apply_counters(gen, done)
            # `pending` stays on the document (clearing it was one more write per batch): this
            # process remembers that it applied it; another reader applies it again, a no-op.
            for aid, v, _ in done:
                self._applied.put((gen, aid), v)
        return len(done), lost

    # ------------------------------------------------------------------ reads

    async def _scope_counters(self, gen: str, scope: Document, shown: Document) -> AsyncIterator[Document]:
        """The counter documents of a scope (tenant, site and/or clinician), fields `shown`: their
        ids from the counter directory (its scope indexes), then the documents by `_id`
        (`each_by_ids`). An entry whose counter is not written yet finds nothing (a crash between
        the two writes: `apply_counters`), as a counter without moves adds nothing."""
        ids = [str(d["_id"]) async for d in self.counter_directory(gen).find(scope, {"_id": 1})]
        async for d in each_by_ids(self.counters(gen), ids, shown):
            yield d

    @staticmethod
    def _scope(tenant_id: str, site_id: str | None) -> Document:
        q: Document = {"tenant_id": tenant_id}
        if site_id is not None:
            q["site_id"] = site_id
        return q

    async def record(self, gen: str, tenant_id: str, client_id: str, instrument: str,
                     site_id: str | None = None) -> Document | None:
        """The record of a client and instrument (None when unknown, empty, or owned by another
        site than `site_id`)."""
        doc = await self._records(gen, instrument).find_one({"_id": rules.record_id(tenant_id, client_id, instrument)})
        if doc is None or doc.get("tenant_id") != tenant_id or not doc.get("session_count"):
            return None
        if site_id is not None and doc.get("site_id") != site_id:
            return None
        return from_stored(doc)

    async def alerts_for(self, gen: str, tenant_id: str, record_ids: Sequence[str], *,
                         outcome: bool = False) -> dict[str, list[Document]]:
        """Alerts of some records (alliance ones; outcome ones with `outcome`), grouped by record
        id (one query)."""
        out: dict[str, list[Document]] = {t: [] for t in record_ids}
        if not record_ids:
            return out
        col = self.outcome_alerts(gen) if outcome else self.alerts(gen)
        cursor = col.find({"tenant_id": tenant_id, "record_id": {"$in": list(record_ids)}})
        async for a in cursor:
            out.setdefault(a["record_id"], []).append(a)
        return out

    async def caseload(self, gen: str, tenant_id: str, clinician_id: str, site_id: str | None,
                       after: str | None, limit: int) -> list[Document]:
        """One page (limit + 1 to tell whether more follow) of a clinician's records, at-risk first:
        the alliance records, and the outcome records of clients with no alliance record (an
        outcome record's `caseload_key` is that of the alliance line it stands for), in one
        `caseload_key` order. Both are range scans of their `caseload` index from the cursor; an
        outcome record whose client has a paired alliance record with sessions is skipped (that
        client is listed by its alliance record, wherever it is: one line per client). Outcome
        records are scanned no further than the last alliance record of a full page, so a page
        reads about twice the records it shows when most clients have both.

        The scans are of the record directories (`client_directory`, `outcome_directory`: the
        records carry no index but `_id`), then the records of a page by `_id`
        (`_directory_page`)."""
        q: Document = {"tenant_id": tenant_id, "clinician_id": clinician_id}
        if after is not None:
            q["caseload_key"] = {"$gt": after}
        if site_id is not None:
            q["site_id"] = site_id
        alliance = await self._directory_page(self.client_directory(gen), self.clients(gen), q, limit)
        # past this key the page is alliance records only (there are limit + 1 of them before it)
        bound = alliance[-1]["caseload_key"] if len(alliance) > limit else None
        alone: list[Document] = []
        # `$gt` a key also passes over outcome records written before they had one (a rebuild gives them theirs)
        q = {**q, "caseload_key": {"$gt": after or ""}}
        while len(alone) <= limit:
            batch = await self._directory_page(self.outcome_directory(gen), self.outcomes(gen), q, limit)
            within = [d for d in batch if bound is None or d["caseload_key"] < bound]
            if within:
                paired = {i: d for d in within for i in rules.paired_record_ids(d)}
                listed = {d["_id"] for d in await self.clients(gen).find(
                    {"_id": {"$in": sorted(paired)}, "session_count": {"$gt": 0}}, {"_id": 1}).to_list()}
                shadowed = {paired[i]["_id"] for i in listed}
                alone += [from_stored(d) for d in within if d["_id"] not in shadowed]
            if len(batch) <= limit or len(within) < len(batch):
                break
            q = {**q, "caseload_key": {"$gt": batch[-1]["caseload_key"]}}
        return sorted([*alliance, *alone], key=lambda d: str(d["caseload_key"]))[:limit + 1]

    @staticmethod
    async def _directory_page(directory: AsyncCollection[Document], records: AsyncCollection[Document],
                              q: Document, limit: int) -> list[Document]:
        """The records of the first limit + 1 entries of `directory` matching `q`, in `caseload_key`
        order (the `caseload` index), read by `_id`.

        An entry lags its record only between the two writes (`directory_entries`: a crash, until
        the record is next taken). Such a record is returned where its entry is, with its
        `caseload_key` set to the entry's: the page's cursor is the entries' order, so no entry
        after it is skipped or shown twice; the rest of it is the record's, the newer."""
        page = await directory.find(q, {"caseload_key": 1}).sort([("caseload_key", ASCENDING)]).limit(
            limit + 1).to_list()
        docs = {d["_id"]: d async for d in each_by_ids(records, [p["_id"] for p in page])}
        out: list[Document] = []
        for p in page:
            if (doc := docs.get(p["_id"])) is not None:  # never otherwise: a record is written before its entry
                doc["caseload_key"] = p["caseload_key"]
                out.append(from_stored(doc))
        return out

    async def summary(self, gen: str, tenant_id: str, site_id: str | None,
                      clinician_id: str | None = None) -> Document | None:
        """The PCOMS summary of a tenant, a site or a clinician (each record's current episode),
        from the current-episode counters of the scope (one document per site, clinician and
        instrument, whatever the number of clients), with the outcome indices of its outcome
        records; None when the scope has no data at all. A tenant's from its roll-up when it may
        be served (one document: see the module docs), `as_of` then the roll-up's."""
        scope = self._scope(tenant_id, site_id)
        if clinician_id is not None:
            scope["clinician_id"] = clinician_id
        rollup = None if site_id is not None or clinician_id is not None else await self._rollup(
            gen, tenant_id, {ROLLUP_CURRENT: 1})
        if rollup is not None:
            rows = [{"instrument": i, **fields} for i, fields in (rollup.get(ROLLUP_CURRENT) or {}).items()]
            as_of = _aware(rollup[AS_OF])
        else:
            # Named fields, not "all but markers and months": the store copies a document to cut
            # fields out of it, so an exclusion costs what the markers weigh (3.6x at 500 markers).
            shown = dict.fromkeys(("instrument", *_ROLLED_FIELDS), 1)
            rows = [d async for d in self._scope_counters(gen, scope, shown)]
            as_of = datetime.now(UTC)
        # Alerts from the counters too (`rules.alert_share`): counting alert documents costs one
        # read per alert (the local store fetches every document an index finds, even to count).
        raised = sum(int(r.get(rules.ALERTS_RAISED) or 0) for r in rows)
        acknowledged = sum(int(r.get(rules.ALERTS_ACKNOWLEDGED) or 0) for r in rows)
        if not any(r.get("records") or r.get("o_clients") for r in rows) and not raised and not acknowledged:
            return None
        return {**rules.summary_from_counters(rows, raised, acknowledged), "as_of": as_of.isoformat()}

    async def trends(self, gen: str, tenant_id: str, first: str, last: str, *, site_id: str | None = None,
                     clinician_id: str | None = None) -> list[Document]:
        """Monthly series of a tenant, a site or a clinician from `first` to `last` (`YYYY-MM`)."""
        return (await self.trends_as_of(gen, tenant_id, first, last, site_id=site_id, clinician_id=clinician_id))[0]

    async def trends_as_of(self, gen: str, tenant_id: str, first: str, last: str, *, site_id: str | None = None,
                           clinician_id: str | None = None) -> tuple[list[Document], datetime]:
        """(`trends`, the time up to which they count every counter write): a tenant's from its
        roll-up when it may be served (one document), else from the counters of the scope."""
        shown: Document = {f"{MONTHS}.{m}": 1 for m in rules.months_between(first, last)}
        rollup = None if site_id is not None or clinician_id is not None else await self._rollup(
            gen, tenant_id, shown)
        if rollup is not None:
            return rules.trend_series(month_rows(rollup), first, last), _aware(rollup[AS_OF])
        q = self._scope(tenant_id, site_id)
        if clinician_id is not None:
            q["clinician_id"] = clinician_id
        as_of = datetime.now(UTC)
        docs = [d async for d in self._scope_counters(gen, q, shown)]
        return rules.trend_series([row for d in docs for row in month_rows(d)], first, last), as_of

    async def sites(self, gen: str, tenant_id: str) -> list[str]:
        """The sites of a tenant that have any counted data (one counter directory entry per site,
        clinician and instrument, so this reads no record and no counter). A site whose only
        entry's counter a crash left unwritten is listed, and reads as zero until the redelivery
        writes it (`apply_counters`), as a site whose counters all went back to zero does."""
        return sorted(str(s) for s in await self.counter_directory(gen).distinct("site_id", {"tenant_id": tenant_id})
                      if s)

    async def verify(self, gen: str) -> dict[str, tuple[dict[str, int], dict[str, int]]]:
        """Recompute the counters from the records and the alerts and compare: per counter id
        whose values differ, (what the records and alerts say, what the counters hold as readers
        find them: a counter document its counter directory does not list is read by no query,
        so it holds nothing). Empty when they agree."""

        async def every_share() -> AsyncIterator[rules.Counters]:
            for records in (self.clients(gen), self.outcomes(gen)):
                async for d in records.find({}):
                    yield rules.contribution(from_stored(d))
            async for a in self.alerts(gen).find({}, {COUNTED: 0, PENDING: 0}):
                yield rules.alert_share(a)

        total: rules.Counters = {}
        shares: list[rules.Counters] = []
        async for share in every_share():
            shares.append(share)
            if len(shares) == 1000:  # folded as it goes: memory bounded by the buckets, not the documents
                total, shares = rules.total_counters([total, *shares]), []
        flat = flat_counters(rules.total_counters([total, *shares]))
        expected = {counter_doc_id(b): v for b, v in flat.items()}
        held: dict[str, dict[str, int]] = {}
        listed = {d["_id"] async for d in self.counter_directory(gen).find({}, {"_id": 1})}
        async for c in self.counters(gen).find({}, {MARKS: 0}):
            if c["_id"] in listed and (values := counter_values(c)):
                held[c["_id"]] = values
        out = {cid: (expected.get(cid, {}), held.get(cid, {}))
               for cid in sorted(expected.keys() | held.keys()) if expected.get(cid, {}) != held.get(cid, {})}
        return {**out, **await self._verify_rollups(gen, flat)}

    async def _verify_rollups(self, gen: str, flat: dict[Bucket, dict[str, int]]) -> dict[
            str, tuple[dict[str, int], dict[str, int]]]:
        """Per roll-up marked up to date whose sums differ from the records' (as `flat`, the
        counters the records and alerts make): (from the records, held). A roll-up marked out of
        date is not compared: it is served only within `rollup_max_age` of its making, the bounded
        staleness of the design, and the next refresh replaces it."""
        by_tenant: dict[str, list[Document]] = {}
        for bucket, fields in flat.items():
            by_tenant.setdefault(bucket[0], []).append(counter_document(bucket, fields))
        docs = await self.rollups(gen).find({}).to_list()
        changed = {d["tenant_id"]: int(d.get(CHANGED) or 0) for d in docs if str(d["_id"]).startswith(STAMP_PREFIX)}
        out: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
        for d in docs:
            if not str(d["_id"]).startswith(ROLLUP_PREFIX) or int(d.get(ROLLED) or 0) < changed.get(d["tenant_id"], 0):
                continue
            want, have = rollup_values(rollup_of(by_tenant.get(d["tenant_id"], []))), rollup_values(d)
            if want != have:
                out[d["_id"]] = (want, have)
        return out


class RollupRefresher:
    """The loop of a consuming process that refreshes the roll-ups of the active generation's
    tenants every `interval` seconds (`ReportingStore.refresh_rollups`). A generation being
    rebuilt is left to its rebuild, which refreshes it once before the switch; what the live
    consumers write into it after that is refreshed here once it is active."""

    def __init__(self, store: ReportingStore, generations: Generations, interval: float) -> None:
        self.store, self.generations, self.interval = store, generations, interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.store.refresh_rollups((await self.generations.current()).active)
            except PyMongoError as exc:  # the store is away: reads fall back to the counters past the max age
                log.warning("refreshing the tenant roll-ups failed: %s", type(exc).__name__)


class SubmissionStore:
    """The `reporting_submissions` collection: what happened to each submission (see rules.py), and
    `reporting_rejections`, the rejections page's listing of its rejected documents (module docs)."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.col: AsyncCollection[Document] = db[SUBMISSIONS]
        self.listed: AsyncCollection[Document] = db[REJECTIONS]
        self._client_bulk = ClientBulk(db)
        self._indexed = False

    async def ensure_indexes(self) -> None:
        """The listing's indexes; on the first start after the split, the migration (`_migrate`)."""
        if self._indexed:
            return
        for name, fields in _REJECTION_INDEXES:
            await self.listed.create_index([("tenant_id", ASCENDING), *((f, ASCENDING) for f in fields)], name=name)
        if _OLD_REJECTION_INDEXES[0] in await self.col.index_information():
            await self._migrate()
        self._indexed = True

    async def _migrate(self) -> None:
        """From a deployment whose status documents carried the rejections indexes: list every
        rejected status document (one scan, guarded upserts in batches: a repeat writes nothing),
        then drop the old indexes. The drop marks the migration done: a crash before it repeats the
        backfill on the next start, and two processes starting together both backfill (idempotent)
        and one of them finds an index already dropped."""
        scanned = written = 0
        rejected = self.col.find({"rejected": {"$exists": True}},
                                 {"tenant_id": 1, "rejected.key": 1, "rejected.sort": 1, "rejected.site_id": 1})
        async for batch in batches(rejected, MIGRATION_BATCH):
            scanned += len(batch)
            written += await guarded_upserts(
                self.listed, [self._listing_op(d["_id"], d["tenant_id"], d["rejected"]) for d in batch])
        await drop_indexes(self.col, _OLD_REJECTION_INDEXES)
        log.info("rejections moved to %s: %d rejected status documents, %d listed anew; old indexes dropped",
                 REJECTIONS, scanned, written)

    @staticmethod
    def _part_op(doc_id: str, name: str, part: Document, owner: tuple[str, str],
                 namespace: str | None = None) -> UpdateOne:
        """The write of a part, when its key is greater than the stored one (or there is none)."""
        tenant_id, submission_id = owner
        owned = {"tenant_id": tenant_id, "submission_id": submission_id}
        # "missing or lower" as one `$not`, not an `$or`: the local store plans an `$or` as a
        # collection scan (63 ms per update at 10,000 documents), `_id` + `$not` by key.
        return UpdateOne({"_id": doc_id, f"{name}.key": {"$not": {"$gte": part["key"]}}},
                         {"$set": {name: part}, "$setOnInsert": owned}, upsert=True, namespace=namespace)

    @staticmethod
    def _listing_op(doc_id: str, tenant_id: str, rejected: Document, namespace: str | None = None) -> UpdateOne:
        """The listing of a status document's `rejected` part, under the same guard as the part
        (its key): so it follows the part a re-judgement writes (a new `sort`), never an older one."""
        return UpdateOne({"_id": doc_id, "key": {"$not": {"$gte": rejected["key"]}}},
                         {"$set": {"tenant_id": tenant_id, "site_id": rejected["site_id"], "sort": rejected["sort"],
                                   "key": rejected["key"]}},
                         upsert=True, namespace=namespace)

    async def _write(self, parts: dict[tuple[str, str], Document], owners: dict[str, tuple[str, str]]) -> int:
        """Write each (document, part) when its key is greater than the stored one, in one bulk write
        (`guarded_upserts`: E11000 means the document exists with a key at least as high), and the
        listing of each `rejected` part under the same guard. Returns the parts written.

        With rejected parts, the parts and then their listings go as ONE ordered cross-collection
        command. When it stops early (a guard that missed: a redelivery, a concurrent writer) or
        the store has no such command, the two writes are made apart, the parts first: so a
        listing never names a part not written yet, and a crash between the two leaves parts
        without their listing until the redelivery, whose part writes are no-ops and whose
        listings go through."""
        keys = sorted(parts)
        listed = [(doc_id, parts[(doc_id, name)]) for doc_id, name in keys if name == "rejected"]
        if listed:
            together = await self._client_bulk.ordered(
                [*(self._part_op(d, n, parts[(d, n)], owners[d], namespace_of(self.col)) for d, n in keys),
                 *(self._listing_op(d, owners[d][0], part, namespace_of(self.listed)) for d, part in listed)])
            if together is not None:
                # Complete: every guarded update matched (and changed the key) or upserted.
                return len(keys)
        written = await guarded_upserts(self.col, [self._part_op(d, n, parts[(d, n)], owners[d]) for d, n in keys])
        await guarded_upserts(self.listed, [self._listing_op(d, owners[d][0], part) for d, part in listed])
        return written

    async def apply_scored(self, events: Sequence[rules.Scored]) -> int:
        """The `scored` part of each event's submission and the `superseded` part of the one it
        names in `supersedes`."""
        return await self._write(*self._scored_parts(events))

    def ride(self, events: Sequence[rules.Scored]) -> Ride:
        """What `apply_scored` writes, as a `Ride` on the batch's counter command (the same guarded
        writes; never a `rejected` part, so never a listing). Not taken there: `apply_scored`."""
        parts, owners = self._scored_parts(events)
        return Ride([self._part_op(d, n, parts[(d, n)], owners[d], namespace_of(self.col)) for d, n in sorted(parts)])

    @staticmethod
    def _scored_parts(events: Sequence[rules.Scored]) -> tuple[dict[tuple[str, str], Document],
                                                               dict[str, tuple[str, str]]]:
        owners: dict[str, tuple[str, str]] = {}
        parts: list[tuple[str, str, Document]] = []
        for e in events:
            if e.retracted:  # the session moved to another client: that client's events answer for it
                continue
            scale = rules.scale_of(str(e.instrument))  # a submission supersedes only one of its scale
            doc_id = rules.submission_doc_id(e.tenant_id, e.submission_id, scale)
            owners[doc_id] = (e.tenant_id, e.submission_id)
            parts.append((doc_id, "scored", rules.scored_part(e)))
            if e.supersedes and e.supersedes != e.submission_id:
                old = rules.submission_doc_id(e.tenant_id, e.supersedes, scale)
                owners[old] = (e.tenant_id, e.supersedes)
                parts.append((old, "superseded", rules.superseded_part(e)))
        return rules.fold_parts(parts), owners

    async def apply_rejected(self, rejections: Sequence[tuple[str, DeadLetter, rules.Submitted]]) -> int:
        """The `rejected` part of dead-lettered submissions, given as (tenant, dead letter, submission)."""
        owners: dict[str, tuple[str, str]] = {}
        parts: list[tuple[str, str, Document]] = []
        for tenant_id, dead, submitted in rejections:
            doc_id = rules.submission_doc_id(tenant_id, submitted.submission_id,
                                             rules.scale_of(str(submitted.instrument)))
            owners[doc_id] = (tenant_id, submitted.submission_id)
            parts.append((doc_id, "rejected", rules.rejected_part(dead, submitted)))
        return await self._write(rules.fold_parts(parts), owners)

    async def get(self, tenant_id: str, submission_id: str, scale: rules.Scale | None = None) -> Document | None:
        """The status document of the submission with this id on `scale`; without one, the
        alliance submission's when there is one, else the outcome one's. (An outcome submission
        scored before the scales were keyed apart has its document under the alliance key: it
        is found by its parts' instrument.)"""
        alliance_id = rules.submission_doc_id(tenant_id, submission_id, "alliance")
        outcome_id = rules.submission_doc_id(tenant_id, submission_id, "outcome")
        found: dict[rules.Scale, Document] = {}
        async for doc in self.col.find({"_id": {"$in": [alliance_id, outcome_id]}}):
            if doc.get("tenant_id") != tenant_id:
                continue
            held = "outcome" if doc["_id"] == outcome_id else rules.submission_scale(doc)
            if held not in found or doc["_id"] == outcome_id:
                found[held] = doc
        if scale is not None:
            return found.get(scale)
        return found.get("alliance") or found.get("outcome")

    async def rejections(self, tenant_id: str, site_id: str | None, after: str, limit: int) -> list[Document]:
        """One page (limit + 1) of a tenant's (or site's) rejections with `rejected.sort` > `after`,
        oldest first: the listing's page (by its index), then its status documents in one read.

        A listing lags its part only between the two writes of `_write` (a re-judgement's part
        written, its listing not yet: until the redelivery). Such a document is returned where its
        listing is, with its `rejected.sort` set to the listing's: the page's cursor is the listing's
        order, so no listing after it is skipped; its reason is the part's, the newer one. (The API
        still checks the part's site: `rules.submission_view`.)"""
        q: Document = {"tenant_id": tenant_id, "sort": {"$gt": after}}
        if site_id is not None:
            q["site_id"] = site_id
        page = await self.listed.find(q, {"sort": 1}).sort([("sort", ASCENDING)]).limit(limit + 1).to_list()
        docs = {d["_id"]: d for d in await find_by_ids(self.col, [p["_id"] for p in page])}
        out: list[Document] = []
        for p in page:
            doc = docs.get(p["_id"])
            if doc is not None and doc.get("rejected"):  # never otherwise: a part is written before its listing
                doc["rejected"]["sort"] = p["sort"]
                out.append(doc)
        return out
