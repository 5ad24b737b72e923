"""Metrics of the reporting service (default registry, bounded labels)."""

from __future__ import annotations

from prometheus_client import Counter

from shared.metrics import batch_seconds, latency_seconds

EVENTS = Counter(
    "alliance_reporting_events_total",
    "Events consumed by reporting, by outcome: applied (new session or alert fact), corrected (a newer "
    "revision replaced a session, or superseded another submission), duplicate (already there), stale "
    "(older than what is there), refused (its client's record is at its size cap; also counted as "
    "deadlettered), deadlettered (undecodable, invalid or refused).",
    ["outcome"],
)
APPLY_SECONDS = batch_seconds("alliance_reporting_apply_seconds",
                              "Time to apply one consumed batch to the read models (all generations written).")
SCORED_TO_VISIBLE = latency_seconds("alliance_scored_to_visible_seconds",
                                    "From a session's scored_at to its point being readable through the reporting API.")
DEAD_LETTERS = Counter(
    "alliance_reporting_dead_letters_total",
    "Dead letters read by reporting's rejection feed, by outcome: recorded (a rejected submission), "
    "ignored (not a submission: another source topic, or a payload that is not one), unparseable "
    "(not a dead letter at all; skipped).",
    ["outcome"],
)
SUBMISSION_WRITES = Counter(
    "alliance_reporting_submission_writes_total",
    "Parts of submission status documents written (scored, superseded, rejected; a part older "
    "than the stored one is not written).",
)
