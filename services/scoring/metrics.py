"""Scoring metrics (dead letters and consumer lag are shared ones, see shared/metrics.py).

Counted once per submission, when its outcome is first stored; a redelivery re-emits events
without counting them again.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from shared.metrics import batch_seconds, latency_seconds

SCORED = Counter("alliance_scored_total", "Sessions scored, by instrument.", ["instrument"])
DETERIORATION = Counter(
    "alliance_deterioration_total",
    "Deterioration alerts raised, by trigger (an alert with two triggers counts under both) and severity.",
    ["trigger", "severity"],
)
AUDITED = Counter("alliance_scoring_audited_total", "Submissions stored without scoring (YCSRS).", ["instrument"])
BATCH_SECONDS = batch_seconds("alliance_scoring_batch_seconds",
                              "Time to handle one batch of submissions: state read, scoring, state write, publish "
                              "and acks.")
PHASE_SECONDS = Histogram(
    "alliance_scoring_phase_seconds",
    "Time of each step of a batch: load (state, rules, index reads; once per batch), apply (the rules; per "
    "slice of records), save (one chunk's state write), index (registering a chunk's versions of the batch's "
    "submission ids), publish (one chunk's records, incl. acks). Chunks overlap (a chunk is applied while the "
    "one before it is written), so the sums can exceed the batch's time.",
    ["phase"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SUBMISSION_TO_SCORED = latency_seconds("alliance_submission_to_scored_seconds",
                                       "From intake's acceptance of a submission to its scoring.")
STATE_WRITES = Counter(
    "alliance_scoring_state_writes_total",
    "Series documents written; below one per scored session when a batch holds several sessions of a client.",
)
STATE_CONFLICTS = Counter(
    "alliance_scoring_state_conflicts_total",
    "State writes that lost to another scoring process (a partition moved mid-batch); retried.",
)
REEMITTED = Counter(
    "alliance_scoring_reemitted_total",
    "Submissions seen again (redelivery or duplicate) whose stored outcome was published again.",
)
ALERT_STATUS = Counter(
    "alliance_scoring_alert_status_total",
    "Alerts scoring ended: superseded (a later session was scored) or withdrawn (a correction cleared it).",
    ["status"],
)
