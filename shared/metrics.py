"""Metrics shared by every service. Service-specific metrics live in each service's metrics.py.

Label values are bounded: service names, topic names, partition numbers, outcome enums.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

# One bucket set per kind of duration, so that kind reads alike in every service.
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # handling one consumed batch
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)  # from one stage to a later one
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)  # one request


def batch_seconds(name: str, documentation: str, labels: Sequence[str] = ()) -> Histogram:
    """A histogram of how long handling one batch took, on `BATCH_BUCKETS`."""
    return Histogram(name, documentation, labels, buckets=BATCH_BUCKETS)


def latency_seconds(name: str, documentation: str, labels: Sequence[str] = ()) -> Histogram:
    """A histogram of the time from one stage's event to a later stage, on `LATENCY_BUCKETS`."""
    return Histogram(name, documentation, labels, buckets=LATENCY_BUCKETS)


CONSUMER_LAG = Gauge(
    "alliance_consumer_lag_messages",
    "Records between the consumer group's committed offset and the partition's log end, for the partitions "
    "this process owns (measured from the broker every few seconds, also while batches fail).",
    ["service", "topic", "partition"],
)
CONSUMER_RECORDS = Counter(
    "alliance_consumer_records_total",
    "Records consumed, by outcome (processed or deadlettered).",
    ["service", "topic", "outcome"],
)
CONSUMER_BATCH_SECONDS = batch_seconds("alliance_consumer_batch_seconds",
                                       "Time to process one consumed batch, commit included.", ["service", "topic"])
CONSUMER_RETRIES = Counter(
    "alliance_consumer_batch_retries_total",
    "Batches retried after a transient failure (store or broker unavailable).",
    ["service", "topic"],
)
DEADLETTER = Counter(
    "alliance_deadletter_total",
    "Records sent to the dead-letter topic, by service and reason.",
    ["service", "reason"],
)
POISON_RECORDS = Counter(
    "alliance_consumer_poison_records_total",
    "Records that failed deterministically on their own (too large for the store, invalid, refused "
    "for good by the handler) and were dead-lettered so the rest of their batch could be committed.",
    ["service", "topic", "reason"],
)
READY = Gauge("alliance_ready", "1 when the service's dependencies answer (checked every few seconds by the "
              "runtime's monitor loop, and by each /readyz).", ["service"])
DEPENDENCY_UP = Gauge(
    "alliance_dependency_up",
    "1 when the dependency (kafka, mongodb) answered the service's last check, else 0.",
    ["service", "dependency"],
)
THROTTLED = Counter(
    "alliance_http_throttled_total",
    "Requests answered 429 in front of the routes, by limit: auth_failures (too many failed "
    "authentications from one peer) or key_rate (one API key past its request rate).",
    ["service", "limit"],
)

HTTP_REQUESTS = Counter(
    "alliance_http_requests_total",
    "HTTP requests by service, method, route template (`other` for paths no route matches) and status code.",
    ["service", "method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "alliance_http_request_seconds",
    "HTTP request duration by service, method and route template.",
    ["service", "method", "route"],
    buckets=REQUEST_BUCKETS,
)
EVENT_LOOP_LAG = Histogram(
    "alliance_event_loop_lag_seconds",
    "How late the service's event loop ran a timer: sampled every 0.1 s by the runtime (the time "
    "past a 0.1 s sleep). Every request, consumed batch and store reply of the process waits on "
    "this loop, so a lag of tens of ms adds that much to each of their steps; high when the process "
    "runs long callbacks or waits for a CPU (docs/operations.md).",
    ["service"],
    buckets=REQUEST_BUCKETS,
)
