"""The typed layer of the shared consumer (`shared.kafka.decode_batch`) and the dead-letter reasons."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

from services.scoring.series import RejectReason
from shared.events import (
    CLIENT_TRANSFER,
    RECORD_TYPE_HEADER,
    ClientTransfer,
    DeadLetter,
    DeadLetterReason,
    SrsSubmitted,
)
from shared.kafka import InboundRecord, decode_batch
from tests.support.fakes import inbound

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
