"""The tracing path of deploy/ holds together: in compose the services export to the collector, the
collector's pipeline forwards to Jaeger, Grafana's Jaeger datasource points at it, and latency samples
link to their traces (exemplars); on Kubernetes each deployment names its spans and exports them to
the collector there, sampled parent-based."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider

from shared import tracing
from shared.settings import SERVICE_PORTS, TracingSettings

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


# ---- exemplars: from a latency panel's point to its trace -------------------------------------

# The histograms observed with the trace id of the request or batch they measure (`tracing.exemplar`).
EXEMPLAR_HISTOGRAMS = ("alliance_http_request_seconds", "alliance_consumer_batch_seconds",
                       "alliance_intake_publish_seconds", "alliance_alert_to_delivered_seconds")


def _datasource(name: str) -> dict[str, Any]:
    [source] = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / f"{name}.yml")["datasources"]
    assert isinstance(source, dict)
    return source


def test_prometheus_keeps_exemplars(compose: dict[str, Any]) -> None:
    assert "--enable-feature=exemplar-storage" in compose["services"]["prometheus"]["command"]


def test_an_exemplars_trace_id_label_opens_the_trace_in_the_jaeger_datasource() -> None:
    [destination] = _datasource("prometheus")["jsonData"]["exemplarTraceIdDestinations"]
    assert destination["datasourceUid"] == _datasource("jaeger")["uid"]
    traced_label = "trace_id"  # what `shared.tracing.exemplar` names the trace id
    assert destination["name"] == traced_label


def test_a_span_links_to_its_services_metrics_by_its_service_name_as_the_prometheus_job() -> None:
    links = _datasource("jaeger")["jsonData"]["tracesToMetrics"]
    assert links["datasourceUid"] == _datasource("prometheus")["uid"]
    assert {"key": "service.name", "value": "job"} in links["tags"]
    scrape = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"] for job in scrape["scrape_configs"]}
    assert {tracing.service_name(s) for s in SERVICE_PORTS} <= jobs
    assert all("$$__tags" in q["query"] for q in links["queries"])  # `$$`: a literal `$` in provisioning files


def test_every_panel_on_a_histogram_with_exemplars_shows_them() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "alliance.json").read_text())
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])
               if any(f"{h}_bucket" in t.get("expr", "") for h in EXEMPLAR_HISTOGRAMS)]
    assert targets and all(t.get("exemplar") is True for t in targets)


# ---- Kubernetes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    kustomization = _yaml(DEPLOY / "k8s" / "kustomization.yaml")
    return [d for r in kustomization["resources"] for d in yaml.safe_load_all((DEPLOY / "k8s" / r).read_text()) if d]


def _k8s(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("service", sorted(SERVICE_PORTS))
def test_each_k8s_deployment_names_its_spans_as_the_code_does(k8s: list[dict[str, Any]], service: str) -> None:
    [container] = _k8s(k8s, "Deployment", service)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTEL_SERVICE_NAME"] == tracing.service_name(service)


def test_k8s_services_export_to_the_collector_services_otlp_http_port(k8s: list[dict[str, Any]]) -> None:
    endpoint = _k8s(k8s, "ConfigMap", "alliance-config")["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    host, port = endpoint.removeprefix("http://").split(":")
    service = _k8s(k8s, "Service", host)
    [http] = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    [container] = _k8s(k8s, "Deployment", host)["spec"]["template"]["spec"]["containers"]
    [listening] = [p for p in container["ports"] if p["name"] == http["targetPort"]]
    config = yaml.safe_load(_k8s(k8s, "ConfigMap", "otel-collector")["data"]["collector.yaml"])
    receiver = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert int(receiver.rsplit(":", 1)[1]) == listening["containerPort"]
    assert TracingSettings(exporter_otlp_endpoint=endpoint).exporting


def test_the_k8s_collector_mounts_its_config_and_exports_what_it_receives(k8s: list[dict[str, Any]]) -> None:
    spec = _k8s(k8s, "Deployment", "otel-collector")["spec"]["template"]["spec"]
    [container] = spec["containers"]
    [mount] = container["volumeMounts"]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    config_map = _k8s(k8s, "ConfigMap", volume["configMap"]["name"])
    [config_file] = config_map["data"]
    assert f"--config={mount['mountPath']}/{config_file}" in container["args"]
    pipeline = yaml.safe_load(config_map["data"][config_file])["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and pipeline["exporters"]


def test_k8s_sampling_is_parent_based_on_a_ratio_the_sdk_reads(k8s: list[dict[str, Any]],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = _k8s(k8s, "ConfigMap", "alliance-config")["data"]
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.setenv(name, data[name])
    # A misspelt sampler or argument would fall back to the SDK's default (parent-based always-on).
    description = TracerProvider().sampler.get_description()
    assert description.startswith(f"ParentBased{{root:TraceIdRatioBased{{{float(data['OTEL_TRACES_SAMPLER_ARG'])}}}")
