"""Tracing with OpenTelemetry: one trace follows a submission from intake's `POST` to the webhook.

Off unless an OTLP endpoint is set in the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` keep it
off). Off, nothing is imported from the SDK, no span is made and the hot paths test one boolean
(`enabled()`); the W3C `traceparent` a record arrived with is still passed on to what it causes, so a
trace joins up across a service that does not export. On (`configure`, called by `shared.http.serve`
before the app is built), spans go through a batch span processor to the OTLP/HTTP (protobuf)
exporter, which reads the other `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*` variables itself; the sampler
is the SDK's (`OTEL_TRACES_SAMPLER`, parent-based always-on by default). The resource's
`service.name` is `alliance-<service>` whatever `OTEL_SERVICE_NAME` says (one environment is shared
by all four services); `OTEL_RESOURCE_ATTRIBUTES` adds to it.

What makes spans:
- HTTP: FastAPI's own telemetry (`shared.http.ServiceApp`), a server span per request continuing the
  caller's `traceparent`; the ops endpoints are left out.
- Kafka: `shared.kafka` (not FastStream's telemetry middleware, whose publish side injects the
  ambient context: a batch mixes records of many submissions, and each output must carry on the trace
  of the record that caused it). A consumed batch gets a `process` span linked to every record's
  context (`BatchTrace`), each record a `process` span continuing its own trace (linked to the batch
  span), and the record's outputs carry that span's `traceparent` in their headers (`OutboundRecord`).
  Publishing is a `publish` span.
- MongoDB: the PyMongo instrumentation (a command listener, which PyMongo's async API calls as the
  sync one does), statements not captured (they hold client data).
- Outgoing HTTP: the httpx instrumentation, which also puts `traceparent` on the request: alerts'
  delivery span continues the trace stored with the delivery, so the webhook a partner receives
  carries the submission's trace id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.settings import TracingSettings

log = logging.getLogger("alliance.tracing")

TRACEPARENT = "traceparent"
# The SDK keeps at most 128 links per span (OTEL_SPAN_LINK_COUNT_LIMIT); a batch of 500 records
# links to its first distinct 128 contexts.
MAX_LINKS = 128

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER = trace.get_tracer("alliance")  # a proxy: it follows the provider `configure` sets
_state: dict[str, Any] = {"enabled": False, "provider": None}


def enabled() -> bool:
    """Whether spans are made and exported (an exporter is configured)."""
    return bool(_state["enabled"])


def service_name(service: str) -> str:
    """The `service.name` of a service's spans (also its Prometheus job, `alliance-<service>`)."""
    return f"alliance-{service}"


def configure(service: str, settings: TracingSettings | None = None) -> bool:
    """Export this process's spans when the environment names an OTLP endpoint; returns whether it
    does. Must run before the MongoDB clients are made (PyMongo copies its listeners at creation)."""
    settings = settings or TracingSettings()
    if enabled() or not settings.exporting:
        return enabled()
    # Imported here: a process that does not export never loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.pymongo import PymongoInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if settings.exporter_otlp_protocol not in ("", "http/protobuf"):
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported: exporting with http/protobuf",
                    settings.exporter_otlp_protocol)
    resource = Resource.create({"service.name": service_name(service), "service.namespace": "alliance"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    PymongoInstrumentor().instrument(tracer_provider=provider)
    _state.update(enabled=True, provider=provider)
    log.info("tracing: exporting spans over OTLP/HTTP")
    return True


def shutdown() -> None:
    """Export what is still buffered (on exit)."""
    provider = _state["provider"]
    if provider is not None:
        provider.shutdown()


def context_of(traceparent: str | None) -> Context | None:
    """The context a W3C `traceparent` names, or None when it is missing or malformed."""
    if not traceparent:
        return None
    ctx = _PROPAGATOR.extract({TRACEPARENT: traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def traceparent_of(span: Span) -> str | None:
    """The W3C `traceparent` of `span` (None for an invalid one). Formatted here rather than through
    the propagator: a batch of 500 records asks 500 times."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def current_traceparent() -> str | None:
    """The `traceparent` of the current span, when tracing is on and a span is current."""
    if not enabled():
        return None
    return traceparent_of(trace.get_current_span())


def exemplar(span: Span | None = None) -> dict[str, str] | None:
    """The exemplar that links a histogram sample to its trace (`observe(v, exemplar=...)`): the trace
    id of `span`, else of the current span, when tracing is on and that span is sampled (an unsampled
    trace is nowhere to be found). Off, None without a call into OpenTelemetry: an observation then
    costs one boolean test more. Prometheus sees exemplars only in the OpenMetrics exposition
    (`shared.http`'s /metrics negotiates it) and keeps them with `--enable-feature=exemplar-storage`."""
    if not enabled():
        return None
    ctx = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return {"trace_id": format(ctx.trace_id, "032x")}


def log_ids() -> tuple[str, str] | None:
    """The current trace and span ids (hex), for log records; None outside any span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


@contextmanager
def _current(name: str, kind: SpanKind, parent: Context | None, attributes: Mapping[str, Any]) -> Iterator[Span]:
    with _TRACER.start_as_current_span(name, context=parent, kind=kind, attributes=attributes) as span:
        yield span


def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, traceparent: str | None = None,
         attributes: Mapping[str, Any] | None = None) -> Any:
    """A context manager: a current span named `name` (a child of `traceparent` when given, else of
    the current span), or nothing at all when tracing is off. Yields the span or None."""
    if not enabled():
        return nullcontext()
    return _current(name, kind, context_of(traceparent), attributes or {})


class BatchTrace:
    """The spans of one consumed batch (made only when tracing is on).

    `batch`: `<topic> process`, a root linked to the contexts the records arrived with. One
    `<topic> process` span per record (its own topic) continues that record's own trace and links to
    the batch span;
    `traceparents[i]` is the i-th record's, which its outputs carry. All end with the batch: committed
    (ok) or rewound (error)."""

    def __init__(self, service: str, topic: str, group: str, headers: Sequence[Mapping[str, str]],
                 tracer: trace.Tracer = _TRACER, topics: Sequence[str] | None = None) -> None:
        # `topics`: each record's, for a consumer of several (`topic` then names the batch's, e.g.
        # "a, b"); without it every record is on `topic`.
        attributes = {"messaging.system": "kafka", "messaging.destination.name": topic,
                      "messaging.consumer.group.name": group, "messaging.operation.type": "process",
                      "alliance.service": service}
        parents = [context_of(h.get(TRACEPARENT)) for h in headers]
        links: dict[int, Link] = {}
        for ctx in parents:
            if ctx is not None and len(links) < MAX_LINKS:
                sc = trace.get_current_span(ctx).get_span_context()
                links.setdefault(sc.span_id, Link(sc))
        self.batch = tracer.start_span(f"{topic} process", context=Context(), kind=SpanKind.CONSUMER,
                                        links=list(links.values()),
                                        attributes={**attributes, "messaging.batch.message_count": len(headers)})
        # The record spans name their topic only: the batch span holds the rest, once.
        to_batch = [Link(self.batch.get_span_context())]
        self.records = [tracer.start_span(f"{on} process", context=ctx or Context(), kind=SpanKind.CONSUMER,
                                          links=to_batch, attributes={"messaging.destination.name": on})
                        for ctx, on in zip(parents, topics or [topic] * len(parents), strict=True)]
        self.traceparents = [traceparent_of(s) for s in self.records]
        self.ended = False

    def retrying(self, attempt: int, failure: str) -> None:
        """A failed attempt (`failure` names the exception and codes only: no document, no value)."""
        self.batch.add_event("batch failed", {"alliance.attempt": attempt, "alliance.failure": failure})

    def end(self, ok: bool, description: str = "") -> None:
        """End every span (once: later calls do nothing)."""
        if self.ended:
            return
        self.ended = True
        for s in (*self.records, self.batch):
            if not ok:
                s.set_status(Status(StatusCode.ERROR, description))
            s.end()

    def current(self) -> Any:
        """A context manager making the batch span current (store spans are its children)."""
        return trace.use_span(self.batch, end_on_exit=False)
