"""The FHIR R4 view of a trajectory."""

from __future__ import annotations

from typing import Any

from services.reporting import fhir, rules
from services.reporting.demo import scored
from shared.events import Items

ITEMS = Items(relationship=9.0, goals=8.0, approach=9.5, overall=9.0)


def bundle() -> dict[str, Any]:
    doc = rules.merge(None, [scored("t", "c1", 1, 35.5, items=ITEMS, site_id="north"),
                             scored("t", "c1", 2, 38.0)]).doc
    assert doc is not None
    return fhir.trajectory_bundle(doc)


def resources(b: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == kind]


def test_bundle_is_a_collection_with_a_response_and_an_observation_per_session() -> None:
    b = bundle()
    assert b["resourceType"] == "Bundle" and b["type"] == "collection"
    assert len(resources(b, "QuestionnaireResponse")) == 2
    assert len(resources(b, "Observation")) == 2
    assert all(e["fullUrl"] == f"urn:uuid:{e['resource']['id']}" for e in b["entry"])


def test_observations_are_survey_scores_in_the_local_code_system() -> None:
    obs = resources(bundle(), "Observation")[0]
    assert obs["status"] == "final"
    assert obs["category"][0]["coding"][0] == {"system": fhir.OBSERVATION_CATEGORY, "code": "survey",
                                               "display": "Survey"}
    assert obs["code"]["coding"][0]["system"] == fhir.CODE_SYSTEM
    assert obs["code"]["coding"][0]["code"] == "SRS-total"
    assert obs["valueQuantity"]["value"] == 35.5
    assert obs["interpretation"][0]["coding"][0]["code"] == "L"
    assert [c["valueQuantity"]["value"] for c in obs["component"]] == [9.0, 8.0, 9.5, 9.0]


def test_observation_derives_from_its_questionnaire_response() -> None:
    b = bundle()
    qr_ids = {r["id"] for r in resources(b, "QuestionnaireResponse")}
    assert {o["derivedFrom"][0]["reference"].removeprefix("urn:uuid:") for o in resources(b, "Observation")} == qr_ids


def test_questionnaire_response_carries_items_and_total_but_only_a_pseudonymous_subject() -> None:
    qr = resources(bundle(), "QuestionnaireResponse")[0]
    assert qr["status"] == "completed"
    assert [i["linkId"] for i in qr["item"]] == ["relationship", "goals", "approach", "overall", "total"]
    assert qr["subject"] == {"identifier": {"system": fhir.client_system("t"), "value": "c1"}}


def test_total_only_sessions_have_no_item_answers() -> None:
    qr = resources(bundle(), "QuestionnaireResponse")[1]
    assert [i["linkId"] for i in qr["item"]] == ["total"]
    assert "component" not in resources(bundle(), "Observation")[1]


def test_the_same_trajectory_always_gives_the_same_bundle() -> None:
    assert bundle() == bundle()
