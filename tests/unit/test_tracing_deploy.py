"""The tracing path of deploy/compose.yaml holds together: the services export to the collector, the
collector's pipeline forwards to Jaeger, and Grafana's Jaeger datasource points at it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import SERVICE_PORTS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = _yaml(DEPLOY / "compose.yaml")
    return doc


@pytest.mark.parametrize("service", sorted(SERVICE_PORTS))
def test_each_service_exports_its_spans_to_the_collectors_otlp_http_port(compose: dict[str, Any],
                                                                          service: str) -> None:
    collector = _yaml(DEPLOY / "otel" / "collector.yaml")
    http_port = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1]
    env = compose["services"][service]["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{http_port}"


def test_the_collector_mounts_its_config_and_forwards_traces_to_jaeger(compose: dict[str, Any]) -> None:
    collector = compose["services"]["otel-collector"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in collector["volumes"]}
    assert mounted["./otel/collector.yaml"] in " ".join(collector["command"])
    config = _yaml(DEPLOY / "otel" / "collector.yaml")
    [exporter] = config["service"]["pipelines"]["traces"]["exporters"]
    assert config["exporters"][exporter]["endpoint"].split(":")[0] == "jaeger"
    assert "jaeger" in compose["services"]


def test_grafana_has_a_jaeger_datasource_on_the_compose_jaeger(compose: dict[str, Any]) -> None:
    [source] = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "jaeger.yml")["datasources"]
    assert source["type"] == "jaeger"
    assert source["url"].split("//")[1].split(":")[0] == "jaeger"
    assert "16686:16686" in compose["services"]["jaeger"]["ports"]
