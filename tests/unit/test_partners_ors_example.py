"""The ORS walk-through of docs/partners.md and README.md says what the code does: the posted body
passes intake's rules, the scored event is what the outcome rules give for that session, and the
alert body is the contract's, with the ids scoring derives (issue 16)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.intake.models import OrsSubmissionIn, check_submission
from services.scoring.outcome import advice, score_outcome
from services.scoring.rules import OutcomeRules
from shared import ids
from shared.events import OrsScored, OutcomeAlert, OutcomeScore

ROOT = Path(__file__).resolve().parents[2]
# What the walk-through says came before: the episode's first (intake) and second session totals.
INTAKE_TOTAL, PREVIOUS_TOTAL = 23.0, 21.0
IDENTITY = ("tenant_id", "submission_id", "site_id", "clinician_id", "client_id", "episode_id", "instrument",
            "session_number", "client_age")


def walkthrough() -> str:
    text = (ROOT / "docs" / "partners.md").read_text()
    match = re.search(r"^## An ORS end to end\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match is not None, "partners.md has no section 'An ORS end to end'"
    return match.group(1)


def posted() -> dict[str, Any]:
    (request,) = re.findall(r"```\nPOST [^\n]*/v1/submissions\n.*?\n\n(.*?)```", walkthrough(), flags=re.S)
    body: dict[str, Any] = json.loads(request)
    return body


def events() -> tuple[OrsScored, OutcomeAlert]:
    scored, alert = re.findall(r"```json\n(.*?)```", walkthrough(), flags=re.S)
    return OrsScored.model_validate_json(scored), OutcomeAlert.model_validate_json(alert)


@pytest.fixture
def body() -> dict[str, Any]:
    return posted()


def test_the_posted_ors_passes_intakes_rules(body: dict[str, Any]) -> None:
    model, errors = check_submission(body)
    assert errors == [] and isinstance(model, OrsSubmissionIn)


def test_the_scored_event_is_the_posted_session(body: dict[str, Any]) -> None:
    scored, _ = events()
    assert {f: getattr(scored, f) for f in IDENTITY if f != "tenant_id"} == {f: body[f] for f in IDENTITY
                                                                              if f != "tenant_id"}
    assert scored.items is not None and scored.items.model_dump() == body["items"]
    assert scored.event_id == ids.scored_event_id(scored.tenant_id, scored.submission_id, scored.revision)


def test_the_scored_event_carries_what_the_outcome_rules_give_for_the_session() -> None:
    scored, _ = events()
    want = score_outcome(scored.instrument, scored.client_age, scored.total, INTAKE_TOTAL, PREVIOUS_TOTAL,
                         scored.session_number, True, OutcomeRules())
    assert scored.items is not None and round(sum(scored.items.values()), 1) == scored.total
    score = OutcomeScore.model_fields  # what the outcome rules say, as the event carries it
    assert {f: getattr(scored, f) for f in score} == {f: getattr(want, f) for f in score}
    assert want.alert


def test_the_alert_body_is_the_outcome_alert_of_that_session_with_its_advice() -> None:
    scored, alert = events()
    assert {f: getattr(alert, f) for f in IDENTITY} == {f: getattr(scored, f) for f in IDENTITY}
    assert alert.alert_id == ids.alert_id(alert.tenant_id, alert.client_id, "ORS", scored.episode_id or "",
                                          alert.session_number)
    assert alert.event_id == ids.alert_event_id(alert.alert_id, alert.revision)
    assert (alert.triggers, alert.severity, alert.total, alert.cutoff, alert.intake_total, alert.change_from_intake,
            alert.previous_total, alert.change_from_previous) == (
        scored.triggers, scored.severity, scored.total, scored.cutoff, scored.intake_total,
        scored.change_from_intake, scored.previous_total, scored.change_from_previous)
    assert alert.advice == advice(alert.triggers, alert.severity)


def test_the_readme_posts_the_same_ors_and_shows_part_of_the_same_alert(body: dict[str, Any]) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The Outcome Rating Scale (ORS)"):]
    (curl,) = re.findall(r"-d '(\{.*?\})'", section, flags=re.S)
    assert json.loads(curl) == body
    _, alert = events()
    abridged = json.loads(re.findall(r"```json\n(.*?)```", section, flags=re.S)[0])
    assert abridged == {k: v for k, v in alert.model_dump(mode="json").items() if k in abridged}
