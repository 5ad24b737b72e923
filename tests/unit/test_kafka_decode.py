"""The typed layer of the shared consumer (`shared.kafka.decode_batch`, `typed_handler`) and the
dead-letter reasons."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import get_args

import pytest
from faststream.kafka import KafkaBroker

from services.scoring.series import RejectReason
from shared.events import (
    CLIENT_TRANSFER,
    RECORD_TYPE_HEADER,
    ClientTransfer,
    DeadLetter,
    DeadLetterReason,
    SrsSubmitted,
)
from shared.kafka import (
    BatchHandler,
    DeadLetterTarget,
    Decoded,
    InboundRecord,
    PermanentError,
    Route,
    by_topic,
    decode_batch,
    subscribe_batch,
    typed_handler,
)
from tests.support.fakes import Sink, inbound

EVENTS_DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"
TRANSFER = (b'{"event_id": "t", "tenant_id": "acme", "occurred_at": "2026-03-02T09:00:00Z", "client_id": "x", '
            b'"site_id": "south", "accepted_at": "2026-03-02T09:00:00Z"}')


def model_of(rec: InboundRecord) -> type[SrsSubmitted] | type[ClientTransfer]:
    return ClientTransfer if rec.headers.get(RECORD_TYPE_HEADER) == CLIENT_TRANSFER else SrsSubmitted


def test_the_model_can_be_chosen_per_record() -> None:
    transfer = inbound("t", TRANSFER, headers={RECORD_TYPE_HEADER: CLIENT_TRANSFER})
    decoded, dead = decode_batch([transfer, inbound("t", TRANSFER)], model_of, service="s", dlq_topic="dlq")
    assert [type(d.event) for d in decoded] == [ClientTransfer] and decoded[0].record is transfer
    (letter,) = [DeadLetter.model_validate_json(r.value) for r in dead]  # a transfer is not a submission
    assert (letter.reason, letter.tenant_id) == ("invalid", "acme")


def test_a_value_that_is_not_utf8_json_is_undecodable() -> None:
    _, dead = decode_batch([inbound("t", b"\xff\xfe"), inbound("t", b"")], SrsSubmitted, service="s", dlq_topic="d")
    assert [DeadLetter.model_validate_json(r.value).reason for r in dead] == ["undecodable", "undecodable"]


def test_a_service_may_name_its_decode_failures_with_one_reason() -> None:
    _, dead = decode_batch([inbound("t", b"{"), inbound("t", b"{}")], SrsSubmitted, service="alerts", dlq_topic="d",
                           reason=DeadLetterReason.INVALID_EVENT)
    assert {DeadLetter.model_validate_json(r.value).reason for r in dead} == {"invalid_event"}


def test_the_decoded_events_keep_their_records_order_and_correlation_ids() -> None:
    recs = [inbound("t", TRANSFER, correlation=f"c-{i}") for i in range(3)]
    decoded, _ = decode_batch(recs, ClientTransfer, service="s", dlq_topic="d")
    assert [d.correlation_id for d in decoded] == ["c-0", "c-1", "c-2"] and decoded[0].body == TRANSFER.decode()


def test_every_dead_letter_reason_is_documented() -> None:
    reasons_row = next(line for line in EVENTS_DOC.read_text().splitlines() if line.startswith("| `reason` |"))
    documented = set(re.findall(r"`([a-z_]+)`", reasons_row))
    assert {r.value for r in DeadLetterReason} <= documented


def test_every_reason_scoring_refuses_a_submission_with_is_a_dead_letter_reason() -> None:
    assert set(get_args(RejectReason)) <= {r.value for r in DeadLetterReason}


# --- typed_handler: what subscribe_batch(model=...) runs ------------------------------------------


class Recording:
    """A typed handler keeping the events it got; fails while `failing`."""

    def __init__(self, sink: Sink, failing: bool = False) -> None:
        self.sink = sink
        self.failing = failing
        self.batches: list[list[str]] = []
        self.letters_before: list[int] = []

    async def __call__(self, decoded: list[Decoded[ClientTransfer]]) -> None:
        self.letters_before.append(len(self.sink.published))
        if self.failing:
            raise ConnectionError("store down")
        self.batches.append([d.event.client_id for d in decoded])


def transfer_to(client: str) -> InboundRecord:
    return inbound("t", TRANSFER.replace(b'"x"', f'"{client}"'.encode()))


async def test_the_handler_gets_the_decoded_events_in_order_and_the_rest_is_dead_lettered_after_it() -> None:
    sink = Sink()
    handler = Recording(sink)
    run = typed_handler(ClientTransfer, handler, service="s", dead_letters=DeadLetterTarget("dlq", sink.publish_all))
    await run([transfer_to("a"), inbound("t", b"not json"), transfer_to("b")])
    assert handler.batches == [["a", "b"]] and handler.letters_before == [0]
    assert [DeadLetter.model_validate_json(r.value).reason for r in sink.of_topic("dlq")] == ["undecodable"]


async def test_a_failing_handler_publishes_no_dead_letter_so_a_retried_batch_sends_each_once() -> None:
    sink = Sink()
    run = typed_handler(ClientTransfer, Recording(sink, failing=True), service="s",
                        dead_letters=DeadLetterTarget("dlq", sink.publish_all))
    with pytest.raises(ConnectionError):
        await run([inbound("t", b"not json"), transfer_to("a")])
    assert sink.attempted == []


async def test_a_chosen_reason_replaces_both_decode_reasons() -> None:
    sink = Sink()
    run = typed_handler(ClientTransfer, Recording(sink), service="s", dead_letters=DeadLetterTarget("dlq", sink),
                        invalid_reason=DeadLetterReason.INVALID_EVENT)
    await run([inbound("t", b"not json"), inbound("t", b"{}")])
    assert [d.reason for d in sink.letters("dlq")] == ["invalid_event", "invalid_event"]


def test_a_typed_consumer_without_a_dead_letter_target_is_refused_at_wiring() -> None:
    with pytest.raises(ValueError, match="dead_letters"):
        subscribe_batch(KafkaBroker(), "t", group_id="g", service="s", model=ClientTransfer,  # type: ignore[call-overload]
                        handler=Recording(Sink()))


# ---- one consumer over several topics (`by_topic`) -------------------------------------------


class Topic:
    """A route's handler: keeps the client ids it was given; can wait for another topic's part, or fail."""

    def __init__(self, failure: Exception | None = None, wait_for: asyncio.Event | None = None) -> None:
        self.batches: list[list[str]] = []
        self.started = asyncio.Event()
        self.failure = failure
        self.wait_for = wait_for

    async def __call__(self, decoded: list[Decoded[ClientTransfer]]) -> None:
        self.started.set()
        if self.wait_for is not None:
            await asyncio.wait_for(self.wait_for.wait(), timeout=5)
        self.batches.append([d.event.client_id for d in decoded])
        if self.failure is not None:
            raise self.failure


def on(topic: str, client: str) -> InboundRecord:
    return dataclasses.replace(transfer_to(client), topic=topic)


def routed(handlers: dict[str, Topic], sink: Sink) -> BatchHandler:
    return by_topic([Route(topic, ClientTransfer, h) for topic, h in handlers.items()], service="s",
                    dead_letters=DeadLetterTarget("dlq", sink.publish_all))


async def test_each_topic_of_a_batch_goes_to_its_own_handler_in_record_order() -> None:
    a, b, sink = Topic(), Topic(), Sink()
    await routed({"a": a, "b": b}, sink)([on("a", "1"), on("b", "2"), on("a", "3"), on("b", "4")])
    assert (a.batches, b.batches) == ([["1", "3"]], [["2", "4"]])


async def test_each_topic_dead_letters_the_records_of_its_own_that_do_not_decode() -> None:
    a, b, sink = Topic(), Topic(), Sink()
    await routed({"a": a, "b": b}, sink)([on("a", "1"), inbound("b", b"{")])
    assert [DeadLetter.model_validate_json(r.value).source_topic for r in sink.of_topic("dlq")] == ["b"]
    assert (a.batches, b.batches) == ([["1"]], [[]])


async def test_the_topics_of_a_batch_are_handled_at_the_same_time() -> None:
    b = Topic()
    a = Topic(wait_for=b.started)  # would time out if b's part ran only after a's
    await routed({"a": a, "b": b}, Sink())([on("a", "1"), on("b", "2")])
    assert (a.batches, b.batches) == ([["1"]], [["2"]])


async def test_a_topics_failure_is_raised_after_every_other_topic_has_run() -> None:
    a, b = Topic(failure=ConnectionError("store down")), Topic()
    with pytest.raises(ConnectionError):
        await routed({"a": a, "b": b}, Sink())([on("a", "1"), on("b", "2")])
    assert b.batches == [["2"]]


async def test_a_transient_failure_is_raised_before_a_deterministic_one_so_the_batch_is_retried_not_isolated() -> None:
    a, b = Topic(failure=PermanentError()), Topic(failure=ConnectionError("store down"))
    with pytest.raises(ConnectionError):
        await routed({"a": a, "b": b}, Sink())([on("a", "1"), on("b", "2")])


def test_two_routes_for_one_topic_are_refused_at_wiring() -> None:
    with pytest.raises(ValueError, match="one route per topic"):
        routed_twice = [Route("a", ClientTransfer, Topic()), Route("a", ClientTransfer, Topic())]
        by_topic(routed_twice, service="s", dead_letters=DeadLetterTarget("dlq", Sink().publish_all))
