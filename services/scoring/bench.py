"""Benchmark of the scoring stage: scored events/s next to the two limits under it.

    python -m services.scoring.bench [--submissions 12000] [--sessions 4] [--batch 500]

In one run, on one broker and one store:

1. fills a fresh `srs.submitted.v1` topic with N submissions (clients x sessions, sessions in
   order per client, about one in five deteriorating);
2. limit 1, the broker: a bare aiokafka read-process-write loop over the same records
   (`getmany(max_records=batch)`, parse + trivial transform, send all, gather acks, commit);
3. limit 2, the store: raw `bulk_write` of replace-upserts of N documents shaped like scoring's
   state documents, in batches of the same size;
4. scoring itself, as a separate process (`python -m services.scoring`), draining the same N
   records: scored events/s from its first to its last scored event (the group join is excluded,
   as it is for limit 1).

Prints the three rates, names the slower limit (the binding one) and the ratio of scoring to it
(target >= 0.5). Starts its own local stack unless ALLIANCE_KAFKA_BOOTSTRAP and
ALLIANCE_MONGO_URL are set (then it uses a fresh topic prefix and database there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pymongo import AsyncMongoClient, ReplaceOne

from services.scoring.history import History, Submission
from services.scoring.loadgen import TopicReader, publish, series_total, start_producer, submission
from services.scoring.rules import TenantRules
from services.scoring.store import history_doc, series_key
from shared.events import Instrument
from shared.mongo import Document
from shared.settings import KafkaSettings
from shared.stack import LocalStack, ensure_topics, free_port

ROOT = Path(__file__).resolve().parents[2]
TENANT = "bench"


@dataclass
class Target:
    """Where the bench runs: broker, store, a fresh topic prefix and database."""

    bootstrap: str
    mongo_url: str
    prefix: str
    database: str
    idempotence: bool

    def kafka(self) -> KafkaSettings:
        return KafkaSettings(bootstrap=self.bootstrap, idempotence=self.idempotence, topic_prefix=self.prefix)

    def env(self, port: int, batch: int) -> dict[str, str]:
        return {
            "ALLIANCE_KAFKA_BOOTSTRAP": self.bootstrap, "ALLIANCE_KAFKA_IDEMPOTENCE": str(self.idempotence).lower(),
            "ALLIANCE_KAFKA_TOPIC_PREFIX": self.prefix, "ALLIANCE_MONGO_URL": self.mongo_url,
            "ALLIANCE_MONGO_DATABASE": self.database, "ALLIANCE_SCORING_PORT": str(port),
            "ALLIANCE_SCORING_MAX_RECORDS": str(batch), "ALLIANCE_LOG_LEVEL": "WARNING",
        }


async def fill(target: Target, clients: int, sessions: int) -> int:
    """Publish clients x sessions submissions, one round per session number."""
    producer = await start_producer(target.bootstrap, max_batch_size=256 * 1024)
    try:
        topic = target.kafka().topics().submitted
        for s in range(1, sessions + 1):
            await publish(producer, topic, [
                submission(TENANT, f"client-{c}", s, series_total(c, s), submission_id=f"client-{c}-s{s}",
                           accepted_at=datetime.now(UTC)) for c in range(clients)])
    finally:
        await producer.stop()
    return clients * sessions


async def bare_loop(target: Target, n: int, batch: int) -> float:
    """Records/s of a bare consume -> transform -> produce -> commit loop over the submitted topic."""
    topics = target.kafka().topics()
    out_topic = target.prefix + "bench.bare-out"
    await ensure_topics(target.kafka(), (out_topic,))
    consumer = AIOKafkaConsumer(topics.submitted, bootstrap_servers=target.bootstrap, group_id=target.prefix + "bare",
                                enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=batch)
    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, acks="all", linger_ms=5,
                                max_batch_size=256 * 1024)
    await consumer.start()
    await producer.start()
    done, started = 0, 0.0
    try:
        while done < n:
            got = await consumer.getmany(timeout_ms=1000, max_records=batch)
            if not got:
                continue
            if not started:
                started = time.perf_counter()
            futures = []
            for recs in got.values():
                for r in recs:
                    doc = json.loads(r.value)
                    doc["total"] = doc.get("total") or 0.0
                    doc["scored_at"] = datetime.now(UTC).isoformat()
                    futures.append(await producer.send(out_topic, json.dumps(doc).encode(), key=r.key))
                    done += 1
            await asyncio.gather(*futures)
            await consumer.commit()
        return n / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()


def state_docs(n: int, sessions: int) -> list[tuple[str, Document]]:
    """n documents shaped like scoring's state documents after 1..sessions sessions."""
    docs = []
    now = datetime.now(UTC)
    for i in range(n):
        h = History()
        for s in range(1, i % sessions + 2):
            h.apply(Submission(f"client-{i}-s{s}", s, Instrument.SRS, now + timedelta(seconds=s), None,
                               series_total(i, s)), TenantRules(), now)
        key = series_key(TENANT, f"client-{i}", Instrument.SRS, None)
        docs.append((key.doc_id, history_doc(key, h, 1)))
    return docs


async def store_limit(target: Target, n: int, batch: int, sessions: int) -> float:
    """Documents/s of raw bulk replace-upserts into a fresh collection."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(target.mongo_url, tz_aware=True)
    try:
        col = client[target.database]["bench_raw_upserts"]
        docs = state_docs(n, sessions)
        started = time.perf_counter()
        for i in range(0, n, batch):
            await col.bulk_write([ReplaceOne({"_id": k}, d, upsert=True) for k, d in docs[i : i + batch]],
                                 ordered=False)
        return n / (time.perf_counter() - started)
    finally:
        await client.close()


def spawn_scoring(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m services.scoring` as production runs it, logging to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "services.scoring"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)})


async def scoring_rate(target: Target, n: int, batch: int, log: Path) -> tuple[float, float]:
    """(scored events/s from first to last scored event, seconds from process start to the end)."""
    port = free_port()
    reader = await TopicReader(target.bootstrap, target.kafka().topics().scored).start()
    started = time.monotonic()
    proc = spawn_scoring(target.env(port, batch), log)
    try:
        deadline = time.monotonic() + max(120.0, n / 100)
        while len(reader.records) < n:
            if proc.poll() is not None:
                raise RuntimeError(f"scoring exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(reader.records)}/{n} scored; see {log}")
            await asyncio.sleep(0.2)
        total = time.monotonic() - started
        async with httpx.AsyncClient() as http:
            conflicts = [line for line in (await http.get(f"http://127.0.0.1:{port}/metrics")).text.splitlines()
                         if line.startswith("alliance_scoring_state_conflicts_total ")]
        if conflicts and not conflicts[0].endswith(" 0.0"):
            print(f"  note: {conflicts[0]}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        await reader.stop()
    stamps = sorted(r.timestamp for r in reader.records[:n])
    span = (stamps[-1] - stamps[0]) / 1000
    return (n - 1) / span if span > 0 else float("inf"), total


async def run(args: argparse.Namespace) -> dict[str, float | str]:
    tag = uuid.uuid4().hex[:8]
    stack: LocalStack | None = None
    bootstrap, mongo_url = os.environ.get("ALLIANCE_KAFKA_BOOTSTRAP"), os.environ.get("ALLIANCE_MONGO_URL")
    idempotence = os.environ.get("ALLIANCE_KAFKA_IDEMPOTENCE", "false").lower() == "true"
    data = Path(args.data_dir or tempfile.mkdtemp(prefix="alliance-scoring-bench-"))
    if not (bootstrap and mongo_url):
        stack = LocalStack(data, kafka_port=free_port(), mongo_port=free_port(), s3_port=free_port(),
                           mongo_memory=args.mongo_memory)
        await asyncio.to_thread(stack.start)
        bootstrap, mongo_url, idempotence = stack.bootstrap, stack.mongo_url, False
    target = Target(bootstrap, mongo_url, f"bench{tag}.", f"bench_{tag}", idempotence)
    try:
        await ensure_topics(target.kafka())
        clients = args.submissions // args.sessions
        n = await fill(target, clients, args.sessions)
        print(f"{n} submissions ({clients} clients x {args.sessions} sessions), batches of {args.batch}")
        bare = await bare_loop(target, n, args.batch)
        print(f"  limit 1, broker: bare aiokafka read-process-write loop   {bare:10.0f} records/s")
        store = await store_limit(target, n, args.batch, args.sessions)
        print(f"  limit 2, store: raw bulk replace-upserts of state docs    {store:10.0f} docs/s")
        scored, wall = await scoring_rate(target, n, args.batch, data / "scoring-bench.log")
        print(f"  scoring: scored events/s (first to last scored event)     {scored:10.0f} events/s"
              f"   ({wall:.1f} s from process start, group join included)")
        binding = "store (raw bulk upsert)" if store < bare else "broker (bare read-process-write loop)"
        limit = min(store, bare)
        ratio = scored / limit
        print(f"binding limit: {binding} at {limit:.0f}/s; scoring reaches {ratio:.2f} of it "
              f"({'meets' if ratio >= 0.5 else 'MISSES'} the >= 0.50 target); "
              f"broker/store = {bare / store:.1f}x")
        return {"submissions": n, "bare_loop_per_s": bare, "store_upserts_per_s": store, "scored_per_s": scored,
                "binding": binding, "ratio": ratio}
    finally:
        if stack is not None:
            await asyncio.to_thread(stack.stop)


def main(argv: list[str] | None = None) -> None:
    """`python -m services.scoring.bench [options]`."""
    parser = argparse.ArgumentParser(prog="python -m services.scoring.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submissions", type=int, default=12_000, help="records to score (default 12000)")
    parser.add_argument("--sessions", type=int, default=4, help="sessions per client (default 4)")
    parser.add_argument("--batch", type=int, default=500, help="records per consumed batch (default 500)")
    parser.add_argument("--mongo-memory", action="store_true", help="in-memory store instead of WiredTiger on disk")
    parser.add_argument("--data-dir", default=None, help="where the local stack keeps data and logs")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
