"""schemathesis over the three HTTP APIs (issue 12, must show: 0 server errors and 0 contract failures).

Intake, alerts and reporting run as real processes (uvicorn) on the real broker and store of the
test kit. Every operation of each service's own OpenAPI document is called with generated requests,
valid ones and (for operations that take input) invalid ones, carrying a valid key of the role that
reaches the route's logic. Every answer must not be a 5xx, and must be one the document declares:
its status code, its content type and its body schema.

The number of examples is bounded (the whole module runs in about a minute); the partner-facing
documents (docs/openapi/*.json) are generated from the same code (`alliance docs gen`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared import auth
from tests.support.apps import HTTP_SERVICES, HttpService, build_app, client, new_key
from tests.support.services import Namespace, running
from tools.processes import ServiceProcess

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 12
# The role whose key gets furthest into each service's routes: intake's submissions need `submit`
# (its transfer route answers such a key 403, which it documents); alerts and reporting serve
# everything to a tenant-wide `admin` key.
ROLES: dict[HttpService, auth.Role] = {"intake": "submit", "alerts": "admin", "reporting": "admin"}


@pytest.fixture(scope="module")
def services(namespace_m: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    logs: Path = tmp_path_factory.mktemp("contract-logs")
    with running(list(HTTP_SERVICES), namespace_m, logs) as procs:
        yield procs


def operations(url: str) -> list[Any]:
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in api.get_all_operations()]  # type: ignore[union-attr]


def exercise(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> int:
    """Call `operation` with up to `EXAMPLES` generated requests of `mode`; how many were sent.
    Raises at the first failed check (hypothesis shrinks it to a minimal request first)."""
    calls = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()
    return calls


@pytest.mark.parametrize("service", HTTP_SERVICES)
async def test_no_generated_request_gets_a_server_error_or_an_undocumented_answer(
        service: HttpService, services: dict[str, ServiceProcess], namespace_m: Namespace) -> None:
    key = await new_key(namespace_m, ROLES[service])
    headers = {"Authorization": f"Bearer {key}"}
    ops = operations(services[service].url)
    assert any(op.path.startswith("/v1/") for op in ops)
    calls = 0
    failures: list[str] = []
    for op in ops:
        # Negative examples need an input to break (a body, a path or query parameter).
        takes_input = bool(op.body) or bool(op.path_parameters) or bool(op.query)
        for mode in [GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if takes_input else [])]:
            try:
                calls += exercise(op, mode, headers)
            except (Exception, FailureGroup) as exc:  # every operation is exercised; all failures are reported together
                failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {exc}")
    print(f"\n{service}: {len(ops)} operations, {calls} generated requests, {len(failures)} failed")
    assert failures == [], "\n\n".join(failures)
    assert calls >= len(ops)


async def test_a_json_body_that_is_not_utf8_gets_a_422_naming_the_body(namespace: Namespace) -> None:
    """Found by the run above: FastAPI answered it 400 "There was an error parsing the body", which no
    operation documents; every other malformed body is a 422 naming the field."""
    app = build_app("alerts", namespace)
    key = await new_key(namespace, "admin")
    async with client(app) as http:
        r = await http.put("/v1/escalation", content=b"\xff\xfe{", headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json() == {"errors": [{"field": "body", "message": "invalid JSON: the body must be UTF-8 encoded JSON"}]}
