"""Settings of the reporting service (`ALLIANCE_REPORTING_*`)."""

from __future__ import annotations

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from pydantic_settings import BaseSettings, SettingsConfigDict


class ReportingSettings(BaseSettings):
    """What the reporting service reads from the environment besides Kafka, MongoDB and HTTP."""

    model_config = SettingsConfigDict(env_prefix="ALLIANCE_REPORTING_", extra="ignore")

    # How long the API and the consumers trust their copy of the active-generation pointer. A
    # rebuild waits a few of these after announcing its generation, so every live consumer is
    # writing into it before the replay's end offsets are taken.
    generation_cache_seconds: float = Field(default=1.0, gt=0, le=30)
    # Network indices are not real-time numbers; one aggregation per scope and window is enough.
    summary_cache_seconds: NonNegativeFloat = 15.0
    # A tenant's summary and trends read its roll-up (one document) instead of one counter
    # document per site, clinician and instrument. A process that consumes refreshes the roll-ups
    # of the tenants it wrote every `rollup_refresh_seconds`; a roll-up that misses counter writes
    # is served until it is `rollup_max_age_seconds` old (as old as the summary cache lets a
    # summary be), after that the read sums the counters itself. 0: exact reads only.
    rollup_refresh_seconds: PositiveFloat = 5.0
    rollup_max_age_seconds: NonNegativeFloat = 15.0
    # Browser/proxy caching of per-key JSON answers (`Cache-Control: private, max-age=...`).
    trajectory_max_age_seconds: NonNegativeInt = 5
    summary_max_age_seconds: NonNegativeInt = 30
    # Declining, below cutoff and at risk come from scoring's flags; there is no threshold here.
    page_size: int = Field(default=50, ge=1, le=500)
    max_page_size: int = Field(default=200, ge=1, le=1000)
    batch_max_records: PositiveInt = 500
    rebuild_batch_records: PositiveInt = 2000
    # Write-through cache of record documents (saves the read before each write). Entries
    # are a few KB each; a rebuild's is bounded by the memory its records take (a record of 5
    # sessions ~9 KB: 16 MiB ~ 1,900 of them), so that its footprint does not grow with the
    # network (a record it no longer holds is read again). A rebuild holds its clients' sessions
    # until it writes each record once (`rebuild_records_mib`), so it rarely meets a record
    # again: at 20,000 clients, 64 MiB here peaked at 348 MiB and 16 at 284, as fast. Read in
    # step (`rebuild_skew_seconds`), a 50,000-client rebuild met 0-6 records again, so 4 is plenty.
    cache_entries: NonNegativeInt = 20_000
    rebuild_cache_mib: NonNegativeInt = 4
    # The alerts a rebuild holds while their events fold (`store.HeldAlerts`), written once each
    # when pushed out: 32 MiB of them pickled (~720-900 bytes an alert) holds the ~40,000 touched
    # last. With 16, a fifth of the scale bench's alerts were pushed out before their last event
    # (each then costs an update, a read and a counting update instead of its share of an insert).
    # Read in step (`rebuild_skew_seconds`), an alert's events are close together: at 50,000
    # clients 16 MiB left 2.4% of the alerts pushed out before their last event (32: 1.7%).
    rebuild_alerts_mib: NonNegativeInt = 16
    # The scored records a rebuild holds undecoded, grouped by client (`rebuild.HeldRecords`), so
    # that a client's sessions are merged and its record written once (an insert) when pushed out,
    # not rewritten by every replayed batch holding one of them: ~800 bytes a session, 24 MiB
    # holds the last ~30,000 sessions. Read in step (`rebuild_skew_seconds`), a client's sessions
    # are close together in the replay, so less is enough: at 200,000 clients 24 MiB rebuilt at
    # 7,032 events/s (156% of raw) with a peak RSS of 281 MiB, where 32 MiB gave 6,396/s (147%)
    # and 296 MiB (2026-11-27, one run each). 0: each batch's records are written as it is replayed.
    rebuild_records_mib: NonNegativeInt = 24
    # The counter moves a rebuild holds (`store.CounterTally`, 8 bytes a field of a counter
    # document), written at the end, or whenever they pass this before: 16 MiB holds the 2,000
    # documents of a 200,000-client network (~4 MiB) with room to spare. Each early write rewrites
    # every counter document touched since the last (with 50,000 fields held, 2,000 documents
    # every ~40,000 events: an eighth of the replay's time at 50,000 clients).
    rebuild_tally_mib: NonNegativeInt = 16
    # How far (by the records' timestamps) a rebuild reads any partition ahead of the one furthest
    # behind (`rebuild.in_step`). The six topics are produced together; read as fetched, one runs
    # ahead by a share of the log, and a client's sessions and an alert's events meet the replay
    # too far apart to be held together (`rebuild_records_mib`, `rebuild_alerts_mib`). Smaller:
    # closer to the order produced, smaller batches.
    rebuild_skew_seconds: PositiveFloat = 2.0
    # What a rebuild's consumer fetches ahead of the replay, all partitions of the six topics together.
    # Read in step, each partition waiting holds its last fetched response (Tansu returned ~2 MiB
    # a partition in the scale bench whatever the per-partition limit), so this bounds less than
    # it says; it does bound the response being read (one buffer of this size).
    rebuild_fetch_mib: PositiveInt = 2
    key_cache_seconds: NonNegativeFloat = 30.0
    # A client's record (every session on one instrument) is one document; sessions that would
    # grow it past this many bytes (encoded) are dead-lettered as `record_too_large` instead of
    # being written. Below MongoDB's 16 MiB limit, which would refuse the write anyway.
    max_record_bytes: int = Field(default=15 * 1024 * 1024, ge=64 * 1024, le=16 * 1024 * 1024)
    # False: serve the API and dashboard only (e.g. extra read replicas behind a load balancer).
    consume: bool = True
