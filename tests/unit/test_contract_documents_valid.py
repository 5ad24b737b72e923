"""The generated contract documents are valid against their specifications' schemas: AsyncAPI 3.0
(the official JSON Schema, npm `@asyncapi/specs`) and OpenAPI 3.1 (npm
`@seriousme/openapi-schema-validator`), both pinned in tests/node. What the generator adds to
FastStream's and FastAPI's output (servers, security schemes, webhooks) is checked with the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.support.node import NODE_DIR, NODE_MODULES, run_node

DOCS = Path(__file__).resolve().parents[2] / "docs"
ASYNCAPI = sorted((DOCS / "asyncapi").glob("*.json"))
OPENAPI = sorted((DOCS / "openapi").glob("*.json"))


@pytest.fixture(scope="module")
def asyncapi_3() -> jsonschema.Draft7Validator:
    path = NODE_MODULES / "@asyncapi" / "specs" / "schemas" / "3.0.0-without-$id.json"
    assert path.is_file(), "the npm packages of tests/node are not installed: run scripts/bootstrap"
    return jsonschema.Draft7Validator(json.loads(path.read_text()))


def openapi_problems(paths: list[Path]) -> dict[str, Any]:
    """Each document's validation errors (None when valid)."""
    results: dict[str, Any] = json.loads(run_node(NODE_DIR / "validate-openapi.mjs", *map(str, paths)))
    return results


@pytest.mark.parametrize("path", ASYNCAPI, ids=lambda p: p.stem)
def test_every_asyncapi_document_is_valid_asyncapi_3(path: Path, asyncapi_3: jsonschema.Draft7Validator) -> None:
    document = json.loads(path.read_text())
    assert document["asyncapi"] == "3.0.0"
    assert [f"{list(e.absolute_path)}: {e.message[:200]}" for e in asyncapi_3.iter_errors(document)] == []


def test_the_asyncapi_schema_refuses_a_server_without_a_host(asyncapi_3: jsonschema.Draft7Validator) -> None:
    document = json.loads(ASYNCAPI[0].read_text())
    del document["servers"]["production"]["host"]
    assert list(asyncapi_3.iter_errors(document))


def test_every_openapi_document_is_valid_openapi_3_1() -> None:
    assert {json.loads(p.read_text())["openapi"] for p in OPENAPI} == {"3.1.0"}
    assert openapi_problems(OPENAPI) == {str(p): None for p in OPENAPI}


def test_the_openapi_validator_refuses_a_document_without_a_title(tmp_path: Path) -> None:
    broken = json.loads(OPENAPI[0].read_text())
    del broken["info"]["title"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    assert openapi_problems([path])[str(path)]
