"""The reporting service: consumers that materialize read models, the read API, the dashboard.

Shape (the same in every service): `ReportingConfig` extends `shared.settings.ServiceConfig`;
`build(config)` wires a `shared.http.Service` (broker with its consumers, store client, runtime, HTTP
app over the stores and key store) without opening a connection: nothing outside reads reporting's inner
parts, so it declares no subclass of its own; `create_app` (uvicorn) and `asyncapi_app`
(`faststream docs gen`) are views of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.reporting.api import build_router, install_store_errors, mount_dashboard
from services.reporting.audit import build_audit_router
from services.reporting.handlers import ReportingHandlers
from services.reporting.settings import ReportingSettings
from services.reporting.store import Generations, ReportingStore, SubmissionStore
from shared import audit
from shared.auth import KeyStore
from shared.events import (
    AlertStatusChanged,
    AllianceDeterioration,
    DeadLetter,
    OrsScored,
    OutcomeAlert,
    OutcomeAlertStatusChanged,
    SrsScored,
)
from shared.http import Adapters, Service, Views, authenticate_first, make_guard, service_api
from shared.kafka import DeadLetterTarget, OutboundRecord, subscribe_batch
from shared.settings import ServiceConfig

SERVICE = "reporting"
TITLE = "Alliance Stream reporting"
DESCRIPTION = ("Trajectories and PCOMS indices materialized from scored sessions (read keys), and what happened to "
               "each submission (read or submit keys).")


@dataclass
class ReportingConfig(ServiceConfig, service=SERVICE):
    """Everything the service reads from the environment (overridable in tests)."""

    reporting: ReportingSettings = field(default_factory=ReportingSettings)


def build(config: ReportingConfig) -> Service:
    """Wire broker, stores, consumers and the HTTP app; opens no connection."""
    settings = config.reporting
    base = Adapters(config)
    broker, topics = base.broker, base.topics
    store = ReportingStore(base.db, cache_entries=settings.cache_entries, max_record_bytes=settings.max_record_bytes)
    submissions = SubmissionStore(base.db)
    generations = Generations(base.db, settings.generation_cache_seconds)
    keys = KeyStore(base.db, settings.key_cache_seconds)

    async def dead_letters(records: Sequence[OutboundRecord]) -> None:
        await base.publisher.publish_all(records)

    handlers = ReportingHandlers(store, generations, dead_letters, topics, submissions)
    if settings.consume:
        batch = min(settings.batch_max_records, config.kafka.batch_max_records)
        poison = DeadLetterTarget(topics.deadletter, handlers.dead_letter)

        def group(purpose: str) -> str:
            return config.kafka.group(f"{SERVICE}-{purpose}")

        subscribe_batch(broker, topics.scored, group_id=group("scored"), service=SERVICE, model=SrsScored,
                        handler=handlers.scored, max_records=batch, dead_letters=poison, settings=config.kafka)
        subscribe_batch(broker, topics.deterioration, group_id=group("deterioration"), service=SERVICE,
                        model=AllianceDeterioration, handler=handlers.deterioration, max_records=batch,
                        dead_letters=poison, settings=config.kafka)
        subscribe_batch(broker, topics.alert_status, group_id=group("alert-status"), service=SERVICE,
                        model=AlertStatusChanged, handler=handlers.alert_status, max_records=batch,
                        dead_letters=poison, settings=config.kafka)
        # The outcome half (ORS): its own topics, the same merge (docs/outcome.md).
        subscribe_batch(broker, topics.ors_scored, group_id=group("ors-scored"), service=SERVICE, model=OrsScored,
                        handler=handlers.ors_scored, max_records=batch, dead_letters=poison, settings=config.kafka)
        subscribe_batch(broker, topics.outcome_alert, group_id=group("outcome-alert"), service=SERVICE,
                        model=OutcomeAlert, handler=handlers.outcome_alert, max_records=batch,
                        dead_letters=poison, settings=config.kafka)
        subscribe_batch(broker, topics.outcome_alert_status, group_id=group("outcome-alert-status"),
                        service=SERVICE, model=OutcomeAlertStatusChanged, handler=handlers.outcome_alert_status,
                        max_records=batch, dead_letters=poison, settings=config.kafka)
        # Raw records and no target: a record the dead-letter consumer fails on must not feed its own input.
        subscribe_batch(broker, topics.deadletter, group_id=group("deadletter"), service=SERVICE,
                        handler=handlers.deadletter, max_records=batch, settings=config.kafka)

    # Dead letters go out through `Publisher`; this declaration puts them (and their schema) into
    # the AsyncAPI document.
    broker.publisher(topics.deadletter, title=f"{SERVICE}:deadletter", schema=DeadLetter,
                     description="Scored, alert or alert-status records (of either scale) reporting could not read.")

    async def prepare_store() -> None:
        state = await generations.ensure()
        for gen in state.write_targets:
            await store.ensure_indexes(gen)
        await submissions.ensure_indexes()

    runtime = base.runtime(on_start=[prepare_store])
    trail = audit.audit_collection(base.mongo, config.mongo, config.audit)
    audit_log = audit.audit_log_for(base.mongo, config.mongo, SERVICE, config.audit)
    auditor = audit.Auditor(audit_log, SERVICE, keys.lookup)
    # The read side's indexes (this service serves the trail); written entries are flushed on stop.
    runtime.on_start.append(lambda: audit.ensure_indexes(trail))
    if audit_log is not None:
        runtime.on_stop.append(audit_log.close)
    app = service_api(runtime, title=TITLE, description=DESCRIPTION)
    app.include_router(build_router(store, generations, lambda: keys, config.reporting, submissions, auditor))
    app.include_router(build_audit_router(trail, lambda: keys, auditor, config.reporting))
    install_store_errors(app)
    mount_dashboard(app)
    # Every /v1 route needs a key: check it before anything else (FastAPI reads a body first).
    # With it, the failed-authentication limit per peer and the request rate per key (`make_guard`).
    guard, limits = make_guard(config.http, base.db, SERVICE)
    runtime.on_start.append(limits.ensure_indexes)
    authenticate_first(app, keys.lookup, guard=guard, known=keys.known)
    return Service(broker, base.mongo, runtime, app, spec_title=TITLE, spec_version="1.0.0",
                   spec_description=DESCRIPTION)


# `create_app` (uvicorn, `python -m services.reporting`) and `asyncapi_app` (`faststream docs gen`).
_views = Views(build, ReportingConfig)
create_app, asyncapi_app = _views.create_app, _views.asyncapi_app
