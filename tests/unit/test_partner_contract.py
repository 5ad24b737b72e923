"""The partner contract has no gaps: what docs/openapi, docs/asyncapi, events.md and partners.md
promise is what the services do (issue 14, partner contract).

The committed documents are compared with the code by test_contracts_docs.py; these tests read
them as a partner would and check each promise against the code that keeps it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.alerts import signing
from services.alerts.rules import SUBSCRIBABLE
from shared.settings import KafkaSettings
from shared.topic_admin import retention_ms
from tools import contracts

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
HTTP_METHODS = {"get", "put", "post", "delete", "patch"}


def document(kind: str, service: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DOCS / kind / f"{service}.json").read_text())
    return loaded


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items()
            for method, op in item.items() if method in HTTP_METHODS]


OPENAPI = sorted(p.stem for p in (DOCS / "openapi").glob("*.json"))


# ---- OpenAPI: the API key ---------------------------------------------------------------------


@pytest.mark.parametrize("service", OPENAPI)
def test_every_v1_operation_requires_the_bearer_api_key(service: str) -> None:
    doc = document("openapi", service)
    keyed = [(path, method, op) for path, method, op in operations(doc) if path.startswith("/v1/")]
    for path, method, op in keyed:
        assert op.get("security") == [{"bearer": []}], f"{method.upper()} {path}"
    if keyed:
        scheme = doc["components"]["securitySchemes"]["bearer"]
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


@pytest.mark.parametrize("service", OPENAPI)
def test_operations_outside_v1_need_no_key(service: str) -> None:
    # /healthz, /readyz, /metrics and the dashboard's files are open: probes and scrapers hold no key.
    for path, method, op in operations(document("openapi", service)):
        if not path.startswith("/v1/"):
            assert "security" not in op, f"{method.upper()} {path}"


def test_the_alerts_api_declares_its_key_scheme() -> None:
    assert "bearer" in document("openapi", "alerts")["components"]["securitySchemes"]


# ---- OpenAPI: what partners receive --------------------------------------------------------------


def webhook(topic: str) -> dict[str, Any]:
    hook: dict[str, Any] = document("openapi", "alerts")["webhooks"][topic]["post"]
    return hook


def test_there_is_one_webhook_per_subscribable_topic() -> None:
    assert set(document("openapi", "alerts")["webhooks"]) == set(SUBSCRIBABLE)


@pytest.mark.parametrize("topic", SUBSCRIBABLE)
def test_a_webhook_body_is_the_event_its_topic_carries(topic: str) -> None:
    (model,) = contracts.TOPIC_EVENTS[topic]
    body = webhook(topic)["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{model.__name__}"}
    schemas = document("openapi", "alerts")["components"]["schemas"]
    assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)


@pytest.mark.parametrize("topic", SUBSCRIBABLE)
def test_a_webhook_documents_every_header_alerts_signs_it_with(topic: str) -> None:
    sent = signing.webhook_headers("d-1", int(time.time()), b"{}", [signing.new_secret()], topic)
    required = {p["name"] for p in webhook(topic)["parameters"] if p["in"] == "header" and p["required"]}
    # content-type is the request body's media type in OpenAPI, not a parameter.
    assert required == set(sent) - {"content-type"}
    event = next(p for p in webhook(topic)["parameters"] if p["name"] == "x-alliance-event")
    assert event["schema"]["enum"] == [sent["x-alliance-event"]]


@pytest.mark.parametrize("topic", SUBSCRIBABLE)
def test_a_documented_signature_matches_what_alerts_sends(topic: str) -> None:
    pattern = next(p for p in webhook(topic)["parameters"] if p["name"] == "webhook-signature")["schema"]["pattern"]
    rotating = [signing.new_secret(), signing.new_secret()]
    sent = signing.webhook_headers("d-1", int(time.time()), b"{}", rotating, topic)["webhook-signature"]
    assert re.fullmatch(pattern, sent)


def test_only_the_alert_webhooks_have_the_optional_escalation_header_and_alerts_and_statuses_the_routed_ones(
        ) -> None:
    optional = {t: {p["name"] for p in webhook(t)["parameters"] if not p["required"]} for t in SUBSCRIBABLE}
    alerts = {"alliance.deterioration.v1", "outcome.alert.v1"}
    statuses = {"alliance.alert-status.v1", "outcome.alert-status.v1"}
    routed = {"x-alliance-routed", "x-alliance-routed-reason"}
    assert optional == {t: ({"x-alliance-escalation", *routed} if t in alerts else routed if t in statuses else set())
                        for t in SUBSCRIBABLE}


# ---- AsyncAPI ------------------------------------------------------------------------------------


ASYNCAPI = sorted(p.stem for p in (DOCS / "asyncapi").glob("*.json"))
# AsyncAPI's security scheme type for each SASL mechanism the services support.
ASYNCAPI_SASL = {"SCRAM-SHA-512": "scramSha512", "SCRAM-SHA-256": "scramSha256", "PLAIN": "plain"}


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


@pytest.mark.parametrize("service", ASYNCAPI)
def test_every_receive_operation_has_the_payload_of_its_topics_events(service: str) -> None:
    doc = document("asyncapi", service)
    receives = [op for op in doc["operations"].values() if op["action"] == "receive"]
    for op in receives:
        topic = resolve(doc, op["channel"]["$ref"])["address"]
        expected = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in contracts.TOPIC_EVENTS[topic]]
        for ref in op["messages"]:
            payload = resolve(doc, resolve(doc, ref["$ref"])["$ref"])["payload"]
            assert payload == (expected[0] if len(expected) == 1 else {"anyOf": expected}), topic


@pytest.mark.parametrize("service", ASYNCAPI)
def test_no_payload_schema_is_left_empty(service: str) -> None:
    schemas = document("asyncapi", service)["components"]["schemas"]
    assert [name for name, schema in schemas.items() if set(schema) <= {"title"}] == []


@pytest.mark.parametrize("service", ASYNCAPI)
def test_the_production_server_uses_the_security_the_deployment_configures(service: str) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "config.yaml").read_text())["data"]
    assert config["ALLIANCE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    doc = document("asyncapi", service)
    production = doc["servers"]["production"]
    assert production["protocol"] == "kafka-secure"  # AsyncAPI's name for Kafka over TLS
    (security,) = production["security"]
    scheme = resolve(doc, security["$ref"])
    assert scheme["type"] == ASYNCAPI_SASL[config["ALLIANCE_KAFKA_SASL_MECHANISM"]]
    assert "security" not in doc["servers"]["development"]


@pytest.mark.parametrize("kind", ["asyncapi", "openapi"])
@pytest.mark.parametrize("service", contracts.SERVICES)
def test_every_document_is_titled_after_its_service(kind: str, service: str) -> None:
    info = document(kind, service)["info"]
    assert info["title"] == f"Alliance Stream {service}"
    assert info["version"] == "1.0.0"


# ---- retention and tenants in the prose ---------------------------------------------------------


def expected_retention(topic: str) -> str:
    kafka = KafkaSettings()
    ms = retention_ms(kafka, topic)
    return "forever" if ms == -1 else f"{ms // 86_400_000} days"


def test_events_doc_states_each_topics_real_retention() -> None:
    rows = re.findall(r"^\| `([\w.-]+)` \| [^|]+ \| [^|]+ \| ([^|]+) \|", (DOCS / "events.md").read_text(), re.M)
    assert {topic for topic, _ in rows} >= set(contracts.TOPIC_EVENTS)
    for topic, retention in rows:
        assert retention.strip() == expected_retention(topic), topic


def test_partners_doc_names_the_topics_kept_forever() -> None:
    (row,) = re.findall(r"^\| replay \| ([^|]+) \|", (DOCS / "partners.md").read_text(), re.M)
    forever_part, _, rest = row.partition("kept forever")
    forever = set(re.findall(r"`([\w.-]+\.v1)`", forever_part))
    assert forever == {t for t in contracts.TOPIC_EVENTS if expected_retention(t) == "forever"}
    assert f"for {expected_retention('srs.submitted.v1')}" in rest


def test_partners_doc_says_a_kafka_consumer_sees_every_tenant() -> None:
    (row,) = re.findall(r"^\| sees \| ([^|]+) \|", (DOCS / "partners.md").read_text(), re.M)
    assert "every tenant" in row
