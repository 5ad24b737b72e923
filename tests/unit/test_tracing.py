"""Tracing (shared/tracing.py): off unless an OTLP endpoint is set; a consumed batch's spans continue
each record's own trace; records and log lines carry the trace context."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import tracing
from shared.kafka import InboundRecord, OutboundRecord
from shared.logs import JsonFormatter
from shared.settings import TracingSettings

PRODUCER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER = "00-1bf7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01"


@pytest.fixture
def exported() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_tracing_is_off_without_an_otlp_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert TracingSettings().exporting is False
    assert tracing.configure("intake") is False and tracing.enabled() is False


@pytest.mark.parametrize("endpoint", ["exporter_otlp_endpoint", "exporter_otlp_traces_endpoint"])
def test_either_standard_endpoint_variable_turns_exporting_on(endpoint: str) -> None:
    assert TracingSettings(**{endpoint: "http://collector:4318"}).exporting is True


@pytest.mark.parametrize("off", [{"traces_exporter": "none"}, {"sdk_disabled": True}])
def test_the_standard_off_switches_win_over_an_endpoint(off: dict[str, object]) -> None:
    assert TracingSettings(exporter_otlp_endpoint="http://collector:4318", **off).exporting is False  # type: ignore[arg-type]


def test_spans_are_not_made_while_tracing_is_off() -> None:
    with tracing.span("deliver webhook", traceparent=PRODUCER) as span:
        assert span is None
    assert tracing.current_traceparent() is None


def _record(traceparent: str | None) -> InboundRecord:
    headers = {"traceparent": traceparent} if traceparent else {}
    return InboundRecord("t", 0, 1, b"k", b"{}", headers, 0)


def test_a_record_passes_on_the_context_it_arrived_with_when_its_service_does_not_trace() -> None:
    assert _record(PRODUCER).traceparent == PRODUCER
    assert _record(None).traceparent is None


def test_an_outbound_record_carries_its_trace_context_in_the_traceparent_header() -> None:
    assert OutboundRecord("t", b"{}", traceparent=PRODUCER).all_headers()["traceparent"] == PRODUCER
    assert "traceparent" not in OutboundRecord("t", b"{}").all_headers()


def test_each_record_of_a_batch_continues_its_own_trace(exported: tuple[trace.Tracer, InMemorySpanExporter]) -> None:
    tracer, exporter = exported
    batch = tracing.BatchTrace("scoring", "srs.submitted.v1", "g", [{"traceparent": PRODUCER},
                                                                     {"traceparent": OTHER}, {}], tracer)
    batch.end(True)
    trace_ids = [tp.split("-")[1] if tp else None for tp in batch.traceparents]
    assert trace_ids[:2] == [PRODUCER.split("-")[1], OTHER.split("-")[1]]
    assert trace_ids[2] is not None  # a record without a context starts a trace of its own
    parents = {format(s.parent.span_id, "016x") for s in exporter.get_finished_spans() if s.parent is not None}
    assert parents == {PRODUCER.split("-")[2], OTHER.split("-")[2]}


def test_a_batch_span_links_to_the_context_of_each_record(exported: tuple[trace.Tracer, InMemorySpanExporter]) -> None:
    tracer, exporter = exported
    batch = tracing.BatchTrace("scoring", "srs.submitted.v1", "g", [{"traceparent": PRODUCER},
                                                                     {"traceparent": OTHER}], tracer)
    batch.end(True)
    [span] = [s for s in exporter.get_finished_spans() if s.context.span_id == batch.batch.get_span_context().span_id]
    assert span.parent is None
    assert {format(link.context.trace_id, "032x") for link in span.links} == {
        PRODUCER.split("-")[1], OTHER.split("-")[1]}


def test_a_rewound_batch_ends_its_spans_as_errors_once(exported: tuple[trace.Tracer, InMemorySpanExporter]) -> None:
    tracer, exporter = exported
    batch = tracing.BatchTrace("scoring", "srs.submitted.v1", "g", [{"traceparent": PRODUCER}], tracer)
    batch.end(False, "rewound for redelivery")
    batch.end(False, "interrupted")
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    assert {s.status.description for s in spans} == {"rewound for redelivery"}


def _log_line() -> dict[str, str]:
    record = logging.LogRecord("alliance.test", logging.INFO, __file__, 1, "hello", None, None)
    doc: dict[str, str] = json.loads(JsonFormatter("scoring").format(record))
    return doc


def test_a_log_line_written_in_a_span_carries_its_trace_and_span_ids(
        exported: tuple[trace.Tracer, InMemorySpanExporter]) -> None:
    tracer, _ = exported
    with tracer.start_as_current_span("work") as span:
        doc = _log_line()
    ctx = span.get_span_context()
    assert (doc["trace_id"], doc["span_id"]) == (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))


def test_a_log_line_outside_any_span_has_no_trace_ids() -> None:
    assert not {"trace_id", "span_id"} & _log_line().keys()


def test_each_record_span_names_its_own_topic_in_a_batch_of_several(
        exported: tuple[trace.Tracer, InMemorySpanExporter]) -> None:
    tracer, exporter = exported
    batch = tracing.BatchTrace("reporting", "a, b", "g", [{"traceparent": PRODUCER}, {"traceparent": OTHER}], tracer,
                               topics=["b", "a"])
    batch.end(True)
    names = {s.context.span_id: s.name for s in exporter.get_finished_spans()}
    assert [names[s.get_span_context().span_id] for s in batch.records] == ["b process", "a process"]
    assert names[batch.batch.get_span_context().span_id] == "a, b process"
