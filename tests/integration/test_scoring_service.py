"""The scoring service as a process on the real local broker and store: submitted events and
client transfers go straight to its input topic; scored events, alerts, alert statuses and dead
letters are read from its outputs.

One process serves the whole module (a start costs a group join); each test uses its own tenant.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import bson
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient

from services.alerts.rules import merge_lifecycle
from services.scoring.rules import TenantRules
from services.scoring.store import RulesStore, StateStore
from shared import ids
from shared.events import (
    AlertStatusChanged,
    AllianceDeterioration,
    DeadLetter,
    Instrument,
    Items,
    OrsScored,
    OrsSubmitted,
    OutcomeAlert,
    SrsScored,
    SrsSubmitted,
)
from shared.kafka import CORRELATION_HEADER
from shared.mongo import Document
from tests.support.services import Namespace, ServiceProcess, service_fixture
from tests.support.wait import eventually
from tools.loadgen import BASE, client_transfer, publish, start_producer, submission
from tools.recorder import TopicRecorder

T0 = datetime(2026, 4, 1, 8, 0, tzinfo=UTC)


@dataclass
class Scoring:
    ns: Namespace
    proc: ServiceProcess
    producer: AIOKafkaProducer
    scored: TopicRecorder
    alerts: TopicRecorder
    statuses: TopicRecorder
    dead: TopicRecorder
    mongo: AsyncMongoClient[Document]

    @property
    def submitted(self) -> str:
        return self.ns.kafka().topics().submitted

    def scored_of(self, tenant: str) -> list[SrsScored]:
        return [s for s in (SrsScored.model_validate_json(v) for v in self.scored.values()) if s.tenant_id == tenant]

    def alerts_of(self, tenant: str) -> list[AllianceDeterioration]:
        return [a for a in (AllianceDeterioration.model_validate_json(v) for v in self.alerts.values())
                if a.tenant_id == tenant]

    def statuses_of(self, tenant: str) -> list[AlertStatusChanged]:
        return [a for a in (AlertStatusChanged.model_validate_json(v) for v in self.statuses.values())
                if a.tenant_id == tenant]

    def letters_of(self, tenant: str) -> list[DeadLetter]:
        return [d for d in (DeadLetter.model_validate_json(v) for v in self.dead.values()) if d.tenant_id == tenant]

    def raw_of(self, reader: TopicRecorder, tenant: str) -> list[bytes]:
        return [v for v in reader.values() if json.loads(v)["tenant_id"] == tenant]


scoring_process = service_fixture("scoring")


@pytest.fixture(scope="module")
async def scoring(namespace_m: Namespace, scoring_process: ServiceProcess) -> AsyncIterator[Scoring]:
    ns = namespace_m
    topics = ns.kafka().topics()
    producer = await start_producer(ns.stack.bootstrap)
    readers = [await TopicRecorder(ns.stack.bootstrap, t).start(background=True)
               for t in (topics.scored, topics.deterioration, topics.alert_status, topics.deadletter)]
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(ns.stack.mongo_url, tz_aware=True)
    try:
        yield Scoring(ns, scoring_process, producer, readers[0], readers[1], readers[2], readers[3], mongo)
    finally:
        for r in readers:
            await r.stop()
        await producer.stop()
        await mongo.close()


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def episode_of(first_session: int) -> str:
    """The derived episode of a series whose first session is `first_session` (loadgen administers
    session n on BASE + 7n days)."""
    return f"auto/{(BASE + timedelta(days=7 * first_session)).date().isoformat()}/{first_session}"


def alert_id(tenant: str, client: str, session: int, episode: str | None = None) -> str:
    return ids.alert_id(tenant, client, "SRS", episode or episode_of(1), session)


async def test_sessions_are_scored_in_order_and_each_low_latest_session_alerts(scoring: Scoring) -> None:
    t = "t-order"
    await publish(scoring.producer, scoring.ns.kafka().topics().submitted, [
        submission(t, "c", 1, 38.0, accepted_at=at(1)),
        submission(t, "c", 2, 36.5, accepted_at=at(2)),
        submission(t, "c", 3, 33.0, accepted_at=at(3)),
        submission(t, "c", 4, 35.0, accepted_at=at(4)),
    ])
    scored = await at_least(lambda: scoring.scored_of(t), 4)
    assert [(s.session_number, s.total, s.previous_total, s.change_from_previous, s.flags, s.latest)
            for s in scored] == [
        (1, 38.0, None, None, [], True),
        (2, 36.5, 38.0, -1.5, ["drop_from_previous"], True),
        (3, 33.0, 36.5, -3.5, ["below_cutoff", "drop_from_previous"], True),
        (4, 35.0, 33.0, 2.0, ["below_cutoff"], True),
    ]
    assert {(s.episode_id, s.episode_derived, s.revision) for s in scored} == {(episode_of(1), True, 1)}
    alerts = await at_least(lambda: scoring.alerts_of(t), 3)
    assert [(a.session_number, a.triggers, a.severity, a.revision) for a in alerts] == [
        (2, ["drop_from_previous"], "warning", 1),
        (3, ["below_cutoff", "drop_from_previous"], "critical", 1),
        (4, ["below_cutoff"], "warning", 1),
    ]
    assert alerts[0].alert_id == alert_id(t, "c", 2) and scored[0].event_id == ids.scored_event_id(t, "c-s1")
    statuses = await at_least(lambda: scoring.statuses_of(t), 2)
    assert [(s.alert_id, s.status, s.revision) for s in statuses] == [
        (alert_id(t, "c", 2), "superseded", 1), (alert_id(t, "c", 3), "superseded", 1)]


async def test_a_late_older_session_is_scored_not_latest_and_raises_no_alert(scoring: Scoring) -> None:
    t = "t-late"
    await publish(scoring.producer, scoring.ns.kafka().topics().submitted, [
        submission(t, "c", 1, 38.0, accepted_at=at(1)),
        submission(t, "c", 3, 38.0, accepted_at=at(2)),
        submission(t, "c", 2, 30.0, accepted_at=at(3)),  # backfilled
        submission(t, "c", 4, 37.5, accepted_at=at(4)),  # flushes the partition past the late one
    ])
    scored = await at_least(lambda: scoring.scored_of(t), 5)
    late = next(s for s in scored if s.session_number == 2)
    assert late.latest is False and late.flags == ["below_cutoff", "drop_from_previous"]
    third = [(s.revision, s.previous_total) for s in scored if s.session_number == 3]
    assert third == [(1, 38.0), (2, 30.0)]  # recomputed against the backfilled session
    assert next(s for s in scored if s.session_number == 4).previous_total == 38.0
    assert scoring.alerts_of(t) == []


async def test_a_correction_supersedes_its_session_and_the_next_session_compares_with_it(scoring: Scoring) -> None:
    t = "t-fix"
    await publish(scoring.producer, scoring.ns.kafka().topics().submitted, [
        submission(t, "c", 1, 38.0, accepted_at=at(1)),
        submission(t, "c", 1, 34.0, submission_id="c-s1-fix", accepted_at=at(2)),
        submission(t, "c", 2, 34.0, accepted_at=at(3)),
    ])
    scored = await at_least(lambda: scoring.scored_of(t), 3)
    assert [(s.submission_id, s.latest, s.previous_total, s.revision, s.supersedes) for s in scored] == [
        ("c-s1", True, None, 1, None), ("c-s1-fix", True, None, 2, "c-s1"), ("c-s2", True, 34.0, 1, None)]
    alerts = await at_least(lambda: scoring.alerts_of(t), 2)
    assert [(a.submission_id, a.severity) for a in alerts] == [("c-s1-fix", "warning"), ("c-s2", "warning")]


async def test_redelivered_and_duplicated_submissions_republish_identical_events_and_no_second_alert(
        scoring: Scoring) -> None:
    t = "t-dup"
    events = [submission(t, "c", 1, 30.0, accepted_at=at(1)), submission(t, "c", 2, 29.0, accepted_at=at(2))]
    topic = scoring.ns.kafka().topics().submitted
    await publish(scoring.producer, topic, events)
    first = await at_least(lambda: scoring.raw_of(scoring.alerts, t), 2)
    await publish(scoring.producer, topic, events)  # an upstream retry
    await publish(scoring.producer, topic, [*events, submission(t, "c", 3, 38.0, accepted_at=at(3))])

    async def third_scored() -> bool:  # it follows every duplicate in the client's partition
        return any(s.session_number == 3 for s in scoring.scored_of(t))

    await eventually(third_scored)
    alerts = scoring.raw_of(scoring.alerts, t)
    assert len(set(alerts)) == 2 and set(alerts) == set(first)  # byte-identical repeats, same two alert ids
    by_id = Counter(json.loads(v)["event_id"] for v in set(scoring.raw_of(scoring.scored, t)))
    assert all(n == 1 for n in by_id.values()) and len(by_id) == 3


async def test_poison_records_are_deadlettered_with_a_reason_and_consumption_continues(scoring: Scoring) -> None:
    t = "t-poison"
    topic = scoring.ns.kafka().topics().submitted
    key = ids.partition_key(t, "c")
    for value in (b"not json at all", b"\xff\xfe\x00binary", b'{"schema_version": 1, "tenant_id": "t-poison"}',
                  b"[1, 2, 3]", b""):
        await scoring.producer.send_and_wait(topic, value, key=key)
    no_total = submission(t, "c", 1, None)
    await publish(scoring.producer, topic, [no_total, submission(t, "c", 2, 38.0)])
    scored = await at_least(lambda: scoring.scored_of(t), 1)
    assert scored[0].session_number == 2

    def letters() -> list[DeadLetter]:
        return [d for d in (DeadLetter.model_validate_json(v) for v in scoring.dead.values())
                if d.key == f"{t}:c"]

    got = await at_least(lambda: letters(), 6)
    assert sorted(d.reason for d in got) == ["invalid", "invalid", "undecodable", "undecodable", "undecodable",
                                             "unscorable"]
    assert all(d.service == "scoring" and d.source_topic == topic and d.source_offset is not None for d in got)
    assert next(d for d in got if d.reason == "unscorable").tenant_id == t


async def test_tenant_rules_in_the_store_change_the_cutoff(scoring: Scoring) -> None:
    t = "t-strict"
    await RulesStore(scoring.mongo[scoring.ns.database]).put(t, TenantRules(cutoff=38.0, operator="<="))
    await publish(scoring.producer, scoring.ns.kafka().topics().submitted, [submission(t, "c", 1, 38.0)])
    (scored,) = await at_least(lambda: scoring.scored_of(t), 1)
    assert (scored.cutoff, scored.flags) == (38.0, ["below_cutoff"])
    await at_least(lambda: scoring.alerts_of(t), 1)


async def test_ycsrs_is_kept_for_audit_and_publishes_nothing(scoring: Scoring) -> None:
    t = "t-young"
    young = submission(t, "c", 1, None, instrument=Instrument.YCSRS, submission_id="c-young-1",
                       items=Items(relationship=1.0, goals=2.0, approach=3.0, overall=4.0))
    await publish(scoring.producer, scoring.ns.kafka().topics().submitted, [young, submission(t, "c", 1, 30.0)])
    scored = await at_least(lambda: scoring.scored_of(t), 1)
    assert [s.instrument for s in scored] == [Instrument.SRS]
    doc = await StateStore(scoring.mongo[scoring.ns.database]).client_state(t, "c")
    assert doc is not None and sorted((s["sid"], s["i"]) for s in doc["subs"]) == [
        ("c-s1", "SRS"), ("c-young-1", "YCSRS")]
    assert all(json.loads(v)["submission_id"] != "c-young-1" for v in scoring.raw_of(scoring.alerts, t))


async def test_a_correction_under_the_same_id_is_revision_2_with_items_and_total_that_agree(
        scoring: Scoring) -> None:
    t = "t-same-id"
    await publish(scoring.producer, scoring.submitted, [
        submission(t, "c", 1, items=Items(relationship=9.0, goals=9.0, approach=9.0, overall=9.0), accepted_at=at(1)),
        submission(t, "c", 2, 37.0, accepted_at=at(2)),
    ])
    await at_least(lambda: scoring.scored_of(t), 2)
    await publish(scoring.producer, scoring.submitted, [
        submission(t, "c", 1, items=Items(relationship=10.0, goals=9.5, approach=9.0, overall=9.5), accepted_at=at(3))])
    scored = await at_least(lambda: scoring.scored_of(t), 4)
    fixed = next(s for s in scored if s.submission_id == "c-s1" and s.revision == 2)
    assert fixed.items is not None and sum(fixed.items.values()) == fixed.total == 38.0
    assert fixed.event_id == ids.scored_event_id(t, "c-s1", 2) and fixed.supersedes is None
    after = next(s for s in scored if s.submission_id == "c-s2" and s.revision == 2)
    assert (after.previous_total, after.change_from_previous, after.flags) == (38.0, -1.0, ["drop_from_previous"])
    (alert,) = await at_least(lambda: scoring.alerts_of(t), 1)
    assert (alert.session_number, alert.revision, alert.severity) == (2, 1, "warning")


async def test_a_correction_clearing_the_triggers_withdraws_the_alert(scoring: Scoring) -> None:
    t = "t-withdraw"
    await publish(scoring.producer, scoring.submitted, [
        submission(t, "c", 1, 38.0, accepted_at=at(1)), submission(t, "c", 2, 30.0, accepted_at=at(2))])
    (alert,) = await at_least(lambda: scoring.alerts_of(t), 1)
    await publish(scoring.producer, scoring.submitted, [submission(t, "c", 2, 38.0, accepted_at=at(3))])
    (status,) = await at_least(lambda: scoring.statuses_of(t), 1)
    assert (status.alert_id, status.status, status.revision) == (alert.alert_id, "withdrawn", 1)
    assert (status.client_id, status.session_number, status.episode_id, status.site_id) == (
        "c", 2, episode_of(1), "north")
    assert status.event_id == ids.alert_status_event_id(t, alert.alert_id, "withdrawn", 1)
    fixed = await at_least(lambda: [s for s in scoring.scored_of(t) if s.revision == 2], 1)
    assert fixed[0].flags == [] and fixed[0].triggers == [] and scoring.alerts_of(t) == [alert]


async def test_a_new_episode_without_episode_id_keeps_the_old_one_and_a_drop_in_it_alerts(scoring: Scoring) -> None:
    t = "t-episodes"
    sept, nov = datetime(2026, 9, 1, 9, tzinfo=UTC), datetime(2026, 11, 1, 9, tzinfo=UTC)
    await publish(scoring.producer, scoring.submitted, [
        *(submission(t, "c", n, 38.0, submission_id=f"sep-{n}", administered_at=sept + timedelta(days=n - 1),
                     accepted_at=at(n)) for n in (1, 2, 3)),
        *(submission(t, "c", n, total, submission_id=f"nov-{n}", administered_at=nov + timedelta(days=n - 1),
                     accepted_at=at(10 + n)) for n, total in ((1, 38.0), (2, 30.0))),
    ])
    scored = await at_least(lambda: scoring.scored_of(t), 5)
    assert [(s.submission_id, s.episode_id, s.revision) for s in scored] == [
        ("sep-1", "auto/2026-09-01/1", 1), ("sep-2", "auto/2026-09-01/1", 1), ("sep-3", "auto/2026-09-01/1", 1),
        ("nov-1", "auto/2026-11-01/1", 1), ("nov-2", "auto/2026-11-01/1", 1)]
    (alert,) = await at_least(lambda: scoring.alerts_of(t), 1)
    assert (alert.submission_id, alert.episode_id, alert.severity, alert.previous_total) == (
        "nov-2", "auto/2026-11-01/1", "critical", 38.0)
    assert alert.alert_id == ids.alert_id(t, "c", "SRS", "auto/2026-11-01/1", 2)


async def test_a_session_number_typo_is_dead_lettered_as_session_gap_and_the_client_still_alerts(
        scoring: Scoring) -> None:
    t = "t-gap"
    typo = submission(t, "c", 100000, 30.0, submission_id="c-typo", administered_at=BASE + timedelta(days=28),
                      accepted_at=at(4))
    await publish(scoring.producer, scoring.submitted, [
        *(submission(t, "c", n, 38.0, accepted_at=at(n)) for n in (1, 2, 3)), typo,
        submission(t, "c", 4, 12.0, accepted_at=at(5))])
    (letter,) = await at_least(lambda: scoring.letters_of(t), 1)
    assert (letter.reason, letter.service, letter.key) == ("session_gap", "scoring", f"{t}:c")
    assert "100000" in letter.detail and json.loads(letter.payload)["submission_id"] == "c-typo"
    (alert,) = await at_least(lambda: scoring.alerts_of(t), 1)
    assert (alert.session_number, alert.previous_total, alert.severity) == (4, 38.0, "critical")
    assert all(s.submission_id != "c-typo" for s in scoring.scored_of(t))


async def test_a_submission_of_another_site_is_dead_lettered_as_site_conflict(scoring: Scoring) -> None:
    t = "t-site"
    await publish(scoring.producer, scoring.submitted, [
        submission(t, "c", 1, 38.0, accepted_at=at(1)),
        submission(t, "c", 2, 20.0, site="south", accepted_at=at(2)),
        submission(t, "c", 3, 37.5, accepted_at=at(3))])
    (letter,) = await at_least(lambda: scoring.letters_of(t), 1)
    assert letter.reason == "site_conflict" and "north" in letter.detail
    scored = await at_least(lambda: scoring.scored_of(t), 2)
    assert [(s.submission_id, s.site_id, s.previous_total) for s in scored] == [
        ("c-s1", "north", None), ("c-s3", "north", 38.0)]
    assert scoring.alerts_of(t) == []


async def test_a_transfer_moves_the_client_and_its_sessions_to_the_new_site(scoring: Scoring) -> None:
    t = "t-transfer"
    await publish(scoring.producer, scoring.submitted, [
        submission(t, "c", 1, 38.0, accepted_at=at(1)), submission(t, "c", 2, 37.5, accepted_at=at(2))])
    await at_least(lambda: scoring.scored_of(t), 2)
    move = client_transfer(t, "c", "south", accepted_at=at(3))
    await publish(scoring.producer, scoring.submitted, [
        move, submission(t, "c", 3, 37.0, site="south", accepted_at=at(4)),
        submission(t, "c", 4, 37.0, site="north", accepted_at=at(5))])
    (letter,) = await at_least(lambda: scoring.letters_of(t), 1)
    assert letter.reason == "site_conflict" and json.loads(letter.payload)["submission_id"] == "c-s4"
    scored = await at_least(lambda: scoring.scored_of(t), 5)
    assert [(s.submission_id, s.site_id, s.site_version, s.revision) for s in scored] == [
        ("c-s1", "north", 0, 1), ("c-s2", "north", 0, 1),
        ("c-s1", "south", 1, 2), ("c-s2", "south", 1, 2), ("c-s3", "south", 1, 1)]
    await publish(scoring.producer, scoring.submitted, [move, submission(t, "c", 5, 37.0, site="south",
                                                                         accepted_at=at(6))])  # redelivered
    after = await at_least(lambda: [s for s in scoring.scored_of(t) if s.session_number == 5], 1)
    assert after[0].site_version == 1
    events = scoring.raw_of(scoring.scored, t)
    assert len({json.loads(v)["event_id"] for v in events}) == len(set(events)) == 6  # the redelivery: same bytes


async def test_metrics_count_scored_sessions_alerts_and_latency(scoring: Scoring) -> None:
    t = "t-metrics"
    await publish(scoring.producer, scoring.ns.kafka().topics().submitted, [submission(t, "c", 1, 20.0)])
    await at_least(lambda: scoring.scored_of(t), 1)

    async def with_lag() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        # Lag is measured by the runtime's monitor loop, every few seconds: wait for its first report.
        async with httpx.AsyncClient() as http:
            text = (await http.get(scoring.proc.url + "/metrics")).text
        found = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for f in text_string_to_metric_families(text) for s in f.samples}
        return found if any(name == "alliance_consumer_lag_messages" for name, _ in found) else None

    samples = await eventually(with_lag, timeout=20)
    assert samples[("alliance_scored_total", (("instrument", "SRS"),))] >= 1
    assert samples[("alliance_deterioration_total", (("severity", "warning"), ("trigger", "below_cutoff")))] >= 1
    assert samples[("alliance_scoring_batch_seconds_count", ())] >= 1
    assert samples[("alliance_submission_to_scored_seconds_count", ())] >= 1

T = TypeVar("T")


async def at_least(get: Callable[[], list[T]], n: int) -> list[T]:
    """Wait until `get()` returns n items or more, and return them."""

    async def check() -> list[T]:
        items = get()
        return items if len(items) >= n else []

    return await eventually(check, timeout=60)


async def test_a_client_at_its_record_cap_is_refused_series_full_and_the_partition_goes_on(scoring: Scoring) -> None:
    # Issue 12, finding 1: a client's record must not grow without bound (one document per
    # client: MongoDB refuses 16 MiB) nor stall the clients behind it. Default caps: 500 sessions
    # per episode, 5,000 submissions per client; ten full episodes, then ten more sessions.
    t = "t-full"
    big = [submission(t, "big", n, 38.0, submission_id=f"big-{e}-{n}", episode_id=f"course-{e}",
                      administered_at=BASE + timedelta(days=e * 600 + n), accepted_at=at(e * 600 + n))
           for e in range(11) for n in range(1, 501 if e < 10 else 11)]
    after = [submission(t, "other", n, total, accepted_at=at(10_000 + n)) for n, total in ((1, 38.0), (2, 30.0))]
    await publish(scoring.producer, scoring.submitted, [*big, *after])
    (alert,) = await at_least(lambda: scoring.alerts_of(t), 1)
    assert alert.client_id == "other"  # scored behind the big client's 5,010 submissions
    letters = await at_least(lambda: scoring.letters_of(t), 10)
    assert {d.reason for d in letters} == {"series_full"} and len(letters) == 10
    assert all("max_client_submissions 5000" in d.detail for d in letters)
    # The scored topic has its own reader, which may lag the ones waited on above.
    big_scored = await at_least(lambda: sorted({s.submission_id for s in scoring.scored_of(t)
                                                if s.client_id == "big"}), 5_000)
    assert len(big_scored) == 5_000
    doc = await scoring.mongo[scoring.ns.database]["scoring_state"].find_one({"client_id": "big", "tenant_id": t})
    assert doc is not None and len(bson.encode(doc)) < 4 * 2**20  # far from the 16 MiB limit


# --- the Outcome Rating Scale (docs/outcome.md) ---------------------------------------------------


def ors(tenant: str, client: str, session: int, total: float, accepted: int) -> OrsSubmitted:
    """An ORS as intake publishes it on ors.submitted.v1: the same session as `submission(...)`."""
    sid = f"{client}-ors{session}"
    return OrsSubmitted(event_id=ids.submitted_event_id(tenant, sid), tenant_id=tenant, occurred_at=at(accepted),
                        submission_id=sid, site_id="north", clinician_id="c-1", client_id=client,
                        session_number=session, administered_at=BASE + timedelta(days=7 * session), total=total,
                        accepted_at=at(accepted))


async def test_an_ors_deterioration_alerts_and_an_srs_drop_in_its_session_is_critical_at_risk(
        scoring: Scoring) -> None:
    t = "t-ors"
    topics = scoring.ns.kafka().topics()
    ors_scored, outcome_alerts = [await TopicRecorder(scoring.ns.stack.bootstrap, name).start(background=True)
                                  for name in (topics.ors_scored, topics.outcome_alert)]
    try:
        futures = [await scoring.producer.send(topics.ors_submitted, ev.model_dump_json().encode(),
                                               key=ids.partition_key(t, "c"),
                                               headers=[(CORRELATION_HEADER, b"corr-ors")])
                   for ev in (ors(t, "c", 1, 22.0, 1), ors(t, "c", 2, 15.5, 2))]
        for f in futures:
            await f
        scored = await at_least(lambda: [s for s in map(OrsScored.model_validate_json, ors_scored.values())
                                         if s.tenant_id == t], 2)
        assert [(s.session_number, s.change_from_intake, s.change) for s in scored] == [
            (1, 0.0, "no_reliable_change"), (2, -6.5, "reliable_deterioration")]
        (alert,) = await at_least(lambda: [a for a in map(OutcomeAlert.model_validate_json, outcome_alerts.values())
                                           if a.tenant_id == t], 1)
        assert (alert.alert_id, alert.severity, alert.triggers) == (
            ids.alert_id(t, "c", "ORS", episode_of(1), 2), "critical", ["reliable_deterioration"])

        await publish(scoring.producer, topics.submitted, [submission(t, "c", 1, 39.0, accepted_at=at(3)),
                                                           submission(t, "c", 2, 38.0, accepted_at=at(4))])
        (alliance,) = await at_least(lambda: scoring.alerts_of(t), 1)
        assert (alliance.alert_id, alliance.severity, alliance.outcome_at_risk) == (alert_id(t, "c", 2), "critical",
                                                                                    True)
    finally:
        for r in (ors_scored, outcome_alerts):
            await r.stop()


EVENING = datetime(2026, 4, 1, 23, 30, tzinfo=UTC)  # session 1 of an evening client in the Americas


def evening_client(t: str, client: str, first_accepted: int, fixed_accepted: int) -> list[SrsSubmitted]:
    """Sessions 1..3 without episode id, session 3 dropping; session 1 in two versions under its
    id: 23:30 UTC (accepted at `first_accepted`) and its time fixed to 00:30 the next day."""
    return [submission(t, client, 1, 38.0, administered_at=EVENING, accepted_at=at(first_accepted)),
            submission(t, client, 2, 38.0, administered_at=EVENING + timedelta(days=7), accepted_at=at(2)),
            submission(t, client, 3, 32.0, administered_at=EVENING + timedelta(days=14), accepted_at=at(3)),
            submission(t, client, 1, 38.0, administered_at=EVENING + timedelta(hours=1),
                       accepted_at=at(fixed_accepted))]


def open_alerts(alerts: list[AllianceDeterioration], statuses: list[AlertStatusChanged],
                client: str) -> set[tuple[str, str, int]]:
    """A client's alerts whose lifecycle ends open, in whatever order it was heard (an alert
    withdrawn, then raised again with a higher revision, is open)."""
    mine = [a for a in alerts if a.client_id == client]
    final = merge_lifecycle([*mine, *(s for s in statuses if s.client_id == client)])
    return {(a.alert_id, a.episode_id, a.session_number) for a in mine if final[a.alert_id] == "open"}


def fixed_evening(episode: str) -> dict[int, tuple[str, datetime]]:
    """An `evening_client`'s sessions once session 1's time is fixed: all three in `episode`."""
    return {1: (episode, EVENING + timedelta(hours=1)), 2: (episode, EVENING + timedelta(days=7)),
            3: (episode, EVENING + timedelta(days=14))}


def newest_of(scored: list[SrsScored], client: str) -> dict[int, tuple[str, datetime]]:
    """A client's sessions (episode, time) as a consumer keeping each submission's newest revision
    shows them (a retracted one is not shown)."""
    newest: dict[str, SrsScored] = {}
    for s in scored:
        if s.client_id == client and (s.submission_id not in newest or s.revision > newest[s.submission_id].revision):
            newest[s.submission_id] = s
    return {s.session_number: (s.episode_id, s.administered_at) for s in newest.values() if not s.retracted}


async def settle_fixed_evenings(scoring: Scoring, t: str, clients: tuple[str, ...], episode: str) -> None:
    """Wait until each client shows `fixed_evening(episode)` on the scored topic and one open
    alert, session 3's in `episode` (the two topics are read apart: neither is waited for alone)."""

    async def final() -> list[tuple[dict[int, tuple[str, datetime]], set[tuple[str, str, int]]]]:
        return [(newest_of(scoring.scored_of(t), c), open_alerts(scoring.alerts_of(t), scoring.statuses_of(t), c))
                for c in clients]

    await eventually(final, timeout=60, until=lambda got: got == [
        (fixed_evening(episode), {(ids.alert_id(t, c, "SRS", episode, 3), episode, 3)}) for c in clients])


async def test_a_time_of_session_1_corrected_across_midnight_keeps_the_episode_whichever_version_arrives_first(
        scoring: Scoring) -> None:
    t = "t-evening"
    topic = scoring.ns.kafka().topics().submitted
    in_order = evening_client(t, "in-order", 1, 4)
    await publish(scoring.producer, topic, in_order)
    # The other client's correction reaches scoring first, its older version (accepted first) last.
    late = evening_client(t, "late", 1, 4)
    await publish(scoring.producer, topic, [late[3], late[1], late[2]])
    await publish(scoring.producer, topic, [late[0]])
    episode = "auto/2026-04-01/1"

    await settle_fixed_evenings(scoring, t, ("in-order", "late"), episode)
    # In order, the correction re-published session 1 alone, and said nothing of the alert.
    assert [a.client_id for a in scoring.alerts_of(t)].count("in-order") == 1
    assert not [s for s in scoring.statuses_of(t) if s.client_id == "in-order"]


async def test_session_1_moved_away_and_back_with_its_time_fixed_keeps_the_episode_whichever_arrives_first(
        scoring: Scoring) -> None:
    # Session 1 (23:30 UTC) of each client is re-sent for another client (accepted at 5), then for
    # its own again with its time fixed to 00:30 the next UTC day (accepted at 6). One client reads
    # the retraction before the version that brings it back; for the other, the version for the
    # other client is read last (older than the one the client holds by then: it changes nothing).
    t = "t-evening-move"
    topic = scoring.ns.kafka().topics().submitted
    fixed = EVENING + timedelta(hours=1)
    episode = "auto/2026-04-01/1"
    clients = ("retraction-first", "return-first")

    def moves(client: str) -> tuple[SrsSubmitted, SrsSubmitted]:
        sid = f"{client}-s1"
        return (submission(t, f"{client}-b", 1, 38.0, submission_id=sid, administered_at=EVENING, accepted_at=at(5)),
                submission(t, client, 1, 38.0, submission_id=sid, administered_at=fixed, accepted_at=at(6)))

    async def shown(client: str) -> dict[int, tuple[str, datetime]]:
        return newest_of(scoring.scored_of(t), client)

    for c in clients:
        await publish(scoring.producer, topic, evening_client(t, c, 1, 4)[:3])
    await at_least(lambda: scoring.alerts_of(t), 2)
    away, back = moves("retraction-first")
    await publish(scoring.producer, topic, [away])
    await eventually(lambda: shown("retraction-first"), timeout=60, until=lambda s: 1 not in s)
    await publish(scoring.producer, topic, [back])
    away, back = moves("return-first")
    await publish(scoring.producer, topic, [back])
    await eventually(lambda: shown("return-first"), timeout=60, until=lambda s: s.get(1, ("", None))[1] == fixed)
    await publish(scoring.producer, topic, [away])

    await settle_fixed_evenings(scoring, t, clients, episode)


async def send_ors(scoring: Scoring, ev: OrsSubmitted) -> None:
    """`ev` on ors.submitted.v1, as intake publishes it."""
    topics = scoring.ns.kafka().topics()
    await (await scoring.producer.send(topics.ors_submitted, ev.model_dump_json().encode(),
                                       key=ids.partition_key(ev.tenant_id, ev.client_id)))


async def ors_scored_recorder(scoring: Scoring) -> TopicRecorder:
    return await TopicRecorder(scoring.ns.stack.bootstrap, scoring.ns.kafka().topics().ors_scored).start(
        background=True)


def ors_scored_in(recorder: TopicRecorder, tenant: str) -> list[OrsScored]:
    return [s for s in map(OrsScored.model_validate_json, recorder.values()) if s.tenant_id == tenant]


async def transferred_south(scoring: Scoring, t: str) -> None:
    """Client `c` transferred to south (accepted at 3 s), once scoring re-published it there."""
    await publish(scoring.producer, scoring.submitted, [client_transfer(t, "c", "south", accepted_at=at(3))])
    await at_least(lambda: [s for s in scoring.scored_of(t) if s.site_id == "south"], 1)


async def test_the_new_sites_ors_accepted_after_a_transfer_is_scored_whichever_topic_is_read_first(
        scoring: Scoring) -> None:
    t = "t-transfer-race"
    ors_scored = await ors_scored_recorder(scoring)
    try:
        await publish(scoring.producer, scoring.submitted, [submission(t, "c", 1, 38.0, accepted_at=at(1))])
        await at_least(lambda: scoring.scored_of(t), 1)
        await send_ors(scoring, ors(t, "c", 1, 22.0, 4).model_copy(update={"site_id": "south",
                                                                             "clinician_id": "c-south"}))
        await at_least(lambda: scoring.letters_of(t), 1)  # read first: the srs.submitted.v1 consumer lagged
        await transferred_south(scoring, t)

        async def ors_of_south() -> list[OrsScored]:
            return [s for s in ors_scored_in(ors_scored, t) if s.site_id == "south"]

        (scored,) = await eventually(ors_of_south, timeout=10)
        assert (scored.submission_id, scored.revision, scored.total) == ("c-ors1", 1, 22.0)
        (letter,) = scoring.letters_of(t)  # the refusal told when it was read stays; no second one
        assert letter.reason == "site_conflict"
    finally:
        await ors_scored.stop()


async def test_the_old_sites_ors_accepted_before_a_transfer_is_scored_whichever_topic_is_read_first(
        scoring: Scoring) -> None:
    # Accepted while north owned the client, read after the transfer (the ors.submitted.v1 consumer
    # lagged): judged by its acceptance, so taken, and shown for the site that owns the client now.
    t = "t-transfer-race-old"
    ors_scored = await ors_scored_recorder(scoring)
    try:
        await publish(scoring.producer, scoring.submitted, [submission(t, "c", 1, 38.0, accepted_at=at(1))])
        await transferred_south(scoring, t)
        await send_ors(scoring, ors(t, "c", 1, 22.0, 2))

        async def ors_of_tenant() -> list[OrsScored]:
            return ors_scored_in(ors_scored, t)

        (scored,) = await eventually(ors_of_tenant, timeout=10)
        assert (scored.submission_id, scored.site_id, scored.clinician_id, scored.site_version) == (
            "c-ors1", "south", "c-1", 1)
        assert scoring.letters_of(t) == []
    finally:
        await ors_scored.stop()


async def test_the_old_sites_ors_accepted_after_a_transfer_is_refused_though_the_srs_topic_lags(
        scoring: Scoring) -> None:
    # The transfer's copy on ors.submitted.v1 precedes the ORS in its partition; its copy on
    # srs.submitted.v1 is read last (that consumer lagging) and changes nothing.
    t = "t-transfer-race-late"
    topics = scoring.ns.kafka().topics()
    move = client_transfer(t, "c", "south", accepted_at=at(3))
    await publish(scoring.producer, scoring.submitted, [submission(t, "c", 1, 38.0, accepted_at=at(1))])
    await at_least(lambda: scoring.scored_of(t), 1)
    await publish(scoring.producer, topics.ors_submitted, [move, ors(t, "c", 1, 22.0, 4)])
    (letter,) = await at_least(lambda: scoring.letters_of(t), 1)
    assert (letter.reason, json.loads(letter.payload)["submission_id"]) == ("site_conflict", "c-ors1")
    await publish(scoring.producer, scoring.submitted, [move, submission(t, "c", 2, 37.0, site="south",
                                                                         accepted_at=at(5))])
    await at_least(lambda: [s for s in scoring.scored_of(t) if s.session_number == 2], 1)
    assert [(s.submission_id, s.site_id, s.site_version, s.revision) for s in scoring.scored_of(t)] == [
        ("c-s1", "north", 0, 1), ("c-s1", "south", 1, 2), ("c-s2", "south", 1, 1)]
    assert len(scoring.letters_of(t)) == 1


async def test_two_transfers_read_in_reverse_acceptance_order_leave_the_client_at_the_one_accepted_last(
        scoring: Scoring) -> None:
    # Intake stamps `accepted_at` before it publishes: the transfer to south accepted at 3 s reaches
    # the client's partitions after the one to west accepted at 5 s. West, accepted last, owns it;
    # south's SRS accepted between the two is judged against south, and taken.
    t = "t-transfer-reversed"
    topics = scoring.ns.kafka().topics()
    await publish(scoring.producer, scoring.submitted, [submission(t, "c", 1, 38.0, accepted_at=at(1))])
    await at_least(lambda: scoring.scored_of(t), 1)
    south, west = (client_transfer(t, "c", "south", accepted_at=at(3)),
                   client_transfer(t, "c", "west", accepted_at=at(5)))
    for topic in (scoring.submitted, topics.ors_submitted):  # both copies of each, as intake writes them
        await publish(scoring.producer, topic, [west, south])
    await publish(scoring.producer, scoring.submitted, [submission(t, "c", 2, 37.0, site="south", accepted_at=at(4))])
    await at_least(lambda: [s for s in scoring.scored_of(t) if s.session_number == 2], 1)
    scored = scoring.scored_of(t)
    assert [(s.submission_id, s.site_id, s.site_version, s.revision) for s in scored] == [
        ("c-s1", "north", 0, 1), ("c-s1", "west", 1, 2), ("c-s2", "west", 1, 1)]
    assert max(scored, key=lambda s: s.site_version).site_id == "west"  # the site reporting derives
    assert scoring.letters_of(t) == []
