"""Rebuild the read models from the event log, then switch over atomically.

1. Claim a new generation in the pointer document (`building`). From then on every live
   consumer writes each batch into the active generation AND the new one (see handlers.py).
2. Wait a few pointer-cache lifetimes, so every live consumer has seen the claim.
3. Replay `srs.scored.v1`, `alliance.deterioration.v1` and `alliance.alert-status.v1`, and the
   outcome half `ors.scored.v1`, `outcome.alert.v1` and `outcome.alert-status.v1`, from the
   beginning with a fresh group-less consumer (nothing committed anywhere) into the new
   generation, through the same merge as the live consumer (inserts for records it has not
   written yet, a write-through cache for the rest, query indexes built after the load), until
   each partition reaches the high-water mark first seen after step 2.
   The partitions are read in step by their records' timestamps (`in_step`: none read more
   than `rebuild_skew_seconds` ahead of the one furthest behind), so that a client's sessions and
   an alert's events, produced together onto different topics, also reach the replay together,
   while what it holds of them is still held (read as fetched, one topic ran ahead of the others
   by a share of the log: at 50,000 clients a third of the alerts were written before their last
   event, each then read back, updated and counted again).
   Anything past those marks was produced after the claim, so the live consumers put it into
   the new generation themselves; the writes are idempotent and commutative, so the two
   writers overlapping is harmless.
   The scored records are held undecoded, grouped by client (`HeldRecords`,
   `rebuild_records_mib` of them), and a client's sessions are decoded, merged and written
   together when the client is pushed out by newer ones or at the end: a record is written
   about once, by insert, instead of once per batch holding one of its sessions. A record
   there by then (a live consumer's, or one this replay pushed out before a later session) is
   merged with what is stored and replaced, as any write of a known record is.
   The replay's own counter moves are held in memory (`CounterTally`, `rebuild_tally_mib` of
   them: a network's 2,000 counter documents take a few MiB) and written once per counter
   document at the end, and whenever the tally grows past its bound before (an insert of the
   whole document the first time, a `$inc` after). Its alerts are held in memory too
   (`HeldAlerts`, `rebuild_alerts_mib` of them), each as the one update its events fold into
   (the alert operators commute), and inserted once, counted in the same insert (`counted`,
   `cv` 1, the share added to the tally), when pushed out by newer alerts or at the end: the
   store inserts several times faster than it updates. An alert whose document is there by
   then (a live consumer's, or one pushed out before its later events) gets the update and is
   counted as live consumers count (read back, `cv` the guard). The live consumers keep
   counting what they write with their markers (see store.py); `$inc` commutes, so both add
   up. A rebuild that dies loses what it holds (records, alerts, counter moves) with its
   generation, which is dropped (or abandoned by the next `rebuild --force`) and never
   switched to. Every record written (a new one, or one read back from the store) is entered in
   its record directory after it (store.directory_entries), so the directories are complete
   when the indexes are built.
4. Flip `active` to the new generation in one single-document update. Until then the API
   answers from the old generation; after at most one pointer-cache lifetime, from the new one.
5. Drop generations older than the previous one (the previous stays for a quick way back).

The replay skips records that do not decode (the live consumer dead-lettered them already).
Submission statuses (`reporting_submissions`, and their listing `reporting_rejections`) are not
part of a generation and are not touched: the live consumers keep them, and the dead-letter topic
is not replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, ValidationError

from services.reporting import rules
from services.reporting.settings import ReportingSettings
from services.reporting.store import CounterTally, Generations, HeldAlerts, ReportingStore, generation_collections
from shared import channels
from shared import events as ev
from shared.kafka import InboundRecord, admin_security_kwargs, decode_records
from shared.mongo import database, make_client
from shared.settings import KafkaSettings, MongoSettings

log = logging.getLogger("alliance.reporting.rebuild")

Progress = Callable[[int, int], None]


class TruncatedLog(RuntimeError):
    """A scored topic no longer starts at offset 0: retention deleted history a rebuild needs."""
Hook = Callable[[str], Awaitable[None]]


@dataclass
class RebuildResult:
    """What a rebuild did."""

    previous: str
    generation: str
    events: int = 0
    skipped: int = 0
    replay_seconds: float = 0.0
    switched: bool = False
    dropped: list[str] = field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        return self.events / self.replay_seconds if self.replay_seconds > 0 else 0.0


def in_step(pending: Sequence[TopicPartition], read_to: dict[TopicPartition, int], skew_ms: int,
            ) -> list[TopicPartition]:
    """The partitions of `pending` (not at their end yet) to read next: those whose last record
    read (`read_to`, its timestamp in ms) is at most `skew_ms` ahead of the one furthest behind,
    and every one not read yet (its place unknown). The one furthest behind is always among them,
    so the replay never stalls; a partition ahead waits, its fetched records buffered (the
    consumer fetches no more for it meanwhile)."""
    if any(tp not in read_to for tp in pending):
        return list(pending)
    behind = min((read_to[tp] for tp in pending), default=0)
    return [tp for tp in pending if read_to[tp] <= behind + skew_ms]


def truncated_partitions(begin: dict[TopicPartition, int], topic: str) -> list[int]:
    """Partitions of `topic` whose log no longer starts at offset 0."""
    return sorted(tp.partition for tp, offset in begin.items() if tp.topic == topic and offset > 0)


# What holding one scored record's value costs besides its bytes (the bytes object and its list
# slot), and one client's group besides its values (its key, list and ordered-dict node).
HELD_VALUE_OVERHEAD = 48
HELD_GROUP_OVERHEAD = 320


class HeldRecords:
    """Scored records a replay holds undecoded, grouped by client (topic and Kafka key, which is
    `tenant_id:client_id`), the clients touched last first kept, `capacity` bytes of them.

    A client's sessions are decoded, merged and written together when its group is pushed out
    (the clients touched least recently go first) or at the end (`drain`): each record is then
    written about once, by insert, instead of once per replayed batch holding one of its sessions
    (a conditional replace each: the store inserts several times faster than it updates), and
    merged once. The group is only how records are held together: the writer groups the decoded
    events by record (`rules.group_by_record`), so a key that is not a client's (a record without
    one is held alone) changes how much folds, never the result. A group pushed out and touched
    again is written again (the record cache, else a read, gives the merge its document): the
    merge is a commutative max, so the result is the same either way.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: OrderedDict[tuple[str, bytes], list[bytes]] = OrderedDict()
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, topic: str, key: bytes, value: bytes) -> None:
        """Hold one record's value with its client's (now the client touched last)."""
        group = self._held.get((topic, key))
        if group is None:
            self._held[(topic, key)] = group = []
            self.held_bytes += HELD_GROUP_OVERHEAD + len(key)
        else:
            self._held.move_to_end((topic, key))
        group.append(value)
        self.held_bytes += HELD_VALUE_OVERHEAD + len(value)

    def _pop_oldest(self) -> tuple[str, list[bytes]]:
        (topic, key), values = self._held.popitem(last=False)
        self.held_bytes -= HELD_GROUP_OVERHEAD + len(key) + sum(HELD_VALUE_OVERHEAD + len(v) for v in values)
        return topic, values

    def overflow(self) -> list[tuple[str, list[bytes]]]:
        """The groups touched least recently, once more than `capacity` is held: down to 15/16 of
        it, so that what is written at once is a bulk write's worth, not a few records each batch,
        and no more (its sessions decoded and merged take several times their bytes until written)."""
        out: list[tuple[str, list[bytes]]] = []
        if self.held_bytes > self.capacity:
            while self._held and self.held_bytes > self.capacity * 15 // 16:
                out.append(self._pop_oldest())
        return out

    def take(self, groups: int) -> list[tuple[str, list[bytes]]]:
        """Up to `groups` groups, the least recently touched first (the end of a replay)."""
        return [self._pop_oldest() for _ in range(min(groups, len(self._held)))]


class Replayer:
    """Applies replayed records of the six topics (both scales) to one generation."""

    def __init__(self, store: ReportingStore, gen: str, kafka: KafkaSettings, *, alert_bytes: int,
                 record_bytes: int = 0, tally_bytes: int = 16 * 2**20) -> None:
        self.store, self.gen = store, gen
        topics = kafka.topics()
        self.scored, self.deterioration, self.alert_status = topics.scored, topics.deterioration, topics.alert_status
        self.ors_scored, self.outcome_alert = topics.ors_scored, topics.outcome_alert
        self.outcome_alert_status = topics.outcome_alert_status
        self.events = 0
        self.skipped = 0
        self.tally = CounterTally()
        self.tally_bytes = tally_bytes
        self.records = HeldRecords(record_bytes)
        self.alerts = HeldAlerts(store, gen, outcome=False, capacity=alert_bytes, tally=self.tally)
        self.outcome_alerts = HeldAlerts(store, gen, outcome=True, capacity=alert_bytes)

    @property
    def topics(self) -> tuple[str, ...]:
        """Every topic replayed."""
        return (self.scored, self.deterioration, self.alert_status, self.ors_scored, self.outcome_alert,
                self.outcome_alert_status)

    @property
    def scored_topics(self) -> tuple[str, ...]:
        """The topics whose full history a rebuild needs (the records are folded from them)."""
        return (self.scored, self.ors_scored)

    async def apply(self, records: list[InboundRecord]) -> None:
        """Apply one batch of replayed records: scored ones are held undecoded (`HeldRecords`),
        alert ones decoded (skipping those that do not decode) and folded into the held alerts."""
        by_topic: dict[str, list[InboundRecord]] = {}
        for r in records:
            if r.topic in self.scored_topics:
                self.records.add(r.topic, r.key if r.key is not None else f"@{r.partition}:{r.offset}".encode(),
                                 r.value)
            else:
                by_topic.setdefault(r.topic, []).append(r)
        events: list[BaseModel] = []
        for topic, model in ((self.deterioration, channels.DETERIORATION.model),
                             (self.alert_status, channels.ALERT_STATUS.model),
                             (self.outcome_alert, channels.OUTCOME_ALERT.model),
                             (self.outcome_alert_status, channels.OUTCOME_ALERT_STATUS.model)):
            decoded, bad = decode_records(by_topic.get(topic, []), model)
            events.extend(d.event for d in decoded)
            self.skipped += len(bad)
        await self._apply_alerts(events)
        await self._write_records(self.records.overflow())
        await self._bound_tally()

    async def apply_events(self, events: Sequence[BaseModel]) -> None:
        """Apply one batch of decoded events of the six topics (their channels' models): scored
        ones are held as their records would be (grouped by record), alert ones folded."""
        for e in events:
            if isinstance(e, ev.SrsScored | ev.OrsScored):
                topic = self.ors_scored if isinstance(e, ev.OrsScored) else self.scored
                self.records.add(topic, rules.record_id(e.tenant_id, e.client_id, str(e.instrument)).encode(),
                                 e.model_dump_json().encode())
        await self._apply_alerts(events)
        await self._write_records(self.records.overflow())
        await self._bound_tally()

    async def _apply_alerts(self, events: Sequence[BaseModel]) -> None:
        # Alerts are held, their events folded, and written once each (`HeldAlerts`): raises
        # before statuses, as the live consumer applies a batch of each.
        alerts = 0
        for e in events:
            if isinstance(e, ev.AllianceDeterioration | ev.OutcomeAlert):
                (self.outcome_alerts if isinstance(e, ev.OutcomeAlert) else self.alerts).add(
                    e.alert_id, rules.raise_update(e))
                alerts += 1
        for e in events:
            if isinstance(e, ev.AlertStatusChanged):
                (self.outcome_alerts if isinstance(e, ev.OutcomeAlertStatusChanged) else self.alerts).add(
                    e.alert_id, rules.status_update(e))
                alerts += 1
        await self.alerts.write_overflow()
        await self.outcome_alerts.write_overflow()
        self.events += alerts

    async def _write_records(self, groups: list[tuple[str, list[bytes]]]) -> None:
        """Decode the held records of these clients (skipping those that do not decode: the live
        consumer dead-lettered them) and merge them into their records, one bulk write per scale."""
        if not groups:
            return
        scored: list[ev.SrsScored] = []
        ors: list[ev.OrsScored] = []
        for topic, values in groups:
            model = channels.ORS_SCORED.model if topic == self.ors_scored else channels.SCORED.model
            for value in values:
                try:
                    event = model.model_validate_json(value)
                except ValidationError:
                    self.skipped += 1
                    continue
                if isinstance(event, ev.OrsScored):
                    ors.append(event)
                else:
                    scored.append(event)
        self.events += len(scored) + len(ors)
        # Sessions over a record's size cap are skipped here as the live consumer dead-lettered them.
        if scored:
            self.skipped += len((await self.store.apply_scored(self.gen, scored, fresh=True, tally=self.tally)).refused)
        if ors:
            self.skipped += len((await self.store.apply_outcomes(self.gen, ors, fresh=True, tally=self.tally)).refused)

    async def _bound_tally(self) -> None:
        """Write the counter moves held once they pass `tally_bytes` (after every write that
        adds to them: records and alliance alerts)."""
        if self.tally.held_bytes > self.tally_bytes:
            await self.store.flush_tally(self.gen, self.tally)

    async def finish(self, records: int = 500, alerts: int = 2_000) -> None:
        """Write the records, alerts and counter moves held, a chunk at a time (`records` clients,
        `alerts` alerts), the counter moves bounded as during the replay: the generation is complete."""
        while len(self.records):
            await self._write_records(self.records.take(records))
            await self._bound_tally()
        for held in (self.alerts, self.outcome_alerts):
            while len(held):
                await held.write_oldest(alerts)
                await self._bound_tally()
        await self.store.flush_tally(self.gen, self.tally)


async def replay(kafka: KafkaSettings, replayer: Replayer, *, batch: int, progress: Progress | None = None,
                 idle_seconds: float = 10.0, allow_truncated: bool = False, fetch_bytes: int = 8 * 2**20,
                 skew_seconds: float = 2.0) -> None:
    """Read the six topics from the beginning up to the high-water marks first seen, applying
    batches, the partitions in step (`in_step`, `skew_seconds`).

    Refuses (TruncatedLog) when a partition of a scored topic no longer starts at offset 0:
    the rebuilt trajectories would silently lack their oldest sessions. `srs.scored.v1` and
    `ors.scored.v1` need unlimited retention (`retention.ms=-1`) for rebuilds to be complete.
    The consumer buffers about `fetch_bytes` of records fetched ahead, shared among the
    partitions (the client's default, 1 MiB a partition, held 28 MiB of the six topics).
    """
    per_partition = max(64 * 1024, fetch_bytes // (len(replayer.topics) * kafka.partitions))
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, client_id="alliance-reporting-rebuild",
                                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_bytes=fetch_bytes, max_partition_fetch_bytes=per_partition,
                                request_timeout_ms=kafka.request_timeout_ms, **admin_security_kwargs(kafka))
    await consumer.start()
    try:
        names = replayer.topics
        await consumer.topics()  # fetches metadata
        tps = [TopicPartition(t, p) for t in names for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        begin = {tp: int(o) for tp, o in (await consumer.beginning_offsets(tps)).items()}
        for topic in replayer.scored_topics:
            cut = truncated_partitions(begin, topic)
            if cut and not allow_truncated:
                raise TruncatedLog(f"{topic} partitions {cut} no longer start at offset 0 (retention); "
                                   "a rebuild would lose their oldest sessions")
        # The high-water mark each partition had when first seen (Tansu's ListOffsets is
        # approximate; the fetch responses' marks are exact).
        target: dict[TopicPartition, int] = {}
        read_to: dict[TopicPartition, int] = {}  # the latest timestamp read of each partition
        pending = list(tps)
        last_record = time.monotonic()
        while True:
            got = await consumer.getmany(*in_step(pending, read_to, int(skew_seconds * 1000)), timeout_ms=200,
                                         max_records=batch)
            for tp, recs in got.items():
                if recs:
                    newest = max(r.timestamp for r in recs)
                    read_to[tp] = max(newest, read_to.get(tp, newest))
            records = [InboundRecord.from_consumer_record(r) for recs in got.values() for r in recs]
            if records:
                last_record = time.monotonic()
                await replayer.apply(records)
            done = 0
            caught_up = True
            behind: list[TopicPartition] = []
            for tp in tps:
                if tp not in target:
                    hw = consumer.highwater(tp)
                    if hw is not None:
                        target[tp] = int(hw)
                pos = await consumer.position(tp)
                if tp in target:
                    done += max(0, min(pos, target[tp]) - begin.get(tp, 0))
                    caught_up = caught_up and pos >= target[tp]
                    if pos < target[tp]:
                        behind.append(tp)
                else:
                    caught_up = False
                    behind.append(tp)
            pending = behind
            if progress is not None:
                progress(done, sum(target[tp] - begin.get(tp, 0) for tp in target))
            if caught_up:
                return
            if not records and time.monotonic() - last_record > idle_seconds:
                log.warning("replay idle for %.0fs before every partition reported its end; finishing", idle_seconds)
                return
    finally:
        await consumer.stop()


async def rebuild(kafka: KafkaSettings, mongo: MongoSettings, settings: ReportingSettings, *,
                  progress: Progress | None = None, after_claim: Hook | None = None,
                  before_switch: Hook | None = None, force: bool = False, drop_old: bool = True,
                  idle_seconds: float = 10.0, allow_truncated: bool = False) -> RebuildResult:
    """Replay the log into a new generation and switch the API over to it (see module docs)."""
    client = make_client(mongo, admin=True)
    db = database(client, mongo)
    generations = Generations(db, settings.generation_cache_seconds)
    store = ReportingStore(db, cache_bytes=settings.rebuild_cache_mib * 2**20,
                           max_record_bytes=settings.max_record_bytes)
    try:
        old, new = await generations.begin_rebuild(force=force)
        result = RebuildResult(previous=old.active, generation=new)
        try:
            if after_claim is not None:
                await after_claim(new)
            # Every live consumer re-reads the pointer at least once per cache lifetime.
            await asyncio.sleep(2 * settings.generation_cache_seconds + 0.25)
            replayer = Replayer(store, new, kafka, alert_bytes=settings.rebuild_alerts_mib * 2**20,
                                record_bytes=settings.rebuild_records_mib * 2**20,
                                tally_bytes=settings.rebuild_tally_mib * 2**20)
            started = time.perf_counter()
            await replay(kafka, replayer, batch=settings.rebuild_batch_records, progress=progress,
                         idle_seconds=idle_seconds, allow_truncated=allow_truncated,
                         fetch_bytes=settings.rebuild_fetch_mib * 2**20,
                         skew_seconds=settings.rebuild_skew_seconds)
            await replayer.finish()  # part of the replay's time: the counters it holds are its work
            result.replay_seconds = time.perf_counter() - started
            result.events, result.skipped = replayer.events, replayer.skipped
            # Query indexes after the bulk load (cheaper than maintaining them through it).
            await store.ensure_indexes(new)
            # The tenant roll-ups of everything replayed (and what the live consumers wrote into the
            # new generation so far), before the switch: the first tenant read after it is one document.
            await store.refresh_rollups(new)
            if before_switch is not None:
                await before_switch(new)
            await generations.switch(new)
            result.switched = True
        except BaseException:
            await generations.abandon(new)
            for name in generation_collections(new):
                await db.drop_collection(name)
            raise
        if drop_old:
            result.dropped = await generations.drop_unused()
        return result
    finally:
        await client.close()
