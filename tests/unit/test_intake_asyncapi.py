"""The AsyncAPI document of intake shows what it publishes."""

from __future__ import annotations

import json

from services.intake.app import IntakeConfig, asyncapi_app, create_app
from shared.settings import KafkaSettings


def test_asyncapi_shows_the_srs_and_ors_submitted_publishers_with_their_payloads() -> None:
    app = asyncapi_app(IntakeConfig(kafka=KafkaSettings(topic_prefix="")))
    spec = json.loads(app.schema.to_specification().to_json())
    assert {c["address"] for c in spec["channels"].values()} == {"srs.submitted.v1", "ors.submitted.v1"}
    assert {op["action"] for op in spec["operations"].values()} == {"send"}
    assert {"SrsSubmitted", "OrsSubmitted"} <= set(spec["components"]["schemas"])


def test_openapi_documents_the_request_bodies_and_bearer_auth() -> None:
    doc = create_app(IntakeConfig()).openapi()
    body = doc["paths"]["/v1/submissions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"oneOf": [{"$ref": "#/components/schemas/SubmissionIn"},
                              {"$ref": "#/components/schemas/OrsSubmissionIn"}]}
    schemas = doc["components"]["schemas"]
    assert schemas["SubmissionIn"]["additionalProperties"] is False
    assert set(schemas["ItemsIn"]["required"]) == {"relationship", "goals", "approach", "overall"}
    assert schemas["OrsSubmissionIn"]["additionalProperties"] is False
    assert set(schemas["OrsSubmissionIn"]["required"]) >= {"instrument", "client_id", "session_number"}
    assert set(schemas["OrsItemsIn"]["required"]) == {"individually", "interpersonally", "socially", "overall"}
    assert "client_age" in schemas["OrsSubmissionIn"]["properties"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert set(doc["paths"]["/v1/submissions"]["post"]["responses"]) >= {"202", "401", "403", "413", "415", "422",
                                                                         "429", "503"}
    assert "text/csv" in doc["paths"]["/v1/submissions/csv"]["post"]["requestBody"]["content"]
