"""docs/ says what the code does: the signature example verifies real deliveries, every event
field is documented, every consumer group and Kafka setting is listed, every link resolves."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from services.alerts import signing
from shared.settings import KafkaSettings
from tests.unit.test_contracts_events import event_models
from tools import contracts

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FIXTURES = ROOT / "tests" / "fixtures" / "events" / "v1"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def section(markdown: str, heading: str) -> str:
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", markdown, flags=re.S | re.M)
    assert match is not None, f"no section {heading!r}"
    return match.group(1)


# ---- the webhook verification example --------------------------------------------------------


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    """The Python example of partners.md, run as a partner would, with a fresh secret."""
    secret = signing.new_secret()
    monkeypatch.setenv("WEBHOOK_SECRET", secret)
    (code,) = python_blocks(section((DOCS / "partners.md").read_text(), "Verifying the signature"))
    namespace: dict[str, Any] = {}
    exec(compile(code, "partners.md", "exec"), namespace)
    return namespace, secret


BODY = (FIXTURES / "AllianceDeterioration.current.json").read_bytes()


def delivery(secrets: list[str], body: bytes = BODY, delivery_id: str = "d-1", at: int | None = None) -> dict[str, str]:
    """The headers alerts sends with a webhook (services/alerts/signing.py)."""
    return signing.webhook_headers(delivery_id, at or int(time.time()), body, secrets, "alliance.deterioration.v1")


def test_example_accepts_a_delivery_signed_by_alerts(example: tuple[dict[str, Any], str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ns, secret = example
    assert ns["handle"](BODY, delivery([secret])) == 200
    alert = json.loads(BODY)
    assert alert["alert_id"] in capsys.readouterr().out


def test_example_rejects_a_tampered_body(example: tuple[dict[str, Any], str]) -> None:
    ns, secret = example
    headers = delivery([secret])
    assert ns["handle"](BODY.replace(b'"critical"', b'"warning"'), headers) == 401


def test_example_rejects_another_tenants_secret(example: tuple[dict[str, Any], str]) -> None:
    ns, _ = example
    assert ns["handle"](BODY, delivery([signing.new_secret()])) == 401


def test_example_rejects_a_replayed_old_delivery(example: tuple[dict[str, Any], str]) -> None:
    ns, secret = example
    assert ns["handle"](BODY, delivery([secret], at=int(time.time()) - 3600)) == 401


def test_example_accepts_either_secret_during_a_rotation(example: tuple[dict[str, Any], str]) -> None:
    ns, secret = example
    assert ns["handle"](BODY, delivery([signing.new_secret(), secret])) == 200


def test_example_handles_a_retried_delivery_once(example: tuple[dict[str, Any], str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ns, secret = example
    for _ in range(3):
        assert ns["handle"](BODY, delivery([secret], delivery_id="d-retried")) == 200
    assert capsys.readouterr().out.count("alert ") == 1


def test_example_accepts_headers_in_any_case(example: tuple[dict[str, Any], str]) -> None:
    ns, secret = example
    headers = {k.title(): v for k, v in delivery([secret]).items()}
    assert ns["handle"](BODY, headers) == 200


def test_every_python_example_in_the_docs_is_valid_python() -> None:
    blocks = [(p.name, b) for p in DOCS.glob("*.md") for b in python_blocks(p.read_text())]
    assert len(blocks) >= 2
    for name, block in blocks:
        ast.parse(block, filename=name)


# ---- events.md -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(event_models()))
def test_events_doc_describes_exactly_the_fields_of(model: str) -> None:
    text = section((DOCS / "events.md").read_text(), model)
    documented = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))
    assert documented == set(event_models()[model].model_fields)


def test_events_doc_lists_every_topic() -> None:
    text = (DOCS / "events.md").read_text()
    for topic in KafkaSettings().topics().all():
        if topic.endswith("notify-retry.v1"):
            continue  # internal to alerts: its retry schedule, not a contract
        assert f"`{topic}`" in text, topic


# ---- operations.md ---------------------------------------------------------------------------


def consumer_groups() -> dict[str, set[str]]:
    """service -> the consumer groups its subscribers use (read from the FastStream apps)."""
    groups: dict[str, set[str]] = {}
    with contracts.default_environment():
        for service in contracts.implemented_services():
            broker = importlib.import_module(f"services.{service}.app").asyncapi_app().broker
            found = {s.group_id for s in broker.subscribers if getattr(s, "group_id", None)}
            if found:
                groups[service] = found
    return groups


def test_operations_doc_names_every_services_consumer_groups() -> None:
    groups = consumer_groups()
    assert groups, "no service with consumers has an app.py yet"
    row_of = {m.group(1): m.group(0) for m in re.finditer(r"^\| (\w+) \| \d+ \|.*$",
                                                            (DOCS / "operations.md").read_text(), flags=re.M)}
    for service, names in groups.items():
        for name in names:
            assert f"(`{name}`)" in row_of[service], (service, name)


def test_operations_doc_covers_every_kafka_setting() -> None:
    text = (DOCS / "operations.md").read_text()
    for field in KafkaSettings.model_fields:
        assert f"ALLIANCE_KAFKA_{field.upper()}" in text, field


# ---- links -----------------------------------------------------------------------------------


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for page in DOCS.glob("*.md"):
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path) if path else page
            if not resolved.exists():
                broken.append((page.name, target))
            elif anchor:
                headings = re.findall(r"^#+ (.+)$", resolved.read_text(), flags=re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
                if anchor not in slugs:
                    broken.append((page.name, target))
    assert broken == []


def test_docs_index_links_every_page() -> None:
    index = (DOCS / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"]({page.name})" in index, page.name
    assert os.path.isdir(DOCS / "asyncapi") and os.path.isdir(DOCS / "openapi")
