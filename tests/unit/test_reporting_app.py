"""The reporting app's contracts: routes, OpenAPI, AsyncAPI, and the views matching their documents."""

from __future__ import annotations

import json

from services.reporting import models, rules
from services.reporting.app import ReportingConfig, asyncapi_app, create_app
from services.reporting.models import CaseloadOut, SubmissionOut, SubmissionsPageOut, SummaryOut, TrajectoryOut
from shared.events import Items
from shared.settings import KafkaSettings
from tools.demo import revised, scored


def test_the_app_serves_exactly_the_read_endpoints_and_the_dashboard() -> None:
    paths = set(create_app().openapi()["paths"])
    assert {p for p in paths if p.startswith("/v1")} == {
        "/v1/clients/{client_id}/trajectory", "/v1/clients/{client_id}/fhir", "/v1/clinicians/{clinician_id}/caseload",
        "/v1/sites/{site_id}/summary", "/v1/summary", "/v1/clinicians/{clinician_id}/summary",
        "/v1/submissions/{submission_id}", "/v1/submissions",
        "/v1/audit", "/v1/summary/trends", "/v1/sites/{site_id}/trends", "/v1/clinicians/{clinician_id}/trends",
        "/v1/sites"}
    assert {"/dashboard", "/healthz", "/readyz", "/metrics"} <= paths


def test_openapi_documents_bearer_auth_and_response_bodies() -> None:
    doc = create_app().openapi()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    op = doc["paths"]["/v1/clients/{client_id}/trajectory"]["get"]
    assert op["security"] == [{"bearer": []}]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/TrajectoryOut"}
    assert {"401", "403", "404"} <= set(op["responses"])


def test_asyncapi_shows_the_subscriptions_of_both_scales_and_the_dead_letters() -> None:
    app = asyncapi_app(ReportingConfig(kafka=KafkaSettings(topic_prefix="")))
    spec = json.loads(app.schema.to_specification().to_json())
    addresses = {c["address"] for c in spec["channels"].values()}
    assert addresses == {"srs.scored.v1", "alliance.deterioration.v1", "alliance.alert-status.v1", "srs.deadletter.v1",
                         "ors.scored.v1", "outcome.alert.v1", "outcome.alert-status.v1"}
    actions = {(spec["channels"][o["channel"]["$ref"].split("/")[-1]]["address"], o["action"])
               for o in spec["operations"].values()}
    assert {("srs.deadletter.v1", "receive"), ("srs.deadletter.v1", "send")} <= actions
    assert "DeadLetter" in spec["components"]["schemas"]


def _doc() -> dict[str, object]:
    first = scored("t", "c1", 1, 35.0, items=Items(relationship=9, goals=9, approach=8, overall=9))
    doc = rules.merge(None, [first, scored("t", "c1", 2, 37.0), revised(first, submission_id="fix", total=35.5)]).doc
    assert doc is not None
    return doc


def test_trajectory_view_matches_its_documented_model() -> None:
    alerts = [{"_id": "a1", "session_number": 1, "severity": "warning", "triggers": ["below_cutoff"],
               "raised": True, "raised_at": None, "acknowledged": False},
              {"_id": "a2", "session_number": 2, "raised": True, "life": rules.life_key(2, "withdrawn"),
               "raises": {"2": {"severity": "critical", "triggers": ["drop_from_previous"], "low_items": ["goals"]}}}]
    view = rules.trajectory_view(_doc(), alerts)
    TrajectoryOut.model_validate(view)
    assert [a["status"] for a in view["alerts"]] == ["open", "withdrawn"]


def test_caseload_entry_matches_its_documented_model() -> None:
    CaseloadOut.model_validate({"clinician_id": "c-1", "clients": [rules.caseload_entry(_doc())], "next_cursor": None})


def test_submission_views_match_their_documented_models() -> None:
    from datetime import UTC, datetime

    from shared.events import DeadLetter, SrsSubmitted

    event = scored("t", "c1", 1, 35.0)
    fix = revised(event, submission_id="fix", total=36.0)
    submitted = SrsSubmitted(event_id="x", tenant_id="t", occurred_at=event.accepted_at, submission_id="r",
                             site_id="north", clinician_id="c-1", client_id="c1", session_number=40,
                             administered_at=event.administered_at, total=30.0,
                             accepted_at=event.accepted_at or datetime.now(UTC))
    dead = DeadLetter(event_id="d", tenant_id="t", occurred_at=datetime.now(UTC), service="scoring",
                      reason="session_gap", detail="40 is more than 20 above 1", source_topic="srs.submitted.v1",
                      payload=submitted.model_dump_json())
    docs = [{"submission_id": event.submission_id, "scored": rules.scored_part(event),
             "superseded": rules.superseded_part(fix)},
            {"submission_id": "r", "rejected": rules.rejected_part(dead, submitted)}]
    views = [rules.submission_view(d) for d in docs]
    assert [v["status"] for v in views if v] == ["superseded", "rejected"]
    SubmissionsPageOut.model_validate({"submissions": views, "next_cursor": None})
    SubmissionOut.model_validate(views[0])


def test_summary_matches_its_documented_model() -> None:
    rows = [{"instrument": "SRS", "records": 1, "sessions": 2, "below": 1, "first": 3500, "latest": 3700}]
    body = rules.summary_from_counters(rows, 1, 0)
    SummaryOut.model_validate({"tenant_id": "t", "site_id": None, **body, "as_of": "2026-11-26T10:00:00+00:00"})


def test_trends_match_their_documented_model() -> None:
    months = rules.trend_series([{"month": "2026-01", "sessions": 2, "below": 1, "clients": 1, "episodes": 1,
                                  "change": 400}], "2025-12", "2026-01")
    models.TrendsOut.model_validate({"tenant_id": "t", "site_id": None, "clinician_id": None,
                                     "from_month": "2025-12", "to_month": "2026-01",
                                     "as_of": "2026-11-26T10:00:00+00:00", "months": months})


def test_a_scored_log_cut_by_retention_is_detected_before_a_rebuild() -> None:
    from aiokafka import TopicPartition

    from services.reporting.rebuild import truncated_partitions

    begin = {TopicPartition("srs.scored.v1", 0): 0, TopicPartition("srs.scored.v1", 1): 17,
             TopicPartition("alliance.deterioration.v1", 0): 5}
    assert truncated_partitions(begin, "srs.scored.v1") == [1]
    assert truncated_partitions({TopicPartition("srs.scored.v1", 0): 0}, "srs.scored.v1") == []


async def test_a_store_that_does_not_answer_is_a_503_with_retry_after() -> None:
    import httpx

    from shared.settings import MongoSettings
    from tools.stack import free_port

    mongo = MongoSettings(url=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", timeout_ms=300)
    app = create_app(ReportingConfig(mongo=mongo))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://reporting") as http:
        res = await http.get("/v1/clients/c1/trajectory", headers={"Authorization": "Bearer ak_x"})
    assert res.status_code == 503 and "retry-after" in res.headers
