"""Prometheus rules and config, the Grafana dashboard, and the metrics they rely on.

The rules are checked and unit-tested with the real `promtool` (Debian package `prometheus`,
installed by scripts/system-deps); every metric and label the rules and the dashboard use must
be one the code registers, so a renamed metric cannot leave a silent panel or a dead alert.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from shared.settings import SERVICE_PORTS

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
SERVICES = tuple(SERVICE_PORTS)
BUILTIN_SERIES = {"up"}  # written by Prometheus itself for every scrape target
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
LATENCY_HISTOGRAMS = (
    "alliance_submission_to_scored_seconds",
    "alliance_scored_to_visible_seconds",
    "alliance_alert_to_delivered_seconds",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is missing (Debian package `prometheus`; scripts/system-deps installs it in CI)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False)


# ---- promtool --------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules() -> None:
    done = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_the_prometheus_config() -> None:
    done = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    done = promtool("test", "rules", str(PROMETHEUS / "alerts.test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    # The checks above mean something only if promtool does reject bad rules here.
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(x[5m])\n")
    assert promtool("check", "rules", str(bad)).returncode != 0


# ---- what the rules cover --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


@pytest.mark.parametrize(
    ("concern", "pattern"),
    [
        ("consumer lag growing", r"delta\(alliance_consumer_lag_messages\["),
        ("dead-letter rate above zero", r"increase\(alliance_deadletter_total(\{[^}]*\})?\[\w+\]\)\)\s*>\s*0"),
        ("poison records set aside", r"increase\(alliance_consumer_poison_records_total\[\w+\]\)\)\s*>\s*0"),
        ("notification failures", r"alliance_notifications_total\{outcome=\"failed\"\}"),
        ("intake 503 rate", r"alliance_intake_submissions_total\{outcome=\"unavailable\"\}"),
        ("5xx rate of every API", r"sum by \(service\) \(rate\(alliance_http_requests_total\{status=~\"5\.\.\"\}"),
        ("service not scraped", r"up\{job=~\"alliance-\.\+\"\} == 0"),
        ("service not ready", r"alliance_ready\) == 0"),
    ],
)
def test_an_alert_covers(rules: list[dict[str, Any]], concern: str, pattern: str) -> None:
    matching = [r["alert"] for r in rules if re.search(pattern, r["expr"])]
    assert matching, f"no alert rule for {concern}"
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_prometheus_scrapes_every_service_on_its_port() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for service, settings in SERVICE_PORTS.items():
        job = jobs[f"alliance-{service}"]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert targets == [f"{service}:{settings.model_fields['port'].default}"]
    assert all((PROMETHEUS / f).is_file() for f in config["rule_files"])


# ---- metrics the code defines ----------------------------------------------------------------


@pytest.fixture(scope="module")
def registered() -> dict[str, tuple[str, ...]]:
    """Series name -> label names, for every metric the code registers."""
    importlib.import_module("shared.metrics")
    importlib.import_module("shared.http")
    for service in SERVICES:
        for module in ("metrics", "app"):
            if importlib.util.find_spec(f"services.{service}.{module}") is not None:
                importlib.import_module(f"services.{service}.{module}")
    names: dict[str, tuple[str, ...]] = {}
    for series, collector in REGISTRY._names_to_collectors.items():
        names[series] = tuple(getattr(collector, "_labelnames", ()))
    return names


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every alert rule and every dashboard target."""
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            yield f"alerts.yml {rule['alert']}", rule["expr"]
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            yield f"alliance.json {panel['title']!r}", target["expr"]


METRIC = re.compile(r"\b(alliance_[a-z0-9_]+|up)\b(?!\s*\()")
SELECTOR = re.compile(r"\b(alliance_[a-z0-9_]+|up)\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def metric_names(expr: str) -> set[str]:
    return {m for m in METRIC.findall(expr) if m != "up" or re.search(r"\bup\{", expr)}


def allowed_labels(expr: str, registered: dict[str, tuple[str, ...]]) -> set[str]:
    labels = set(TARGET_LABELS)
    for name in metric_names(expr):
        labels |= set(registered.get(name, ()))
        if name.endswith("_bucket"):
            labels.add("le")
    return labels


def test_every_metric_in_rules_and_dashboard_is_defined_by_the_code(registered: dict[str, tuple[str, ...]]) -> None:
    undefined = sorted({(where, name) for where, expr in queries() for name in metric_names(expr)
                        if name not in registered and name not in BUILTIN_SERIES})
    assert undefined == [], "metrics used but registered by no module in shared/ or services/"


def test_every_label_in_rules_and_dashboard_exists_on_its_metric(registered: dict[str, tuple[str, ...]]) -> None:
    wrong = []
    for where, expr in queries():
        for name, matchers in SELECTOR.findall(expr):
            valid = set(registered.get(name, ())) | TARGET_LABELS
            wrong += [(where, name, label) for label in MATCHER.findall(matchers) if label not in valid]
        allowed = allowed_labels(expr, registered)
        for grouping in GROUPING.findall(expr):
            wrong += [(where, "by", label.strip()) for label in grouping.split(",") if label.strip() not in allowed]
    assert wrong == []


def test_label_checks_catch_a_label_the_metric_lacks(registered: dict[str, tuple[str, ...]]) -> None:
    expr = 'sum by (site_id) (rate(alliance_deadletter_total{service="scoring"}[5m]))'
    assert "site_id" not in allowed_labels(expr, registered)
    assert "service" in allowed_labels(expr, registered)


# ---- Grafana ---------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GRAFANA / "alliance.json").read_text())
    return doc


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"]


def test_dashboard_provider_loads_the_path_compose_mounts_it_to() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "alliance.yml").read_text())
    (entry,) = provider["providers"]
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    mounts = [v.split(":")[1] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./grafana/alliance")]
    assert mounts == [f"{entry['options']['path']}/alliance.json"]


def test_dashboard_panels_have_unique_ids_and_fit_the_grid() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0


def panel_exprs() -> str:
    return "\n".join(t["expr"] for p in dashboard_panels() for t in p["targets"])


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("submissions/s", r"rate\(alliance_intake_submissions_total\["),
        ("scored/s", r"rate\(alliance_scored_total\["),
        ("deterioration alerts by trigger", r"by \(trigger.*alliance_deterioration_total"),
        ("delivery outcomes", r"by \(channel, outcome\) \(rate\(alliance_notifications_total\["),
        ("consumer lag", r"alliance_consumer_lag_messages"),
        ("dead letters", r"alliance_deadletter_total"),
        *[(f"latency percentiles of {h}", rf"histogram_quantile\(0\.99, sum by \(le\) \(rate\({h}_bucket\[")
          for h in LATENCY_HISTOGRAMS],
    ],
)
def test_dashboard_shows(what: str, pattern: str) -> None:
    assert re.search(pattern, panel_exprs()), f"no panel shows {what}"


def test_dashboard_legends_name_labels_the_query_keeps() -> None:
    for panel in dashboard_panels():
        for target in panel["targets"]:
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            grouped = {label.strip() for g in GROUPING.findall(target["expr"]) for label in g.split(",")}
            assert legend_labels <= grouped, (panel["title"], legend_labels - grouped)
