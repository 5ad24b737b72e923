"""Settings of the intake service (`ALLIANCE_INTAKE_*`)."""

from __future__ import annotations

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from pydantic_settings import BaseSettings, SettingsConfigDict


class IntakeSettings(BaseSettings):
    """Limits and timeouts of the intake API.

    The rate limit is per API key and counts *submissions* (`rate_burst` per window of
    `ceil(rate_burst / rate_per_second)` seconds, a sliding window shared by all replicas, see
    services/intake/ratelimit.py): a single post costs 1, a batch or CSV import costs its number
    of items (capped at the burst, so a batch larger than the burst is still admitted once nothing
    else counts). Submissions are what load the broker and every downstream consumer, so that is
    what the limit meters.
    """

    model_config = SettingsConfigDict(env_prefix="ALLIANCE_INTAKE_", extra="ignore")

    # The broker must acknowledge within this bound, else 503; the effective value is the
    # smaller of this and ALLIANCE_KAFKA_PUBLISH_TIMEOUT_SECONDS.
    publish_timeout_seconds: PositiveFloat = 3.0
    # Key look-ups hit MongoDB on a cache miss; a store that hangs must not hang the API.
    auth_timeout_seconds: PositiveFloat = 3.0
    key_cache_seconds: NonNegativeFloat = 30.0
    # Known keys cached at most (least recently used dropped first; unknown keys are never cached).
    key_cache_entries: PositiveInt = 10_000
    rate_per_second: PositiveFloat = 500.0
    rate_burst: float = Field(default=2000.0, ge=1)
    max_single_bytes: int = Field(default=64 * 1024, ge=1024)
    max_batch_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_batch_items: PositiveInt = 1000
    # A CSV row's cells together; a valid row needs a few hundred characters. Checked on each row
    # while parsing, so one huge row is refused without building it.
    max_csv_row_chars: int = Field(default=4096, ge=256)
    # How far in the future `administered_at` may lie (clock skew between tablets and us).
    max_future_seconds: NonNegativeFloat = 86_400.0
    # The producer's linger for intake (overrides ALLIANCE_KAFKA_LINGER_MS): every HTTP client waits
    # for the ack, so lingering only adds latency; records of concurrent requests still share a
    # produce request while one is in flight.
    linger_ms: NonNegativeInt = 0
    # Retry-After (seconds) sent with a 503 when the broker does not acknowledge.
    unavailable_retry_after_seconds: PositiveInt = 2
