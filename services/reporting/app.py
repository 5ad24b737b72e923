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
from typing import Any

from services.reporting.api import build_router, mount_dashboard
from services.reporting.audit import build_audit_router
from services.reporting.handlers import ReportingHandlers
from services.reporting.settings import ReportingSettings
from services.reporting.store import Generations, ReportingStore, RollupRefresher, SubmissionStore
from shared import audit, channels
from shared.auth import KeyStore
from shared.channels import Channel
from shared.http import Adapters, Service, Views, authenticate_first, make_guard, service_api
from shared.kafka import DeadLetterTarget, M, OutboundRecord, Route, TypedHandler, by_topic, subscribe_batch
from shared.settings import ServiceConfig

SERVICE = "reporting"
TITLE = "Alliance Stream reporting"
DESCRIPTION = ("Trajectories and PCOMS indices materialized from scored sessions (read keys), and what happened to "
               "each submission (read or submit keys).")


# The consumer group (purpose) each event topic had before reporting shared consumers between topics.
PREVIOUS_GROUPS: tuple[tuple[Channel[Any], str], ...] = (
    (channels.SCORED, "scored"), (channels.DETERIORATION, "deterioration"), (channels.ALERT_STATUS, "alert-status"),
    (channels.ORS_SCORED, "ors-scored"), (channels.OUTCOME_ALERT, "outcome-alert"),
    (channels.OUTCOME_ALERT_STATUS, "outcome-alert-status"))


@dataclass
class ReportingConfig(ServiceConfig, service=SERVICE):
    """Everything the service reads from the environment (overridable in tests)."""

    reporting: ReportingSettings = field(default_factory=ReportingSettings)


def build(config: ReportingConfig) -> Service:
    """Wire broker, stores, consumers and the HTTP app; opens no connection."""
    settings = config.reporting
    base = Adapters(config)
    broker, topics = base.broker, base.topics
    store = ReportingStore(base.db, cache_entries=settings.cache_entries, max_record_bytes=settings.max_record_bytes,
                           rollup_max_age=settings.rollup_max_age_seconds)
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

        def route(channel: Channel[M], handler: TypedHandler[M]) -> Route[M]:
            return Route(channel.on(topics), channel.model, handler)

        def consume(purpose: str, routes: Sequence[Route[Any]]) -> None:
            """One consumer over several topics: each topic's part of a batch goes to its handler,
            decoded to the channel's event. Each topic had a consumer group of its own before
            (`PREVIOUS_GROUPS`): the new group starts where those left off (`TakeOver`;
            docs/operations.md, "Upgrading to one consumer per kind of event")."""
            subscribe_batch(broker, [r.topic for r in routes], group_id=group(purpose), service=SERVICE,
                            handler=by_topic(routes, service=SERVICE, dead_letters=poison), max_records=batch,
                            dead_letters=poison, settings=config.kafka,
                            takes_over={r.topic: previous[r.topic] for r in routes})

        previous = {channel.on(topics): group(purpose) for channel, purpose in PREVIOUS_GROUPS}

        # Every consumer polls the broker all the time, busy or not, so topics share consumers; but a
        # batch is committed only when each of its parts is written, so the scored sessions (what a
        # clinician waits to see) do not share one with the alerts' writes. The outcome half (ORS):
        # its own topics, the same merge (docs/outcome.md).
        consume("sessions", [route(channels.SCORED, handlers.scored), route(channels.ORS_SCORED, handlers.ors_scored)])
        consume("alerts", [route(channels.DETERIORATION, handlers.deterioration),
                           route(channels.ALERT_STATUS, handlers.alert_status),
                           route(channels.OUTCOME_ALERT, handlers.outcome_alert),
                           route(channels.OUTCOME_ALERT_STATUS, handlers.outcome_alert_status)])
        # Raw records and no target: a record the dead-letter consumer fails on must not feed its own input.
        subscribe_batch(broker, topics.deadletter, group_id=group("deadletter"), service=SERVICE,
                        handler=handlers.deadletter, max_records=batch, settings=config.kafka)

    # Dead letters go out through `Publisher`; this declaration puts them (and their schema) into
    # the AsyncAPI document.
    base.declare_output(channels.DEADLETTER, title=f"{SERVICE}:deadletter",
                        description="Scored, alert or alert-status records (of either scale) reporting could not read.")

    async def prepare_store() -> None:
        state = await generations.ensure()
        for gen in state.write_targets:
            await store.ensure_indexes(gen)
        await submissions.ensure_indexes()

    runtime = base.runtime(on_start=[prepare_store])
    if settings.consume:
        # The writers keep the roll-ups they make out of date fresh (store.py, "Tenant roll-ups").
        runtime.store_tasks.append(RollupRefresher(store, generations, settings.rollup_refresh_seconds).run)
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
