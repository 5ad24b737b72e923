"""The batch handler with in-memory state and publisher: dead letters, round trips per batch,
and what a crash at each step leaves behind (the same tests run against the real broker and
store in tests/integration/test_scoring_*.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.scoring.handlers import ScoringHandler, StateConflict
from services.scoring.history import History
from services.scoring.rules import TenantRules
from services.scoring.store import SeriesKey, StateCache, StatePort, history_doc, history_from
from shared import ids
from shared.events import AllianceDeterioration, DeadLetter, SrsScored
from shared.kafka import InboundRecord, OutboundRecord
from shared.mongo import Document
from shared.topics import Topics

TOPICS = Topics("u.")
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


class MemoryStates:
    """State kept as the stored documents, so every load goes through the real (de)serialization."""

    def __init__(self) -> None:
        self.docs: dict[str, Document] = {}
        self.loads = 0
        self.saves = 0
        self.before_save: Callable[[], Awaitable[None]] | None = None

    async def load(self, keys: Iterable[SeriesKey]) -> dict[SeriesKey, History]:
        self.loads += 1
        return {k: history_from(self.docs[k.doc_id]) if k.doc_id in self.docs else History() for k in keys}

    async def save(self, changed: dict[SeriesKey, History]) -> set[SeriesKey]:
        if self.before_save is not None:
            hook, self.before_save = self.before_save, None
            await hook()
        self.saves += 1
        conflicts = set()
        for k, h in changed.items():
            stored = self.docs.get(k.doc_id)
            if (stored["v"] if stored else 0) != h.version:
                conflicts.add(k)
                continue
            self.docs[k.doc_id] = history_doc(k, h, h.version + 1)
            h.version += 1
        return conflicts


class MemoryRules:
    def __init__(self, rules: dict[str, TenantRules] | None = None) -> None:
        self.rules = rules or {}

    async def get_many(self, tenants: Iterable[str]) -> dict[str, TenantRules]:
        return {t: self.rules.get(t, TenantRules()) for t in tenants}


class Sink:
    """A publisher that can fail its next N calls (broker down / kill -9 before the acks);
    a failing call still gets its first half acknowledged, as when a process dies mid-publish."""

    def __init__(self) -> None:
        self.published: list[OutboundRecord] = []
        self.attempted: list[OutboundRecord] = []
        self.fail_next = 0

    async def __call__(self, records: Sequence[OutboundRecord]) -> None:
        self.attempted.extend(records)
        if self.fail_next:
            self.fail_next -= 1
            self.published.extend(records[: len(records) // 2])
            raise ConnectionError("broker did not acknowledge")
        self.published.extend(records)


def ticking_clock(start: datetime = T0) -> Callable[[], datetime]:
    counter = itertools.count()
    return lambda: start + timedelta(days=1, milliseconds=next(counter))


def handler(states: MemoryStates | None = None, sink: Sink | None = None, clock: Callable[[], datetime] | None = None,
            rules: MemoryRules | None = None, cache: bool = False,
            save_chunk: int = 128) -> tuple[ScoringHandler, MemoryStates, Sink]:
    states = states or MemoryStates()
    sink = sink or Sink()
    port: StatePort = StateCache(states) if cache else states
    h = ScoringHandler(port, rules or MemoryRules(), sink, TOPICS, clock=clock or ticking_clock(),
                       save_chunk=save_chunk)
    return h, states, sink


_offsets = itertools.count()


def submitted(client: str, session: int, total: float | None = None, *, tenant: str = "acme", sid: str | None = None,
              instrument: str = "SRS", items: dict[str, float] | None = None, at: int = 0,
              correlation: str | None = "corr-1", **extra: Any) -> InboundRecord:
    doc: dict[str, Any] = {
        "event_id": f"ev-{client}-{session}", "tenant_id": tenant, "occurred_at": T0.isoformat(),
        "submission_id": sid or f"{client}-{session}", "site_id": "north", "clinician_id": "c-1",
        "client_id": client, "instrument": instrument, "session_number": session,
        "administered_at": (T0 + timedelta(days=7 * session)).isoformat(),
        "accepted_at": (T0 + timedelta(seconds=at)).isoformat(), **extra,
    }
    if total is not None:
        doc["total"] = total
    if items is not None:
        doc["items"] = items
    return raw(json.dumps(doc).encode(), key=f"{tenant}:{client}".encode(), correlation=correlation)


def raw(value: bytes, key: bytes | None = b"acme:x", correlation: str | None = None) -> InboundRecord:
    headers = {"correlation_id": correlation} if correlation else {}
    return InboundRecord(TOPICS.submitted, 0, next(_offsets), key, value, headers, 0)


def of_topic(records: Iterable[OutboundRecord], topic: str) -> list[OutboundRecord]:
    return [r for r in records if r.topic == topic]


async def test_valid_records_are_scored_and_alerts_raised_with_the_client_key_and_correlation_id() -> None:
    h, _, sink = handler()
    await h([submitted("x", 1, 38.0, at=1), submitted("x", 2, 35.0, at=2, correlation="corr-2")])
    scored = [SrsScored.model_validate_json(r.value) for r in of_topic(sink.published, TOPICS.scored)]
    assert [(s.session_number, s.total, s.previous_total, s.flags, s.latest) for s in scored] == [
        (1, 38.0, None, [], True), (2, 35.0, 38.0, ["below_cutoff", "drop_from_previous"], True)]
    assert scored[1].event_id == ids.scored_event_id("acme", "x-2")
    (alert_rec,) = of_topic(sink.published, TOPICS.deterioration)
    alert = AllianceDeterioration.model_validate_json(alert_rec.value)
    assert alert.alert_id == ids.alert_id("acme", "x-2") and alert.severity == "critical"
    assert alert.triggers == ["below_cutoff", "drop_from_previous"] and alert.change_from_previous == -3.0
    assert alert_rec.key == ids.partition_key("acme", "x") and alert_rec.correlation_id == "corr-2"


async def test_alert_document_has_identity_fields_at_top_level() -> None:
    h, _, sink = handler()
    await h([submitted("x", 1, 30.0, episode_id="ep-1")])
    body = json.loads(of_topic(sink.published, TOPICS.deterioration)[0].value)
    for name in ("tenant_id", "site_id", "clinician_id", "client_id", "episode_id", "instrument", "session_number",
                 "submission_id", "administered_at", "alert_id", "triggers", "severity", "total", "previous_total",
                 "change_from_previous", "cutoff"):
        assert name in body, name
    assert body["episode_id"] == "ep-1"


async def test_undecodable_invalid_and_unscorable_records_are_dead_lettered_and_the_rest_scored() -> None:
    h, _, sink = handler()
    bad_json, bad_event, no_total = raw(b"\xff not json"), raw(b'{"tenant_id": "acme"}'), submitted("y", 1)
    await h([bad_json, submitted("x", 1, 38.0), bad_event, no_total, raw(b""), raw(b"[1,2]", key=None)])
    letters = [DeadLetter.model_validate_json(r.value) for r in of_topic(sink.published, TOPICS.deadletter)]
    assert [(d.reason, d.source_offset) for d in letters] == [
        ("undecodable", bad_json.offset), ("invalid", bad_event.offset), ("undecodable", letters[2].source_offset),
        ("invalid", letters[3].source_offset), ("unscorable", no_total.offset)]
    assert letters[1].tenant_id == "acme" and "submission_id" in letters[1].detail
    assert len(of_topic(sink.published, TOPICS.scored)) == 1


async def test_dead_letter_detail_names_fields_but_not_their_values() -> None:
    h, _, sink = handler()
    await h([submitted("secret-client", 1, 38.0, session_number="not-a-number")])
    (letter,) = [DeadLetter.model_validate_json(r.value) for r in of_topic(sink.published, TOPICS.deadletter)]
    assert "session_number" in letter.detail and "secret-client" not in letter.detail


async def test_a_batch_reads_state_once_and_writes_it_once() -> None:
    h, states, sink = handler()
    batch = [submitted(f"c{i}", s, 37.0, at=s) for i in range(50) for s in (1, 2, 3)]
    await h(batch)
    assert (states.loads, states.saves) == (1, 1)
    assert len(of_topic(sink.published, TOPICS.scored)) == 150 and len(states.docs) == 50


async def test_ycsrs_is_stored_and_publishes_nothing() -> None:
    h, states, sink = handler()
    await h([submitted("kid", 1, 20.0, instrument="YCSRS")])
    assert sink.published == [] and len(states.docs) == 1


async def test_same_submission_twice_in_one_batch_is_published_once() -> None:
    h, _, sink = handler()
    await h([submitted("x", 1, 30.0), submitted("x", 1, 30.0)])
    assert len(of_topic(sink.published, TOPICS.scored)) == 1
    assert len(of_topic(sink.published, TOPICS.deterioration)) == 1


async def test_missing_correlation_id_falls_back_to_the_submission_id() -> None:
    h, _, sink = handler()
    await h([submitted("x", 1, 38.0, correlation=None)])
    assert sink.published[0].correlation_id == "x-1"


async def test_crash_after_state_write_before_the_acks_republishes_byte_equal_events() -> None:
    h, _, sink = handler()
    batch = [submitted("x", 1, 38.0, at=1), submitted("x", 2, 33.0, at=2)]
    sink.fail_next = 1
    with pytest.raises(ConnectionError):
        await h(batch)
    first_attempt, partly_published = list(sink.attempted), len(sink.published)
    await h(batch)  # the subscriber retries (or another process gets the uncommitted batch)
    retried = sink.published[partly_published:]
    assert [(r.topic, r.key, r.value) for r in retried] == [(r.topic, r.key, r.value) for r in first_attempt]


async def test_redelivery_after_publishing_republishes_byte_equal_events_and_no_new_alert() -> None:
    h, _, sink = handler()
    batch = [submitted("x", 1, 30.0, at=1), submitted("x", 2, 29.0, at=2)]
    await h(batch)
    first = list(sink.published)
    await h(batch)  # kill -9 before the commit: the whole batch comes again
    again = sink.published[len(first):]
    assert [r.value for r in again] == [r.value for r in first]
    alert_ids = {json.loads(r.value)["alert_id"] for r in of_topic(sink.published, TOPICS.deterioration)}
    assert alert_ids == {ids.alert_id("acme", "x-1"), ids.alert_id("acme", "x-2")}


async def test_losing_a_write_race_publishes_the_winners_outcomes() -> None:
    states = MemoryStates()
    a, _, sink_a = handler(states, clock=ticking_clock(T0))
    b, _, sink_b = handler(states, clock=ticking_clock(T0 + timedelta(hours=5)))
    batch = [submitted("x", 1, 38.0, at=1), submitted("x", 2, 30.0, at=2)]

    async def other_process_scores_the_same_batch_first() -> None:
        await b(batch)

    states.before_save = other_process_scores_the_same_batch_first  # A read the state, then B wrote it
    await a(batch)
    assert [r.value for r in sink_a.published] == [r.value for r in sink_b.published]
    assert SrsScored.model_validate_json(sink_a.published[0].value).scored_at.hour == 14  # B's clock


async def test_state_that_keeps_changing_fails_the_batch_for_the_subscriber_to_retry() -> None:
    class AlwaysConflicting(MemoryStates):
        async def save(self, changed: dict[SeriesKey, History]) -> set[SeriesKey]:
            return set(changed)

    h, _, sink = handler(AlwaysConflicting())
    with pytest.raises(StateConflict):
        await h([submitted("x", 1, 38.0)])
    assert sink.attempted == []


async def test_tenant_rules_are_applied_per_tenant() -> None:
    rules = MemoryRules({"strict": TenantRules(cutoff=38.0, operator="<=")})
    h, _, sink = handler(rules=rules)
    await h([submitted("x", 1, 38.0, tenant="strict"), submitted("x", 1, 38.0, tenant="acme")])
    cutoffs = [(s.tenant_id, s.cutoff, s.flags) for s in
               (SrsScored.model_validate_json(r.value) for r in of_topic(sink.published, TOPICS.scored))]
    assert cutoffs == [("strict", 38.0, ["below_cutoff"]), ("acme", 36.0, [])]


async def test_events_of_a_written_chunk_are_published_while_later_chunks_wait_for_their_write() -> None:
    sink = Sink()
    published_at_save: list[int] = []

    class Watching(MemoryStates):
        async def save(self, changed: dict[SeriesKey, History]) -> set[SeriesKey]:
            await asyncio.sleep(0)  # let started sends run
            published_at_save.append(len(sink.published))
            return await super().save(changed)

    watching = Watching()
    h = ScoringHandler(watching, MemoryRules(), sink, TOPICS, save_chunk=2)
    await h([submitted(c, 1, 37.0) for c in "abcde"])
    assert watching.saves == 3 and len(of_topic(sink.published, TOPICS.scored)) == 5
    assert published_at_save[0] == 0  # nothing before the first write
    for seen, saves_done in zip(published_at_save, range(3), strict=True):
        assert seen <= 2 * saves_done  # never more events out than series written


# --- the state cache ---------------------------------------------------------------------------


async def test_series_written_by_this_process_are_not_read_again() -> None:
    h, states, _ = handler(cache=True)
    await h([submitted(f"c{i}", 1, 37.0) for i in range(10)])
    await h([submitted(f"c{i}", 2, 37.0) for i in range(10)])
    await h([submitted(f"c{i}", 3, 37.0) for i in range(12)])
    assert (states.loads, states.saves) == (2, 3)  # the third batch read only the two new series


async def test_stale_cache_after_another_process_wrote_leads_to_a_reread_not_a_wrong_previous() -> None:
    states = MemoryStates()
    a, _, sink_a = handler(states, cache=True)
    b, _, sink_b = handler(states, cache=True, clock=ticking_clock(T0 + timedelta(hours=5)))
    await a([submitted("x", 1, 38.0, at=1)])  # A caches the series at version 1
    await b([submitted("x", 2, 35.0, at=2)])  # the partition moved to B: version 2
    await a([submitted("x", 2, 35.0, at=2), submitted("x", 3, 34.5, at=3)])  # ...and back to A
    republished, third = (SrsScored.model_validate_json(r.value) for r in of_topic(sink_a.published[1:], TOPICS.scored))
    assert republished.model_dump_json() == SrsScored.model_validate_json(
        of_topic(sink_b.published, TOPICS.scored)[0].value).model_dump_json()
    assert third.previous_total == 35.0 and third.flags == ["below_cutoff", "low_not_improving"]


async def test_cache_is_bounded_and_forgets_the_least_recent_series() -> None:
    states = MemoryStates()
    cache = StateCache(states, max_series=2)
    h = ScoringHandler(cache, MemoryRules(), Sink(), TOPICS)
    for c in ("a", "b", "c"):
        await h([submitted(c, 1, 37.0)])
    assert len(cache) == 2
    before = states.loads
    await h([submitted("a", 2, 37.0)])
    assert states.loads == before + 1  # "a" was forgotten


async def test_a_failed_write_forgets_the_series() -> None:
    class Failing(MemoryStates):
        async def save(self, changed: dict[SeriesKey, History]) -> set[SeriesKey]:
            raise ConnectionError("store down")

    cache = StateCache(Failing())
    h = ScoringHandler(cache, MemoryRules(), Sink(), TOPICS)
    with pytest.raises(ConnectionError):
        await h([submitted("x", 1, 37.0)])
    assert len(cache) == 0


# --- crash anywhere, redeliver: exactly-once in effect -----------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> list[InboundRecord]:
    """A few clients' sessions in partition order, with corrections and duplicates."""
    out: list[InboundRecord] = []
    at = itertools.count(1)
    for c in range(draw(st.integers(min_value=1, max_value=4))):
        for s in range(1, draw(st.integers(min_value=1, max_value=5)) + 1):
            out.append(submitted(f"c{c}", s, draw(st.integers(200, 400)) / 10, at=next(at)))
            if draw(st.integers(0, 5)) == 0:
                out.append(submitted(f"c{c}", s, draw(st.integers(200, 400)) / 10, sid=f"c{c}-{s}-fix", at=next(at)))
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=workloads(), batch_size=st.integers(1, 6), crashes=st.lists(st.sampled_from(["publish", "commit"]),
                                                                       max_size=6), data=st.data())
async def test_crash_at_any_point_and_redelivery_yields_each_submission_once_in_effect(
        stream: list[InboundRecord], batch_size: int, crashes: list[str], data: st.DataObject) -> None:
    """Two processes with their own state caches share the store; the partition moves between
    them at random, and a process may die (losing its cache) or fail to publish at any batch."""
    clean, _, clean_sink = handler()
    for i in range(0, len(stream), batch_size):
        await clean(stream[i : i + batch_size])

    states, sink = MemoryStates(), Sink()
    chunk: int = data.draw(st.integers(1, 3))
    procs = [handler(states, sink, cache=True, save_chunk=chunk)[0] for _ in range(2)]
    committed = 0
    pending = list(crashes)
    while committed < len(stream):
        size = data.draw(st.integers(1, batch_size))
        owner: int = data.draw(st.integers(0, 1))
        batch = stream[committed : committed + size]
        crash_now: bool = data.draw(st.booleans())
        crash = pending.pop(0) if pending and crash_now else None
        sink.fail_next = 1 if crash == "publish" else 0
        try:
            await procs[owner](batch)
        except ConnectionError:
            continue  # no commit: the same offsets are read again
        if crash == "commit":
            procs[owner] = handler(states, sink, cache=True, save_chunk=chunk)[0]  # killed: restarts cold
            continue
        committed += len(batch)

    def contents(records: list[OutboundRecord], topic: str) -> dict[str, set[bytes]]:
        by: dict[str, set[bytes]] = {}
        for r in of_topic(records, topic):
            by.setdefault(json.loads(r.value)["event_id"], set()).add(r.value)
        return by

    for topic in (TOPICS.scored, TOPICS.deterioration):
        got, want = contents(sink.published, topic), contents(clean_sink.published, topic)
        assert set(got) == set(want)
        assert all(len(v) == 1 for v in got.values()), "one id published with two different contents"

        def strip(values: set[bytes]) -> dict[str, Any]:
            doc: dict[str, Any] = json.loads(next(iter(values)))
            return {k: v for k, v in doc.items() if k not in ("scored_at", "occurred_at")}

        assert {k: strip(v) for k, v in got.items()} == {k: strip(v) for k, v in want.items()}
