"""Issue 12, finding 1: a failure is classified as deterministic (the record is at fault: retrying
cannot help, so it is isolated and dead-lettered) or transient (retried, never committed past).

The exceptions are the ones PyMongo, BSON and pydantic raise, built as the store reports them.
"""

from __future__ import annotations

import pytest
from bson.errors import InvalidDocument
from pydantic import BaseModel, ValidationError
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ClientBulkWriteException,
    DocumentTooLarge,
    ExecutionTimeout,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
    WriteConcernError,
    WriteError,
    WTimeoutError,
)

from shared.kafka import PermanentError, classify

SECRET = "client-p-8812"  # a value of the refused document: must never reach a log line


def bulk_error(*codes: int, write_concern: bool = False) -> BulkWriteError:
    """A BulkWriteError as the store returns it: each write error quotes the refused operation."""
    errors = [{"index": i, "code": code, "errmsg": f"error {code}", "op": {"_id": SECRET, "x": "y" * 100}}
              for i, code in enumerate(codes)]
    concern = [{"code": 64, "errmsg": "waiting for replication timed out"}] if write_concern else []
    return BulkWriteError({"writeErrors": errors, "writeConcernErrors": concern, "nInserted": 0})


class Event(BaseModel):
    total: float


def validation_error() -> ValidationError:
    try:
        Event.model_validate({"total": "x"})
    except ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize("code", [10334, 17419, 17420])
def test_a_document_the_store_refuses_as_too_large_is_deterministic(code: int) -> None:
    failure = classify(bulk_error(code))
    assert failure.deterministic and failure.reason == "document_too_large"


def test_pymongos_own_document_too_large_is_deterministic() -> None:
    failure = classify(DocumentTooLarge("BSON document too large (17825816 bytes)"))
    assert failure.deterministic and failure.reason == "document_too_large"


def test_a_document_bson_cannot_encode_is_an_invalid_document() -> None:
    failure = classify(InvalidDocument("cannot encode object: <object>, of type: <class 'object'>"))
    assert failure.deterministic and failure.reason == "invalid_document"


@pytest.mark.parametrize("code", [2, 52, 121])
def test_a_write_error_naming_an_invalid_document_is_deterministic(code: int) -> None:
    assert classify(bulk_error(code)).reason == "invalid_document"
    assert classify(WriteError("refused", code)).reason == "invalid_document"


def test_a_command_level_bad_value_is_transient_as_it_may_be_a_bug_in_a_query() -> None:
    assert not classify(OperationFailure("bad query", 2)).deterministic


def test_a_too_large_code_on_a_command_is_deterministic() -> None:
    assert classify(OperationFailure("too large", 10334)).reason == "document_too_large"


def test_a_validation_error_escaping_a_handler_is_deterministic() -> None:
    failure = classify(validation_error())
    assert failure.deterministic and failure.reason == "validation_error"


def test_a_permanent_error_keeps_the_reason_the_handler_gave() -> None:
    failure = classify(PermanentError("series_corrupt", "detail for the dead letter"))
    assert failure.deterministic and failure.reason == "series_corrupt"
    assert failure.detail == "detail for the dead letter" and "detail" not in failure.summary


@pytest.mark.parametrize("exc", [
    AutoReconnect("connection reset"),
    NetworkTimeout("timed out"),
    NotPrimaryError("not primary"),
    ServerSelectionTimeoutError("no servers"),
    WriteConcernError("waiting for replication timed out", 64),
    ExecutionTimeout("operation exceeded time limit", 50),
    WTimeoutError("waiting for replication timed out", 64),
    WaitQueueTimeoutError("timed out while checking out a connection from connection pool"),
    OperationFailure("interrupted", 11601),
    RuntimeError("3 records kept conflicting; the batch will be retried"),
    KeyError("x"),
    TimeoutError(),
], ids=lambda e: type(e).__name__)
def test_unreachable_stores_timeouts_and_unknown_errors_are_transient(exc: Exception) -> None:
    failure = classify(exc)
    assert not failure.deterministic and failure.reason == "transient"


def test_a_retryable_label_makes_even_a_too_large_code_transient() -> None:
    exc = OperationFailure("retry", 10334, {"errorLabels": ["RetryableWriteError"], "code": 10334})
    assert not classify(exc).deterministic


def test_a_bulk_write_with_a_write_concern_error_is_transient() -> None:
    assert not classify(bulk_error(10334, write_concern=True)).deterministic


def test_a_bulk_write_with_one_unknown_code_among_too_large_ones_is_transient() -> None:
    assert not classify(bulk_error(10334, 50)).deterministic


def test_a_bulk_write_the_store_stopped_at_its_time_limit_is_transient() -> None:
    # Each write the operation bound cut (MaxTimeMSExpired) would succeed on a store that answers.
    assert not classify(bulk_error(50, 50)).deterministic


def test_a_cross_collection_bulk_write_that_timed_out_is_transient() -> None:
    exc = ClientBulkWriteException({"error": NetworkTimeout("timed out"), "writeErrors": [],
                                    "writeConcernErrors": []}, verbose=False)
    assert not classify(exc).deterministic


def test_duplicate_keys_beside_a_too_large_document_do_not_hide_it() -> None:
    assert classify(bulk_error(11000, 10334)).reason == "document_too_large"


def test_duplicate_keys_alone_are_transient() -> None:
    # A concurrent writer's E11000 is re-read and merged by the stores; if one escapes, retry.
    assert not classify(bulk_error(11000)).deterministic


def test_an_exception_raised_from_a_deterministic_one_counts_as_it() -> None:
    try:
        try:
            raise bulk_error(10334)
        except BulkWriteError as inner:
            raise RuntimeError("could not write the batch") from inner
    except RuntimeError as outer:
        failure = classify(outer)
    assert failure.deterministic and failure.reason == "document_too_large"


def test_an_exception_group_is_deterministic_only_when_all_its_members_are() -> None:
    assert classify(ExceptionGroup("writes", [bulk_error(10334), DocumentTooLarge("x")])).deterministic
    assert not classify(ExceptionGroup("writes", [bulk_error(10334), AutoReconnect("reset")])).deterministic


@pytest.mark.parametrize("exc", [bulk_error(10334), bulk_error(50), WriteError(f"dup {SECRET}", 2),
                                 validation_error(), PermanentError("permanent_error", SECRET)],
                         ids=lambda e: type(e).__name__)
def test_the_loggable_summary_carries_no_document_value(exc: Exception) -> None:
    failure = classify(exc)
    assert SECRET not in failure.summary and len(failure.summary) < 200
