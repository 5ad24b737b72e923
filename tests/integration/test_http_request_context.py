"""Correlation ids and HTTP metrics of every API, through real HTTP to the four service processes
(`shared.http.RequestContext`): each answers with the client's valid `X-Correlation-ID` or one of its
own, and counts each request in `alliance_http_requests_total` under its route template.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.services import Namespace, ServiceProcess, running

pytestmark = pytest.mark.asyncio(loop_scope="session")

SERVICES = ("intake", "scoring", "alerts", "reporting")
# A request each service answers without a key (401 for the APIs, scoring has only its ops routes),
# and the route template it is counted under.
PROBES: dict[str, tuple[str, str, str, str]] = {
    "intake": ("POST", "/v1/clients/p-ctx-1/transfer", "/v1/clients/{client_id}/transfer", "401"),
    "scoring": ("GET", "/healthz", "/healthz", "200"),
    "alerts": ("GET", "/v1/alerts/a-ctx-1", "/v1/alerts/{alert_id}", "401"),
    "reporting": ("GET", "/v1/submissions/s-ctx-1", "/v1/submissions/{submission_id}", "401"),
}


@pytest.fixture(scope="module")
def services(namespace_m: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    with running(list(SERVICES), namespace_m, tmp_path_factory.mktemp("context-logs")) as procs:
        yield procs


@pytest.fixture(scope="module")
async def http(services: dict[str, ServiceProcess]) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    clients = {name: httpx.AsyncClient(base_url=proc.url, timeout=30) for name, proc in services.items()}
    yield clients
    for c in clients.values():
        await c.aclose()


def requests_counted(text: str, service: str, method: str, route: str, status: str) -> float:
    family = next(f for f in text_string_to_metric_families(text) if f.name == "alliance_http_requests")
    return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels == {
        "service": service, "method": method, "route": route, "status": status})


@pytest.mark.parametrize("service", SERVICES)
async def test_a_valid_correlation_id_from_the_client_is_answered_back(
        http: dict[str, httpx.AsyncClient], service: str) -> None:
    cid = f"ctx-{service}.{uuid.uuid4().hex[:8]}"
    r = await http[service].get("/healthz", headers={"X-Correlation-ID": cid})
    assert r.status_code == 200 and r.headers["x-correlation-id"] == cid


@pytest.mark.parametrize("service", SERVICES)
async def test_without_a_valid_correlation_id_the_service_makes_one(
        http: dict[str, httpx.AsyncClient], service: str) -> None:
    plain = await http[service].get("/healthz")
    invalid = await http[service].get("/healthz", headers={"X-Correlation-ID": "no spaces allowed"})
    made = {plain.headers["x-correlation-id"], invalid.headers["x-correlation-id"]}
    assert len(made) == 2 and all(uuid.UUID(c) for c in made)


@pytest.mark.parametrize("service", SERVICES)
async def test_each_request_is_counted_under_its_route_template_and_status(
        http: dict[str, httpx.AsyncClient], service: str) -> None:
    method, path, route, status = PROBES[service]
    before = requests_counted((await http[service].get("/metrics")).text, service, method, route, status)
    assert str((await http[service].request(method, path)).status_code) == status
    text = (await http[service].get("/metrics")).text
    assert requests_counted(text, service, method, route, status) == before + 1
    if path != route:
        assert f'route="{path}"' not in text  # the concrete path never becomes a label
