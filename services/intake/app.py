"""Wiring of the intake service: broker, key store, routes. No connection is opened at import time.

Shape (the same in every service): `IntakeConfig` extends `shared.settings.ServiceConfig`;
`build(config)` wires an `IntakeService` (broker, store client, runtime, HTTP app and the routes'
`Context`) without opening a connection; `create_app` (uvicorn) and `asyncapi_app` (`faststream docs
gen`) are views of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from faststream.kafka import KafkaBroker

from services.intake.api import Context, SubmissionPublisher, build_router, install_openapi
from services.intake.ratelimit import submission_limiter
from services.intake.settings import IntakeSettings
from shared.audit import install_audit_routes
from shared.auth import KeyStore
from shared.events import ClientTransfer, OrsSubmitted, SrsSubmitted
from shared.http import Adapters, Service, Views, make_guard, service_api
from shared.settings import ServiceConfig

SERVICE = "intake"
TITLE = "Alliance Stream intake"
DESCRIPTION = """Accepts Session Rating Scale submissions from clinic sites and EHR exports, validates them,
and publishes them to `srs.submitted.v1`; Outcome Rating Scale submissions (`instrument` ORS, CORS or
YCORS, docs/outcome.md) through the same endpoints go to `ors.submitted.v1`. A submission is answered
with 202 only after the broker has acknowledged it; send the same `submission_id` again to retry
safely. A tenant-wide admin key moves a client to another site with
`POST /v1/clients/{client_id}/transfer`."""


@dataclass
class IntakeConfig(ServiceConfig, service=SERVICE):
    """Everything intake reads from the environment."""

    intake: IntakeSettings = field(default_factory=IntakeSettings)

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


def _ors_publisher(broker: KafkaBroker, config: IntakeConfig) -> Any:
    return broker.publisher(
        config.kafka.topics().ors_submitted,
        description="Validated Outcome Rating Scale submissions (ORS, CORS, YCORS; docs/outcome.md), and a copy "
                    "of every client transfer (header `record-type: client-transfer`, the same record as on "
                    "`srs.submitted.v1`; see docs/clinical-records.md); key `tenant_id:client_id`, header "
                    "`correlation_id`.",
        schema=OrsSubmitted | ClientTransfer,
    )


@dataclass
class IntakeService(Service):
    """The wired service: broker and publisher, key store and limits (`context`), runtime, HTTP app."""

    context: Context


def build(config: IntakeConfig) -> IntakeService:
    """Wire broker, key store, limits and routes; opens no connection."""
    base = Adapters(config, kafka=config.kafka.model_copy(update={"linger_ms": config.intake.linger_ms}))
    broker, mongo, db = base.broker, base.mongo, base.db
    publisher = _publisher(broker, config)
    ors_publisher = _ors_publisher(broker, config)
    # Failed authentications per peer; submissions per key are metered by `limiter` instead.
    guard, limits = make_guard(config.http, db, SERVICE, per_key=False)
    runtime = base.runtime(on_start=[limits.ensure_indexes])
    ctx = Context(
        settings=config.intake,
        keys=KeyStore(db, ttl_seconds=config.intake.key_cache_seconds,
                      max_entries=config.intake.key_cache_entries),
        publisher=SubmissionPublisher(runtime, publisher.publish, config.publish_timeout, ors_publisher.publish),
        limiter=submission_limiter(config.intake, limits, config.http.rate_limit_lease),
        guard=guard,
    )
    app = service_api(runtime, title=TITLE, description=DESCRIPTION)
    app.include_router(build_router(ctx))
    # A client transfer is an administrative change: each appends an audit entry (shared.audit).
    install_audit_routes(app, runtime, config.mongo, ctx.keys.lookup,
                         [("POST", re.compile(r"/v1/clients/(?P<client_id>.+)/transfer"), "client.transfer")],
                         config.audit)
    install_openapi(app)
    app.state.intake = ctx
    return IntakeService(broker, mongo, runtime, app, ctx, spec_title=TITLE, spec_version="1.0.0",
                         spec_description=DESCRIPTION)


# `create_app` (uvicorn, `python -m services.intake`) and `asyncapi_app` (`faststream docs gen`).
_views = Views(build, IntakeConfig)
create_app, asyncapi_app = _views.create_app, _views.asyncapi_app
