"""Tracing end to end: with an OTLP endpoint set, one deteriorating submission is one trace, from
intake's `POST` through scoring, reporting and alerts to the webhook, whose request carries that trace
in its `traceparent`. The four service processes export to an in-process OTLP/HTTP receiver."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.support.otlp import ReceivedSpan, TraceReceiver, trace_receiver
from tests.support.services import Namespace, ServiceProcess, running
from tests.support.wait import eventually
from tools.receiver import WebhookReceiver

pytestmark = pytest.mark.asyncio(loop_scope="session")

SERVICES = ("intake", "scoring", "alerts", "reporting")
T = TypeVar("T")


@pytest.fixture(scope="module")
def otlp() -> Iterator[TraceReceiver]:
    with trace_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def services(namespace_m: Namespace, otlp: TraceReceiver,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    # A short export delay keeps the test short (the default is 5 s).
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with running(list(SERVICES), namespace_m, tmp_path_factory.mktemp("trace-logs"), extra_env=env) as procs:
        yield procs


def _whole_trace(otlp: TraceReceiver, trace_id: str, webhook_span_id: str) -> list[ReceivedSpan] | None:
    """The trace once every service's spans and the webhook's sending spans have been exported (each
    process exports on its own schedule, a span when it ends: the delivery span after its request)."""
    spans = otlp.trace(trace_id)
    by_id = {s.span_id: s for s in spans}
    sender = by_id.get(webhook_span_id)
    complete = ({s.service for s in spans} >= {f"alliance-{name}" for name in SERVICES}
                and sender is not None and sender.parent_span_id in by_id
                and any(s.parent_span_id == "" for s in spans))
    return spans if complete else None


def _tree(spans: list[ReceivedSpan]) -> str:
    """The trace as an indented tree (service, span name), for the artifacts."""
    children: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        children.setdefault(s.parent_span_id, []).append(s)
    ids = {s.span_id for s in spans}
    lines: list[str] = []

    def walk(s: ReceivedSpan, depth: int) -> None:
        lines.append(f"{'  ' * depth}{s.service}: {s.name}")
        for child in children.get(s.span_id, []):
            walk(child, depth + 1)

    for root in (s for s in spans if s.parent_span_id not in ids):
        walk(root, 0)
    return "\n".join(lines) + "\n"


async def test_a_deteriorating_submission_is_one_trace_from_intake_to_the_webhook(
        services: dict[str, ServiceProcess], keys: dict[str, str], receiver: WebhookReceiver, otlp: TraceReceiver,
        artifacts: Path) -> None:
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    async with httpx.AsyncClient(timeout=15) as http:
        secret = await http.post(f"{services['alerts'].url}/v1/webhook-secret", headers=admin)
        assert secret.status_code in (200, 201), secret.text
        put = await http.put(f"{services['alerts'].url}/v1/clinicians/c-17", headers=admin, json={
            "site_id": "north", "email": "c17@clinic.example", "webhook_url": receiver.url})
        assert put.status_code in (200, 201), put.text
        posted = await http.post(f"{services['intake'].url}/v1/submissions",
                                 headers={"Authorization": f"Bearer {keys['submit']}"}, json={
            "client_id": "client-traced", "clinician_id": "c-17", "site_id": "north", "instrument": "SRS",
            "session_number": 1, "administered_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
            # 20 of 40: below the cutoff, so scoring raises an alert and alerts calls the webhook.
            "items": {"relationship": 5.0, "goals": 5.0, "approach": 5.0, "overall": 5.0}})
        assert posted.status_code == 202, posted.text

    delivered = (await eventually(lambda: _now(receiver.successes()), timeout=60))[0]
    _, trace_id, parent_span_id, _ = delivered.headers["traceparent"].split("-")

    spans = await eventually(lambda: _now(_whole_trace(otlp, trace_id, parent_span_id)), timeout=30)
    (artifacts / "e2e-trace.txt").write_text(_tree(spans))
    by_id = {s.span_id: s for s in spans}
    # It starts at intake's request ...
    roots = [s for s in spans if s.parent_span_id == "" or s.parent_span_id not in by_id]
    assert [(r.service, r.kind) for r in roots] == [("alliance-intake", Span.SPAN_KIND_SERVER)], roots
    # ... and ends at the webhook request: the span that sent it is alerts' HTTP client span, inside
    # the delivery attempt.
    sender = by_id[parent_span_id]
    assert (sender.service, sender.kind) == ("alliance-alerts", Span.SPAN_KIND_CLIENT)
    assert by_id[sender.parent_span_id].name == "deliver webhook"
    # Each consumer processed the submission's records within it.
    assert {s.service for s in spans if s.name.endswith(" process")} >= {
        "alliance-scoring", "alliance-reporting", "alliance-alerts"}


async def _now(value: T) -> T:
    return value
