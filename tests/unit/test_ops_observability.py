"""Prometheus rules and config, the Grafana dashboard, and the metrics they rely on.

The rules are checked and unit-tested with the real `promtool` (Debian package `prometheus`,
installed by scripts/system-deps); every metric and label the rules and the dashboard use must
be one the code registers, so a renamed metric cannot leave a silent panel or a dead alert.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
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


def run_tool(name: str, package: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Prometheus tool, or skip when it is not installed (scripts/system-deps installs it in CI)."""
    binary = shutil.which(name)
    if binary is None:
        pytest.skip(f"{name} is missing (Debian package `{package}`; scripts/system-deps installs it in CI)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return run_tool("promtool", "prometheus", *args)


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


def all_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    """The alerting rules (the recording rules aside)."""
    return [r for r in all_rules() if "alert" in r]


@pytest.fixture(scope="module")
def recorded() -> set[str]:
    """Series the recording rules write."""
    return {r["record"] for r in all_rules() if "record" in r}


@pytest.mark.parametrize(
    ("concern", "pattern"),
    [
        ("consumer lag growing", r"delta\(alliance_consumer_lag_messages\["),
        ("dead-letter rate above zero", r"increase\(alliance_deadletter_total(\{[^}]*\})?\[\w+\]\)\)\s*>\s*0"),
        ("poison records set aside", r"increase\(alliance_consumer_poison_records_total\[\w+\]\)\)\s*>\s*0"),
        ("notification failures", r"alliance_notifications_total\{outcome=\"failed\"\}"),
        ("deliveries waiting for an operator",
         r"increase\(alliance_notification_blocked_attempts_total\[\w+\]\)\)\s*>\s*0"),
        ("intake 503 rate", r"alliance_intake_submissions_total\{outcome=\"unavailable\"\}"),
        ("5xx rate of every API", r"sum by \(service\) \(rate\(alliance_http_requests_total\{status=~\"5\.\.\"\}"),
        ("service not scraped", r"up\{job=~\"alliance-\.\+\"\} == 0"),
        ("service not ready", r"alliance_ready\) == 0"),
        ("stuck consumer: lag not decreasing", r"delta\(alliance_consumer_lag_messages\[\w+\]\)\) >= 0"),
        ("stuck consumer: batch retries rising", r"increase\(alliance_consumer_batch_retries_total\[\w+\]\)\) > 0"),
        ("dead-letter rate", r"rate\(alliance_deadletter_total\{[^}]*\}\[\w+\]\)\)\s*/"),
        ("delivery backlog", r"max\(alliance_notification_pending\) >"),
        ("deliveries waiting for a retry", r"max\(alliance_notification_pending_retries\) >"),
        ("escalation without a supervisor", r"alliance_alert_escalations_total\{outcome=\"no_supervisor\"\}"),
        ("escalations", r"alliance_alert_escalations_total\{outcome=\"sent\"\}"),
        ("alerts reaching nobody", r"increase\(alliance_alerts_unrouted_total\{fallback=\"no\"\}\[\w+\]\)\)\s*>\s*0"),
        ("alerts sent to a site fallback", r"alliance_alerts_unrouted_total\{fallback=\"yes\"\}"),
        ("store unavailable", r"alliance_dependency_up\{dependency=\"mongodb\"\}\) == 0"),
        ("broker unavailable", r"alliance_dependency_up\{dependency=\"kafka\"\}\) == 0"),
        ("alert delivery SLO burn", r"alliance:slo_alert_delivery:error_ratio_rate1h > \(14\.4 \* 0\.010\)"),
        ("submissions scored SLO burn", r"alliance:slo_submissions_scored:error_ratio_rate1h > \(14\.4 \* 0\.001\)"),
    ],
)
def test_an_alert_covers(rules: list[dict[str, Any]], concern: str, pattern: str) -> None:
    matching = [r["alert"] for r in rules if re.search(pattern, r["expr"])]
    assert matching, f"no alert rule for {concern}"


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook_url"].startswith("docs/runbooks.md#"), rule["alert"]


def test_prometheus_scrapes_every_service_on_its_port() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for service, settings in SERVICE_PORTS.items():
        job = jobs[f"alliance-{service}"]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert targets == [f"{service}:{settings.model_fields['port'].default}"]
    assert all((PROMETHEUS / f).is_file() for f in config["rule_files"])


# ---- runbooks --------------------------------------------------------------------------------

RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_PARTS = ("**Symptom.**", "**Impact.**", "**First checks.**", "**Commands.**", "**Fix.**")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lower case, punctuation dropped, spaces to -)."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    """Anchor -> text of every `##` section of docs/runbooks.md."""
    parts = re.split(r"^## (.+)$", RUNBOOKS.read_text(), flags=re.M)
    return {github_anchor(title): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_every_runbook_url_points_at_a_section_of_the_runbooks(rules: list[dict[str, Any]]) -> None:
    sections = runbook_sections()
    missing = [(r["alert"], r["annotations"]["runbook_url"]) for r in rules
               if r["annotations"]["runbook_url"].partition("#")[2] not in sections]
    assert missing == []


def test_every_alerts_runbook_says_symptom_impact_first_checks_commands_and_fix(rules: list[dict[str, Any]]) -> None:
    sections = runbook_sections()
    for anchor in {r["annotations"]["runbook_url"].partition("#")[2] for r in rules}:
        text = sections[anchor]
        if not anchor.startswith("slo-"):
            assert [p for p in RUNBOOK_PARTS if p not in text] == [], anchor
        assert "```" in text, f"{anchor}: no commands"


def cli_commands(text: str) -> set[tuple[str, ...]]:
    """`alliance a b ...` command paths (without options) named in command lines of the text."""
    found = set()
    for line in re.findall(r"^\s*alliance ((?:[a-z][a-z-]* ?)+)", text, flags=re.M):
        found.add(tuple(line.split()))
    return found


def test_the_runbooks_name_only_cli_commands_that_exist() -> None:
    import click
    import typer

    from tools.cli import app

    root = typer.main.get_command(app)
    named = cli_commands(RUNBOOKS.read_text())
    assert named, "the runbooks name no alliance command"
    for path in named:
        command: click.Command = root
        for i, word in enumerate(path):
            if not isinstance(command, click.Group):
                break  # the rest are arguments
            sub = command.commands.get(word)
            assert sub is not None, f"`alliance {' '.join(path[:i + 1])}` does not exist"
            command = sub
        assert not isinstance(command, click.Group), f"`alliance {' '.join(path)}` is a group, not a command"


# ---- promtool unit tests cover every rule ----------------------------------------------------


def rule_tests() -> list[dict[str, Any]]:
    doc: dict[str, Any] = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())
    tests: list[dict[str, Any]] = doc["tests"]
    return tests


def test_every_alert_fires_in_a_promtool_unit_test(rules: list[dict[str, Any]]) -> None:
    firing = {case["alertname"] for test in rule_tests() for case in test.get("alert_rule_test", [])
              if case["exp_alerts"]}
    assert sorted(r["alert"] for r in rules if r["alert"] not in firing) == []


def expand(values: str) -> list[float]:
    """promtool's expanding notation: `a+bxn` / `a-bxn` (n+1 values), `axn`, plain numbers."""
    out: list[float] = []
    for term in values.split():
        match = re.fullmatch(r"(-?[\d.]+)(?:([+-][\d.]+))?x(\d+)", term)
        if match is None:
            out.append(float(term))
            continue
        start, step, times = float(match[1]), float(match[2] or 0), int(match[3])
        out += [start + step * i for i in range(times + 1)]
    return out


def test_a_unit_test_fires_the_stuck_alert_on_a_lag_that_stops_decreasing() -> None:
    for test in rule_tests():
        if any(c["alertname"] == "AllianceConsumerStuck" and c["exp_alerts"] for c in test.get("alert_rule_test", [])):
            lags = [expand(s["values"]) for s in test["input_series"]
                    if s["series"].startswith("alliance_consumer_lag_messages")]
            for lag in lags:
                turn = next((i for i in range(1, len(lag)) if lag[i] == lag[i - 1]), None)
                if turn is not None and turn > 1 and lag[turn - 1] < lag[0] and len(set(lag[turn - 1:])) == 1 \
                        and lag[-1] > 0:
                    return
    raise AssertionError("no unit test fires AllianceConsumerStuck on a lag that decreases, then stays put")


# Alert name suffix -> (long window, short window, burn rate) pairs, as the SRE workbook recommends.
SLO_WINDOWS = {"BurnFast": (("1h", "5m", "14.4"), ("6h", "30m", "6")),
               "BurnSlow": (("1d", "2h", "3"), ("3d", "6h", "1"))}


@pytest.mark.parametrize(("slo", "objective"), [("alert_delivery", 0.99), ("submissions_scored", 0.999)])
def test_each_slo_alerts_on_the_sre_workbook_windows_and_burn_rates(rules: list[dict[str, Any]], recorded: set[str],
                                                                     slo: str, objective: float) -> None:
    budget = f"{1 - objective:.3f}"
    for suffix, pairs in SLO_WINDOWS.items():
        (rule,) = [r for r in rules if r["labels"].get("slo") == slo and r["alert"].endswith(suffix)]
        for long, short, rate in pairs:
            for window in (long, short):
                series = f"alliance:slo_{slo}:error_ratio_rate{window}"
                assert series in recorded
                assert f"{series} > ({rate} * {budget})" in rule["expr"], (rule["alert"], window)


def test_alerts_use_only_recorded_series_that_a_rule_records(recorded: set[str]) -> None:
    used = {name for _, expr in queries() for name in re.findall(r"\balliance:[a-z0-9_:]+", expr)}
    assert sorted(used - recorded) == []


# ---- Alertmanager ----------------------------------------------------------------------------

ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return run_tool("amtool", "prometheus-alertmanager", *args)


def test_amtool_accepts_the_alertmanager_config() -> None:
    done = amtool("check-config", str(ALERTMANAGER))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("labels", "receiver"), [
    (("severity=critical", "alertname=AllianceConsumerStuck"), "ops-pager"),
    (("severity=warning", "alertname=AllianceDeliveryBacklog"), "ops-tickets"),
    (("alertname=Unlabelled",), "ops-tickets"),
])
def test_alertmanager_pages_critical_alerts_and_tickets_the_others(labels: tuple[str, ...], receiver: str) -> None:
    done = amtool("config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels)
    assert done.stdout.strip() == receiver, done.stdout + done.stderr


def test_every_alertmanager_receiver_is_a_webhook() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    for receiver in config["receivers"]:
        assert set(receiver) == {"name", "webhook_configs"}, receiver["name"]


def test_prometheus_sends_alerts_to_the_alertmanager_compose_runs() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (manager,) = config["alerting"]["alertmanagers"]
    targets = [t for sc in manager["static_configs"] for t in sc["targets"]]
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    service = compose["services"]["alertmanager"]
    assert targets == ["alertmanager:9093"]
    assert "9093:9093" in service["ports"]
    assert "./alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro" in service["volumes"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in service["command"]


def test_operations_doc_names_every_receiver_and_inhibition() -> None:
    from tests.unit.test_ops_docs import section

    # A `|` inside a table cell is written `\\|`.
    routing = section((ROOT / "docs" / "operations.md").read_text(), "Alert routing").replace("\\|", "|")
    config = yaml.safe_load(ALERTMANAGER.read_text())
    for receiver in config["receivers"]:
        assert f"`{receiver['name']}`" in routing
    for rule in config["inhibit_rules"]:
        source = rule["source_matchers"][0].split("=", 1)[1].strip('~"')
        assert f"`{source}`" in routing, source



# ---- metrics the code defines ----------------------------------------------------------------


def import_every_module() -> None:
    """Import every module of shared/ and services/ (their metrics register at import; importing
    opens no connection), entry points aside."""
    for package in ("shared", "services"):
        for module in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)


@pytest.fixture(scope="module")
def registered() -> dict[str, tuple[str, ...]]:
    """Series name -> label names, for every metric the code registers."""
    import_every_module()
    names: dict[str, tuple[str, ...]] = {}
    for series, collector in REGISTRY._names_to_collectors.items():
        names[series] = tuple(getattr(collector, "_labelnames", ()))
    return names


EXPORTED = re.compile(r"(alliance|process|python)_")
SERIES_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum")
# Families the code exports (prometheus_client's default collectors included) that no panel and no
# rule shows, on purpose. Every other exported family must be on the dashboard or in a rule.
UNUSED_FAMILIES = {
    "process_max_fds": "a limit, not a state: open descriptors near it would show as errors first",
    "process_open_fds": "no leak has been seen; the connection pools are bounded",
    "process_start_time_seconds": "restarts show as gaps in `up` and alliance_ready",
    "process_virtual_memory_bytes": "resident memory (shown) is what a pod's limit counts",
    "python_gc_collections": "interpreter internals; CPU and memory panels show their cost",
    "python_gc_objects_collected": "interpreter internals",
    "python_gc_objects_uncollectable": "interpreter internals",
    "python_info": "a constant: the Python version",
}


@pytest.fixture(scope="module")
def families(registered: dict[str, tuple[str, ...]]) -> set[str]:
    """Every metric family the code exports (alliance_*, and the default collectors' process_*, python_*)."""
    names: set[str] = set()
    for collector in set(REGISTRY._names_to_collectors.values()):
        described = getattr(collector, "describe", collector.collect)()
        names |= {metric.name for metric in described if EXPORTED.match(metric.name)}
    return names


def family_of(series: str, families: set[str]) -> str:
    if series in families:
        return series
    for suffix in SERIES_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in families:
            return series.removesuffix(suffix)
    return series


def used_families(families: set[str]) -> set[str]:
    return {family_of(name, families) for _, expr in queries() for name in metric_names(expr)} - BUILTIN_SERIES


def test_every_exported_family_is_shown_or_alerted_on_or_listed_as_unused(families: set[str]) -> None:
    assert sorted(families - used_families(families) - set(UNUSED_FAMILIES)) == []


def test_the_unused_list_names_exported_families_that_nothing_uses(families: set[str]) -> None:
    assert sorted(set(UNUSED_FAMILIES) - families) == [], "not exported"
    assert sorted(set(UNUSED_FAMILIES) & used_families(families)) == [], "used after all"


def test_the_families_found_include_every_services_own(families: set[str]) -> None:
    # The check above means something only if the code's families are found: one of each service's.
    assert {"alliance_intake_submissions", "alliance_scored", "alliance_notifications", "alliance_reporting_events",
            "alliance_consumer_lag_messages", "alliance_http_requests"} <= families


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every alerting and recording rule and every dashboard target."""
    for rule in all_rules():
        yield f"alerts.yml {rule.get('alert') or rule['record']}", rule["expr"]
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            yield f"alliance.json {panel['title']!r}", target["expr"]


# Series the code exports: the services' own (alliance_*) and prometheus_client's default
# collectors' (process_*, python_*); `up` is Prometheus' own.
METRIC = re.compile(r"\b((?:alliance|process|python)_[a-z0-9_]+|up)\b(?!\s*\()")
SELECTOR = re.compile(r"\b((?:alliance|process|python)_[a-z0-9_]+|up)\{([^}]*)\}")
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
            valid = set(registered.get(name, ())) | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
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


def test_dashboard_picks_its_datasource_by_a_variable_and_hard_codes_no_uid() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', (GRAFANA / "alliance.json").read_text()))
    assert uids == {"${datasource}", dashboard()["uid"]}


def test_the_provisioned_datasource_is_the_default_prometheus() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]


def test_dashboard_has_job_and_instance_variables_from_the_scrape_targets() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert 'up{job=~"alliance-.+"}' in variables["job"]["query"]["query"]
    assert 'up{job=~"$job"}' in variables["instance"]["query"]["query"]
    for name in ("job", "instance"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_panel_query_is_filtered_by_job_and_instance() -> None:
    unfiltered = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            selected = {name for name, _ in SELECTOR.findall(expr)}
            bare = metric_names(expr) - selected
            unfiltered += [(panel["title"], name) for name in bare]
            for name, matchers in SELECTOR.findall(expr):
                if 'job=~"$job"' not in matchers or 'instance=~"$instance"' not in matchers:
                    unfiltered.append((panel["title"], name))
    assert unfiltered == []


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


SEL = r"(?:\{[^}]*\})?"  # an optional label selector, in the patterns below


def panel_exprs() -> str:
    return "\n".join(t["expr"] for p in dashboard_panels() for t in p["targets"])


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("submissions/s", rf"rate\(alliance_intake_submissions_total{SEL}\["),
        ("scored/s", rf"rate\(alliance_scored_total{SEL}\["),
        ("deterioration alerts by trigger", r"by \(trigger.*alliance_deterioration_total"),
        ("delivery outcomes", rf"by \(channel, outcome\) \(rate\(alliance_notifications_total{SEL}\["),
        ("consumer lag", r"alliance_consumer_lag_messages"),
        ("dead letters", r"alliance_deadletter_total"),
        ("HTTP requests of every API by service",
         rf"by \(service, status\) \(rate\(alliance_http_requests_total{SEL}\["),
        ("HTTP latency by service and route",
         rf"histogram_quantile\(0\.99, sum by \(le, service, route\) "
         rf"\(rate\(alliance_http_request_seconds_bucket{SEL}\["),
        ("delivery backlog", r"alliance_notification_pending\b"),
        ("escalations", r"alliance_alert_escalations_total"),
        ("dependencies", r"alliance_dependency_up"),
        ("event-loop lag by service",
         rf"histogram_quantile\(0\.99, sum by \(le, service\) \(rate\(alliance_event_loop_lag_seconds_bucket{SEL}\["),
        *[(f"the burn rate of the {slo} SLO", rf"alliance:slo_{slo}:error_ratio_rate1h / ")
          for slo in ("alert_delivery", "submissions_scored")],
        *[(f"latency percentiles of {h}", rf"histogram_quantile\(0\.99, sum by \(le\) \(rate\({h}_bucket{SEL}\[")
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
