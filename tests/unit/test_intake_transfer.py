"""Client transfers on intake: the record it publishes, the id rules, the metrics label and the
contract documents (pure, no broker)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import typer
from typer.testing import CliRunner

from services.intake.app import IntakeConfig, asyncapi_app, create_app
from services.intake.cli import clients_app
from services.intake.models import check_id, check_transfer, transfer_event, transfer_records
from shared import ids
from shared.events import CLIENT_TRANSFER, RECORD_TYPE_HEADER, ClientTransfer
from shared.http import route_template, route_templates
from shared.settings import KafkaSettings

NOW = datetime(2026, 11, 25, 14, 5, tzinfo=UTC)


def test_a_transfer_record_is_keyed_like_the_clients_submissions_and_marked_by_its_header() -> None:
    event = transfer_event("acme", "p-1", "south", "key-1", NOW, request_id="r-1")
    assert event.event_id == ids.client_transfer_event_id("acme", "p-1", "south", "r-1")
    rec, _ = transfer_records(event)
    assert rec.key == ids.partition_key("acme", "p-1")
    assert rec.headers == {RECORD_TYPE_HEADER: CLIENT_TRANSFER}
    body = ClientTransfer.model_validate_json(rec.value)
    assert body == event
    assert (body.record_type, body.requested_by, body.occurred_at, body.accepted_at) == (
        CLIENT_TRANSFER, "key-1", NOW, NOW)


def test_a_transfer_is_the_same_record_on_both_submitted_topics() -> None:
    on_srs, on_ors = transfer_records(transfer_event("acme", "p-1", "south", "key-1", NOW, request_id="r-1"))
    assert (on_srs.outcome, on_ors.outcome) == (False, True)
    assert (on_srs.key, on_srs.value, on_srs.headers) == (on_ors.key, on_ors.value, on_ors.headers)


def test_each_request_gets_an_event_id_of_its_own() -> None:
    a, b = (transfer_event("acme", "p-1", "south", "key-1", NOW) for _ in range(2))
    assert a.event_id != b.event_id


def test_ids_follow_the_submission_id_rules() -> None:
    assert check_id("client_id", "p-8812") == []
    assert check_id("client_id", "p/1")[0][0] == "client_id"
    assert "at most 128" in check_id("client_id", "p" * 129)[0][1]
    assert check_transfer({"site_id": "south"})[0] is not None
    model, errors = check_transfer({"site_id": "so uth", "x": 1})
    assert model is None and {f for f, _ in errors} == {"site_id", "x"}


def test_metrics_label_the_transfer_route_by_its_template() -> None:
    templates = route_templates(create_app(IntakeConfig()).router.routes)

    def label(path: str) -> str:
        return route_template(templates, path)

    assert label("/v1/clients/p-1/transfer") == label("/v1/clients/p-2/transfer") == "/v1/clients/{client_id}/transfer"
    assert label("/v1/submissions") == "/v1/submissions"
    assert label("/v1/clients/p-1") == label("/nowhere") == "other"


def test_openapi_documents_the_transfer_route_its_body_security_and_answers() -> None:
    doc = create_app(IntakeConfig()).openapi()
    op = doc["paths"]["/v1/clients/{client_id}/transfer"]["post"]
    assert op["security"] == [{"bearer": []}]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/TransferIn"}
    assert set(op["responses"]) >= {"202", "401", "403", "415", "422", "503"}
    assert "tenant-wide" in op["responses"]["403"]["description"]
    assert doc["components"]["schemas"]["TransferIn"]["required"] == ["site_id"]
    assert "admin" in doc["components"]["securitySchemes"]["bearer"]["description"]


def test_asyncapi_shows_client_transfers_on_the_submitted_topic() -> None:
    spec = json.loads(asyncapi_app(IntakeConfig(kafka=KafkaSettings(topic_prefix=""))).schema.to_specification()
                      .to_json())
    assert {"SrsSubmitted", "ClientTransfer"} <= set(spec["components"]["schemas"])


def test_the_cli_refuses_a_bad_site_before_touching_the_broker() -> None:
    cli = typer.Typer()
    cli.add_typer(clients_app, name="clients")
    result = CliRunner().invoke(cli, ["clients", "transfer", "p-1", "--tenant", "acme", "--site", "so uth"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "--site" in result.output
