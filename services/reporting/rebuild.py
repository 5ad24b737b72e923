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
   Anything past those marks was produced after the claim, so the live consumers put it into
   the new generation themselves; the writes are idempotent and commutative, so the two
   writers overlapping is harmless.
   The replay's own counter moves are held in memory (`CounterTally`) and written once per
   counter document whenever the tally grows past `TALLY_FIELDS` and at the end (an insert of
   the whole document the first time, a `$inc` after). Its alerts are held in memory too
   (`HeldAlerts`, `rebuild_alerts_mib` of them), each as the one update its events fold into
   (the alert operators commute), and inserted once, counted in the same insert (`counted`,
   `cv` 1, the share added to the tally), when pushed out by newer alerts or at the end: the
   store inserts several times faster than it updates. An alert whose document is there by
   then (a live consumer's, or one pushed out before its later events) gets the update and is
   counted as live consumers count (read back, `cv` the guard). The live consumers keep
   counting what they write with their markers (see store.py); `$inc` commutes, so both add
   up. A rebuild that dies loses what it holds with its generation, which is dropped (or
   abandoned by the next `rebuild --force`) and never switched to.
4. Flip `active` to the new generation in one single-document update. Until then the API
   answers from the old generation; after at most one pointer-cache lifetime, from the new one.
5. Drop generations older than the previous one (the previous stays for a quick way back).

The replay skips records that do not decode (the live consumer dead-lettered them already).
Submission statuses (`reporting_submissions`) are not part of a generation and are not touched:
the live consumers keep them, and the dead-letter topic is not replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel

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
# Counter fields a replay holds before writing them (a few hundred bytes each: some MiB at most).
TALLY_FIELDS = 50_000


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


def truncated_partitions(begin: dict[TopicPartition, int], topic: str) -> list[int]:
    """Partitions of `topic` whose log no longer starts at offset 0."""
    return sorted(tp.partition for tp, offset in begin.items() if tp.topic == topic and offset > 0)


class Replayer:
    """Applies replayed records of the six topics (both scales) to one generation."""

    def __init__(self, store: ReportingStore, gen: str, kafka: KafkaSettings, *, alert_bytes: int) -> None:
        self.store, self.gen = store, gen
        topics = kafka.topics()
        self.scored, self.deterioration, self.alert_status = topics.scored, topics.deterioration, topics.alert_status
        self.ors_scored, self.outcome_alert = topics.ors_scored, topics.outcome_alert
        self.outcome_alert_status = topics.outcome_alert_status
        self.events = 0
        self.skipped = 0
        self.tally = CounterTally()
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
        """Decode one batch of replayed records (skipping those that do not decode) and apply them."""
        by_topic: dict[str, list[InboundRecord]] = {}
        for r in records:
            by_topic.setdefault(r.topic, []).append(r)
        events: list[BaseModel] = []
        for topic, model in ((self.scored, channels.SCORED.model), (self.ors_scored, channels.ORS_SCORED.model),
                             (self.deterioration, channels.DETERIORATION.model),
                             (self.alert_status, channels.ALERT_STATUS.model),
                             (self.outcome_alert, channels.OUTCOME_ALERT.model),
                             (self.outcome_alert_status, channels.OUTCOME_ALERT_STATUS.model)):
            decoded, bad = decode_records(by_topic.get(topic, []), model)
            events.extend(d.event for d in decoded)
            self.skipped += len(bad)
        await self.apply_events(events)

    async def apply_events(self, events: Sequence[BaseModel]) -> None:
        """Apply one batch of decoded events of the six topics (their channels' models)."""
        scored = [e for e in events if isinstance(e, ev.SrsScored)]
        ors = [e for e in events if isinstance(e, ev.OrsScored)]
        # Sessions over a record's size cap are skipped here as the live consumer dead-lettered them.
        if scored:
            self.skipped += len((await self.store.apply_scored(self.gen, scored, fresh=True, tally=self.tally)).refused)
        if ors:
            self.skipped += len((await self.store.apply_outcomes(self.gen, ors, fresh=True, tally=self.tally)).refused)
        # Alerts are held, their events folded, and written once each (`HeldAlerts`): raises
        # before statuses, as the live consumer applies a batch of each.
        for e in events:
            if isinstance(e, ev.AllianceDeterioration | ev.OutcomeAlert):
                (self.outcome_alerts if isinstance(e, ev.OutcomeAlert) else self.alerts).add(
                    e.alert_id, rules.raise_update(e))
        for e in events:
            if isinstance(e, ev.AlertStatusChanged):
                (self.outcome_alerts if isinstance(e, ev.OutcomeAlertStatusChanged) else self.alerts).add(
                    e.alert_id, rules.status_update(e))
        await self.alerts.write_overflow()
        await self.outcome_alerts.write_overflow()
        self.events += len(events)
        if self.tally.fields > TALLY_FIELDS:
            await self.store.flush_tally(self.gen, self.tally)

    async def finish(self) -> None:
        """Write the alerts and the counter moves held: the generation is complete."""
        await self.alerts.flush()
        await self.outcome_alerts.flush()
        await self.store.flush_tally(self.gen, self.tally)


async def replay(kafka: KafkaSettings, replayer: Replayer, *, batch: int, progress: Progress | None = None,
                 idle_seconds: float = 10.0, allow_truncated: bool = False) -> None:
    """Read the six topics from the beginning up to the high-water marks first seen, applying batches.

    Refuses (TruncatedLog) when a partition of a scored topic no longer starts at offset 0:
    the rebuilt trajectories would silently lack their oldest sessions. `srs.scored.v1` and
    `ors.scored.v1` need unlimited retention (`retention.ms=-1`) for rebuilds to be complete.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, client_id="alliance-reporting-rebuild",
                                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
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
        last_record = time.monotonic()
        while True:
            got = await consumer.getmany(timeout_ms=200, max_records=batch)
            records = [InboundRecord.from_consumer_record(r) for recs in got.values() for r in recs]
            if records:
                last_record = time.monotonic()
                await replayer.apply(records)
            done = 0
            caught_up = True
            for tp in tps:
                if tp not in target:
                    hw = consumer.highwater(tp)
                    if hw is not None:
                        target[tp] = int(hw)
                pos = await consumer.position(tp)
                if tp in target:
                    done += max(0, min(pos, target[tp]) - begin.get(tp, 0))
                    caught_up = caught_up and pos >= target[tp]
                else:
                    caught_up = False
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
    client = make_client(mongo)
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
            replayer = Replayer(store, new, kafka, alert_bytes=settings.rebuild_alerts_mib * 2**20)
            started = time.perf_counter()
            await replay(kafka, replayer, batch=settings.rebuild_batch_records, progress=progress,
                         idle_seconds=idle_seconds, allow_truncated=allow_truncated)
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
