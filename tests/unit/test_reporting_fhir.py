"""The FHIR R4 view of a trajectory."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from services.reporting import fhir, rules
from shared.events import Items, SrsScored
from tools.demo import BASE, revised, scored

ITEMS = Items(relationship=9.0, goals=8.0, approach=9.5, overall=9.0)


def fold(events: list[SrsScored]) -> dict[str, Any]:
    doc = rules.merge(None, events).doc
    assert doc is not None
    return doc


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


def _ids(b: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in b["entry"]]


def test_resource_ids_follow_the_session_so_a_correction_keeps_them() -> None:
    first = scored("t", "c1", 1, 35.5, items=ITEMS, episode_id="e1")
    second = scored("t", "c1", 2, 38.0, episode_id="e1", previous_total=35.5)
    before = fhir.trajectory_bundle(fold([first, second]))
    fixed = revised(second, submission_id="s-fix", total=36.5)
    after = fhir.trajectory_bundle(fold([first, second, fixed]))
    assert _ids(after) == _ids(before)
    assert _ids(before)[2:] == list(fhir.session_resource_ids("t", "c1", "SRS", "e1", 2))
    qr, obs = resources(after, "QuestionnaireResponse")[1], resources(after, "Observation")[1]
    assert qr["identifier"]["value"] == obs["identifier"][0]["value"] == "s-fix"  # who holds the session now
    assert obs["valueQuantity"]["value"] == 36.5


def test_version_id_is_the_revision_and_a_revision_above_one_is_amended() -> None:
    first = scored("t", "c1", 1, 35.5, items=ITEMS)
    b = fhir.trajectory_bundle(fold([first, revised(scored("t", "c1", 2, 38.0), total=37.0)]))
    qrs, obs = resources(b, "QuestionnaireResponse"), resources(b, "Observation")
    assert [r["meta"]["versionId"] for r in qrs] == [o["meta"]["versionId"] for o in obs] == ["1", "2"]
    assert [r["status"] for r in qrs] == ["completed", "amended"]
    assert [o["status"] for o in obs] == ["final", "amended"]


def test_interpretation_is_scoring_s_below_cutoff_flag() -> None:
    flagged = scored("t", "c1", 1, 36.0, flags=["below_cutoff"])  # a tenant rule `<= 36`
    unflagged = scored("t", "c1", 2, 35.0, flags=[], cutoff=35.0)
    obs = resources(fhir.trajectory_bundle(fold([flagged, unflagged])), "Observation")
    assert [o["interpretation"][0]["coding"][0]["code"] for o in obs] == ["L", "N"]


def test_each_episode_is_its_own_bundle() -> None:
    old = scored("t", "c1", 1, 30.0, episode_id="e1", administered_at=BASE - timedelta(days=60))
    new = scored("t", "c1", 1, 38.0, episode_id="e2")
    doc = fold([old, new])
    current, earlier = fhir.trajectory_bundle(doc), fhir.trajectory_bundle(doc, "e1")
    assert current["id"] != earlier["id"] and set(_ids(current)).isdisjoint(_ids(earlier))
    assert resources(earlier, "Observation")[0]["valueQuantity"]["value"] == 30.0
