"""The scoring app's wiring, without connecting to anything (nothing opens at build time)."""

from __future__ import annotations

from services.scoring.app import ScoringConfig, asyncapi_app, create_app
from shared.settings import KafkaSettings, MongoSettings


def config() -> ScoringConfig:
    return ScoringConfig(kafka=KafkaSettings(topic_prefix="p."), mongo=MongoSettings(database="unused"))


def test_asyncapi_document_shows_the_input_and_every_output_with_its_schema() -> None:
    spec = asyncapi_app(config()).schema.to_specification().to_jsonable()
    channels = {c["address"] for c in spec["channels"].values()}
    assert channels == {"p.srs.submitted.v1", "p.ors.submitted.v1", "p.srs.scored.v1", "p.alliance.deterioration.v1",
                        "p.alliance.alert-status.v1", "p.srs.deadletter.v1",
                        "p.ors.scored.v1", "p.outcome.alert.v1", "p.outcome.alert-status.v1"}
    assert {"SrsScored", "AllianceDeterioration", "AlertStatusChanged", "DeadLetter", "OrsScored", "OutcomeAlert",
            "OutcomeAlertStatusChanged"} <= set(
        spec["components"]["schemas"])


def test_http_app_serves_only_the_ops_endpoints() -> None:
    paths = set(create_app(config()).openapi()["paths"])
    assert paths == {"/healthz", "/readyz", "/metrics"}
