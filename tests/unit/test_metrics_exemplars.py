"""Exemplars: with tracing on, a request's sample of `alliance_http_request_seconds` carries the trace
id of the request's span, and a delivered alert's `alliance_alert_to_delivered_seconds` sample the
trace its delivery continues, so Grafana links a latency panel to the trace (`shared.tracing.exemplar`).
Prometheus sees them only in the OpenMetrics exposition, which /metrics serves when asked for it."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from services.alerts.settings import AlertsSettings
from services.alerts.worker import DeliveryWorker
from shared import tracing
from shared.http import Runtime, service_api
from shared.mongo import Document
from shared.topics import Topics

# The registry is the process's: each test labels its requests with a service of its own, so an
# exemplar another test left on a bucket is not read as this test's.
TRACED, UNTRACED = "probe-exemplars-traced", "probe-exemplars-untraced"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def probe_app(service: str) -> FastAPI:
    app = service_api(Runtime(service), title="probe")

    @app.get("/v1/ping")
    async def ping() -> dict[str, str | None]:
        ids = tracing.log_ids()
        return {"trace_id": ids[0] if ids else None}

    return app


async def client(service: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=probe_app(service)), base_url="http://probe") as c:
        yield c


@pytest.fixture
async def traced_http() -> AsyncIterator[httpx.AsyncClient]:
    async for c in client(TRACED):
        yield c


@pytest.fixture
async def untraced_http() -> AsyncIterator[httpx.AsyncClient]:
    async for c in client(UNTRACED):
        yield c


def _tracing_on(monkeypatch: pytest.MonkeyPatch, provider: TracerProvider) -> None:
    # What `tracing.configure` does, without its OTLP exporter and without leaving a global provider
    # behind for the other tests (OpenTelemetry sets its global once per process; the attribute is
    # restored after the test).
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    monkeypatch.setitem(tracing._state, "enabled", True)


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    _tracing_on(monkeypatch, TracerProvider())
    yield


def exemplars(exposition: str, service: str) -> set[str]:
    """The trace ids of the exemplars on `service`'s /v1/ping request-duration buckets."""
    pattern = re.compile(r'^alliance_http_request_seconds_bucket\{[^}]*route="/v1/ping",service="' + re.escape(service)
                         + r'"\} \S+ # \{trace_id="([0-9a-f]{32})"\}', re.M)
    return set(pattern.findall(exposition))


async def test_a_request_sample_carries_the_requests_trace_id_in_the_openmetrics_exposition(
        traced: None, traced_http: httpx.AsyncClient) -> None:
    trace_id = (await traced_http.get("/v1/ping")).json()["trace_id"]
    scrape = await traced_http.get("/metrics", headers={"Accept": OPENMETRICS})
    assert scrape.headers["content-type"].startswith("application/openmetrics-text")
    assert trace_id is not None and exemplars(scrape.text, TRACED) == {trace_id}


async def test_the_classic_text_format_is_served_when_openmetrics_is_not_asked_for(
        traced: None, traced_http: httpx.AsyncClient) -> None:
    await traced_http.get("/v1/ping")
    scrape = await traced_http.get("/metrics")
    assert scrape.headers["content-type"].startswith("text/plain")
    assert 'route="/v1/ping"' in scrape.text and "# {" not in scrape.text


async def test_an_unsampled_trace_leaves_no_exemplar(monkeypatch: pytest.MonkeyPatch) -> None:
    _tracing_on(monkeypatch, TracerProvider(sampler=ALWAYS_OFF))
    with trace.get_tracer("probe").start_as_current_span("dropped"):
        assert tracing.exemplar() is None


async def test_with_tracing_off_a_sample_has_no_exemplar(untraced_http: httpx.AsyncClient) -> None:
    await untraced_http.get("/v1/ping")
    scrape = await untraced_http.get("/metrics", headers={"Accept": OPENMETRICS})
    assert f'route="/v1/ping",service="{UNTRACED}"' in scrape.text and not exemplars(scrape.text, UNTRACED)


def test_with_tracing_off_an_exemplar_costs_no_call_into_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_call() -> None:
        raise AssertionError("OpenTelemetry consulted while tracing is off")

    monkeypatch.setattr(trace, "get_current_span", no_call)
    assert tracing.exemplar() is None


class Answers200:
    async def send(self, d: Document) -> int:
        return 200


async def test_a_delivered_alerts_latency_sample_carries_the_trace_its_delivery_continues(
        monkeypatch: pytest.MonkeyPatch) -> None:
    provider = TracerProvider()
    _tracing_on(monkeypatch, provider)
    monkeypatch.setattr(tracing, "_TRACER", provider.get_tracer("alliance"))  # not cached in the proxy for later tests
    channel = "webhook-exemplar-probe"  # a label of this test's own on the process's registry
    worker = DeliveryWorker(None, {channel: Answers200()}, None, Topics(""), AlertsSettings())  # type: ignore[arg-type]
    submission_trace = "0af7651916cd43dd8448eb211c80319c"
    await worker._attempt({"_id": "d-1", "channel": channel, "claim": "c-1", "attempts": 0, "kind": "alert",
                           "origin_at": datetime.now(UTC), "traceparent": f"00-{submission_trace}-b7ad6b7169203331-01"})
    encode, _ = choose_encoder(OPENMETRICS)
    exposition = encode(REGISTRY).decode()
    pattern = re.compile(r'^alliance_alert_to_delivered_seconds_bucket\{channel="' + channel
                         + r'",[^}]*\} \S+ # \{trace_id="([0-9a-f]{32})"\}', re.M)
    assert set(pattern.findall(exposition)) == {submission_trace}
