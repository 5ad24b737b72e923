"""Intake benchmark: accepted submissions/s through the batch endpoint and p50/p99 latency of single
posts, next to a raw aiokafka produce rate (same record size, acks=all) measured in the same run.

    python -m tools.bench.intake [--submissions 50000] [--singles 2000]

Starts its own local stack (Tansu memory + SecantusDB in memory) on free ports unless
ALLIANCE_KAFKA_BOOTSTRAP and ALLIANCE_MONGO_URL are set, and intake as a separate process
(`python -m services.intake`, as in production). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from services.intake.models import check_submission, outgoing
from services.intake.settings import IntakeSettings
from shared import auth
from shared.mongo import Document
from shared.settings import KafkaSettings
from shared.topic_admin import ensure_topics
from tools.processes import ServiceProcess
from tools.stack import LocalStack, free_port


def _submission(i: int, run: str) -> dict[str, Any]:
    return {
        "submission_id": f"{run}-{i}", "instrument": "SRS", "client_id": f"p-{i % 5000}", "clinician_id": "c-17",
        "site_id": "north", "session_number": 1 + i // 5000,
        "administered_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        "items": {"relationship": 9.1, "goals": 8.4, "approach": 9.0, "overall": 8.8},
    }


async def _raw_produce_rate(kafka: KafkaSettings, n: int, chunk: int, linger_ms: int) -> float:
    """Records/s of a bare aiokafka producer sending intake-sized events, `chunk` at a time, acks gathered."""
    model, _ = check_submission(_submission(0, "raw"))
    assert model is not None
    value = outgoing(model, "bench", datetime.now(UTC)).value
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=linger_ms,
                                enable_idempotence=kafka.idempotence)
    await producer.start()
    try:
        topic = kafka.topics().submitted
        headers = [("content-type", b"application/json"), ("correlation_id", str(uuid.uuid4()).encode())]
        await (await producer.send(topic, value, key=b"warm-up", headers=headers))
        started = time.perf_counter()
        for base in range(0, n, chunk):
            futures = [await producer.send(topic, value, key=f"bench:p-{i % 5000}".encode(), headers=headers)
                       for i in range(base, min(n, base + chunk))]
            await asyncio.gather(*futures)
        return n / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def _run_concurrently(jobs: list[Callable[[], Awaitable[None]]], concurrency: int) -> None:
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            await queue.pop()()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _batch_rate(url: str, key: str, n: int, size: int, concurrency: int) -> tuple[float, int]:
    run = uuid.uuid4().hex[:8]
    bodies = [json.dumps({"submissions": [_submission(i, run) for i in range(b, min(n, b + size))]}).encode()
              for b in range(0, n, size)]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    accepted = 0

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as http:
        warm = json.dumps({"submissions": [_submission(i, run + "w") for i in range(size)]}).encode()
        (await http.post(f"{url}/v1/submissions/batch", content=warm, headers=headers)).raise_for_status()

        def job(body: bytes) -> Callable[[], Awaitable[None]]:
            async def post() -> None:
                nonlocal accepted
                r = await http.post(f"{url}/v1/submissions/batch", content=body, headers=headers)
                r.raise_for_status()
                accepted += sum(1 for x in r.json()["results"] if x["status"] == "accepted")
            return post

        started = time.perf_counter()
        await _run_concurrently([job(b) for b in bodies], concurrency)
        elapsed = time.perf_counter() - started
    return accepted / elapsed, accepted


async def _single_latencies(url: str, key: str, n: int, concurrency: int) -> tuple[list[float], float]:
    run = uuid.uuid4().hex[:8]
    bodies = [json.dumps(_submission(i, run)).encode() for i in range(n)]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as http:
        for body in bodies[:20]:  # warm-up: connections, key cache, producer metadata
            (await http.post(f"{url}/v1/submissions", content=body, headers=headers)).raise_for_status()

        def job(body: bytes) -> Callable[[], Awaitable[None]]:
            async def post() -> None:
                t = time.perf_counter()
                r = await http.post(f"{url}/v1/submissions", content=body, headers=headers)
                latencies.append(time.perf_counter() - t)
                if r.status_code != 202:
                    raise RuntimeError(f"single post answered {r.status_code}: {r.text[:200]}")
            return post

        started = time.perf_counter()
        await _run_concurrently([job(b) for b in bodies[20:]], concurrency)
        elapsed = time.perf_counter() - started
    return latencies, len(latencies) / elapsed


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


async def _create_key(mongo_url: str, db: str) -> str:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Document] = AsyncMongoClient(mongo_url, tz_aware=True)
    try:
        key, _ = await auth.create_key(client[db], "bench", "submit")
    finally:
        await client.close()
    return key


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--submissions", type=int, default=50_000, help="submissions through the batch endpoint")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--batch-concurrency", type=int, default=2)
    p.add_argument("--singles", type=int, default=2000, help="single posts for the latency figures")
    p.add_argument("--single-concurrency", type=int, default=1)
    args = p.parse_args(argv)

    bootstrap, mongo_url = os.environ.get("ALLIANCE_KAFKA_BOOTSTRAP"), os.environ.get("ALLIANCE_MONGO_URL")
    data = Path(tempfile.mkdtemp(prefix="alliance-intake-bench-"))
    stack: LocalStack | None = None
    if not (bootstrap and mongo_url):
        stack = LocalStack(data, kafka_port=free_port(), mongo_port=free_port(), mongo_memory=True)
        stack.start()
        bootstrap, mongo_url = stack.bootstrap, stack.mongo_url
    tag = uuid.uuid4().hex[:8]
    idempotence = os.environ.get("ALLIANCE_KAFKA_IDEMPOTENCE", "false" if stack else "true").lower() == "true"
    kafka = KafkaSettings(bootstrap=bootstrap, idempotence=idempotence, topic_prefix=f"bench{tag}.")
    database = f"bench_{tag}"
    proc: ServiceProcess | None = None
    try:
        asyncio.run(ensure_topics(kafka))
        key = asyncio.run(_create_key(mongo_url, database))
        env = {"ALLIANCE_KAFKA_BOOTSTRAP": bootstrap, "ALLIANCE_KAFKA_IDEMPOTENCE": str(idempotence).lower(),
               "ALLIANCE_KAFKA_TOPIC_PREFIX": kafka.topic_prefix, "ALLIANCE_MONGO_URL": mongo_url,
               "ALLIANCE_MONGO_DATABASE": database,
               "ALLIANCE_INTAKE_RATE_PER_SECOND": "10000000", "ALLIANCE_INTAKE_RATE_BURST": "10000000"}
        proc = ServiceProcess("intake", free_port(), env, data / "intake.log")
        proc.start()
        proc.wait_ready()
        url = proc.url

        linger = IntakeSettings().linger_ms  # the raw producer gets intake's producer settings
        raw = asyncio.run(_raw_produce_rate(kafka, args.submissions, args.batch_size, linger))
        batch, accepted = asyncio.run(_batch_rate(url, key, args.submissions, args.batch_size,
                                                  args.batch_concurrency))
        latencies, singles_rate = asyncio.run(_single_latencies(url, key, args.singles, args.single_concurrency))
    finally:
        if proc is not None:
            proc.stop()
        if stack is not None:
            stack.stop()

    print(f"intake benchmark ({'local Tansu + SecantusDB' if stack else bootstrap}, {os.cpu_count()} CPUs, "
          "client, intake and broker on this machine)")
    print(f"  raw aiokafka produce (acks=all, linger {linger} ms, {args.batch_size} per gather): "
          f"{raw:10,.0f} records/s")
    print(f"  batch endpoint ({args.batch_size}/request, {args.batch_concurrency} concurrent): "
          f"{batch:10,.0f} accepted submissions/s  ({accepted:,} accepted)")
    print(f"  ratio batch / raw produce: {batch / raw:.2f}  (target: batch >= 5,000/s)")
    print(f"  single posts ({len(latencies)}, {args.single_concurrency} concurrent): p50 {_pct(latencies, 50):.2f} ms, "
          f"p99 {_pct(latencies, 99):.2f} ms, {singles_rate:,.0f} req/s")


if __name__ == "__main__":
    main()
