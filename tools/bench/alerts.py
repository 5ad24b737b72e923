"""Benchmark of the alerts stage: publish a deterioration -> signed webhook received.

    python -m tools.bench.alerts [--rate 5] [--scored-rate 50] [--duration 30] [--in-process]
    python -m tools.bench.alerts --fairness [--rate 5] [--slow-rate 2] [--duration 30]

Offers deteriorations at a fixed rate (open loop: the schedule does not slow down when the
system does) together with the scored events alerts also consumes (default 50/s, i.e. the
issue's 50 submissions/s of which every tenth deteriorates). Each deterioration goes to its
clinician's webhook and one partner subscription. Prints p50/p95/p99/max from publishing to
receipt at the receiver, and, measured in the same run, the broker's own publish -> consume
latency for the same records, so the ratio shows what the alerts stage adds.

`--fairness` measures issue 12's fair-delivery case instead: tenant A has 20 partner
subscriptions whose endpoints never answer (every attempt times out after the default 5 s and is
retried), A's alerts arrive at `--slow-rate` per second (20 hanging deliveries each), and tenant
B's alerts arrive at `--rate` per second for B's clinicians' webhooks (which answer at once).
Prints B's publish -> receipt percentiles (target: p99 < 1 s) and the most slots A held at once.

Starts its own broker and store (memory) unless ALLIANCE_KAFKA_BOOTSTRAP and ALLIANCE_MONGO_URL
are set; runs alerts as a separate process (`python -m services.alerts`) unless --in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pymongo.asynchronous.database import AsyncDatabase

from services.alerts.secretbox import new_key
from shared.auth import create_key
from shared.kafka import InboundRecord
from shared.mongo import Document, database, make_client
from shared.settings import KafkaSettings, MongoSettings
from shared.topic_admin import ensure_topics
from shared.topics import Topics
from tools.bench.common import latency_summary, percentile, wait_until
from tools.harness import EventPublisher, deterioration, scored
from tools.processes import ServiceProcess
from tools.receiver import WebhookReceiver
from tools.recorder import TopicRecorder
from tools.stack import LocalStack, free_port

SITE = "s1"  # clinicians and their clients' sessions share it: alerts go only to a clinician of the alert's site


class BrokerFloor:
    """A bare reader of the deterioration topic: when each record becomes consumable."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.seen: dict[str, float] = {}
        self.recorder = TopicRecorder(bootstrap, topic, from_end=True, fetch_max_wait_ms=10, on_record=self._record)

    def _record(self, r: InboundRecord, at: float) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            self.seen.setdefault(json.loads(r.value)["alert_id"], at)

    async def start(self) -> None:
        await self.recorder.start(background=True, wait_for_topic=60)

    async def stop(self) -> None:
        await self.recorder.stop()


@dataclass
class Bench:
    """Alerts under bench, on its own broker and store (or the configured ones), and what drives it."""

    topics: Topics
    bootstrap: str
    db: AsyncDatabase[Document]
    http: httpx.AsyncClient
    receiver: WebhookReceiver
    publisher: EventPublisher


@asynccontextmanager
async def alerts_under_bench(in_process: bool = False) -> AsyncIterator[Bench]:
    """Alerts ready to answer (a `python -m services.alerts` process, or in this process), the
    receiver its webhooks go to, and a started publisher; everything stopped on the way out."""
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    stack: LocalStack | None = None
    if os.environ.get("ALLIANCE_KAFKA_BOOTSTRAP") and os.environ.get("ALLIANCE_MONGO_URL"):
        bootstrap, mongo_url = os.environ["ALLIANCE_KAFKA_BOOTSTRAP"], os.environ["ALLIANCE_MONGO_URL"]
        idempotence = os.environ.get("ALLIANCE_KAFKA_IDEMPOTENCE", "false").lower() == "true"
    else:
        stack = LocalStack(Path(tempfile.mkdtemp(prefix="alerts-bench-")), kafka_port=free_port(),
                           mongo_port=free_port(), mongo_memory=True)
        await asyncio.to_thread(stack.start)
        bootstrap, mongo_url, idempotence = stack.bootstrap, stack.mongo_url, False
    async with contextlib.AsyncExitStack() as on_exit:
        if stack is not None:
            on_exit.push_async_callback(asyncio.to_thread, stack.stop)
        kafka = KafkaSettings(bootstrap=bootstrap, idempotence=idempotence, topic_prefix=prefix)
        mongo = MongoSettings(url=mongo_url, database=f"bench_{prefix[5:-1]}")
        await ensure_topics(kafka)
        receiver = on_exit.enter_context(WebhookReceiver())
        client = make_client(mongo, admin=True)
        on_exit.push_async_callback(client.close)
        if in_process:
            from services.alerts.app import AlertsConfig, create_app
            from services.alerts.settings import AlertsSettings, SmtpSettings

            app = create_app(AlertsConfig(kafka=kafka, mongo=mongo, alerts=AlertsSettings(allow_private_targets=True),
                                          smtp=SmtpSettings(host="")))
            await on_exit.enter_async_context(app.router.lifespan_context(app))
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://alerts", timeout=30)
        else:
            env = {"ALLIANCE_KAFKA_BOOTSTRAP": bootstrap, "ALLIANCE_KAFKA_IDEMPOTENCE": str(idempotence).lower(),
                   "ALLIANCE_KAFKA_TOPIC_PREFIX": prefix, "ALLIANCE_MONGO_URL": mongo_url,
                   "ALLIANCE_MONGO_DATABASE": mongo.database, "ALLIANCE_ALERTS_ALLOW_PRIVATE_TARGETS": "true",
                   "ALLIANCE_ALERTS_SECRETS_KEYS": new_key("bench"), "ALLIANCE_LOG_LEVEL": "WARNING"}
            proc = ServiceProcess("alerts", free_port(), env, Path(tempfile.gettempdir()) / f"alerts-{prefix}log")
            proc.start()
            on_exit.callback(proc.stop)
            await asyncio.to_thread(proc.wait_ready, 120)
            http = httpx.AsyncClient(base_url=proc.url, timeout=30)
        on_exit.push_async_callback(http.aclose)
        publisher = EventPublisher(bootstrap)
        await publisher.start()
        on_exit.push_async_callback(publisher.stop)
        yield Bench(kafka.topics(), bootstrap, database(client, mongo), http, receiver, publisher)


async def admin_headers(bench: Bench, tenant: str) -> dict[str, str]:
    """An admin key's headers for `tenant`, whose webhook signing secret is set."""
    key, _ = await create_key(bench.db, tenant, "admin")
    headers = {"Authorization": f"Bearer {key}"}
    (await bench.http.post("/v1/webhook-secret", headers=headers)).raise_for_status()
    return headers


async def add_clinicians(bench: Bench, headers: dict[str, str], clinicians: list[str], path: str) -> None:
    """Clinicians of `SITE` whose webhooks are the receiver's `path/<clinician>`."""
    for c in clinicians:
        body = {"site_id": SITE, "email": f"{c}@bench.test", "webhook_url": bench.receiver.url_for(f"{path}/{c}")}
        (await bench.http.put(f"/v1/clinicians/{c}", headers=headers, json=body)).raise_for_status()


async def subscribe(bench: Bench, headers: dict[str, str], path: str) -> None:
    """A partner subscription to deteriorations at the receiver's `path`."""
    (await bench.http.post("/v1/subscriptions", headers=headers, json={
        "url": bench.receiver.url_for(path), "events": ["alliance.deterioration.v1"]})).raise_for_status()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with alerts_under_bench(args.in_process) as bench:
        receiver, publisher, topics = bench.receiver, bench.publisher, bench.topics
        tenant = "bench"
        headers = await admin_headers(bench, tenant)
        clinicians = [f"c{i}" for i in range(args.clinicians)]
        await add_clinicians(bench, headers, clinicians, "/c")
        await subscribe(bench, headers, "/partner")
        floor = BrokerFloor(bench.bootstrap, topics.deterioration)
        await floor.start()
        try:
            # Warm-up: one alert end to end (the consumer group has joined once it arrives).
            warm = deterioration(tenant, clinicians[0], "warmup", site_id=SITE)
            await publisher.publish(topics.deterioration, warm, tenant, warm.client_id)
            await wait_until(lambda: len(receiver.requests) >= 2, 120)
            receiver.clear()
            floor.seen.clear()

            sent_at: dict[str, float] = {}
            n_alerts = int(args.rate * args.duration)
            n_scored = int(args.scored_rate * args.duration) if args.scored_rate > 0 else 0
            schedule = sorted([(i / args.rate, "d", i) for i in range(n_alerts)]
                              + [(i / args.scored_rate, "s", i) for i in range(n_scored)])
            t0 = time.monotonic()
            late = 0
            for offset, kind, i in schedule:
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -0.05:
                    late += 1
                client_id = f"client-{i % 500}"
                clinician = clinicians[i % len(clinicians)]
                if kind == "d":
                    ev = deterioration(tenant, clinician, client_id, site_id=SITE)
                    sent_at[ev.alert_id] = time.time()
                    await publisher.publish(topics.deterioration, ev, tenant, client_id)
                else:
                    await publisher.publish(topics.scored, scored(tenant, clinician, client_id, site_id=SITE),
                                            tenant, client_id)
            offered_seconds = time.monotonic() - t0
            expected = 2 * n_alerts
            await wait_until(lambda: len(receiver.requests) >= expected, 60)
        finally:
            await floor.stop()

        clinician_lat: list[float] = []
        partner_lat: list[float] = []
        for rec in list(receiver.requests):
            alert_id = json.loads(rec.body)["alert_id"]
            if alert_id not in sent_at:
                continue
            (partner_lat if rec.path == "/partner" else clinician_lat).append(rec.at - sent_at[alert_id])
        floor_lat = [floor.seen[a] - t for a, t in sent_at.items() if a in floor.seen]
        # Breakdown: when alerts recorded each alert (consumed + stored) is `created_at` of its document.
        docs = await bench.db["alerts"].find({"_id": {"$in": list(sent_at)}}, {"created_at": 1}).to_list()
        consumed_lat = [d["created_at"].timestamp() - sent_at[d["_id"]] for d in docs]
        dup = sum(n - 1 for n in Counter(r.webhook_id for r in receiver.requests).values() if n > 1)
        all_lat = clinician_lat + partner_lat
        result: dict[str, Any] = {
            "offered": {"deteriorations_per_s": args.rate, "scored_per_s": args.scored_rate,
                        "duration_s": round(offered_seconds, 1), "late_sends": late},
            "expected_webhooks": expected, "received_webhooks": len(all_lat), "duplicate_webhook_ids": dup,
            "webhook_all": latency_summary(all_lat), "webhook_clinician": latency_summary(clinician_lat),
            "webhook_partner": latency_summary(partner_lat), "broker_floor": latency_summary(floor_lat),
            "alert_recorded": latency_summary(consumed_lat),
        }
        if floor_lat and all_lat:
            for p in (50, 99):
                result[f"ratio_p{p}_vs_broker"] = round(percentile(all_lat, p) / max(percentile(floor_lat, p), 1e-6), 1)
        return result


async def run_fairness(args: argparse.Namespace) -> dict[str, Any]:
    """Tenant A's 20 hanging endpoints against tenant B's clinician webhooks (see the module doc)."""
    hang = threading.Event()  # never set: A's endpoints hold each request past the attempt timeout
    slow_paths = [f"/a/p{i}" for i in range(20)]
    async with alerts_under_bench() as bench:
        receiver, publisher, topics = bench.receiver, bench.publisher, bench.topics
        for path in slow_paths:
            receiver.behave(path, hold=hang, hold_max=6.0)
        a_h, b_h = await admin_headers(bench, "tenant-a"), await admin_headers(bench, "tenant-b")
        for path in slow_paths:
            await subscribe(bench, a_h, path)
        clinicians = [f"c{i}" for i in range(args.clinicians)]
        await add_clinicians(bench, b_h, clinicians, "/b")
        warm = deterioration("tenant-b", clinicians[0], "warmup", site_id=SITE)
        await publisher.publish(topics.deterioration, warm, "tenant-b", warm.client_id)
        await wait_until(lambda: any(r.path.startswith("/b/") for r in receiver.requests), 120)
        receiver.clear()

        sent_at: dict[str, float] = {}
        n_b, n_a = int(args.rate * args.duration), int(args.slow_rate * args.duration)
        schedule = sorted([(i / args.rate, "b", i) for i in range(n_b)]
                          + [(i / args.slow_rate, "a", i) for i in range(n_a if args.slow_rate > 0 else 0)])
        t0 = time.monotonic()
        for offset, who, i in schedule:
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if who == "a":
                ev = deterioration("tenant-a", "nobody", f"a-{i}", site_id=SITE)
                await publisher.publish(topics.deterioration, ev, "tenant-a", ev.client_id)
            else:
                ev = deterioration("tenant-b", clinicians[i % len(clinicians)], f"b-{i % 500}", site_id=SITE)
                sent_at[ev.alert_id] = time.time()
                await publisher.publish(topics.deterioration, ev, "tenant-b", ev.client_id)

        def b_received() -> list[float]:
            return [r.at - sent_at[a] for r in list(receiver.requests)
                    if r.path.startswith("/b/") and (a := json.loads(r.body)["alert_id"]) in sent_at]
        await wait_until(lambda: len(b_received()) >= n_b, 60)
        a_held_max = max(receiver.behaviours[p].seen for p in slow_paths)
        pending_a = await bench.db["deliveries"].count_documents({"tenant_id": "tenant-a", "status": "pending"})
        hang.set()
        return {"offered": {"b_alerts_per_s": args.rate, "a_alerts_per_s": args.slow_rate,
                            "a_hanging_endpoints": len(slow_paths), "duration_s": args.duration},
                "b_clinician_webhook": latency_summary(b_received()), "b_expected": n_b,
                "a_attempts_started": sum(receiver.behaviours[p].seen for p in slow_paths),
                "a_attempts_per_endpoint_max": a_held_max, "a_pending_at_end": pending_a}


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its figures (also as JSON on the last line)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=5.0, help="deteriorations per second (default 5)")
    p.add_argument("--scored-rate", type=float, default=50.0, help="scored events per second alongside (default 50)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of offered load (default 30)")
    p.add_argument("--clinicians", type=int, default=20)
    p.add_argument("--in-process", action="store_true", help="run alerts inside the bench process")
    p.add_argument("--fairness", action="store_true",
                   help="tenant A's 20 hanging endpoints against tenant B's clinician webhooks (issue 12)")
    p.add_argument("--slow-rate", type=float, default=2.0, help="--fairness: tenant A's alerts per second (default 2)")
    args = p.parse_args(argv)
    if args.fairness:
        fair = asyncio.run(run_fairness(args))
        b = fair["b_clinician_webhook"]
        print(f"alerts fair delivery: tenant A {args.slow_rate:g} alerts/s to 20 endpoints that never answer "
              f"(5 s timeouts), tenant B {args.rate:g} alerts/s to clinician webhooks, {args.duration:g} s")
        if b.get("n"):
            print(f"  b_clinician_webhook n={b['n']:5d}/{fair['b_expected']}  p50={b['p50_ms']:7.1f} ms  "
                  f"p95={b['p95_ms']:7.1f} ms  p99={b['p99_ms']:7.1f} ms  max={b['max_ms']:7.1f} ms")
        print(f"  tenant A: {fair['a_attempts_started']} attempts started, {fair['a_pending_at_end']} deliveries "
              "still pending at the end")
        print(json.dumps(fair))
        return
    result = asyncio.run(run(args))
    print(f"alerts stage: publish deterioration -> signed webhook received "
          f"({args.rate:g} deteriorations/s + {args.scored_rate:g} scored/s for {args.duration:g} s)")
    for name in ("webhook_all", "webhook_clinician", "webhook_partner", "alert_recorded", "broker_floor"):
        s = result[name]
        if s.get("n"):
            print(f"  {name:18} n={s['n']:5d}  p50={s['p50_ms']:7.1f} ms  p95={s['p95_ms']:7.1f} ms  "
                  f"p99={s['p99_ms']:7.1f} ms  max={s['max_ms']:7.1f} ms")
    print(f"  received {result['received_webhooks']}/{result['expected_webhooks']} webhooks, "
          f"{result['duplicate_webhook_ids']} duplicate ids, {result['offered']['late_sends']} late sends")
    if "ratio_p50_vs_broker" in result:
        print(f"  alerts stage / bare broker consume: p50 x{result['ratio_p50_vs_broker']}, "
              f"p99 x{result['ratio_p99_vs_broker']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
