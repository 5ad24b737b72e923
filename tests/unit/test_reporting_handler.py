"""The reporting batch handlers with in-memory read models and dead-letter sink
(tests/support/fakes.py): what is written where, what is dead-lettered, and what a redelivery
does (the same behaviours run against the real broker and store in
tests/integration/test_reporting_service.py)."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from services.reporting.handlers import SERVICE, ReportingHandlers
from services.reporting.store import GenerationState
from shared import ids
from shared.events import (
    AlertStatusChanged,
    AllianceDeterioration,
    DeadLetter,
    DeadLetterReason,
    Instrument,
    SrsScored,
    SrsSubmitted,
)
from shared.kafka import DeadLetterTarget, InboundRecord, dead_letter_record, typed_handler
from tests.support.fakes import (
    T0,
    TOPICS,
    FixedGenerations,
    MemoryReadModels,
    MemorySubmissions,
    Sink,
    StoreDown,
    inbound,
)

TENANT = "acme"


class Wired:
    """The handlers on fakes, as the subscriber runs them on raw records (decoded to the model
    app.py subscribes them with, the records that do not decode dead-lettered through
    `dead_letter`; the dead-letter topic's handler reads raw records)."""

    def __init__(self, generations: GenerationState | None = None) -> None:
        self.models = MemoryReadModels()
        self.pointer = FixedGenerations(generations or GenerationState("g1"))
        self.submissions = MemorySubmissions()
        self.sink = Sink()
        handlers = ReportingHandlers(self.models, self.pointer, self.sink.publish_all, TOPICS, self.submissions)
        dead_letters = DeadLetterTarget(TOPICS.deadletter, handlers.dead_letter)

        def consumer(model: type, handler: Any) -> Any:
            return typed_handler(model, handler, service=SERVICE, dead_letters=dead_letters)

        self.handlers = SimpleNamespace(scored=consumer(SrsScored, handlers.scored),
                                        deterioration=consumer(AllianceDeterioration, handlers.deterioration),
                                        alert_status=consumer(AlertStatusChanged, handlers.alert_status),
                                        deadletter=handlers.deadletter)

    def letters(self) -> list[DeadLetter]:
        return self.sink.letters(TOPICS.deadletter)


def scored(client: str = "x", session: int = 1) -> SrsScored:
    sid = f"{client}-{session}"
    return SrsScored(
        event_id=ids.scored_event_id(TENANT, sid), tenant_id=TENANT, occurred_at=T0, submission_id=sid,
        site_id="north", clinician_id="c-1", client_id=client, episode_id="e-1", session_number=session,
        administered_at=T0, total=38.0, cutoff=36.0, scored_at=T0)


def raised(client: str = "x") -> AllianceDeterioration:
    alert_id = ids.alert_id(TENANT, client, "SRS", "e-1", 2)
    return AllianceDeterioration(
        event_id=ids.alert_event_id(alert_id, 1), tenant_id=TENANT, occurred_at=T0, submission_id=f"{client}-2",
        site_id="north", clinician_id="c-1", client_id=client, episode_id="e-1", instrument=Instrument.SRS,
        session_number=2, administered_at=T0, alert_id=alert_id, triggers=["below_cutoff"], severity="warning",
        total=30.0, cutoff=36.0)


def submitted(client: str = "x") -> SrsSubmitted:
    return SrsSubmitted(
        event_id=f"ev-{client}", tenant_id=TENANT, occurred_at=T0, submission_id=f"{client}-1", site_id="north",
        clinician_id="c-1", client_id=client, session_number=1, administered_at=T0, total=30.0,
        accepted_at=T0 + timedelta(seconds=1))


def rec(topic: str, event: SrsScored | AllianceDeterioration | AlertStatusChanged | SrsSubmitted) -> InboundRecord:
    return inbound(topic, event, key=ids.partition_key(TENANT, "x"))


# --- decoding -------------------------------------------------------------------------------------


async def test_records_that_do_not_decode_are_dead_lettered_undecodable_or_invalid_and_the_rest_applied() -> None:
    w = Wired()
    await w.handlers.scored([inbound(TOPICS.scored, b"\xff not json"),
                             inbound(TOPICS.scored, b'{"tenant_id": "acme", "total": 1}'),
                             rec(TOPICS.scored, scored())])
    assert [(d.reason, d.tenant_id, d.service) for d in w.letters()] == [
        ("undecodable", None, "reporting"), ("invalid", "acme", "reporting")]
    assert list(w.models.scored["g1"]) == [scored().event_id]


async def test_a_dead_letter_keeps_the_records_coordinates_and_bytes() -> None:
    w = Wired()
    bad = inbound(TOPICS.deterioration, b"[1, 2]", partition=3, offset=41)
    await w.handlers.deterioration([bad])
    (letter,) = w.letters()
    assert (letter.source_topic, letter.source_partition, letter.source_offset, letter.payload) == (
        TOPICS.deterioration, 3, 41, "[1, 2]")
    assert letter.reason == DeadLetterReason.INVALID and w.models.alerts == {}


# --- writes ---------------------------------------------------------------------------------------


async def test_scored_sessions_are_written_and_their_submissions_noted() -> None:
    w = Wired()
    await w.handlers.scored([rec(TOPICS.scored, scored("x")), rec(TOPICS.scored, scored("y"))])
    assert sorted(e.client_id for e in w.models.scored["g1"].values()) == ["x", "y"]
    assert w.submissions.scored == {"x-1": 1, "y-1": 1} and w.letters() == []


async def test_during_a_rebuild_every_event_is_written_to_both_generations() -> None:
    w = Wired(GenerationState("g1", building="g2"))
    await w.handlers.scored([rec(TOPICS.scored, scored())])
    await w.handlers.deterioration([rec(TOPICS.deterioration, raised())])
    assert set(w.models.scored) == set(w.models.alerts) == {"g1", "g2"}
    assert w.models.indexed == {"g1"}  # the generation being built gets its indexes from the rebuild


async def test_a_redelivered_batch_changes_nothing_and_dead_letters_the_same_letters() -> None:
    w = Wired()
    batch = [rec(TOPICS.scored, scored()), inbound(TOPICS.scored, b"{")]
    await w.handlers.scored(batch)
    await w.handlers.scored(batch)
    assert len(w.models.scored["g1"]) == 1
    first, again = w.letters()
    assert first.event_id == again.event_id


async def test_a_session_over_its_records_cap_is_dead_lettered_once_as_record_too_large() -> None:
    w = Wired(GenerationState("g1", building="g2"))
    w.models.full.add("big")
    await w.handlers.scored([rec(TOPICS.scored, scored("big")), rec(TOPICS.scored, scored("ok"))])
    (letter,) = w.letters()  # refused in both generations, told once
    assert (letter.reason, letter.tenant_id) == ("record_too_large", TENANT)
    assert "MAX_RECORD_BYTES" in letter.detail and "big-1" in letter.payload


# --- the dead-letter topic ------------------------------------------------------------------------


async def test_a_dead_lettered_submission_is_noted_as_rejected_and_nothing_else_is() -> None:
    w = Wired()
    sub = submitted()
    letter = dead_letter_record("scoring", rec(TOPICS.submitted, sub), "session_gap", "too far", TOPICS.deadletter,
                                TENANT)
    other = dead_letter_record("alerts", inbound(TOPICS.scored, b"{}"), "invalid_event", "", TOPICS.deadletter)
    await w.handlers.deadletter([inbound(TOPICS.deadletter, letter.value), inbound(TOPICS.deadletter, other.value),
                                 inbound(TOPICS.deadletter, b"not a dead letter")])
    assert {sid: (t, d.reason) for sid, (t, d) in w.submissions.rejected.items()} == {
        sub.submission_id: (TENANT, "session_gap")}
    assert w.sink.published == []  # never feeds its own input


# --- failures -------------------------------------------------------------------------------------


async def test_a_store_failure_raises_before_any_dead_letter_is_published() -> None:
    w = Wired()
    w.models.down = True
    with pytest.raises(StoreDown):
        await w.handlers.scored([inbound(TOPICS.scored, b"x"), rec(TOPICS.scored, scored())])
    assert w.sink.attempted == []
