"""The committed AsyncAPI/OpenAPI documents under docs/ are what the code generates.

When one of these fails after a change to a service: run `alliance docs gen`, review the diff
of docs/ (it is what partners build against) and commit it with the change.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faststream._internal.cli.main import cli as faststream_cli
from typer.testing import CliRunner

from shared.events import AllianceDeterioration
from tests.unit.test_contracts_events import event_models
from tools import contracts

DOCS = Path(__file__).resolve().parents[2] / "docs"

# A stand-in service, so the generator itself is tested whatever the real services look like.
PROBE = textwrap.dedent(
    '''
    from typing import Any

    from fastapi import FastAPI
    from faststream import FastStream
    from faststream.kafka import KafkaBroker

    from shared.events import SrsScored
    from shared.settings import KafkaSettings

    CONSUMED = "alliance.deterioration.v1"


    def asyncapi_app() -> FastStream:
        kafka = KafkaSettings()
        broker = KafkaBroker(kafka.bootstrap)
        broker.publisher(kafka.topics().scored, schema=SrsScored, title="scored", description="scored sessions")

        # Untyped, like every consumer made by shared.kafka.subscribe_batch.
        @broker.subscriber(kafka.topics().prefix + CONSUMED, title="probe:consumed")
        async def consume(body: Any) -> None:
            return None

        return FastStream(broker)


    def create_app() -> FastAPI:
        api = FastAPI(title="probe", version="1.0.0")

        @api.get("/things/{thing_id}")
        async def thing(thing_id: str) -> dict[str, str]:
            return {"id": thing_id}

        return api
    '''
)


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[str]:
    """Registers `services.probe.app` from a file; yields the module's file name."""
    path = tmp_path / "probe_app.py"
    path.write_text(PROBE)
    spec = importlib.util.spec_from_file_location("services.probe.app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["services.probe.app"] = module
    try:
        yield str(path)
    finally:
        del sys.modules["services.probe.app"]


def faststream_docs_gen(app_dir: Path) -> dict[str, Any]:
    """What `faststream docs gen` writes for the probe."""
    out = app_dir / "faststream.json"
    result = CliRunner().invoke(
        faststream_cli,
        ["docs", "gen", "probe_app:asyncapi_app", "--factory", "--out", str(out), "--app-dir", str(app_dir)],
    )
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def probe_asyncapi() -> dict[str, Any]:
    (doc,) = [d for d in contracts.generate(["probe"]) if d.kind == "asyncapi"]
    return doc.content


def test_generated_asyncapi_is_what_faststream_docs_gen_writes_completed(probe: str, tmp_path: Path) -> None:
    assert probe_asyncapi() == contracts.complete_asyncapi(faststream_docs_gen(tmp_path))


def test_completion_only_adds_to_what_faststream_writes(probe: str, tmp_path: Path) -> None:
    written = faststream_docs_gen(tmp_path)
    completed = probe_asyncapi()
    assert completed["channels"].keys() == written["channels"].keys()
    assert completed["operations"] == written["operations"]
    assert completed["servers"]["development"].items() >= written["servers"]["development"].items()


def test_an_untyped_consumer_gets_the_payload_of_the_events_its_topic_carries(probe: str) -> None:
    document = probe_asyncapi()
    message = document["components"]["messages"]["probe:consumed:SubscribeMessage"]
    assert message["payload"] == {"$ref": "#/components/schemas/AllianceDeterioration"}
    assert "probe:consumed:Message:Payload" not in document["components"]["schemas"]
    expected = set(AllianceDeterioration.model_json_schema()["properties"])
    assert set(document["components"]["schemas"]["AllianceDeterioration"]["properties"]) == expected


def test_a_consumed_topic_without_known_events_fails_generation(probe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(contracts.TOPIC_EVENTS, "alliance.deterioration.v1")
    with pytest.raises(ValueError, match=r"alliance\.deterioration\.v1: consumed, but .*TOPIC_EVENTS"):
        contracts.generate(["probe"])


def test_documents_name_the_production_cluster_with_sasl_ssl_next_to_the_local_one(probe: str) -> None:
    document = probe_asyncapi()
    assert set(document["servers"]) == {"development", "production"}
    production = document["servers"]["production"]
    assert production["protocol"] == "kafka-secure"
    (scheme_ref,) = production["security"]
    scheme = scheme_ref["$ref"].rsplit("/", 1)[1]
    assert document["components"]["securitySchemes"][scheme]["type"] == "scramSha512"
    for channel in document["channels"].values():
        assert {"$ref": "#/servers/production"} in channel["servers"]


def test_gen_writes_asyncapi_and_openapi_documents_that_check_accepts(probe: str, tmp_path: Path) -> None:
    docs = contracts.generate(["probe"])
    written = contracts.write(docs, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == ["asyncapi/probe.json", "openapi/probe.json"]
    assert "/things/{thing_id}" in json.loads((tmp_path / "openapi" / "probe.json").read_text())["paths"]
    assert contracts.drift(docs, tmp_path) == []


def test_check_reports_a_committed_document_that_differs_from_the_code(probe: str, tmp_path: Path) -> None:
    docs = contracts.generate(["probe"])
    contracts.write(docs, tmp_path)
    path = tmp_path / "openapi" / "probe.json"
    edited = json.loads(path.read_text())
    edited["info"]["version"] = "0.9.0"
    path.write_text(json.dumps(edited))
    (problem,) = contracts.drift(docs, tmp_path)
    assert "openapi/probe.json" in problem and "$.info.version" in problem


def test_check_reports_missing_and_stale_documents(probe: str, tmp_path: Path) -> None:
    docs = contracts.generate(["probe"])
    contracts.write(docs, tmp_path)
    (tmp_path / "asyncapi" / "probe.json").unlink()
    (tmp_path / "asyncapi" / "retired.json").write_text("{}")
    problems = contracts.drift(docs, tmp_path)
    assert any("asyncapi/probe.json: missing" in p for p in problems)
    assert any("asyncapi/retired.json: committed but no longer generated" in p for p in problems)


def test_documents_ignore_the_callers_alliance_environment(probe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLIANCE_KAFKA_TOPIC_PREFIX", "t-123-")
    monkeypatch.setenv("ALLIANCE_KAFKA_BOOTSTRAP", "elsewhere:9092")
    text = json.dumps(contracts.asyncapi_document("probe"))
    assert "t-123-" not in text and "elsewhere" not in text
    assert '"srs.scored.v1"' in text


def test_docs_cli_offers_gen_and_check() -> None:
    result = CliRunner().invoke(contracts.app, ["--help"])
    assert result.exit_code == 0
    assert "gen" in result.output and "check" in result.output


# ---- the real services -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated() -> dict[str, list[contracts.Document]]:
    """Documents generated from every service that has an app.py (built once per module)."""
    return {s: contracts.generate([s]) for s in contracts.implemented_services()}


def test_every_service_has_an_app_and_committed_contracts() -> None:
    missing = [s for s in contracts.SERVICES if s not in contracts.implemented_services()]
    assert not missing, f"no services/<name>/app.py for {missing}: their contracts cannot be generated"
    for service in contracts.SERVICES:
        assert (DOCS / "asyncapi" / f"{service}.json").is_file(), f"run `alliance docs gen` ({service})"


@pytest.mark.parametrize("service", contracts.SERVICES)
def test_committed_documents_match_the_code(service: str, generated: dict[str, list[contracts.Document]]) -> None:
    if service not in generated:
        pytest.skip(f"services/{service}/app.py does not exist (test_every_service_has_an_app... fails for it)")
    docs = generated[service]
    problems = [p for p in contracts.drift(docs, DOCS) if f"/{service}.json" in p]
    assert not problems, "\n".join(problems) + "\nrun `alliance docs gen` and commit docs/"


def test_no_committed_document_lacks_a_service() -> None:
    stale = [p for p in contracts.committed(DOCS) if p.stem not in contracts.SERVICES]
    assert not stale


def test_http_apis_have_openapi_documents(generated: dict[str, list[contracts.Document]]) -> None:
    assert generated, "no service has an app.py yet"
    for service in ("intake", "alerts", "reporting"):
        if service in generated:
            assert any(d.kind == "openapi" for d in generated[service]), service


def _schemas(generated: dict[str, list[contracts.Document]]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for docs in generated.values():
        for doc in docs:
            if doc.kind == "asyncapi":
                found.update(doc.content.get("components", {}).get("schemas", {}))
    return found


@pytest.mark.parametrize("model", sorted(event_models()))
def test_every_v1_event_is_described_in_an_asyncapi_document(
    model: str, generated: dict[str, list[contracts.Document]]
) -> None:
    # Partners read payloads from these documents: each event must appear with its real fields,
    # which needs a `publisher(..., schema=<Event>)` (or a typed subscriber) in some asyncapi_app().
    assert generated, "no service has an app.py yet"
    schemas = _schemas(generated)
    assert model in schemas, f"{model} appears in no docs/asyncapi/*.json (have: {sorted(schemas)})"
    expected = set(event_models()[model].model_json_schema()["properties"])
    assert set(schemas[model].get("properties", {})) == expected
