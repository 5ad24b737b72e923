"""Wiring of the intake service: broker, key store, routes. No connection is opened at import time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from services.intake.api import Context, SubmissionPublisher, build_router, install_openapi
from services.intake.ratelimit import submission_limiter
from services.intake.settings import IntakeSettings
from shared.audit import install_audit_routes
from shared.auth import KeyStore
from shared.events import ClientTransfer, SrsSubmitted
from shared.http import Runtime, make_guard, service_api
from shared.kafka import make_broker
from shared.mongo import database, make_client
from shared.settings import IntakeHttp, KafkaSettings, MongoSettings

DESCRIPTION = """Accepts Session Rating Scale submissions from clinic sites and EHR exports, validates them,
and publishes them to `srs.submitted.v1`. A submission is answered with 202 only after the broker has
acknowledged it; send the same `submission_id` again to retry safely. A tenant-wide admin key moves a
client to another site with `POST /v1/clients/{client_id}/transfer`."""


@dataclass
class IntakeConfig:
    """Everything intake reads from the environment."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    mongo: MongoSettings = field(default_factory=MongoSettings)
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    http: IntakeHttp = field(default_factory=IntakeHttp)

    @property
    def publish_timeout(self) -> float:
        """Intake may answer sooner than the shared publish bound, never later."""
        return min(self.intake.publish_timeout_seconds, self.kafka.publish_timeout_seconds)


def _publisher(broker: KafkaBroker, config: IntakeConfig) -> Any:
    return broker.publisher(
        config.kafka.topics().submitted,
        description="Validated SRS submissions, and client transfers (header `record-type: client-transfer`, "
                    "see docs/clinical-records.md); key `tenant_id:client_id`, header `correlation_id`.",
        schema=SrsSubmitted | ClientTransfer,
    )


def create_app(config: IntakeConfig | None = None) -> FastAPI:
    """The intake HTTP app (its lifespan connects the broker in the background)."""
    config = config or IntakeConfig()
    broker = make_broker(config.kafka.model_copy(update={"linger_ms": config.intake.linger_ms}), "intake")
    publisher = _publisher(broker, config)
    mongo = make_client(config.mongo)
    db = database(mongo, config.mongo)
    # Failed authentications per peer; submissions per key are metered by `limiter` instead.
    guard, limits = make_guard(config.http, db, "intake", per_key=False)
    runtime = Runtime("intake", broker=broker, mongo=mongo, on_start=[limits.ensure_indexes])
    ctx = Context(
        settings=config.intake,
        keys=KeyStore(db, ttl_seconds=config.intake.key_cache_seconds,
                      max_entries=config.intake.key_cache_entries),
        publisher=SubmissionPublisher(runtime, publisher.publish, config.publish_timeout),
        limiter=submission_limiter(config.intake, limits),
        guard=guard,
    )
    app = service_api(runtime, title="Alliance Stream intake", description=DESCRIPTION)
    app.include_router(build_router(ctx))
    # A client transfer is an administrative change: each appends an audit entry (shared.audit).
    install_audit_routes(app, runtime, config.mongo, ctx.keys.lookup,
                         [("POST", re.compile(r"/v1/clients/(?P<client_id>.+)/transfer"), "client.transfer")])
    install_openapi(app)
    app.state.intake = ctx
    return app


def asyncapi_app(config: IntakeConfig | None = None) -> FastStream:
    """A FastStream app over intake's broker, for `faststream docs gen` (it publishes srs.submitted.v1)."""
    config = config or IntakeConfig()
    broker = make_broker(config.kafka, "intake")
    _publisher(broker, config)
    return FastStream(broker, specification=AsyncAPI(broker, title="Alliance Stream intake", version="1.0.0",
                                                     description=DESCRIPTION))
