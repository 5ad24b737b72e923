"""`alliance bench`: the end-to-end benchmark (also `python -m tools.bench.system`).

What it does, in one run on this machine:

1. Starts its own local stack (Tansu memory broker + SecantusDB on free ports) unless
   ALLIANCE_KAFKA_BOOTSTRAP and ALLIANCE_MONGO_URL are given (then it uses a fresh topic prefix
   and database there).
2. Measures the raw limits of that broker and store with bare clients, before any service runs:
   aiokafka produce and consume rates, and the store's bulk-upsert rate.
3. Starts the four services as separate processes (`python -m services.<svc>`), creates keys,
   registers clinicians whose webhook points at a receiver the bench runs on 127.0.0.1.
4. Latency phase: posts single submissions at a fixed offered rate (default 50/s, every tenth one
   deteriorating) and measures p50/p95/p99 from intake acceptance (the 202 received) to
   (a) the scored event on `srs.scored.v1` (a raw aiokafka reader), (b) the session visible in the
   trajectory through the reporting API (a sample, polled), (c) the webhook received; plus the
   intake round trip itself and the bench's own event-loop lag (every timestamp but (b)'s is taken
   on it; (b)'s probe polls from a process of its own, `tools/bench/probe.py` says why).
5. Throughput phase: a burst through the batch endpoint; intake submissions/s, and the rates at
   which scoring and reporting drain it (with all four services running), each as a ratio to the
   raw limit that binds it (step 2).
6. Peak RSS (VmHWM) and CPU seconds per service, broker and store, the machine's load average
   (a shared machine skews every figure); optionally the per-service benches
   (`--service-benches`: each `services/<svc>/bench.py`, run after this one).
7. ORS phase (`--ors-duration`, default 15 s; 0 skips it): single ORS posts at the same offered
   rate, every `deteriorate_every`-th a reliable deterioration, measuring accepted -> `ors.scored.v1`
   and accepted -> outcome webhook. It runs after everything above, and after the CPU and peak RSS
   figures were taken, so every SRS figure is measured exactly as before the ORS existed (the A/B
   of issue 11 stays comparable) and the ORS traffic cannot disturb it. Before timing, one ORS
   must be scored (and its outcome alert delivered) within `--ors-ready-timeout`: a scoring (or
   alerts) service that does not handle the ORS yet leaves a note, not a failed bench.

Figures come from one run on one machine; nothing here is a test assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from shared.events import ORS_ITEM_NAMES
from shared.kafka import InboundRecord, admin_security_kwargs
from shared.settings import KafkaSettings, MongoSettings
from shared.topic_admin import ensure_topics
from tools.bench.common import cpu_seconds, histogram_quantile, percentile, until
from tools.bench.probe import VisibilityProbe
from tools.console import run_command
from tools.processes import ServiceProcess
from tools.receiver import Behaviour, Received, WebhookReceiver
from tools.recorder import TopicRecorder
from tools.simulate import PlannedSubmission, send
from tools.stack import LocalStack, free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("intake", "scoring", "alerts", "reporting")
TENANT = "bench"
PROC_NAMES = {"kafka": "broker (tansu)", "mongo": "store (secantusdb)", "s3": "s3 (localbucket)"}
console = Console(width=None if sys.stdout.isatty() else 120)


# ------------------------------------------------------------------------------------------- helpers

def vm_hwm_kb(pid: int) -> int | None:
    """Peak resident set size of a live process (VmHWM), in KiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


@dataclass
class Stack:
    """Where the bench's broker and store are, and the processes that serve them (if ours)."""

    kafka: KafkaSettings
    mongo: MongoSettings
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)  # broker/store processes we started


@contextlib.contextmanager
def bench_stack(data_dir: Path, mongo_memory: bool) -> Iterator[Stack]:
    """Our own local stack, or the one named by ALLIANCE_KAFKA_BOOTSTRAP / ALLIANCE_MONGO_URL."""
    tag = secrets.token_hex(4)
    if os.environ.get("ALLIANCE_KAFKA_BOOTSTRAP") and os.environ.get("ALLIANCE_MONGO_URL"):
        kafka = KafkaSettings(topic_prefix=f"bench{tag}.")
        mongo = MongoSettings(database=f"bench_{tag}")
        asyncio.run(ensure_topics(kafka))
        env = {"ALLIANCE_KAFKA_TOPIC_PREFIX": kafka.topic_prefix, "ALLIANCE_MONGO_DATABASE": mongo.database}
        yield Stack(kafka, mongo, env)
        return
    local = LocalStack(data_dir, kafka_port=free_port(), mongo_port=free_port(), s3_port=free_port(),
                       mongo_memory=mongo_memory)
    local.start()
    try:
        mongo = MongoSettings(url=local.mongo_url, database=f"bench_{tag}")
        env = {**local.env(), "ALLIANCE_MONGO_DATABASE": mongo.database}
        yield Stack(local.kafka_settings(), mongo, env, {n: p.pid for n, p in local.procs.items()})
    finally:
        local.stop()


# ------------------------------------------------------------------------------------------ raw limits

@dataclass
class RawLimits:
    produce_per_s: float = math.nan
    consume_per_s: float = math.nan
    upsert_per_s: float = math.nan


async def raw_kafka(kafka: KafkaSettings, n: int, size: int = 300) -> tuple[float, float]:
    """Bare aiokafka: produce n records (acks=all, futures gathered), then read them all back."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = f"{kafka.topic_prefix}bench.raw.{secrets.token_hex(3)}"
    await ensure_topics(kafka, topics=(topic,))
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=kafka.linger_ms,
                                enable_idempotence=kafka.idempotence, **admin_security_kwargs(kafka))
    await producer.start()
    value = b"x" * size
    try:
        # warm the metadata so the timed part measures produce only
        await (await producer.send(topic, value, key=b"warm"))
        t0 = time.perf_counter()
        for start in range(0, n, 5000):
            futs = [await producer.send(topic, value, key=str(i).encode()) for i in range(start, min(n, start + 5000))]
            await asyncio.gather(*futs)
        produce = n / (time.perf_counter() - t0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
                                **admin_security_kwargs(kafka))
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or set())]
        if not parts:
            await consumer._client.force_metadata_update()
            parts = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or set())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        got = 0
        t0 = time.perf_counter()
        deadline = time.monotonic() + 60
        while got < n + 1 and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            got += sum(len(v) for v in batches.values())
        consume = got / (time.perf_counter() - t0)
    finally:
        await consumer.stop()
    return produce, consume


async def raw_upsert(mongo: MongoSettings, n: int, batch: int = 500) -> float:
    """Bare pymongo: bulk_write of UpdateOne upserts (what read models and state stores do), n docs."""
    from pymongo import UpdateOne

    from shared.mongo import database, make_client

    client = make_client(mongo, admin=True)
    try:
        coll = database(client, mongo)["bench_raw_upsert"]
        await coll.drop()
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            ops = [UpdateOne({"_id": f"k{i}"}, {"$set": {"total": 38.0, "n": i}, "$push": {"s": i}}, upsert=True)
                   for i in range(start, min(n, start + batch))]
            await coll.bulk_write(ops, ordered=False)
        rate = n / (time.perf_counter() - t0)
        await coll.drop()
        return rate
    finally:
        await client.close()


# --------------------------------------------------------------------------------------- the pipeline

HEALTHY = {"relationship": 9.5, "goals": 9.5, "approach": 9.5, "overall": 9.5}  # total 38.0: no trigger
DETERIORATING = {"relationship": 7.0, "goals": 7.0, "approach": 7.0, "overall": 7.0}  # 28.0: below cutoff


# The ORS phase (docs/outcome.md): every client starts at 20.0 (below the adult cutoff of 25), then
# improves reliably (+8, above the cutoff: neither not-on-track nor any other alert) - except the
# deteriorating sessions, a reliable deterioration (-8 from intake: a critical outcome alert).
ORS_INTAKE = dict.fromkeys(ORS_ITEM_NAMES, 5.0)  # 20.0
ORS_IMPROVED = dict.fromkeys(ORS_ITEM_NAMES, 7.0)  # 28.0
ORS_DETERIORATING = dict.fromkeys(ORS_ITEM_NAMES, 3.0)  # 12.0


def bench_plan(count: int, clients: int, run: str, deteriorate_every: int, now: datetime,
               sites: int = 2, clinicians: int = 4, ors: bool = False) -> list[PlannedSubmission]:
    """Round-robin sessions over `clients`; every `deteriorate_every`-th submission is below cutoff.

    Healthy sessions all total 38.0 (no drop, no cutoff), so exactly the deteriorating ones raise
    an alert; each client's sessions are posted in order, seconds apart, so each is the latest.
    With `ors`, ORS forms instead (`ORS_INTAKE` first, then `ORS_IMPROVED` or `ORS_DETERIORATING`;
    a first session is never deteriorating: it is the intake every change is measured from).
    """
    out: list[PlannedSubmission] = []
    base = now - timedelta(days=1)
    for i in range(count):
        c = i % clients
        n = i // clients + 1
        bad = deteriorate_every > 0 and i % deteriorate_every == deteriorate_every - 1
        body: dict[str, Any] = {
            "submission_id": f"bench-{run}-{i:07d}", "instrument": "SRS", "client_id": f"bc-{run}-{c:05d}",
            "clinician_id": f"bench-clin-{c % clinicians + 1}", "site_id": f"bench-site-{c % sites + 1}",
            "session_number": n, "administered_at": (base + timedelta(minutes=n)).isoformat(),
            "items": DETERIORATING if bad else HEALTHY,
        }
        if ors:
            body.update(instrument="ORS", client_age=34,
                        items=ORS_INTAKE if n == 1 else ORS_DETERIORATING if bad else ORS_IMPROVED)
        out.append(PlannedSubmission(i, 0, "new", body, None, c, n))
    return out


class Webhooks:
    """The shared webhook receiver, and when each submission's first webhook reached it (taken on
    the receiver's thread as the body arrived, so the bench's own loop lag does not count)."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}  # submission_id -> first receipt (time.time())
        self.receiver = WebhookReceiver(default=Behaviour(status=204), on_request=self._record)

    def _record(self, r: Received) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            sid = json.loads(r.body).get("submission_id")
            if isinstance(sid, str):
                self.first.setdefault(sid, r.at)

    @property
    def url(self) -> str:
        return self.receiver.url

    def redeliveries(self) -> int:
        """Receipts beyond the first of a webhook id."""
        return sum(n - 1 for n in Counter(r.webhook_id for r in self.receiver.successes()).values())

    def verified(self, secret: str | None) -> str:
        """How many received bodies carry a valid Standard Webhooks signature for `secret`, of how many."""
        if not secret:
            return "no secret"
        got = self.receiver.successes()
        try:
            from standardwebhooks import Webhook  # test extra; the bench works without it
        except ImportError:
            return f"0/{len(got)}"
        hook = Webhook(secret)
        ok = 0
        for r in got:
            with contextlib.suppress(Exception):
                hook.verify(r.body, r.headers)
                ok += 1
        return f"{ok}/{len(got)}"


class LoopLag:
    """How late the bench's own event loop wakes up: every timestamp here is taken on that loop."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        async def run() -> None:
            loop = asyncio.get_running_loop()
            while True:
                t = loop.time()
                await asyncio.sleep(self.interval)
                self.samples.append(max(0.0, loop.time() - t - self.interval))

        self._task = asyncio.create_task(run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class ScoredReader:
    """Reads `srs.scored.v1` (or `topic`, e.g. `ors.scored.v1`) from the beginning (a fresh topic):
    when each submission was first scored."""

    def __init__(self, kafka: KafkaSettings, topic: str | None = None) -> None:
        self.first: dict[str, float] = {}
        self.flags: dict[str, tuple[bool, tuple[str, ...]]] = {}  # submission -> (latest, flags)
        # a short fetch wait: the broker otherwise holds an empty fetch for up to 500 ms, which
        # would be measured as pipeline latency
        self.recorder = TopicRecorder(kafka.bootstrap, topic or kafka.topics().scored, kafka=kafka,
                                      fetch_max_wait_ms=10, on_record=self._record)

    def _record(self, r: InboundRecord, at: float) -> None:
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            event = json.loads(r.value)
            sid = event.get("submission_id")
            if isinstance(sid, str):
                self.first.setdefault(sid, at)
                self.flags[sid] = (bool(event.get("latest", True)), tuple(event.get("flags") or ()))

    async def start(self) -> None:
        await self.recorder.start(background=True)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.recorder.stop()


B_AFTER_SCORING = "(b) part: scored event -> trajectory visible"
B_READ = "(b) part: one trajectory read (every poll)"
LOOP_LAG = "alliance_event_loop_lag_seconds"  # shared.metrics.EVENT_LOOP_LAG, read from each service's page


def after_scoring(visible: dict[str, float], scored: dict[str, float]) -> list[float]:
    """Seconds from the scored event to the trajectory showing it, per sampled submission seen both ways."""
    return [max(0.0, at - scored[s]) for s, at in visible.items() if s in scored]


# The checkout the bench runs from: the probe process imports `tools` from it too.
_ROOT = str(Path(__file__).resolve().parents[2])


class ProbeProcess:
    """The (b) probe as the latency phase uses it (`watch`, then `first`, `round_trips`,
    `statuses`, `watched`, `skipped`, `tasks`), its polling done by a `VisibilityProbe` in a
    process of its own (`python -m tools.bench.probe`, which says why).

    `watch` sends the child one JSON line; the child answers one line per trajectory read and one
    when a watch ends (seen, with the wall-clock time it was seen, or timed out). The bound on
    probes in flight is kept here, so what is skipped is decided where it was before."""

    def __init__(self, base_url: str, key: str, interval: float, timeout: float, max_in_flight: int = 8) -> None:
        self._args = [base_url, key, str(interval), str(timeout)]
        self.max_in_flight = max_in_flight
        self.first: dict[str, float] = {}
        self.tasks: set[str] = set()  # the submissions being watched (named as VisibilityProbe's)
        self.statuses: Counter[int] = Counter()
        self.watched = 0
        self.skipped = 0
        self.round_trips: list[float] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tools.bench.probe", *self._args, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env)
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            msg = json.loads(line)
            if "read" in msg:
                self.round_trips.append(float(msg["read"]))
                self.statuses[int(msg["status"])] += 1
            else:
                self.tasks.discard(msg["sid"])
                if msg["at"] is not None:
                    self.first[msg["sid"]] = float(msg["at"])
        self.tasks.clear()  # the child is gone: nothing is being watched any more

    def watch(self, submission_id: str, client_id: str, session_number: int) -> None:
        if self._proc is None or self._proc.stdin is None or len(self.tasks) >= self.max_in_flight:
            self.skipped += 1
            return
        self.watched += 1
        self.tasks.add(submission_id)
        self._proc.stdin.write(json.dumps({"sid": submission_id, "client": client_id,
                                           "n": session_number}).encode() + b"\n")

    async def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 5)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        if self._reading is not None:
            await self._reading
        self._proc = self._reading = None  # stopped: a second stop does nothing


async def metric_sum(http: httpx.AsyncClient, url: str, name: str) -> float | None:
    """Sum of every sample of a Prometheus counter on a /metrics page; None when absent."""
    try:
        text = (await http.get(url + "/metrics")).text
    except httpx.HTTPError:
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    return total if found else None


@dataclass
class Options:
    rate: float = 50.0
    duration: float = 30.0
    deteriorate_every: int = 10
    clients: int = 199
    burst: int = 5000
    batch_size: int = 500
    raw_records: int = 20_000
    raw_upserts: int = 5000
    visible_sample: int = 5
    visible_poll: float = 0.05
    drain_timeout: float = 60.0
    visible_timeout: float = 15.0
    visible_probes: int = 8
    ready_timeout: float = 120.0
    ors_duration: float = 15.0  # the ORS phase, after everything SRS (0: skipped)
    ors_ready_timeout: float = 30.0


@dataclass
class Results:
    raw: RawLimits = field(default_factory=RawLimits)
    latency: dict[str, list[float]] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    rss_kb: dict[str, int | None] = field(default_factory=dict)
    cpu_s: dict[str, float | None] = field(default_factory=dict)  # CPU used during warm-up + measurement
    # Each service's own `alliance_event_loop_lag_seconds` (p50, p99), from its start to the snapshot.
    loop_lag_s: dict[str, tuple[float, float]] = field(default_factory=dict)
    startup_seconds: float = math.nan
    notes: list[str] = field(default_factory=list)


async def setup_tenant(stack: Stack, urls: dict[str, str], hook_url: str, clinicians: int
                       ) -> tuple[str, str, str | None]:
    """Keys for the bench tenant, a webhook signing secret, and clinicians whose webhook is the receiver."""
    from shared import auth
    from shared.mongo import database, make_client

    client = make_client(stack.mongo, admin=True)
    try:
        db = database(client, stack.mongo)
        submit, _ = await auth.create_key(db, TENANT, "submit", None, "bench")
        read, _ = await auth.create_key(db, TENANT, "read", None, "bench")
        admin, _ = await auth.create_key(db, TENANT, "admin", None, "bench")
    finally:
        await client.close()
    secret: str | None = None
    if "alerts" not in urls:
        return submit, read, secret
    async with httpx.AsyncClient(base_url=urls["alerts"], timeout=10,
                                 headers={"Authorization": f"Bearer {admin}"}) as http:
        r = await http.post("/v1/webhook-secret")
        if r.status_code in (200, 201):
            secret = r.json().get("secret")
        for k in range(clinicians):
            body = {"site_id": f"bench-site-{k % 2 + 1}", "email": f"bench-clin-{k + 1}@example.test",
                    "webhook_url": hook_url}
            r = await http.put(f"/v1/clinicians/bench-clin-{k + 1}", json=body)
            if r.status_code >= 300:
                raise RuntimeError(f"registering a clinician failed: {r.status_code} {r.text[:300]}")
    return submit, read, secret


async def measure(stack: Stack, urls: dict[str, str], opts: Options, res: Results,
                  before_ors: Callable[[], None] | None = None) -> None:
    """Warm up, then the latency phase, then the throughput burst; then (`opts.ors_duration`) the ORS
    phase, after calling `before_ors` (the bench takes its CPU and peak RSS figures there)."""
    lag = LoopLag()
    lag.start()
    receiver = Webhooks()
    receiver.receiver.start()
    reader = ScoredReader(stack.kafka)
    await reader.start()
    submit, read, secret = await setup_tenant(stack, urls, receiver.url, clinicians=4)
    alerts, reporting = "alerts" in urls, "reporting" in urls
    http = httpx.AsyncClient(base_url=urls.get("reporting", "http://127.0.0.1:9"), timeout=10)
    warm_probe = VisibilityProbe(http, read, opts.visible_poll, opts.visible_timeout)
    probe = ProbeProcess(urls.get("reporting", "http://127.0.0.1:9"), read, opts.visible_poll, opts.visible_timeout,
                         opts.visible_probes)
    await probe.start()
    try:
        # Warm-up: one deteriorating submission must travel the whole way (consumers have joined
        # their groups, caches are warm) before anything is timed.
        run = secrets.token_hex(3)
        warm = bench_plan(1, 1, f"w{run}", 1, datetime.now(UTC))
        t0 = time.monotonic()
        await send(warm, urls["intake"], [submit], rate=10, duration=5)
        sid = warm[0].submission_id

        async def warmed() -> bool:
            return sid in reader.first and (not alerts or sid in receiver.first)

        if not await until(warmed, opts.ready_timeout, 0.2):
            res.notes.append(f"warm-up: scored {sid in reader.first}, webhook {sid in receiver.first} "
                             f"after {opts.ready_timeout:.0f} s")

        async def visible() -> bool:
            return await warm_probe.visible(warm[0].body["client_id"], 1)

        if reporting and not await until(visible, opts.drain_timeout, 0.2):
            reporting = False
            res.notes.append(f"warm-up: the trajectory never became visible through reporting within "
                             f"{opts.drain_timeout:.0f} s (answers: {dict(warm_probe.statuses)}); (b) not measured")
        res.counts["warmup_seconds"] = round(time.monotonic() - t0, 1)

        # Latency phase: single posts at the offered rate.
        count = max(1, int(opts.rate * opts.duration))
        planned = bench_plan(count, opts.clients, run, opts.deteriorate_every, datetime.now(UTC))
        accepted: dict[str, float] = {}
        n_accepted = 0

        post_latency: list[float] = []

        def on_result(p: PlannedSubmission, outcome: str, status: str, at: float, started: float) -> None:
            nonlocal n_accepted
            if outcome != "accepted":
                return
            accepted[p.submission_id] = at
            post_latency.append(at - started)
            n_accepted += 1
            if reporting and n_accepted % opts.visible_sample == 0:
                probe.watch(p.submission_id, p.body["client_id"], p.body["session_number"])

        lag.samples.clear()
        stats = await send(planned, urls["intake"], [submit], opts.rate, opts.duration, on_result=on_result)
        res.latency["bench event-loop lag (10 ms ticks, sending)"] = list(lag.samples)
        deteriorating = {p.submission_id for p in planned if p.body["items"] == DETERIORATING}
        deteriorated = deteriorating & set(accepted)

        def expected() -> set[str]:
            # A deteriorating session superseded by the client's next one before scoring saw it
            # (the posts crossed inside intake) is scored latest=false and rightly raises no alert.
            return {s for s in deteriorated if reader.flags.get(s, (True, ()))[0]}

        async def drained() -> bool:
            return (set(accepted) <= set(reader.first) and not probe.tasks
                    and (not alerts or expected() <= set(receiver.first)))

        await until(drained, opts.drain_timeout, 0.2)
        expected_alerts = expected()
        a, b, c = ("(a) accepted -> scored event", "(b) accepted -> trajectory visible",
                   "(c) accepted -> webhook received")
        res.latency["(0) POST sent -> 202 received (intake)"] = post_latency
        res.expected["(0) POST sent -> 202 received (intake)"] = stats.sent
        res.latency[a] = [max(0.0, reader.first[s] - t) for s, t in accepted.items() if s in reader.first]
        res.expected[a] = len(accepted)
        # Its answers are all in once it has ended; and ended (reaped), its CPU counts as the
        # bench's in the figures taken next (`os.times` of the children waited for).
        await probe.stop()
        if reporting:
            res.latency[b] = [max(0.0, probe.first[s] - accepted[s]) for s in probe.first if s in accepted]
            res.expected[b] = probe.watched
            # Where (b) goes (issue 11): its part after scoring (reporting's consume and write, and
            # the read that saw it), and what one read costs the probe; the probe is unchanged.
            res.latency[B_AFTER_SCORING] = after_scoring(probe.first, reader.first)
            res.latency[B_READ] = list(probe.round_trips)
            if probe.skipped:
                res.notes.append(f"(b): {probe.skipped} samples skipped ({probe.max_in_flight} probes in flight)")
        elif "reporting" not in urls:
            res.notes.append("reporting is not runnable yet: (b) and the reporting rate were not measured")
        if alerts:
            res.latency[c] = [max(0.0, receiver.first[s] - accepted[s])
                              for s in expected_alerts if s in receiver.first]
            res.expected[c] = len(expected_alerts)
        else:
            res.notes.append("alerts is not runnable yet: (c) was not measured")
        unexpected_hooks = set(receiver.first) - expected_alerts - {sid}
        for missing in sorted(expected_alerts - set(receiver.first))[:5] if alerts else ():
            latest, flags = reader.flags.get(missing, (None, ()))
            res.notes.append(f"no webhook for {missing}: scored latest={latest} flags={list(flags)}")
        res.counts.update({
            "offered_rate": round(stats.sent / stats.elapsed, 1) if stats.elapsed else 0,
            "sent": stats.sent, "accepted": stats.accepted, "rejected": dict(stats.rejected),
            "retried_429_503": stats.retried, "sender_behind_s": round(stats.behind_seconds, 3),
            "deteriorating accepted": len(deteriorated),
            "... superseded before scoring (latest=false)": len(deteriorated - expected_alerts),
            "alerts_expected": len(expected_alerts),
            "alerts_received": len(expected_alerts & set(receiver.first)),
            "unexpected_alerts": len(unexpected_hooks),
            "webhook_redeliveries": receiver.redeliveries(),
            "signatures_verified": receiver.verified(secret),
        })

        # Throughput phase: a burst through the batch endpoint.
        if opts.burst > 0:
            await burst(stack, urls, opts, res, submit, reader, http)
        if opts.ors_duration > 0:
            if before_ors is not None:
                before_ors()
            await ors_phase(stack, opts, res, urls["intake"], submit, receiver, alerts, lag)
    finally:
        lag.stop()
        await probe.stop()
        await http.aclose()
        await reader.stop()
        receiver.receiver.stop()


async def burst(stack: Stack, urls: dict[str, str], opts: Options, res: Results, submit: str,
                reader: ScoredReader, http: httpx.AsyncClient) -> None:
    """Post `opts.burst` healthy submissions in batches as fast as intake takes them; time each stage's drain."""
    run = secrets.token_hex(3)
    planned = bench_plan(opts.burst, max(1, opts.burst // 5), f"b{run}", 0, datetime.now(UTC))
    bodies = [p.body for p in planned]
    ids = {p.submission_id for p in planned}
    reporting = urls.get("reporting")
    before = None if reporting is None else await metric_sum(http, reporting, "alliance_reporting_events_total")
    accepted = 0
    async with httpx.AsyncClient(base_url=urls["intake"], timeout=60,
                                 headers={"Authorization": f"Bearer {submit}"}) as intake:
        sem = asyncio.Semaphore(4)

        async def post(chunk: list[dict[str, Any]]) -> int:
            async with sem:
                for _ in range(5):
                    r = await intake.post("/v1/submissions/batch", json={"submissions": chunk})
                    if r.status_code in (429, 503):
                        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                        continue
                    r.raise_for_status()
                    return sum(1 for x in r.json()["results"] if x["status"] == "accepted")
                return 0

        t0 = time.time()
        chunks = [bodies[i:i + opts.batch_size] for i in range(0, len(bodies), opts.batch_size)]
        accepted = sum(await asyncio.gather(*(post(c) for c in chunks)))
        t_intake = time.time()
    res.throughput["intake batch submissions/s"] = accepted / (t_intake - t0)

    async def all_scored() -> bool:
        return ids <= set(reader.first)

    await until(all_scored, opts.drain_timeout)
    scored = [reader.first[s] for s in ids if s in reader.first]
    if scored:
        res.throughput["scoring events/s (burst start -> last scored)"] = len(scored) / (max(scored) - t0)
    if len(scored) < accepted:
        res.notes.append(f"burst: {accepted - len(scored)} of {accepted} never seen scored")
    if reporting is None:
        return
    if before is None:
        res.notes.append("reporting exposes no alliance_reporting_events_total; reporting rate not measured")
        return
    target = before + len(scored)

    async def all_applied() -> bool:
        now = await metric_sum(http, reporting, "alliance_reporting_events_total")
        return now is not None and now >= target

    if await until(all_applied, opts.drain_timeout):
        res.throughput["reporting materialized events/s (burst start -> applied)"] = len(scored) / (time.time() - t0)
    else:
        res.notes.append("burst: reporting did not apply every scored event within the drain timeout")


ORS_POST, ORS_SCORED, ORS_WEBHOOK = ("ORS (0) POST sent -> 202 received (intake)",
                                     "ORS (a) accepted -> ors.scored.v1 event",
                                     "ORS (c) accepted -> outcome webhook received")


async def ors_phase(stack: Stack, opts: Options, res: Results, intake_url: str, submit: str, receiver: Webhooks,
                    alerts: bool, lag: LoopLag) -> None:
    """Single ORS posts at `opts.rate` for `opts.ors_duration` s: accepted -> scored, accepted -> webhook.
    Figures only once one ORS has gone the whole way: scoring and alerts may not handle it yet."""
    reader = ScoredReader(stack.kafka, stack.kafka.topics().ors_scored)
    await reader.start()
    try:
        run = secrets.token_hex(3)
        # Warm-up: one client's intake, then a reliable deterioration (its outcome alert).
        warm = bench_plan(2, 1, f"ow{run}", 2, datetime.now(UTC), ors=True)
        await send(warm, intake_url, [submit], rate=10, duration=5)
        last = warm[-1].submission_id

        async def scored() -> bool:
            return last in reader.first

        async def delivered() -> bool:
            return last in receiver.first

        if not await until(scored, opts.ors_ready_timeout, 0.2):
            res.notes.append(f"ORS: no ors.scored.v1 event within {opts.ors_ready_timeout:.0f} s of the warm-up "
                             "(does scoring score the ORS yet?): the ORS figures were not measured")
            return
        hooks = alerts and await until(delivered, opts.ors_ready_timeout, 0.2)
        if alerts and not hooks:
            res.notes.append(f"ORS: the warm-up's outcome alert reached no webhook within "
                             f"{opts.ors_ready_timeout:.0f} s (does alerts deliver outcome alerts yet?): "
                             "ORS (c) not measured")
        count = max(1, int(opts.rate * opts.ors_duration))
        # At least 4 sessions per client: a first session is the intake and never deteriorates.
        planned = bench_plan(count, max(1, min(opts.clients, count // 4)), f"o{run}", opts.deteriorate_every,
                             datetime.now(UTC), ors=True)
        accepted: dict[str, float] = {}
        post_latency: list[float] = []

        def on_result(p: PlannedSubmission, outcome: str, status: str, at: float, started: float) -> None:
            if outcome == "accepted":
                accepted[p.submission_id] = at
                post_latency.append(at - started)

        lag.samples.clear()
        stats = await send(planned, intake_url, [submit], opts.rate, opts.ors_duration, on_result=on_result)
        res.latency["ORS bench event-loop lag (10 ms ticks, sending)"] = list(lag.samples)
        deteriorated = {p.submission_id for p in planned if p.body["items"] == ORS_DETERIORATING} & set(accepted)

        def expected() -> set[str]:  # as for the SRS: a session superseded before it was scored raises none
            return {s for s in deteriorated if reader.flags.get(s, (True, ()))[0]}

        async def drained() -> bool:
            return set(accepted) <= set(reader.first) and (not hooks or expected() <= set(receiver.first))

        await until(drained, opts.drain_timeout, 0.2)
        wanted = expected()
        res.latency[ORS_POST] = post_latency
        res.expected[ORS_POST] = stats.sent
        res.latency[ORS_SCORED] = [max(0.0, reader.first[s] - t) for s, t in accepted.items() if s in reader.first]
        res.expected[ORS_SCORED] = len(accepted)
        if hooks:
            res.latency[ORS_WEBHOOK] = [max(0.0, receiver.first[s] - accepted[s]) for s in wanted
                                        if s in receiver.first]
            res.expected[ORS_WEBHOOK] = len(wanted)
        res.counts.update({
            "ORS sent": stats.sent, "ORS accepted": stats.accepted,
            "ORS reliable deteriorations accepted": len(deteriorated),
            "ORS outcome alerts expected": len(wanted),
            "ORS outcome alerts received": len(wanted & set(receiver.first)) if hooks else "not measured",
        })
    finally:
        await reader.stop()


def run_service_benches() -> None:
    """Run each `services/<svc>/bench.py` that exists (each starts its own stack unless given one)."""
    for svc in SERVICES:
        if importlib.util.find_spec(f"tools.bench.{svc}") is None:
            console.print(f"[yellow]services/{svc}/bench.py: not present")
            continue
        console.rule(f"python -m tools.bench.{svc}")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", f"tools.bench.{svc}"], env=env, cwd=ROOT, check=False)


# ---------------------------------------------------------------------------------------------- report

def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.0f}"


def stage_limit(stage: str, raw: RawLimits) -> tuple[str, float]:
    """The raw limit a stage is compared with: what it cannot be faster than on this broker and store."""
    if stage.startswith("intake"):
        return "produce", raw.produce_per_s
    if stage.startswith("scoring"):  # consumes, keeps state in the store, produces
        return min(("produce", raw.produce_per_s), ("upsert", raw.upsert_per_s), key=lambda x: x[1])
    return "upsert", raw.upsert_per_s


def report(res: Results, opts: Options) -> None:
    """Print the figures as tables."""
    raw = Table(title="raw limits of the broker and store in use (bare clients, before the services start)")
    raw.add_column("limit")
    raw.add_column("rate/s", justify="right")
    raw.add_row(f"aiokafka produce (acks=all, {opts.raw_records} x 300 B)", f"{res.raw.produce_per_s:,.0f}")
    raw.add_row("aiokafka consume (no group)", f"{res.raw.consume_per_s:,.0f}")
    raw.add_row(f"store bulk upsert (UpdateOne upserts, batches of 500, {opts.raw_upserts} docs)",
                f"{res.raw.upsert_per_s:,.0f}")
    console.print(raw)

    lat = Table(title=f"end-to-end latency at {opts.rate:g}/s offered for {opts.duration:g} s, "
                      f"every {opts.deteriorate_every}th deteriorating (ms)")
    for col in ("path", "n / expected", "p50", "p95", "p99", "max"):
        lat.add_column(col, justify="left" if col == "path" else "right")
    for name, values in res.latency.items():
        n = f"{len(values)}/{res.expected[name]}" if name in res.expected else str(len(values))
        lat.add_row(name, n, _ms(percentile(values, 50)),
                    _ms(percentile(values, 95)), _ms(percentile(values, 99)),
                    _ms(max(values) if values else math.nan))
    console.print(lat)
    console.print(f"(b) polls every {opts.visible_poll * 1000:.0f} ms, every {opts.visible_sample}th submission, "
                  f"at most {opts.visible_probes} probes at once")
    if ORS_SCORED in res.latency:
        console.print(f"ORS rows: a phase of its own after the burst, {opts.ors_duration:g} s at the same rate, "
                      f"every {opts.deteriorate_every}th a reliable deterioration (a critical outcome alert)")

    if res.throughput:
        thr = Table(title=f"throughput: a burst of {opts.burst} submissions in batches of {opts.batch_size}, "
                          "all services running")
        for col in ("stage", "events/s", "raw limit it is held against", "ratio"):
            thr.add_column(col, justify="left" if col in ("stage", "raw limit it is held against") else "right")
        for name, rate in res.throughput.items():
            limit_name, limit = stage_limit(name, res.raw)
            thr.add_row(name, f"{rate:,.0f}", f"{limit_name} {limit:,.0f}/s", f"{rate / limit:.1%}")
        console.print(thr)

    rss = Table(title="per process: peak RSS (VmHWM) and CPU used from warm-up to the end of the burst; "
                      "a service's event-loop lag (its alliance_event_loop_lag_seconds, from start)")
    rss.add_column("process")
    rss.add_column("peak RSS MiB", justify="right")
    rss.add_column("CPU s", justify="right")
    rss.add_column("loop lag p50 / p99 ms", justify="right")
    for name in dict.fromkeys([*res.rss_kb, *res.cpu_s]):
        kb, cpu, lag = res.rss_kb.get(name), res.cpu_s.get(name), res.loop_lag_s.get(name)
        rss.add_row(name, "-" if kb is None else f"{kb / 1024:.0f}", "-" if cpu is None else f"{cpu:.1f}",
                    "-" if lag is None else f"{lag[0] * 1000:.1f} / {lag[1] * 1000:.1f}")
    console.print(rss)

    counts = Table(title="counts")
    counts.add_column("measure")
    counts.add_column("value", justify="right")
    counts.add_row("services ready after (s)", f"{res.startup_seconds:.1f}")
    for k, v in res.counts.items():
        counts.add_row(k, str(v))
    console.print(counts)
    for note in res.notes:
        console.print(f"[yellow]note: {note}")


def figures(res: Results, opts: Options) -> dict[str, Any]:
    """The figures as JSON-friendly data."""
    return {
        "options": opts.__dict__,
        "raw": res.raw.__dict__,
        "latency_ms": {k: {"n": len(v), "expected": res.expected.get(k, 0),
                           **{f"p{p}": round(percentile(v, p) * 1000, 1) for p in (50, 95, 99)}}
                       for k, v in res.latency.items()},
        "throughput_per_s": {k: round(v, 1) for k, v in res.throughput.items()},
        "throughput_ratio": {k: round(v / stage_limit(k, res.raw)[1], 3) for k, v in res.throughput.items()},
        "peak_rss_mib": {k: None if v is None else round(v / 1024, 1) for k, v in res.rss_kb.items()},
        "cpu_seconds": {k: None if v is None else round(v, 1) for k, v in res.cpu_s.items()},
        "loop_lag_ms": {k: {"p50": round(v[0] * 1000, 1), "p99": round(v[1] * 1000, 1)}
                        for k, v in res.loop_lag_s.items()},
        "counts": res.counts,
        "startup_seconds": res.startup_seconds,
        "notes": res.notes,
    }


# ------------------------------------------------------------------------------------------------- cli

def missing_services() -> list[str]:
    """Services whose `python -m services.<svc>` cannot run yet."""
    return [s for s in SERVICES if not (ROOT / "services" / s / "__main__.py").exists()
            or not (ROOT / "services" / s / "app.py").exists()]


def bench(
    rate: Annotated[float, typer.Option(help="offered submissions/s in the latency phase", min=0.1)] = 50.0,
    duration: Annotated[float, typer.Option(help="seconds of the latency phase", min=1)] = 30.0,
    deteriorate_every: Annotated[int, typer.Option(help="every Nth submission deteriorates (0: none)",
                                                   min=0)] = 10,
    clients: Annotated[int, typer.Option(help="clients in the latency phase", min=1)] = 199,
    burst: Annotated[int, typer.Option(help="submissions in the throughput burst (0: skip)", min=0)] = 5000,
    batch_size: Annotated[int, typer.Option(help="batch size in the burst", min=1, max=1000)] = 500,
    raw_records: Annotated[int, typer.Option(help="records for the raw Kafka rates", min=100)] = 20_000,
    raw_upserts: Annotated[int, typer.Option(help="documents for the raw bulk-upsert rate", min=100)] = 5000,
    visible_sample: Annotated[int, typer.Option(help="probe trajectory visibility of every Nth submission",
                                                min=1)] = 5,
    visible_probes: Annotated[int, typer.Option(help="at most this many trajectory probes at once (each polls "
                                                     "every 50 ms), so probing cannot become the load", min=1)] = 8,
    ors_duration: Annotated[float, typer.Option(help="seconds of the ORS phase, run after every SRS figure was "
                                                     "taken (0: skip it)", min=0)] = 15.0,
    ors_ready_timeout: Annotated[float, typer.Option(help="seconds the ORS warm-up may take to be scored (and its "
                                                          "outcome alert delivered) before the ORS figures are left "
                                                          "out with a note", min=1)] = 30.0,
    mongo_memory: Annotated[bool, typer.Option(help="run the local store in memory instead of on disk")] = False,
    service_benches: Annotated[bool, typer.Option(help="then run each services/<svc>/bench.py")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures to this file")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="stack data and service logs (default: a temp dir)")] = None,
) -> None:
    """End-to-end benchmark: raw broker/store limits, latency to scored/visible/webhook, stage rates, RSS."""
    opts = Options(rate=rate, duration=duration, deteriorate_every=deteriorate_every, clients=clients, burst=burst,
                   batch_size=batch_size, raw_records=raw_records, raw_upserts=raw_upserts,
                   visible_sample=visible_sample, visible_probes=visible_probes, ors_duration=ors_duration,
                   ors_ready_timeout=ors_ready_timeout)
    missing = missing_services()
    if "intake" in missing or "scoring" in missing:
        console.print(f"[red]not runnable yet (no app.py/__main__.py): {', '.join(missing)}")
        raise typer.Exit(2)
    present = [s for s in SERVICES if s not in missing]
    data = data_dir or Path(tempfile.mkdtemp(prefix="alliance-bench-"))
    data.mkdir(parents=True, exist_ok=True)
    res = Results()
    console.print(f"stack data and service logs: {data}")
    # a shared machine: other work skews every figure, so say how busy it was
    res.counts["load average (1 min) at start"] = round(os.getloadavg()[0], 2)
    with bench_stack(data, mongo_memory) as stack:
        console.print("measuring raw limits ...")
        res.raw.produce_per_s, res.raw.consume_per_s = asyncio.run(raw_kafka(stack.kafka, opts.raw_records))
        res.raw.upsert_per_s = asyncio.run(raw_upsert(stack.mongo, opts.raw_upserts))
        env = {**stack.env, "ALLIANCE_ALERTS_ALLOW_PRIVATE_TARGETS": "true", "ALLIANCE_ALERTS_DEV_MODE": "true",
               "ALLIANCE_LOG_LEVEL": "WARNING",
               # the burst measures capacity, so the per-key rate limit must not be what binds
               "ALLIANCE_INTAKE_RATE_PER_SECOND": "1000000", "ALLIANCE_INTAKE_RATE_BURST": "1000000",
               "ALLIANCE_REPORTING_READ_RATE_PER_SECOND": "1000000", "ALLIANCE_REPORTING_READ_RATE_BURST": "1000000",
               "ALLIANCE_SMTP_HOST": ""}
        procs = {s: ServiceProcess(s, free_port(), env, data / f"{s}.log") for s in present}
        try:
            console.print(f"starting {', '.join(present)} ...")
            t0 = time.monotonic()
            for p in procs.values():
                p.start()
            for p in procs.values():
                p.wait_ready(opts.ready_timeout)
            res.startup_seconds = time.monotonic() - t0
            console.print(f"services ready in {res.startup_seconds:.1f} s; warm-up, then "
                          f"{opts.rate:g}/s for {opts.duration:g} s ...")
            pids = {s: p.proc.pid for s, p in procs.items() if p.proc is not None}
            pids.update({PROC_NAMES.get(n, n): pid for n, pid in stack.pids.items()})
            cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
            own0 = sum(os.times()[:4])

            def snapshot() -> None:
                """CPU used and peak RSS so far: taken before the ORS phase, so they stay SRS-only figures."""
                for n, pid in pids.items():
                    used = cpu_seconds(pid) - cpu0.get(n, math.nan)
                    res.cpu_s[n] = None if math.isnan(used) else used
                # Its own CPU and that of its children it has waited for: the probe process
                # (`ProbeProcess`, ended with the latency phase); the services and the stack run on.
                res.cpu_s["bench (load generator, probes, receiver)"] = sum(os.times()[:4]) - own0
                res.counts["load average (1 min) at end"] = round(os.getloadavg()[0], 2)
                for s, p in procs.items():  # after the CPU figures, so reading the pages is not in them
                    res.rss_kb[s] = vm_hwm_kb(p.proc.pid) if p.proc is not None else None
                    with contextlib.suppress(httpx.HTTPError):
                        page = httpx.get(p.url + "/metrics", timeout=5).text
                        res.loop_lag_s[s] = (histogram_quantile(page, LOOP_LAG, 0.5, service=s),
                                             histogram_quantile(page, LOOP_LAG, 0.99, service=s))
                for name, pid in stack.pids.items():
                    res.rss_kb[PROC_NAMES.get(name, name)] = vm_hwm_kb(pid)

            asyncio.run(measure(stack, {s: p.url for s, p in procs.items()}, opts, res, before_ors=snapshot))
            if not res.cpu_s:  # no ORS phase: taken here, as before the ORS existed
                snapshot()
            for s, p in procs.items():  # kept for a closer look (histograms of each stage)
                with contextlib.suppress(httpx.HTTPError):
                    (data / f"{s}.metrics.txt").write_text(httpx.get(p.url + "/metrics", timeout=5).text)
            res.counts["cpus"] = os.cpu_count()
        finally:
            for p in procs.values():
                p.stop()
        report(res, opts)
        if json_out is not None:
            json_out.write_text(json.dumps(figures(res, opts), indent=2, default=str))
    if service_benches:
        run_service_benches()


def main(argv: list[str] | None = None) -> None:
    """`python -m tools.bench.system [options]`."""
    run_command(bench, argv, "bench")


if __name__ == "__main__":
    main()
