"""Schema evolution within v1: documents recorded from earlier and later producers still parse.

tests/fixtures/events/v1/<Model>.<variant>.json holds, for every event of shared/events.py:
- `current`: what today's producers write;
- `older-producer`: written before optional fields existed (they must take their defaults);
- `newer-producer`: with fields a later v1 producer added (they must be ignored, not rejected).
A change to shared/events.py that makes any of these fail is a breaking change: it needs a
`*.v2` topic (docs/events.md, "Rolling out a v2"), not an edit of v1.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from shared import events

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "events" / "v1"
VARIANTS = ("current", "older-producer", "newer-producer")


def event_models() -> dict[str, type[BaseModel]]:
    """Every event published on a topic: subclasses of Event, plus DeadLetter."""
    found: dict[str, type[BaseModel]] = {}
    for name, obj in vars(events).items():
        if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == events.__name__:
            if (issubclass(obj, events.Event) and obj is not events.Event) or obj is events.DeadLetter:
                found[name] = obj
    return found


def fixture(model: str, variant: str) -> bytes:
    return (FIXTURES / f"{model}.{variant}.json").read_bytes()


CASES = [(m, v) for m in sorted(event_models()) for v in VARIANTS]


def test_the_events_module_defines_the_srs_and_the_ors_v1_events() -> None:
    assert set(event_models()) == {"SrsSubmitted", "SrsScored", "AllianceDeterioration", "AlertStatusChanged",
                                   "ClientTransfer", "SubmissionRetraction", "DeadLetter",
                                   "OrsSubmitted", "OrsScored", "OutcomeAlert", "OutcomeAlertStatusChanged"}


def test_every_fixture_belongs_to_an_event_and_a_known_variant() -> None:
    names = {p.name for p in FIXTURES.glob("*.json")}
    expected = {f"{m}.{v}.json" for m, v in CASES}
    assert names == expected


@pytest.mark.parametrize(("model", "variant"), CASES)
def test_recorded_document_parses_with_todays_model(model: str, variant: str) -> None:
    cls = event_models()[model]
    parsed = cls.model_validate_json(fixture(model, variant))
    assert parsed.model_dump()["event_id"] == json.loads(fixture(model, variant))["event_id"]


@pytest.mark.parametrize(("model", "variant"), CASES)
def test_reserialized_document_parses_to_the_same_event(model: str, variant: str) -> None:
    cls = event_models()[model]
    parsed = cls.model_validate_json(fixture(model, variant))
    assert cls.model_validate_json(parsed.model_dump_json().encode()) == parsed


@pytest.mark.parametrize("model", sorted(event_models()))
def test_older_producer_document_lacks_optional_fields_which_take_their_defaults(model: str) -> None:
    cls = event_models()[model]
    raw: dict[str, Any] = json.loads(fixture(model, "older-producer"))
    optional = {name for name, f in cls.model_fields.items() if not f.is_required()}
    missing = optional - set(raw)
    # The fixture must really be "older": at least schema_version is absent (v1's first producers).
    assert "schema_version" in missing
    parsed = cls.model_validate(raw)
    for name in missing:
        assert getattr(parsed, name) == cls.model_fields[name].get_default(call_default_factory=True), name


@pytest.mark.parametrize("model", sorted(event_models()))
def test_newer_producer_document_has_unknown_fields_which_are_ignored(model: str) -> None:
    cls = event_models()[model]
    raw: dict[str, Any] = json.loads(fixture(model, "newer-producer"))
    unknown = set(raw) - set(cls.model_fields)
    assert unknown, "the newer-producer fixture must carry at least one field today's model does not know"
    dumped = cls.model_validate(raw).model_dump()
    assert not unknown & set(dumped)


@pytest.mark.parametrize("model", sorted(event_models()))
def test_current_fixture_carries_every_field_of_the_model(model: str) -> None:
    # Keeps the `current` fixtures current: adding a field to a v1 event means recording it here.
    cls = event_models()[model]
    raw: dict[str, Any] = json.loads(fixture(model, "current"))
    assert set(cls.model_fields) <= set(raw), set(cls.model_fields) - set(raw)


def test_a_document_missing_a_required_field_is_rejected() -> None:
    # The compatibility checks above mean something only if the models do reject bad input.
    raw = json.loads(fixture("SrsScored", "current"))
    del raw["total"]
    with pytest.raises(ValueError, match="total"):
        events.SrsScored.model_validate(raw)
