"""Scoring's own settings (`ALLIANCE_SCORING_*`); Kafka and MongoDB come from shared.settings."""

from __future__ import annotations

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt
from pydantic_settings import BaseSettings, SettingsConfigDict


class ScoringSettings(BaseSettings):
    """Tuning knobs of the scoring consumer."""

    model_config = SettingsConfigDict(env_prefix="ALLIANCE_SCORING_", extra="ignore")

    # A rules change (`alliance tenants set-rules`) applies within this many seconds.
    rules_cache_seconds: NonNegativeFloat = 5.0
    # Records per consumed batch; None takes ALLIANCE_KAFKA_BATCH_MAX_RECORDS. Larger batches
    # mean fewer store round trips (the store is the slower of the two limits).
    max_records: int | None = Field(default=None, ge=1)
    # Clients kept in memory after a write, so hot clients are not re-read from the store each
    # batch, bounded by the submissions they hold (0 turns the cache off). About 2 KB each with
    # the view kept beside the record (measured with tracemalloc: 1.1 KB for the record, 0.9 KB
    # for the view): 100,000 is ~200 MB, within the k8s limit of 512 MiB.
    state_cache_sessions: NonNegativeInt = 100_000
    # Series per state write: the events of one chunk are published while the next is written.
    save_chunk: PositiveInt = 128
    # How often a batch re-reads state after losing a write race before the batch is retried.
    conflict_attempts: PositiveInt = 5
    # The collector's first-generation threshold for the scoring process (0: Python's default,
    # 700). The state cache keeps many small long-lived objects (each client's record and the
    # view kept with it), and with the default every few batches walk them all. Measured by
    # `python -m tools.bench.scoring --apply-only` (CPU per event, default vs this).
    gc_young_threshold: NonNegativeInt = 10_000
