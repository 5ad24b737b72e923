"""A FHIR R4 view of one trajectory, for EHR partners (pure; no I/O).

One `Bundle` (type `collection`) holding, per session, a `QuestionnaireResponse` with the four
items and the total, and an `Observation` of the total score (category `survey`, code from the
local code system below, the items as components, `derivedFrom` the response). Subjects are
identified by the tenant's pseudonymous client id only: no other identifying data leaves.

Resource ids are derived from the session identity (tenant, client, instrument, episode, session
number), not from the submission, so a corrected session keeps its ids whatever submission
corrected it; `meta.versionId` is the session's `revision`, and a revision above 1 makes both
resources `amended`. The submission that holds the session stays visible as the `identifier`.
The interpretation is scoring's `below_cutoff` flag (never recomputed). The same record always
yields the same Bundle (and the same ETag).

Outcome (ORS-family) sessions of the same episode are in the same Bundle, built the same way:
their own ids (the outcome instrument is part of the session identity), the ORS items, the
interpretation from scoring's `in_clinical_range` (none for YCORS, which is not scored), the
clinical cutoff as reference range, and scoring's reliable change category and change from
intake as extensions.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from services.reporting.rules import below_cutoff, episode_of, is_outcome, outcome_episode, sessions_by_episode
from shared import ids
from shared.events import ITEM_NAMES, ORS_ITEM_NAMES

FHIR_JSON = "application/fhir+json"
# Local identifiers: URNs, so nothing here points at a host.
CODE_SYSTEM = "urn:alliance-stream:fhir:CodeSystem:srs"
QUESTIONNAIRE = "urn:alliance-stream:fhir:Questionnaire:"
SUBMISSION_SYSTEM = "urn:alliance-stream:fhir:submission"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
UCUM = "http://unitsofmeasure.org"

Resource = dict[str, Any]


def _iso(ts: Any) -> str:
    if isinstance(ts, datetime):
        return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).isoformat()
    return str(ts)


def client_system(tenant_id: str) -> str:
    """The identifier system of a tenant's pseudonymous client ids."""
    return f"urn:alliance-stream:tenant:{tenant_id}:client"


def _score(value: float) -> Resource:
    return {"value": value, "unit": "score", "system": UCUM, "code": "{score}"}


def _code(code: str, display: str) -> Resource:
    return {"coding": [{"system": CODE_SYSTEM, "code": code, "display": display}], "text": display}


def session_resource_ids(tenant_id: str, client_id: str, instrument: str, episode_id: str | None,
                         session_number: int) -> tuple[str, str]:
    """(QuestionnaireResponse id, Observation id) of one session: stable across corrections."""
    return ids.fhir_session_ids(tenant_id, client_id, instrument, episode_id, session_number)


def _status(s: Mapping[str, Any], first: str) -> str:
    return "amended" if int(s.get("revision") or 1) > 1 else first


def _meta(s: Mapping[str, Any]) -> Resource:
    meta: Resource = {"versionId": str(int(s.get("revision") or 1))}
    if isinstance(s.get("scored_at"), datetime):
        meta["lastUpdated"] = _iso(s["scored_at"])
    return meta


def _item_names(instrument: str) -> tuple[str, ...]:
    return ORS_ITEM_NAMES if is_outcome(instrument) else ITEM_NAMES


def _questionnaire_response(rid: str, doc: Mapping[str, Any], s: Mapping[str, Any],
                            subject: Resource) -> Resource:
    items = s.get("items") or {}
    answers = [{"linkId": name, "text": name.capitalize(), "answer": [{"valueDecimal": float(items[name])}]}
               for name in _item_names(doc["instrument"]) if name in items]
    answers.append({"linkId": "total", "text": "Total", "answer": [{"valueDecimal": float(s["total"])}]})
    return {
        "resourceType": "QuestionnaireResponse",
        "id": rid,
        "meta": _meta(s),
        "identifier": {"system": SUBMISSION_SYSTEM, "value": s["submission_id"]},
        "questionnaire": QUESTIONNAIRE + doc["instrument"],
        "status": _status(s, "completed"),
        "subject": subject,
        "authored": _iso(s["administered_at"]),
        "item": answers,
    }


def _observation(oid: str, qr_id: str, doc: Mapping[str, Any], s: Mapping[str, Any],
                 subject: Resource) -> Resource:
    instrument = doc["instrument"]
    items = s.get("items") or {}
    obs: Resource = {
        "resourceType": "Observation",
        "id": oid,
        "meta": _meta(s),
        "identifier": [{"system": SUBMISSION_SYSTEM, "value": s["submission_id"]}],
        "status": _status(s, "final"),
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "survey", "display": "Survey"}]}],
        "code": _code(f"{instrument}-total", f"{instrument} total score"),
        "subject": subject,
        "effectiveDateTime": _iso(s["administered_at"]),
        "valueQuantity": _score(float(s["total"])),
        "derivedFrom": [{"reference": f"urn:uuid:{qr_id}"}],
        "extension": [{"url": "urn:alliance-stream:fhir:session-number", "valueInteger": int(s["session_number"])}],
    }
    if not is_outcome(instrument):
        low = below_cutoff(s)
        obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": "L" if low else "N",
                                              "display": "Low" if low else "Normal"}]}]
        obs["referenceRange"] = [{"low": _score(float(s["cutoff"])), "text": "alliance cutoff"}]
    else:
        _outcome_fields(obs, s)
    if items:
        obs["component"] = [{"code": _code(f"{instrument}-{name}", f"{instrument} {name}"),
                             "valueQuantity": _score(float(items[name]))}
                            for name in _item_names(instrument) if name in items]
    return obs


def _outcome_fields(obs: Resource, s: Mapping[str, Any]) -> None:
    """What an outcome Observation says beyond the total: scoring's decisions, as published."""
    if s.get("in_clinical_range") is not None:
        low = bool(s["in_clinical_range"])
        obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": "L" if low else "N",
                                              "display": "Low" if low else "Normal"}]}]
    if s.get("cutoff") is not None:
        obs["referenceRange"] = [{"low": _score(float(s["cutoff"])), "text": "clinical cutoff"}]
    if s.get("change") is not None:
        obs["extension"].append({"url": "urn:alliance-stream:fhir:reliable-change", "valueCode": s["change"]})
    if s.get("change_from_intake") is not None:
        obs["extension"].append({"url": "urn:alliance-stream:fhir:change-from-intake",
                                 "valueDecimal": float(s["change_from_intake"])})
    if s.get("clinically_significant_improvement"):
        obs["extension"].append({"url": "urn:alliance-stream:fhir:clinically-significant-improvement",
                                 "valueBoolean": True})


def trajectory_bundle(doc: Mapping[str, Any], episode_id: str | None = None,
                      outcome: Mapping[str, Any] | None = None) -> Resource:
    """The Bundle of one record's current episode (or the named one; rules.UnknownEpisode if none),
    with the sessions of the same episode in `outcome` (the client's paired outcome record) after
    the alliance ones."""
    tenant = doc["tenant_id"]
    episode, sessions = episode_of(doc, episode_id)
    subject = {"identifier": {"system": client_system(tenant), "value": doc["client_id"]}}
    entries: list[Resource] = []
    last_scored: datetime | None = None
    shown: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = [(doc, s) for s in sessions]
    if outcome is not None:
        paired = outcome_episode(outcome, episode, sessions)
        shown.extend((outcome, s) for s in sessions_by_episode(outcome.get("entries", {})).get(paired, []))
    for record, s in shown:
        # Each session's own episode: an outcome session keeps its resource ids in every Bundle.
        qr_id, obs_id = session_resource_ids(tenant, doc["client_id"], record["instrument"],
                                             s.get("episode_id", episode), int(s["session_number"]))
        qr = _questionnaire_response(qr_id, record, s, subject)
        obs = _observation(obs_id, qr_id, record, s, subject)
        entries.append({"fullUrl": f"urn:uuid:{qr_id}", "resource": qr})
        entries.append({"fullUrl": f"urn:uuid:{obs_id}", "resource": obs})
        scored = s.get("scored_at")
        if isinstance(scored, datetime) and (last_scored is None or scored > last_scored):
            last_scored = scored
    bundle: Resource = {
        "resourceType": "Bundle",
        "id": ids.fhir_bundle_id(tenant, doc["_id"], episode),
        "type": "collection",
        "entry": entries,
    }
    if last_scored is not None:
        bundle["timestamp"] = _iso(last_scored)
    return bundle
