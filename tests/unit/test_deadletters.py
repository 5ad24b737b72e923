"""What a dead-letter replay publishes (shared/deadletters.py): the original record whole, to its
source topic, read by the consumer like the original; and which dead letters are not replayed."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

from shared.deadletters import Selection, Stored, original_headers, replay_problem, replay_record
from shared.events import CLIENT_TRANSFER, RECORD_TYPE_HEADER, DeadLetter, DeadLetterReason
from shared.kafka import CORRELATION_HEADER, InboundRecord, dead_letter_record
from shared.topics import Topics

TOPICS = Topics("p.")
AT = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def letter(**changes: object) -> DeadLetter:
    base: dict[str, object] = {
        "event_id": "dl-1", "tenant_id": "acme", "occurred_at": AT, "service": "scoring",
        "reason": DeadLetterReason.DOCUMENT_TOO_LARGE, "source_topic": TOPICS.submitted, "source_partition": 3,
        "source_offset": 17, "key": "acme:client-1", "payload": '{"event_id": "e-1"}',
    }
    return DeadLetter.model_validate({**base, **changes})


def test_a_dead_letter_keeps_the_original_records_headers() -> None:
    rec = InboundRecord(TOPICS.submitted, 3, 17, b"acme:client-1", b'{"x": 1}',
                        {CORRELATION_HEADER: "corr-1", RECORD_TYPE_HEADER: CLIENT_TRANSFER}, 0)
    out = dead_letter_record("scoring", rec, DeadLetterReason.PERMANENT_ERROR, "", TOPICS.deadletter, "acme")
    assert DeadLetter.model_validate_json(out.value).headers == rec.headers


def test_a_replay_is_the_original_value_key_and_headers_to_the_source_topic() -> None:
    dl = letter(headers={CORRELATION_HEADER: "corr-1", RECORD_TYPE_HEADER: CLIENT_TRANSFER})
    out = replay_record(Stored(0, 5, dl))
    assert (out.topic, out.key, out.value) == (TOPICS.submitted, b"acme:client-1", b'{"event_id": "e-1"}')
    assert out.correlation_id == "corr-1" and out.headers == {RECORD_TYPE_HEADER: CLIENT_TRANSFER}


def test_a_payload_that_was_not_text_is_replayed_as_its_original_bytes() -> None:
    raw = b"\xff\xfe\x00binary"
    dl = letter(payload=base64.b64encode(raw).decode(), payload_encoding="base64", key=None)
    out = replay_record(Stored(0, 5, dl))
    assert out.value == raw and out.key is None


def test_a_letter_written_before_headers_were_kept_gets_its_correlation_id_and_transfer_type_back() -> None:
    dl = letter(payload='{"record_type": "client-transfer", "client_id": "client-1"}')
    assert original_headers(Stored(0, 5, dl, correlation_id="corr-9")) == {
        CORRELATION_HEADER: "corr-9", RECORD_TYPE_HEADER: CLIENT_TRANSFER}


def test_a_failed_delivery_is_not_replayed_but_pointed_at_alerts_retry() -> None:
    problem = replay_problem(letter(service="alerts", reason=DeadLetterReason.DELIVERY_FAILED), TOPICS)
    assert problem is not None and "alliance alerts retry --tenant acme" in problem


def test_a_letter_from_a_topic_outside_the_deployment_or_from_the_dead_letter_topic_is_not_replayed() -> None:
    assert replay_problem(letter(source_topic="srs.submitted.v1"), TOPICS) is not None  # another prefix
    assert replay_problem(letter(source_topic=TOPICS.deadletter), TOPICS) is not None
    assert replay_problem(letter(), TOPICS) is None


def test_a_selection_holds_every_criterion_given() -> None:
    dl = letter()
    assert Selection(reason="document_too_large", tenant="acme", since=AT - timedelta(seconds=1)).matches(dl)
    assert not Selection(reason="document_too_large", tenant="other").matches(dl)
    assert not Selection(since=AT + timedelta(seconds=1)).matches(dl)
    assert not Selection(source_topic=TOPICS.scored).matches(dl)
    assert Selection(event_ids=frozenset({"dl-1"})).matches(dl)
    assert not Selection(event_ids=frozenset({"x"})).matches(dl)


def test_only_a_selection_with_a_criterion_counts_as_narrowed() -> None:
    assert not Selection().narrowed
    assert Selection(service="reporting").narrowed
