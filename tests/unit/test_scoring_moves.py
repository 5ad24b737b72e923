"""A submission re-sent for another client moves the session (docs/clinical-records.md, "The same
id for another client moves the session"): the pure decision of who holds a submission id, what a
client's record does with a retraction, and - through the scoring handler, with the retraction
records it publishes delivered back to it as the broker would - that the final state does not
depend on the order the two clients' versions arrive in."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.scoring import series
from services.scoring.handlers import RETRACTION_HEADERS, model_of
from services.scoring.rules import TenantRules
from services.scoring.series import (
    INDEX_FORMER_HOLDERS,
    Holding,
    Moved,
    forgettable,
    holder,
    holding,
    newer_elsewhere,
    retractions,
)
from services.scoring.store import ClientKey, MemoryIndex, state_doc, state_from
from shared import ids
from shared.events import RECORD_TYPE_HEADER, SUBMISSION_RETRACTION, Lifecycle, SubmissionRetraction
from shared.kafka import BatchHandler, InboundRecord, OutboundRecord
from tests.support.fakes import TOPICS, Sink
from tests.unit.test_scoring_handler import handler, ors_submitted, raw, submitted
from tests.unit.test_scoring_series import (
    ACCEPTED,
    CLIENT,
    EVENING,
    FIXED,
    TENANT,
    Client,
    alerts,
    scored,
    shown,
    statuses,
)

T1, T2, T3 = (ACCEPTED + timedelta(hours=h) for h in (1, 2, 3))


# --- who holds a submission id ------------------------------------------------------------------


def test_no_client_holds_an_id_nobody_accepted() -> None:
    assert holder({}) is None and retractions({}) == []


def test_the_client_of_the_newest_accepted_version_holds_the_id() -> None:
    assert holder({"a": (T1, "d1"), "b": (T2, "d1")}) == holding(T2, "d1", "b")
    assert holder({"a": (T2, "d1"), "b": (T1, "d1")}) == holding(T2, "d1", "a")


def test_versions_accepted_at_the_same_instant_are_ordered_by_digest_then_client() -> None:
    assert holder({"a": (T1, "ff"), "b": (T1, "00")})[2] == "a"  # type: ignore[index]
    assert holder({"a": (T1, "00"), "b": (T1, "00")})[2] == "b"  # type: ignore[index]


def test_a_naive_and_an_aware_time_of_one_instant_are_one_order() -> None:
    naive = T1.replace(tzinfo=None)
    assert holding(naive, "d", "a") == holding(T1, "d", "a")


def test_every_client_but_the_holder_is_retracted_as_of_the_newest_version() -> None:
    held = {"a": (T1, "d"), "b": (T3, "d"), "c": (T2, "d")}
    assert retractions(held) == [("a", holding(T3, "d", "b")), ("c", holding(T3, "d", "b"))]


def test_a_single_client_is_never_retracted() -> None:
    assert retractions({"a": (T1, "d")}) == []


def test_the_index_forgets_no_client_while_it_lists_at_most_the_holder_and_the_kept_former_holders() -> None:
    held = {f"c{i}": (ACCEPTED + timedelta(seconds=i), "d") for i in range(INDEX_FORMER_HOLDERS + 1)}
    assert forgettable(held) == [] and forgettable({}) == []


def test_the_index_forgets_the_oldest_former_holders_beyond_the_kept_number() -> None:
    held = {"old": (T1, "d"), "older": (ACCEPTED, "d"), "mid": (T2, "d"), "holder": (T3, "d")}
    assert forgettable(held, keep=1) == ["old", "older"]


def test_the_holder_is_never_forgotten_even_when_it_registered_first() -> None:
    held = {"holder": (T3, "d"), "a": (T1, "d"), "b": (T2, "d")}
    assert "holder" not in forgettable(held, keep=0) and holder(held) == holding(T3, "d", "holder")


def test_former_holders_are_kept_newest_first_by_the_order_that_decides_the_holder() -> None:
    held = {"holder": (T3, "d"), "a": (T2, "00"), "b": (T2, "ff"), "c": (T1, "ff")}
    assert forgettable(held, keep=1) == ["a", "c"]


def test_a_version_older_than_another_clients_is_not_taken() -> None:
    assert newer_elsewhere({"b": (T2, "d")}, "a", T1, "d") == holding(T2, "d", "b")


def test_a_version_newer_than_every_other_clients_is_taken() -> None:
    assert newer_elsewhere({"b": (T1, "d")}, "a", T2, "d") is None


def test_the_clients_own_registered_version_never_counts_against_it() -> None:
    assert newer_elsewhere({"a": (T3, "d")}, "a", T1, "d") is None


orders = st.builds(lambda h, d: (ACCEPTED + timedelta(minutes=h), d), st.integers(0, 5), st.sampled_from(["0", "f"]))


@given(st.dictionaries(st.sampled_from("abcd"), orders, min_size=1))
def test_the_holder_is_the_one_client_no_other_is_newer_than_and_all_others_are_retracted(
        held: dict[str, tuple[datetime, str]]) -> None:
    newest = holder(held)
    assert newest is not None
    taken = [c for c, (at, d) in held.items() if newer_elsewhere(held, c, at, d) is None]
    assert taken == [newest[2]]
    assert sorted(c for c, _ in retractions(held)) == sorted(c for c in held if c != newest[2])


# --- a client's record and a retraction ---------------------------------------------------------


def _with_moved_second_session(second: float = 32.0) -> tuple[Client, series.Step]:
    """A client with sessions 1 (38) and 2 (`second`, submission `m`), then session 3 (38)."""
    c = Client()
    c.feed(38.0)
    c.state.submit(c.version("m", 2, second), c.rules, c.now())
    return c, c.submit("s3", 3, 38.0)


def _retract(c: Client, as_of: Holding, key: str = "m") -> series.Step:
    return c.state.retract(key, as_of, c.rules, c.now())


def test_a_retraction_publishes_the_session_once_more_marked_retracted_with_the_next_revision() -> None:
    c = Client()
    c.feed(38.0)
    c.submit("m", 2, 32.0)
    (out,) = [o for o in scored(_retract(c, holding(T3, "d", "b"))) if o.session.version.submission_id == "m"]
    assert out.retracted and out.revision == 2 and not out.latest


def test_a_submission_moved_to_another_client_still_counts_towards_the_clients_cap() -> None:
    # Its tombstone stays in the record: without counting it, an integration moving new ids away
    # from one client for ever would grow that client's document without end.
    c = Client(rules=TenantRules(max_client_submissions=2))
    c.feed(38.0)
    c.submit("m", 2, 32.0)
    _retract(c, holding(T3, "d", "b"))
    step = c.submit("s3", 3, 38.0)
    assert step.rejection is not None and step.rejection.reason == "series_full"
    assert "m" in c.state.moved and "s3" not in c.state.versions


def test_a_submission_that_comes_back_counts_once_towards_the_clients_cap() -> None:
    c = Client(rules=TenantRules(max_client_submissions=2))
    c.feed(38.0)
    c.submit("m", 2, 32.0)
    _retract(c, holding(T3, "d", "b"))
    back = c.state.submit(replace(c.version("m", 2, 30.0), accepted_at=T3 + timedelta(hours=1)), c.rules, c.now())
    assert back.rejection is None and "m" not in c.state.moved
    assert c.submit("s3", 3, 38.0).rejection is not None


def test_a_retraction_withdraws_the_alert_of_the_session_it_removes() -> None:
    c = Client()
    c.feed(38.0)
    (raised,) = alerts(c.submit("m", 2, 32.0))
    step = _retract(c, holding(T3, "d", "b"))
    assert [(s.alert_id, s.status) for s in statuses(step)] == [(raised.alert.alert_id, "withdrawn")]


def test_an_alert_withdrawn_by_a_move_to_another_client_re_emits_its_raise_then_the_withdrawal() -> None:
    # The batch that raised it may have withdrawn it too (a retraction behind it in the partition):
    # a redelivery must not tell a withdrawal of an alert nobody heard raised.
    c = Client()
    c.feed(38.0)
    (raised,) = alerts(c.submit("m", 2, 32.0))
    _retract(c, holding(T3, "d", "b"))
    again = c.state.current_outputs(c.rules)
    assert alerts(again) == [raised]
    assert [(s.alert_id, s.status) for s in statuses(again)] == [(raised.alert.alert_id, "withdrawn")]


def test_the_session_before_becomes_the_latest_again_and_holds_its_own_alert() -> None:
    c = Client()
    c.feed(30.0)
    c.submit("m", 2, 32.0)
    step = _retract(c, holding(T3, "d", "b"))
    assert [a.alert.session.version.submission_id for a in alerts(step)] == ["s1"]


def test_later_sessions_are_scored_again_without_the_retracted_one() -> None:
    c, _ = _with_moved_second_session(20.0)
    step = _retract(c, holding(T3, "d", "b"))
    (third,) = [o for o in scored(step) if o.session.version.submission_id == "s3"]
    assert third.session.previous_total == 38.0 and not third.retracted


def test_a_retraction_applied_again_changes_nothing_and_re_emits_the_retracted_event() -> None:
    c, _ = _with_moved_second_session()
    first = [o for o in scored(_retract(c, holding(T3, "d", "b"))) if o.retracted]
    again = _retract(c, holding(T3, "d", "b"))
    assert again.redelivered and not again.changed
    assert [o for o in c.state.current_outputs(c.rules) if isinstance(o, series.ScoredOut) and o.retracted] == first


def test_an_older_retraction_after_a_newer_one_changes_nothing() -> None:
    c, _ = _with_moved_second_session()
    _retract(c, holding(T3, "d", "b"))
    assert _retract(c, holding(T2, "d", "c")).redelivered


def test_a_retraction_older_than_the_version_held_changes_nothing() -> None:
    c = Client()
    c.state.submit(c.version("m", 1, 32.0), c.rules, c.now())
    step = _retract(c, holding(ACCEPTED, "d", "b"))
    assert step.outputs == [] and not step.changed and "m" in c.state.versions


def test_a_version_accepted_before_the_move_arriving_later_changes_nothing() -> None:
    c, _ = _with_moved_second_session()
    _retract(c, holding(T3, "d", "b"))
    late = c.version("m", 2, 10.0, at=None)  # accepted before T3
    step = c.state.submit(late, c.rules, c.now())
    assert step.outputs == [] and not step.changed and "m" not in c.state.versions


def test_a_version_accepted_after_the_move_takes_the_session_back_with_a_higher_revision() -> None:
    c, _ = _with_moved_second_session()
    _retract(c, holding(T3, "d", "b"))
    back = series.Version("m", "SRS", None, 2, c.version("x", 2).administered_at, "north", "c-1", None, 30.0,
                          T3 + timedelta(hours=1))
    step = c.state.submit(back, c.rules, c.now())
    (out,) = [o for o in scored(step) if o.session.version.submission_id == "m"]
    assert not out.retracted and out.revision == 3 and "m" not in c.state.moved


def test_a_version_another_client_holds_a_newer_one_of_is_not_taken_and_publishes_nothing() -> None:
    c = Client()
    c.feed(38.0)
    step = c.state.submit(c.version("m", 2, 20.0), c.rules, c.now(), elsewhere=holding(T3, "d", "b"))
    assert step.outputs == [] and "m" not in c.state.versions and c.state.moved["m"].to_client == "b"


def test_a_retraction_of_a_submission_never_held_is_remembered() -> None:
    c = Client()
    step = _retract(c, holding(T3, "d", "b"))
    assert step.changed and step.outputs == [] and c.state.moved["m"] == Moved(T3, "d", "b")


def test_a_client_that_was_not_the_first_to_hold_an_id_is_marked_foreign_once() -> None:
    c = Client()
    c.state.submit(c.version("m", 1, 38.0), c.rules, c.now(), first=False)
    c.state.submit(c.version("n", 2, 38.0), c.rules, c.now())
    assert c.state.foreign == {"m"}


def test_tombstones_and_foreign_ids_survive_the_store() -> None:
    c, _ = _with_moved_second_session()
    _retract(c, holding(T3, "d", "b"))
    c.state.submit(c.version("x", 4, 38.0), c.rules, c.now(), first=False)
    key = ClientKey(TENANT, CLIENT)
    back = state_from(key, state_doc(key, c.state, 1))
    assert back.moved == c.state.moved and back.foreign == c.state.foreign
    assert back.current_outputs(c.rules) == c.state.current_outputs(c.rules)


def test_a_version_older_than_the_move_arriving_later_is_remembered_as_the_clients_earliest() -> None:
    c = Client()
    late = c.version("m", 2, 30.0)  # accepted first, read last
    c.feed(38.0)
    _retract(c, holding(T3, "d", "b"))
    step = c.state.submit(late, c.rules, c.now())
    assert step.outputs == [] and step.changed and c.state.moved["m"].earliest() == late.first()


def test_the_earliest_version_a_tombstone_saw_survives_the_store_only_when_it_did_not_show_it() -> None:
    shown_, unseen = _with_moved_second_session()[0], Client()
    unseen.state.submit(unseen.version("m", 2, 30.0), unseen.rules, unseen.now(), elsewhere=holding(T3, "d", "b"))
    key = ClientKey(TENANT, CLIENT)
    for c, stored in ((shown_, False), (unseen, True)):
        _retract(c, holding(T3, "d", "b"))
        doc = state_doc(key, c.state, 1)
        assert ("og" in doc["mv"][0]) is stored
        assert state_from(key, doc).moved == c.state.moved


def test_a_record_that_never_moved_stores_nothing_new() -> None:
    c, _ = _with_moved_second_session()
    doc = state_doc(ClientKey(TENANT, CLIENT), c.state, 1)
    assert "mv" not in doc and "fx" not in doc


# --- through the handler: arrival order -----------------------------------------------------------


_offsets = itertools.count(10_000)


def _retractions(records: list[OutboundRecord]) -> list[InboundRecord]:
    """The retractions the handler published, as its consumer would read them back."""
    return [InboundRecord(r.topic, 0, next(_offsets), r.key, r.value, {**r.headers}, 0)
            for r in records
            if r.topic == TOPICS.submitted and r.headers.get(RECORD_TYPE_HEADER) == SUBMISSION_RETRACTION]


async def _run(h: BatchHandler, sink: Sink, batches: list[list[InboundRecord]]) -> None:
    """Each batch, then every retraction it produced (until none), as the broker delivers them."""
    for batch in batches:
        seen = len(sink.published)
        await h(batch)
        while pending := _retractions(sink.published[seen:]):
            seen = len(sink.published)
            await h(pending)


def _final(sink: Sink) -> tuple[dict[tuple[str, str], float], set[tuple[str, int]]]:
    """What a consumer keeping the highest revision per (client, submission) ends with: the shown
    sessions' totals, and the alerts still open (by client and session)."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in sink.of_topic(TOPICS.scored):
        ev = json.loads(r.value)
        k = (ev["client_id"], ev["submission_id"])
        if k not in newest or ev["revision"] > newest[k]["revision"]:
            newest[k] = ev
    life: dict[str, tuple[int, int, dict[str, Any]]] = {}
    for topic in (TOPICS.deterioration, TOPICS.alert_status):
        for r in sink.of_topic(topic):
            ev = json.loads(r.value)
            rank = list(Lifecycle).index(Lifecycle(ev.get("status") or Lifecycle.RAISED))
            key = (ev["revision"], rank)
            held = life.get(ev["alert_id"])
            if held is None or key > held[:2]:
                life[ev["alert_id"]] = (*key, ev)
    shown = {k: e["total"] for k, e in newest.items() if not e.get("retracted")}
    open_ = {(e["client_id"], e["session_number"]) for _, rank, e in life.values() if rank == 0}
    return shown, open_


def _moved(client: str, at: int, total: float = 30.0) -> InboundRecord:
    return submitted(client, 2, total, sid="moved", at=at, correlation=None)


async def _firsts(h: BatchHandler) -> None:
    await h([submitted("a", 1, 38.0, at=0), submitted("b", 1, 38.0, at=0)])


async def test_a_version_for_another_client_moves_the_session_there_with_its_alert() -> None:
    h, _, sink = handler()
    await _firsts(h)
    await _run(h, sink, [[_moved("a", 10)], [_moved("b", 20)]])
    assert _final(sink) == ({("a", "a-1"): 38.0, ("b", "b-1"): 38.0, ("b", "moved"): 30.0}, {("b", 2)})


async def test_the_two_clients_events_of_the_moved_submission_have_different_ids() -> None:
    h, _, sink = handler()
    await _firsts(h)
    await _run(h, sink, [[_moved("a", 10)], [_moved("b", 20)]])
    by_client: dict[str, set[str]] = {}
    for r in sink.of_topic(TOPICS.scored):
        ev = json.loads(r.value)
        if ev["submission_id"] == "moved":
            by_client.setdefault(ev["client_id"], set()).add(ev["event_id"])
    assert not by_client["a"] & by_client["b"]
    assert ids.scored_event_id("acme", "moved", 1) in by_client["a"]  # the first client's ids are as they were


async def test_the_older_version_processed_after_the_newer_one_does_not_take_the_session_back() -> None:
    h, _, sink = handler()
    await _firsts(h)
    await _run(h, sink, [[_moved("b", 20)], [_moved("a", 10)]])
    assert _final(sink) == ({("a", "a-1"): 38.0, ("b", "b-1"): 38.0, ("b", "moved"): 30.0}, {("b", 2)})
    assert not [r for r in sink.of_topic(TOPICS.deterioration) if json.loads(r.value)["client_id"] == "a"]


async def test_both_versions_in_one_batch_end_as_in_either_order() -> None:
    h, _, sink = handler()
    await _firsts(h)
    await _run(h, sink, [[_moved("b", 20), _moved("a", 10)]])
    assert _final(sink) == ({("a", "a-1"): 38.0, ("b", "b-1"): 38.0, ("b", "moved"): 30.0}, {("b", 2)})


async def test_a_redelivered_retraction_changes_nothing_it_re_emits_the_same_bytes() -> None:
    h, _, sink = handler()
    await _firsts(h)
    await _run(h, sink, [[_moved("a", 10)], [_moved("b", 20)]])
    (retraction,) = {r.value: r for r in _retractions(sink.published)}.values()
    before = {r.value for r in sink.published}
    await h([raw(retraction.value, key=retraction.key, headers=dict(RETRACTION_HEADERS))])
    assert {r.value for r in sink.published} == before


async def test_an_ors_session_moves_like_an_srs_one_and_an_srs_of_the_same_id_stays() -> None:
    h, _, sink = handler()
    await h([ors_submitted("a", 1, 20.0, sid="appt", at=1), submitted("a", 1, 38.0, sid="appt", at=1)])
    await _run(h, sink, [[ors_submitted("b", 1, 20.0, sid="appt", at=2)]])
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in sink.of_topic(TOPICS.ors_scored):
        ev = json.loads(r.value)
        if (ev["client_id"], "ors") not in newest or ev["revision"] > newest[(ev["client_id"], "ors")]["revision"]:
            newest[(ev["client_id"], "ors")] = ev
    assert newest[("a", "ors")].get("retracted") == "moved" and "retracted" not in newest[("b", "ors")]
    assert newest[("a", "ors")]["event_id"] != newest[("b", "ors")]["event_id"]
    assert _final(sink)[0] == {("a", "appt"): 38.0}  # the alliance submission of the id is another one


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(10.0, 40.0).map(lambda t: round(t, 1))),
                min_size=1, max_size=4),
       st.randoms(use_true_random=False))
async def test_whatever_the_arrival_order_the_newest_versions_client_alone_shows_the_session(
        versions: list[tuple[str, float]], rnd: Any) -> None:
    # The i-th version is accepted i seconds in; they reach scoring shuffled, one per batch.
    records = [_moved(client, 10 + i, total) for i, (client, total) in enumerate(versions)]
    order = list(range(len(records)))
    rnd.shuffle(order)
    h, _, sink = handler()
    await _run(h, sink, [[records[i]] for i in order])
    shown, _ = _final(sink)
    client, total = versions[-1]
    assert {k: v for k, v in shown.items() if k[1] == "moved"} == {(client, "moved"): total}


async def run_holders(h: BatchHandler, sink: Sink, clients: list[str]) -> None:
    """The submission "moved" re-sent for each of `clients` in turn, each accepted a second after
    the one before (the last client holds it), one batch each, its retractions delivered back."""
    await _run(h, sink, [[_moved(c, 10 + i)] for i, c in enumerate(clients)])


async def test_an_id_re_sent_for_many_clients_keeps_the_holder_and_the_newest_former_holders_in_the_index(
        ) -> None:
    index = MemoryIndex()
    h, _, sink = handler(index=index)
    clients = [f"p{i:02d}" for i in range(INDEX_FORMER_HOLDERS + 5)]
    await run_holders(h, sink, clients)
    (held,) = index.docs.values()
    assert set(held.held) == set(clients[-1 - INDEX_FORMER_HOLDERS:]) and holder(held.held)[2] == clients[-1]  # type: ignore[index]
    assert held.first == clients[0]  # event ids of the first client stay as they were
    assert {k for k in _final(sink)[0] if k[1] == "moved"} == {(clients[-1], "moved")}


async def test_a_former_holder_stays_in_the_index_until_its_retraction_is_acknowledged() -> None:
    index = MemoryIndex()
    h, _, sink = handler(index=index)
    clients = [f"p{i:02d}" for i in range(INDEX_FORMER_HOLDERS + 2)]
    await run_holders(h, sink, clients[:-1])
    sink.fail_next = 1
    with pytest.raises(ConnectionError):
        await h([_moved(clients[-1], 100)])
    assert set(next(iter(index.docs.values())).held) == set(clients)  # the oldest still listed: nothing forgotten
    await h([_moved(clients[-1], 100)])  # the redelivery publishes its retractions, then forgets
    assert set(next(iter(index.docs.values())).held) == set(clients[-1 - INDEX_FORMER_HOLDERS:])
    told = {(ev["client_id"], ev["moved_to_client_id"])
            for ev in (json.loads(r.value) for r in _retractions(sink.published))}
    assert (clients[0], clients[-1]) in told  # the forgotten client was told whom it lost the id to


def test_a_retraction_record_decodes_as_one() -> None:
    rec = raw(b"{}", headers=dict(RETRACTION_HEADERS))
    assert model_of(rec) is SubmissionRetraction


@pytest.mark.parametrize("scale", ["alliance", "outcome"])
def test_a_retraction_names_the_submissions_scale_in_its_id(scale: str) -> None:
    other = "outcome" if scale == "alliance" else "alliance"
    assert ids.submission_retraction_event_id("t", "a", scale, "m", T1, "d", "b") != \
        ids.submission_retraction_event_id("t", "a", other, "m", T1, "d", "b")


# --- a move and back racing a corrected time of an episode's first session ----------------------
#
# Client a's session 1 (submission "s1", 23:30 UTC on Sept 1) begins its derived episode; it is
# moved to client b and back while its time is fixed to 00:30 the next UTC day (docs/clinical-
# records.md, "Episodes"). Client a's record hears of b's version only through the index (when one
# of its own versions is checked) and b's retraction, which reach it at any point among a's own
# versions; `_race` plays one such arrival order through the record, the index as the handler keeps
# it (`newer_elsewhere` when a version is applied, `retractions` after each registration).

@dataclass(frozen=True)
class Race:
    """How one arrival order ends: what client a's record shows (`shown`: per submission its episode
    and time; the open alerts and their episode), and what a consumer keeping the newest revision
    ends with (per submission: episode, time, retracted; the alerts whose last status is raised).
    An alert raised and ended on the way (under a name a correction gave before its older version
    arrived: docs/clinical-records.md, "Episodes") ends withdrawn, and is not compared."""

    sessions: tuple[tuple[str, tuple[str, str]], ...]
    open_alerts: tuple[tuple[str, str], ...]
    events: tuple[tuple[str, tuple[str, str, bool]], ...]
    open_events: tuple[str, ...]


def _s1(at: datetime, accepted: datetime) -> series.Version:
    return series.Version("s1", "SRS", None, 1, at, "north", "c-1", None, 38.0, accepted)


def _race(mine: list[series.Version], b_registers: int) -> Race:
    """Client a's record after its versions of s1 arrive in the order of `mine` (after sessions 2
    and 3), b's version (accepted at T3) registering after the first `b_registers` of them, each
    retraction a registration sends to a appended to a's partition."""
    c = Client()
    c.submit("s2", 2, 38.0, at=EVENING + timedelta(days=7))
    c.submit("s3", 3, 32.0, at=EVENING + timedelta(days=14))
    held: dict[str, tuple[datetime, str]] = {}
    queue: list[series.Version | Holding] = list(mine)
    outputs: list[series.Output] = []

    def register(client: str, order: tuple[datetime, str] | None) -> None:
        if order is not None:
            held[client] = max(held.get(client, order), order)
        queue.extend(as_of for to, as_of in retractions(held) if to == CLIENT)

    done, b_done = 0, False
    while True:
        if done == b_registers and not b_done:
            b_done = True  # b takes its version only when no newer one is registered
            if newer_elsewhere(held, "b", T3, "b3") is None:
                register("b", (T3, "b3"))
        if not queue:
            break
        item = queue.pop(0)
        if isinstance(item, series.Version):
            step = c.state.submit(item, c.rules, c.now(), newer_elsewhere(held, CLIENT, item.accepted_at, item.digest))
            register(CLIENT, c.state.newest("s1"))
            done += 1
        else:
            step = c.state.retract("s1", item, c.rules, c.now())
        outputs += step.outputs
    events: dict[str, tuple[int, tuple[str, str, bool]]] = {}
    for o in scored(outputs):
        sid = o.session.version.submission_id
        if o.revision >= events.get(sid, (0,))[0]:
            events[sid] = (o.revision, (o.session.episode_id, o.session.version.administered_at.isoformat(),
                                        o.retracted))
    life: dict[str, tuple[int, int, str]] = {}
    for a in alerts(outputs):
        life[a.alert.alert_id] = max(life.get(a.alert.alert_id, (0, 0, "")), (a.revision, 0, "raised"))
    for s in statuses(outputs):
        rank = 2 if s.status == "withdrawn" else 1
        life[s.alert_id] = max(life.get(s.alert_id, (0, 0, "")), (s.record.revision, rank, str(s.status)))
    sessions, open_ = shown(c)
    return Race(tuple(sorted(sessions.items())), tuple(sorted(open_.items())),
                tuple(sorted((sid, e) for sid, (_, e) in events.items())),
                tuple(sorted(a for a, (_, rank, _) in life.items() if rank == 0)))


def _every_arrival_order(mine: list[series.Version]) -> dict[Race, list[tuple[list[str], int]]]:
    """The outcomes of every order of `mine` and every moment b's version registers, each with the
    orders that give it (a version named by its time and acceptance)."""
    outcomes: dict[Race, list[tuple[list[str], int]]] = {}
    for order in itertools.permutations(mine):
        for b_at in range(len(mine) + 1):
            label = [f"{v.administered_at:%d %H:%M}@{v.accepted_at:%H}h" for v in order]
            outcomes.setdefault(_race(list(order), b_at), []).append((label, b_at))
    return outcomes


def _final_of(outcomes: dict[Race, list[tuple[list[str], int]]]) -> Race:
    assert len(outcomes) == 1, "\n".join(f"{orders[:3]}: {dict(race.sessions)['s1']}"
                                         for race, orders in outcomes.items())
    (race,) = outcomes
    return race


T4 = T3 + timedelta(hours=1)


def test_a_session_1_moved_away_and_back_with_its_time_fixed_keeps_its_episode_whatever_the_order() -> None:
    # a: 23:30 (T1); b (T3); a again, the time fixed to 00:30 the next UTC day (T4).
    race = _final_of(_every_arrival_order([_s1(EVENING, T1), _s1(FIXED, T4)]))
    assert dict(race.sessions)["s1"] == ("auto/2026-09-01/1", FIXED.isoformat())
    assert race.open_alerts == ((ids.alert_id(TENANT, CLIENT, "SRS", "auto/2026-09-01/1", 3), "auto/2026-09-01/1"),)
    assert dict(race.events)["s1"] == ("auto/2026-09-01/1", FIXED.isoformat(), False)


def test_a_session_1_whose_time_was_fixed_then_moved_away_and_back_keeps_its_episode_whatever_the_order() -> None:
    # a: 23:30 (T1); a: fixed to 00:30 (T2); b (T3); a again as fixed (T4).
    race = _final_of(_every_arrival_order([_s1(EVENING, T1), _s1(FIXED, T2), _s1(FIXED, T4)]))
    assert dict(race.sessions)["s1"] == ("auto/2026-09-01/1", FIXED.isoformat())
