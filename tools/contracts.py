"""Contract documents generated from the code: AsyncAPI per service, OpenAPI per HTTP API.

`alliance docs gen` writes `docs/asyncapi/<service>.json` from each service's `asyncapi_app()`
(what `faststream docs gen` writes, completed by `complete_asyncapi` with what FastStream cannot
declare: the payloads of the generic batch consumers and the production server with its security)
and `docs/openapi/<service>.json` from each service's `create_app().openapi()`. `alliance docs
check` fails when the committed documents differ from what the code generates, so the contracts
partners read cannot drift silently.

Documents describe the default deployment: generation ignores `ALLIANCE_*` variables of the
calling shell (a topic prefix or a broker address must not leak into a published contract).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from shared import channels

SERVICES: tuple[str, ...] = ("intake", "scoring", "alerts", "reporting")
KINDS: tuple[str, ...] = ("asyncapi", "openapi")
DEFAULT_DOCS_DIR = Path(__file__).resolve().parents[1] / "docs"

app = typer.Typer(help="Contract documents (AsyncAPI, OpenAPI) generated from the code.", no_args_is_help=True)


def implemented_services() -> list[str]:
    """Services whose `services/<name>/app.py` exists."""
    return [s for s in SERVICES if importlib.util.find_spec(f"services.{s}.app") is not None]


@contextlib.contextmanager
def default_environment() -> Iterator[None]:
    """Hide `ALLIANCE_*` variables while building apps, so documents show the defaults."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("ALLIANCE_")}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


# What a consumer of each topic reads (logical names), owned by the kernel. Every service consumes
# through the generic `shared.kafka.subscribe_batch`, which decodes records itself, so FastStream
# sees no payload type for a subscriber: the document gets it from here.
TOPIC_EVENTS: dict[str, tuple[type[BaseModel], ...]] = channels.TOPIC_EVENTS

# FastStream names the one server of a broker `development` (the local stack). Production is the
# deployment's cluster (deploy/k8s/config.yaml): TLS and SASL/SCRAM-SHA-512, where partners get a
# user of their own (docs/partners.md, Option 1).
SASL_SCHEME = "saslScramSha512"
PRODUCTION_SERVER: dict[str, Any] = {
    "host": "{bootstrap}",
    "protocol": "kafka-secure",
    "description": "The deployment's Kafka cluster: TLS on the wire and SASL/SCRAM-SHA-512 authentication "
                   "(`security_protocol=SASL_SSL`). The operator gives you the bootstrap brokers, the CA "
                   "certificate, a user with read access to the topics and a consumer group of your own "
                   "(`partner-<name>`). A consumer sees every tenant's events: see docs/partners.md.",
    "variables": {"bootstrap": {"default": "kafka-0.example.org:9094",
                                "description": "the cluster's bootstrap brokers (`host:port`), from the operator"}},
    "security": [{"$ref": f"#/components/securitySchemes/{SASL_SCHEME}"}],
}
SECURITY_SCHEMES: dict[str, Any] = {
    SASL_SCHEME: {"type": "scramSha512",
                  "description": "a SASL/SCRAM-SHA-512 user and password issued by the operator, over TLS"},
}
DEVELOPMENT_DESCRIPTION = "The local stack (`alliance run`): plaintext, no authentication."


def asyncapi_document(service: str) -> dict[str, Any]:
    """The AsyncAPI document of one service: what `faststream docs gen` builds, completed."""
    with default_environment():
        module = importlib.import_module(f"services.{service}.app")
        stream_app = module.asyncapi_app()
    schema: dict[str, Any] = stream_app.schema.to_specification().to_jsonable()
    return complete_asyncapi(schema)


def complete_asyncapi(document: dict[str, Any]) -> dict[str, Any]:
    """`document` (FastStream's) with each receive operation's payload taken from the events its topic
    carries (`TOPIC_EVENTS`), and the production server with its security next to the local one."""
    doc = copy.deepcopy(document)
    for operation in doc.get("operations", {}).values():
        if operation.get("action") == "receive":
            _receive_payload(doc, operation)
    doc["servers"]["development"].setdefault("description", DEVELOPMENT_DESCRIPTION)
    doc["servers"]["production"] = PRODUCTION_SERVER
    doc.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    for channel in doc.get("channels", {}).values():
        if "servers" in channel:
            channel["servers"].append({"$ref": "#/servers/production"})
    return doc


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    """The object a local `$ref` ("#/a/b") points at."""
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _receive_payload(doc: dict[str, Any], operation: dict[str, Any]) -> None:
    topic = _resolve(doc, operation["channel"]["$ref"])["address"]
    models = TOPIC_EVENTS.get(topic)
    if models is None:
        raise ValueError(f"{topic}: consumed, but shared/channels.py TOPIC_EVENTS does not say which events it "
                         "carries, so its payload cannot be documented")
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        for name, schema in _model_schemas(model).items():
            if schemas.setdefault(name, schema) != schema:
                raise ValueError(f"two different schemas are named {name}")
    refs = [{"$ref": f"#/components/schemas/{model.__name__}"} for model in models]
    for message_ref in operation["messages"]:
        message = _resolve(doc, message_ref["$ref"])
        if "$ref" in message:  # the channel's message is a reference to components/messages
            message = _resolve(doc, message["$ref"])
        placeholder = message.get("payload", {}).get("$ref")
        # FastStream's stand-in for an untyped handler: a schema holding only a title (one for all
        # the topics of a subscriber of several: removed with the first).
        stand_in = None if placeholder is None else placeholder.rsplit("/", 1)[1]
        if stand_in is not None and stand_in in schemas and set(schemas[stand_in]) <= {"title"}:
            del schemas[stand_in]
        message["payload"] = refs[0] if len(refs) == 1 else {"anyOf": refs}


def _model_schemas(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of `model` and of the models it refers to, by name, as FastStream lays them out
    under components/schemas."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    found: dict[str, Any] = schema.pop("$defs", {})
    found[model.__name__] = schema
    return found


def openapi_document(service: str) -> dict[str, Any] | None:
    """The OpenAPI document of one service's HTTP API (None if it has no `create_app`)."""
    with default_environment():
        module = importlib.import_module(f"services.{service}.app")
        create_app = getattr(module, "create_app", None)
        if create_app is None:
            return None
        # Never started, so nothing to close: connections open only in the app's lifespan.
        api = create_app()
    document: dict[str, Any] = api.openapi()
    return document


@dataclass(frozen=True)
class Document:
    """One generated contract document and where it is committed."""

    kind: str
    service: str
    content: dict[str, Any]

    def path(self, docs_dir: Path) -> Path:
        return docs_dir / self.kind / f"{self.service}.json"

    def text(self) -> str:
        # `faststream docs gen`'s indent, plus a final newline; keys sorted, because the generator's
        # channel order changes from run to run and every regeneration would otherwise rewrite
        # the partner-facing documents.
        return json.dumps(self.content, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def generate(services: list[str] | None = None) -> list[Document]:
    """Every contract document the code defines for `services` (default: all implemented)."""
    docs: list[Document] = []
    for service in services if services is not None else implemented_services():
        docs.append(Document("asyncapi", service, asyncapi_document(service)))
        openapi = openapi_document(service)
        if openapi is not None:
            docs.append(Document("openapi", service, openapi))
    return docs


def write(docs: list[Document], docs_dir: Path) -> list[Path]:
    """Write the documents; returns the paths written."""
    written = []
    for doc in docs:
        path = doc.path(docs_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc.text(), encoding="utf-8")
        written.append(path)
    return written


def committed(docs_dir: Path) -> dict[Path, dict[str, Any]]:
    """Every committed contract document under `docs_dir`."""
    found: dict[Path, dict[str, Any]] = {}
    for kind in KINDS:
        for path in sorted((docs_dir / kind).glob("*.json")):
            found[path] = json.loads(path.read_text(encoding="utf-8"))
    return found


def drift(docs: list[Document], docs_dir: Path) -> list[str]:
    """How the committed documents differ from `docs` (empty when they match).

    Compares parsed JSON, so formatting does not count; a committed document that the code no
    longer generates counts as drift too.
    """
    on_disk = committed(docs_dir)
    problems: list[str] = []
    expected = {doc.path(docs_dir): doc for doc in docs}
    for path, doc in expected.items():
        if path not in on_disk:
            problems.append(f"{path}: missing (run `alliance docs gen`)")
        elif on_disk[path] != doc.content:
            problems.append(f"{path}: differs from the code ({_first_difference(on_disk[path], doc.content)})")
    for path in on_disk:
        if path not in expected:
            problems.append(f"{path}: committed but no longer generated by the code")
    return problems


def _first_difference(old: Any, new: Any, where: str = "$") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if key not in old:
                return f"{where}.{key} added"
            if key not in new:
                return f"{where}.{key} removed"
            if old[key] != new[key]:
                return _first_difference(old[key], new[key], f"{where}.{key}")
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    return f"{where} changed"


DocsDir = Annotated[Path, typer.Option("--docs-dir", help="where docs/asyncapi and docs/openapi live")]
Only = Annotated[list[str] | None, typer.Option("--service", help="only this service (repeatable)")]


@app.command("gen")
def gen_command(docs_dir: DocsDir = DEFAULT_DOCS_DIR, service: Only = None) -> None:
    """Write docs/asyncapi/<service>.json and docs/openapi/<service>.json from the code."""
    services = service or implemented_services()
    for path in write(generate(services), docs_dir):
        typer.echo(f"wrote {path}")
    missing = sorted(set(SERVICES) - set(implemented_services()))
    if missing:
        typer.echo(f"no app.py yet for: {', '.join(missing)}", err=True)


@app.command("check")
def check_command(docs_dir: DocsDir = DEFAULT_DOCS_DIR) -> None:
    """Exit 1 if the committed documents differ from what the code generates."""
    problems = drift(generate(), docs_dir)
    missing = sorted(set(SERVICES) - set(implemented_services()))
    problems += [f"services/{s}/app.py: missing, so its contracts cannot be generated" for s in missing]
    for p in problems:
        typer.echo(p, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo("contract documents match the code")


if __name__ == "__main__":
    app()
