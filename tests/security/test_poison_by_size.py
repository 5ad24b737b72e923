"""Issue 12, finding 1: one client's history must not stall a partition for every tenant.

A client with 19,000 valid sessions (ids of a plausible length, episodes of 500 sessions) pushes
its reporting record past MongoDB's 16 MiB document limit. Before the fix the store refused the
write (error 10334/17420), the batch was retried forever, and nothing after it on that partition
was materialized again. Now reporting refuses the sessions that would grow the record past its
cap (dead-lettered as `record_too_large`, with their coordinates) and the partition moves on.

Everything runs through the real reporting process on the real broker and store, on topics of
ONE partition, so the other clients' events are queued behind the big client's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pymongo import AsyncMongoClient

from services.reporting.rules import record_id
from services.reporting.store import FIRST_GENERATION, ReportingStore, clients_name
from shared.auth import create_key
from shared.events import DeadLetter, Items, SrsScored
from shared.mongo import Document
from shared.topic_admin import ensure_topics
from tests.support.deadletters import dead_letters
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest, own_store
from tests.support.wait import eventually
from tools.demo import BASE, publish, scored

ITEMS = Items(relationship=9.0, goals=8.5, approach=9.0, overall=9.5)
TENANT = "t-oversized"
BIG = "client-with-a-long-history-0001"
SESSIONS = 19_000
PER_EPISODE = 500  # scoring's per-episode cap (issue 12): the big client is valid data
OTHERS = [f"client-{i}" for i in range(5)]


def big_session(n: int) -> SrsScored:
    """Session `n` (1-based) of the big client: ids as long as a real clinic's, well within 128 characters."""
    return scored(
        TENANT, BIG, (n - 1) % PER_EPISODE + 1, 38.0 if n % 3 else 30.0, items=ITEMS,
        episode_id=f"programme-2026-intensive-outpatient-{(n - 1) // PER_EPISODE:03d}",
        submission_id=f"north-east-community-mental-health-clinic-2026-11-25-intensive-outpatient-programme-{n:06d}",
        site_id="north-east-community-clinic", clinician_id="clinician-north-east-0042",
        administered_at=BASE + timedelta(hours=n))


def other_sessions(client: str) -> list[SrsScored]:
    return [scored(TENANT, client, n, 38.0, site_id="north-east-community-clinic") for n in (1, 2, 3)]


async def stored_sessions(ns: Namespace) -> set[str]:
    """The submission ids the big client's record holds, read from the store."""
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(ns.stack.mongo_url, tz_aware=True)
    try:
        doc = await mongo[ns.database][clients_name(FIRST_GENERATION)].find_one(
            {"_id": record_id(TENANT, BIG, "SRS")})
    finally:
        await mongo.close()
    return set(json.loads(doc["entries"])) if doc is not None else set()  # entries: packed, keyed by submission


def refused_sessions(letters: list[DeadLetter]) -> set[str]:
    """Submission ids of the sessions reporting dead-lettered."""
    return {SrsScored.model_validate_json(d.payload).submission_id for d in letters if d.service == "reporting"}


@pytest.mark.slow  # about 100 s: reporting re-encodes the ~15 MiB record for each batch of 500
async def test_a_client_past_the_document_limit_does_not_stall_other_clients_on_its_partition(
        stack: StackUnderTest, log_dir: Path) -> None:
    with own_store(stack) as isolated:
        await past_the_document_limit(isolated, log_dir)


async def past_the_document_limit(stack: StackUnderTest, log_dir: Path) -> None:
    ns = Namespace.fresh(stack, partitions=1)
    kafka = ns.kafka()
    await ensure_topics(kafka)
    with running(["reporting"], ns, log_dir) as procs:
        mongo: AsyncMongoClient[Document] = AsyncMongoClient(ns.stack.mongo_url)
        try:
            read_key, _ = await create_key(mongo[ns.database], TENANT, "read")
        finally:
            await mongo.close()
        big = [big_session(n) for n in range(1, SESSIONS + 1)]
        async with dead_letters(kafka) as letters, httpx.AsyncClient(base_url=procs["reporting"].url,
                                                                     timeout=30) as http:
            kept: set[str] = set()
            refused_ids: set[str] = set()

            def accounted_for(events: list[SrsScored]) -> Callable[[], Awaitable[bool]]:
                """Every one of `events` is in the big client's record or was dead-lettered by reporting."""
                wanted = {e.submission_id for e in events}

                async def check() -> bool:
                    nonlocal kept, refused_ids
                    kept, refused_ids = await stored_sessions(ns), refused_sessions(await letters.poll())
                    return wanted <= kept | refused_ids

                return check

            started = time.perf_counter()
            await publish(kafka, big)
            await eventually(accounted_for(big), timeout=300, interval=2)
            backlog = time.perf_counter() - started
            assert refused_ids, "19,000 sessions with these ids are over 16 MiB: some must have been refused"

            # Other clients' sessions, queued on the same partition among a further episode of the big
            # client's (more than the record's headroom, which is under one batch of sessions).
            tail = [big_session(n) for n in range(SESSIONS + 1, SESSIONS + PER_EPISODE + 1)]
            step = len(tail) // len(OTHERS)
            mixed: list[SrsScored] = []
            for i, client in enumerate(OTHERS):
                mixed.extend(tail[i * step:(i + 1) * step])
                mixed.extend(other_sessions(client))
            started = time.perf_counter()
            await publish(kafka, mixed)

            async def all_visible() -> bool:
                for client in OTHERS:
                    res = await http.get(f"/v1/clients/{client}/trajectory",
                                         headers={"Authorization": f"Bearer {read_key}"})
                    if res.status_code != 200 or len(res.json()["sessions"]) != 3:
                        return False
                return True

            await eventually(all_visible, timeout=60)
            others = time.perf_counter() - started

            await eventually(accounted_for([*big, *tail]), interval=1)
            res = await http.get(f"/v1/clients/{BIG}/trajectory", headers={"Authorization": f"Bearer {read_key}"})

    mine = [d for d in letters.seen if d.service == "reporting"]
    assert not refused_ids & kept  # none both stored and refused
    assert any(e.submission_id in refused_ids for e in tail)  # the full record still refuses more
    assert {d.reason for d in mine} == {"record_too_large"}
    assert all(d.source_topic == kafka.topics().scored and d.source_partition == 0 and d.source_offset is not None
               for d in mine)
    assert res.status_code == 200 and res.json()["sessions"]  # what fitted stays readable
    print(f"\n{SESSIONS} sessions of one client worked through in {backlog:.1f} s "
          f"({len(kept)} kept, {len(refused_ids)} refused as record_too_large); the other clients behind it visible "
          f"{others:.1f} s after they were published")


async def test_sessions_past_a_records_size_cap_are_refused_and_every_other_record_is_written(
        mongo: AsyncMongoClient[Document]) -> None:
    store = ReportingStore(mongo[f"t_{uuid.uuid4().hex[:10]}"], max_record_bytes=64 * 1024)
    fitting = [big_session(n) for n in range(1, 41)]  # about 35 KB
    report = await store.apply_scored(FIRST_GENERATION, [*fitting, *other_sessions("client-0")[:2]])
    assert not report.refused

    too_many = [big_session(n) for n in range(41, 121)]  # about 70 KB more
    report = await store.apply_scored(FIRST_GENERATION, [*too_many, other_sessions("client-0")[2]])
    assert [e.submission_id for e, _ in report.refused] == [e.submission_id for e in too_many]
    assert all(size > 64 * 1024 for _, size in report.refused)
    assert report.outcomes["refused"] == len(too_many) and report.outcomes["applied"] == 1
    big = await store.record(FIRST_GENERATION, TENANT, BIG, "SRS")
    other = await store.record(FIRST_GENERATION, TENANT, "client-0", "SRS")
    assert big is not None and set(big["entries"]) == {e.submission_id for e in fitting}
    assert other is not None and other["session_count"] == 3
