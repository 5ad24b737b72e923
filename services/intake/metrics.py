"""Metrics of the intake service (default registry, served on /metrics).

Label values are bounded: `outcome` and `reason` come from the fixed sets below. HTTP requests are
counted for every service by `shared.http.RequestContext` (`alliance_http_requests_total`).
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter, Histogram

from shared.metrics import REQUEST_BUCKETS

Outcome = Literal["accepted", "rejected", "unavailable"]
Reason = Literal[
    "ok",                  # accepted
    "invalid",             # a validation rule (422, or a rejected batch item)
    "site",                # a site-bound key named another site
    "unauthorized",        # 401
    "forbidden",           # 403: the key's role does not allow submitting
    "too_large",           # 413
    "media_type",          # 415
    "rate_limited",        # 429
    "not_started",         # 503: the broker has not been connected yet
    "broker_timeout",      # 503: no acknowledgement within the bound
    "broker_error",        # 503: the producer failed
    "keystore",            # 503: API keys could not be looked up
]

SUBMISSIONS = Counter(
    "alliance_intake_submissions_total",
    "Submissions by outcome and reason. Requests refused before their body was read count once.",
    ["outcome", "reason"],
)
PUBLISH_SECONDS = Histogram(
    "alliance_intake_publish_seconds",
    "From handing a request's records to the producer until the broker acknowledged all of them.",
    ["endpoint"],
    buckets=REQUEST_BUCKETS,
)
BATCH_SIZE = Histogram(
    "alliance_intake_batch_size",
    "Items per batch or CSV request.",
    ["endpoint"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
TRANSFERS = Counter(
    "alliance_intake_client_transfers_total",
    "Client transfer requests by outcome and reason (same reasons as submissions).",
    ["outcome", "reason"],
)
def count(outcome: Outcome, reason: Reason, n: int = 1) -> None:
    """Count `n` submissions."""
    if n > 0:
        SUBMISSIONS.labels(outcome, reason).inc(n)


def count_transfers(outcome: Outcome, reason: Reason, n: int = 1) -> None:
    """Count `n` client transfer requests."""
    if n > 0:
        TRANSFERS.labels(outcome, reason).inc(n)
