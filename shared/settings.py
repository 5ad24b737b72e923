"""Settings, read only through pydantic-settings with the `ALLIANCE_` prefix.

One class per adapter (Kafka, MongoDB, SMTP...) and one per service, so a service reads only
what it uses and the same names work in every service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.topics import Topics


class KafkaSettings(BaseSettings):
    """How to reach the Kafka cluster (`ALLIANCE_KAFKA_*`)."""

    model_config = SettingsConfigDict(env_prefix="ALLIANCE_KAFKA_", extra="ignore")

    bootstrap: str = "127.0.0.1:9092"
    # On for Apache Kafka; the local Tansu stand-in rejects InitProducerId v0, so the local
    # launcher turns it off.
    idempotence: bool = True
    acks: Literal["all", "1", "0"] = "all"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: SecretStr = SecretStr("")
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    topic_prefix: str = ""
    partitions: PositiveInt = 6
    replication_factor: PositiveInt = 1
    retention_ms: int = 7 * 24 * 3600 * 1000
    linger_ms: int = 5
    request_timeout_ms: int = 15_000
    publish_timeout_seconds: PositiveFloat = 5.0
    batch_max_records: PositiveInt = 500
    # How long a consumer fetch may wait for data. Apache Kafka answers as soon as data arrives.
    # The local Tansu differs by storage: in memory it holds a fetch for the whole wait (so the
    # launcher sets 20 ms), on s3 a short wait returns before the read completes, almost always
    # empty (so it needs the 500 ms default).
    fetch_max_wait_ms: PositiveInt = 500
    # How many times a whole batch may fail deterministically (a document too large or invalid
    # for the store, a permanent refusal) before its records are isolated and the culprits
    # dead-lettered (`shared.kafka.subscribe_batch`); at most 5, as the 6th failure rewinds it.
    poison_attempts: int = Field(default=2, ge=1, le=5)
    # Consumer group liveness (aiokafka's defaults). A member silent for the session timeout is
    # dropped from its group; heartbeats go out every heartbeat interval (well under the timeout).
    # The local Tansu also holds every group join for half the session timeout, so the test kit
    # sets a shorter one (tests/support/stack.py) to start consumers in ~1.5 s instead of ~5 s.
    session_timeout_ms: PositiveInt = 10_000
    heartbeat_interval_ms: PositiveInt = 3_000

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> KafkaSettings:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be shorter than session_timeout_ms")
        return self

    def topics(self) -> Topics:
        """Concrete topic names for this deployment."""
        return Topics(self.topic_prefix)

    def group(self, service: str) -> str:
        """Consumer group of a service; one group per service and purpose."""
        return f"{self.topic_prefix}alliance-{service}"


class MongoSettings(BaseSettings):
    """How to reach MongoDB (`ALLIANCE_MONGO_*`)."""

    model_config = SettingsConfigDict(env_prefix="ALLIANCE_MONGO_", extra="ignore")

    url: str = "mongodb://127.0.0.1:27017/?directConnection=true"
    database: str = "alliance"
    # Finding the store and opening a connection (server selection, connect): a store that is down
    # or refuses fails an operation after this.
    timeout_ms: int = 5_000
    # How long a service waits for each reply of the store (`shared.mongo.make_client`:
    # `socketTimeoutMS`), so a store that accepts connections but stops answering (a hung server, a
    # lock or disk stall, a half-open connection) fails the operation instead of holding a
    # consumer's batch or a request for ever. PyMongo may retry a read or write once, so an
    # operation fails within twice the bound. The live path's operations are small: a batch's reads
    # by id go 25 ids at a time (`IDS_PER_READ`), its writes are one bulk write of at most
    # `ALLIANCE_KAFKA_BATCH_MAX_RECORDS` documents, a client's record is at most ~3.5 MiB; the
    # slowest measured took a few seconds on a loaded machine (1,600 ids in one `$in` on the local
    # store: 6 s). 30 s leaves them a wide margin while a stalled partition or request is freed in
    # half a minute. A timed-out operation raises `NetworkTimeout`, which every caller treats as the
    # store being unavailable. 0 = no bound (not for production).
    operation_timeout_ms: int = Field(default=30_000, ge=0)
    # The bound of the paths whose single operations legitimately run long: the operator CLI
    # (`reporting verify` aggregates over every trajectory, `reporting rebuild` builds the new
    # generation's indexes and roll-ups over everything replayed) and the tools (`alliance run`, the
    # simulator, the benches). Still bounded: a store that stopped answering ends them too.
    admin_timeout_ms: int = Field(default=3_600_000, ge=0)


class HttpSettings(BaseSettings):
    """Where a service listens (`ALLIANCE_<SERVICE>_HOST/PORT`); built per service below."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # Request bodies larger than this get 413 before they are read (`shared.http.BodyLimit`); the
    # alerts and reporting bodies are small JSON documents, so 1 MiB leaves ample room.
    max_body_bytes: int | None = Field(default=1024 * 1024, ge=1024)
    # Where rate-limit counters live (`shared.ratelimit`): `mongodb` (the `rate_limits` collection,
    # shared by every replica, so N replicas do not multiply a limit) or `memory` (this process only).
    rate_limit_backend: Literal["mongodb", "memory"] = "mongodb"
    # Units of a per-key limit (reads on alerts and reporting, submissions on intake) a replica
    # counts in the shared store at once and then admits from without a store round trip, at most
    # a twentieth of the burst (`shared.ratelimit.Limiter`). 1 = one round trip per request.
    rate_limit_lease: int = Field(default=10, ge=1)
    # Failed authentications (a missing, unknown or revoked key) per peer: `auth_failure_burst` at once,
    # then `auth_failure_rate_per_second`; past it the peer gets 429 with Retry-After without its key
    # being looked up. A key already known (cached) from that peer still passes.
    auth_failure_rate_per_second: PositiveFloat = 0.2
    auth_failure_burst: float = Field(default=10, ge=1)
    # How the peer is identified: 0 = the TCP peer's address (the default: X-Forwarded-For is
    # ignored, as any client can send it). Behind N trusted proxies that each append to
    # X-Forwarded-For, N picks the address the outermost trusted proxy saw.
    trusted_proxy_hops: int = Field(default=0, ge=0, le=10)
    # Requests per API key on alerts and reporting (`/v1/...`); intake limits submissions instead
    # (ALLIANCE_INTAKE_RATE_PER_SECOND / _RATE_BURST).
    read_rate_per_second: PositiveFloat = 50.0
    read_rate_burst: float = Field(default=200.0, ge=1)


class IntakeHttp(HttpSettings):
    model_config = SettingsConfigDict(env_prefix="ALLIANCE_INTAKE_", extra="ignore")
    port: int = 8001
    # Intake limits each route itself (ALLIANCE_INTAKE_MAX_SINGLE_BYTES / MAX_BATCH_BYTES), counting
    # its refusals in its metrics; no service-wide limit on top.
    max_body_bytes: int | None = None
    # Submissions are intake's hot path and its burst is large (2,000): a lease of 50 (a fortieth of
    # it) puts one store write behind 50 submissions instead of 10, cutting the limiter's share of
    # the store's work (the store is what every stage queues behind; issue 11). The price stays
    # bounded: N replicas may refuse up to N x 1.5 x 50 units of a key's 2,000 early, never admit more.
    rate_limit_lease: int = Field(default=50, ge=1)


class ScoringHttp(HttpSettings):
    model_config = SettingsConfigDict(env_prefix="ALLIANCE_SCORING_", extra="ignore")
    port: int = 8002


class AlertsHttp(HttpSettings):
    model_config = SettingsConfigDict(env_prefix="ALLIANCE_ALERTS_", extra="ignore")
    port: int = 8003


class ReportingHttp(HttpSettings):
    model_config = SettingsConfigDict(env_prefix="ALLIANCE_REPORTING_", extra="ignore")
    port: int = 8004


SERVICE_PORTS: dict[str, type[HttpSettings]] = {
    "intake": IntakeHttp,
    "scoring": ScoringHttp,
    "alerts": AlertsHttp,
    "reporting": ReportingHttp,
}


class LogSettings(BaseSettings):
    """Logging (`ALLIANCE_LOG_*`)."""

    model_config = SettingsConfigDict(env_prefix="ALLIANCE_LOG_", extra="ignore")

    level: str = "INFO"
    json_format: bool = True


class TracingSettings(BaseSettings):
    """Whether to export traces: the standard OpenTelemetry variables (`OTEL_*`), not `ALLIANCE_*`,
    so collectors, operators and the SDK agree on them (see `shared.tracing`). Only what decides
    "on or off" is read here; the exporter and the batch processor read their own `OTEL_*` variables."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore")

    sdk_disabled: bool = False
    traces_exporter: str = "otlp"
    exporter_otlp_endpoint: str = ""
    exporter_otlp_traces_endpoint: str = ""
    exporter_otlp_protocol: str = ""

    @property
    def exporting(self) -> bool:
        """An OTLP endpoint is set and nothing turns tracing off."""
        endpoint = self.exporter_otlp_traces_endpoint or self.exporter_otlp_endpoint
        return bool(endpoint) and not self.sdk_disabled and self.traces_exporter.strip().lower() != "none"


# How often a service's monitor loop refreshes readiness and consumer lag when nothing sets it: well
# inside Prometheus' 15 s scrape interval, for a few cheap requests (a ping each, one offsets request
# per consumer).
MONITOR_INTERVAL_SECONDS = 5.0


class MonitorSettings(BaseSettings):
    """The runtime's monitor loop (`ALLIANCE_MONITOR_*`, `shared.http.Runtime`): how often it sets
    `alliance_ready`, `alliance_dependency_up` and `alliance_consumer_lag_messages`. Shorter than the
    scrape interval, or a scrape may show a value older than one interval; each round costs a ping
    of the broker and the store and one offsets request per consumer."""

    model_config = SettingsConfigDict(env_prefix="ALLIANCE_MONITOR_", extra="ignore")

    interval_seconds: float = Field(default=MONITOR_INTERVAL_SECONDS, gt=0, le=300)


class AuditSettings(BaseSettings):
    """The access audit trail (`ALLIANCE_AUDIT_*`, see `shared.audit` and docs/operations.md)."""

    model_config = SettingsConfigDict(env_prefix="ALLIANCE_AUDIT_", extra="ignore")

    # Off only to measure what auditing costs (the reporting bench); a deployment keeps it on.
    enabled: bool = True
    # One collection every service writes and reporting reads; empty: ALLIANCE_MONGO_DATABASE.
    database: str = ""
    collection: str = Field(default="audit", min_length=1)
    # Entries are written in batches: at most this long after they were recorded, or as soon as a
    # batch is full, so a read never waits for the store's write.
    flush_interval_seconds: float = Field(default=0.2, gt=0, le=5)
    batch_max_entries: PositiveInt = 500
    # Entries held while the store does not answer; past this, audited requests get 503 rather
    # than client data nobody could audit.
    queue_max_entries: PositiveInt = 50_000
    # How long a stopping service keeps trying to write what it still holds.
    close_timeout_seconds: PositiveFloat = 10.0


@dataclass
class ServiceConfig:
    """What every service reads from its environment: the broker, the store, the audit trail, the
    runtime's monitor loop and its own HTTP settings. Each service's `Config` (in its app.py) names
    its service and extends it with its own settings; tests pass explicit instances."""

    # The service's name (`class AlertsConfig(ServiceConfig, service="alerts")`): its HTTP settings
    # (`SERVICE_PORTS`), broker client id and runtime name.
    service: ClassVar[str]

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    mongo: MongoSettings = field(default_factory=MongoSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    # Where the service listens and its request limits (`ALLIANCE_<SERVICE>_*`): when not given, read
    # for `service` in `__post_init__` (a default factory cannot see which service it is for).
    http: HttpSettings = field(default=cast(HttpSettings, None))

    def __init_subclass__(cls, service: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if service:
            cls.service = service

    def __post_init__(self) -> None:
        self.http = self.http or SERVICE_PORTS[self.service]()
