"""The alerts service: consumes alliance alerts (deteriorations) and outcome alerts (the ORS) and
their lifecycle statuses (and scored SRS and ORS sessions for partners), delivers signed webhooks
and emails from a durable schedule in MongoDB, escalates unacknowledged alerts, and serves the
directory/subscription/alert API on port 8003.

Shape (the same in every service): `AlertsConfig` extends
`shared.settings.ServiceConfig`; `build(config)` wires an `AlertsService` (broker, store, runtime with
the delivery worker, the status teller (`delivered` / `failed` of clinicians' deliveries) and
escalation as its store tasks, HTTP app) without opening a connection;
`create_app` (uvicorn) and `asyncapi_app` (`faststream docs gen`) are views of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from faststream import FastStream

from services.alerts.api import build_router
from services.alerts.escalation import Escalator
from services.alerts.handlers import INVALID, Handlers, OutcomeStatusEvent, StatusEvent
from services.alerts.reroute import Rerouter
from services.alerts.senders import EmailSender, SigningSecrets, WebhookSender
from services.alerts.settings import AlertsSettings, SmtpSettings
from services.alerts.statuses import StatusTeller
from services.alerts.store import AlertsStore
from services.alerts.targets import Resolver, system_resolve
from services.alerts.webhooks import webhooks_router
from services.alerts.worker import DeliveryWorker, Sender
from shared import audit, auth, channels
from shared.http import Adapters, Service, authenticate_first, make_guard, service_api, stream_app
from shared.kafka import DeadLetterTarget, Route, by_topic, subscribe_batch
from shared.settings import ServiceConfig

log = logging.getLogger("alliance.alerts")

SERVICE = "alerts"
DESCRIPTION = """Delivers alliance and outcome alerts to clinicians (signed webhook, email) and partners (signed
webhooks, Standard Webhooks), retries with backoff from a durable schedule, escalates unacknowledged alerts."""


TITLE = "Alliance Stream alerts"

# The consumer group each input topic had (`Topics` attribute, group purpose) before alerts shared
# consumers between topics.
PREVIOUS_GROUPS = (("deterioration", SERVICE), ("scored", "alerts-partners"), ("alert_status", "alerts-status"),
                   ("outcome_alert", "alerts-outcome"), ("outcome_alert_status", "alerts-outcome-status"),
                   ("ors_scored", "alerts-ors-partners"))


@dataclass
class AlertsConfig(ServiceConfig, service=SERVICE):
    """Everything `build` needs; defaults come from the environment."""

    alerts: AlertsSettings = field(default_factory=AlertsSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)


@dataclass
class AlertsService(Service):
    """The wired service (tests and the bench reach it through `app.state.alerts`)."""

    config: AlertsConfig
    store: AlertsStore
    handlers: Handlers
    worker: DeliveryWorker
    escalator: Escalator
    webhook: WebhookSender


def _declare_outputs(base: Adapters) -> None:
    """Declared for the AsyncAPI document; records are published through `base.publisher`."""
    base.declare_output(channels.ALERT_STATUS, "acknowledged / escalated / delivered / failed alerts, for reporting",
                        title="alerts:alert-status")
    base.declare_output(channels.OUTCOME_ALERT_STATUS,
                        "acknowledged / escalated / delivered / failed outcome alerts, for reporting",
                        title="alerts:outcome-alert-status")
    base.declare_output(channels.DEADLETTER, "undecodable events and deliveries that exhausted their attempts",
                        title="alerts:deadletter")


def build(config: AlertsConfig, resolve: Resolver = system_resolve) -> AlertsService:
    """Wire everything; opens no connection. `resolve` answers webhook host names (tests
    replace it to play a rebinding DNS server)."""
    base = Adapters(config)
    _declare_outputs(base)
    broker, mongo, db, topics, publisher = base.broker, base.mongo, base.db, base.topics, base.publisher
    store = AlertsStore(db, config.alerts.subscription_cache_seconds)
    box = config.alerts.secret_box()
    secrets = SigningSecrets(store, box)
    webhook = WebhookSender(secrets, config.alerts.allow_private_targets, config.alerts.attempt_timeout_seconds,
                            resolve, config.alerts.response_body_max_bytes)
    senders: dict[str, Sender] = {"webhook": webhook}
    if config.smtp.enabled:
        senders["email"] = EmailSender(config.smtp, config.alerts.dashboard_url, config.alerts.attempt_timeout_seconds)
    statuses = StatusTeller(store, publisher, topics, config.alerts)
    worker = DeliveryWorker(store, senders, publisher, topics, config.alerts, on_statuses_owed=statuses.recorded,
                            on_statuses_recorded=statuses.recorded_docs)
    statuses.wake = worker.wake  # the teller schedules fallbacks' deliveries again (a reroute that failed)
    handlers = Handlers(store, config.smtp.enabled, worker.wake, publisher, topics, hand_off=worker)
    escalator = Escalator(store, publisher, topics, config.alerts, config.smtp.enabled, worker.wake)
    rerouter = Rerouter(store, config.smtp.enabled, worker.wake, config.alerts)

    poison = DeadLetterTarget(topics.deadletter, publisher.publish_all)
    previous = {getattr(topics, name): config.kafka.group(group) for name, group in PREVIOUS_GROUPS}

    def consume(purpose: str, routes: list[Route[Any]]) -> None:
        """One consumer over several topics, starting where each topic's group of before left off
        (`TakeOver`; docs/operations.md, "Upgrading to one consumer per kind of event"). The
        lifecycle merge does not depend on the order of the topics, so each topic's part of a batch
        goes to its handler, the parts at the same time."""
        subscribe_batch(broker, [r.topic for r in routes], group_id=config.kafka.group(f"{SERVICE}-{purpose}"),
                        service=SERVICE, handler=by_topic(routes, service=SERVICE, dead_letters=poison,
                                                          invalid_reason=INVALID),
                        max_records=config.kafka.batch_max_records, dead_letters=poison, settings=config.kafka,
                        takes_over={r.topic: previous[r.topic] for r in routes})

    # Every consumer polls the broker all the time, busy or not, so topics share consumers; but a
    # batch is committed only when each of its parts is handled, so the raised alerts (what reaches
    # a clinician) do not share one with partners' events. Alliance and outcome alerts
    # (docs/outcome.md):
    consume("raised", [Route(topics.deterioration, channels.DETERIORATION.model, handlers.on_deterioration),
                       Route(topics.outcome_alert, channels.OUTCOME_ALERT.model, handlers.on_outcome_alert)])
    # Superseded / withdrawn from scoring (and this service's own acknowledged / escalated /
    # delivered / failed, which are only forwarded to partners), and scored sessions for partners.
    consume("events", [Route(topics.alert_status, StatusEvent, handlers.on_alert_status),
                       Route(topics.outcome_alert_status, OutcomeStatusEvent, handlers.on_outcome_status),
                       Route(topics.scored, channels.SCORED.model, handlers.on_scored),
                       Route(topics.ors_scored, channels.ORS_SCORED.model, handlers.on_ors_scored)])

    async def start() -> None:
        await store.ensure_indexes()
        if moved := await store.migrate_clinician_keys():
            log.info("migrated %d directory entries to unambiguous keys", moved)
        await auth.ensure_indexes(db)
        if not box.encrypting:
            log.warning("ALLIANCE_ALERTS_SECRETS_KEYS is empty: webhook signing secrets are stored unencrypted "
                        "(dev mode only: `python -m services.alerts` refuses to start so outside it)")
        if not config.smtp.enabled:
            log.info("ALLIANCE_SMTP_HOST is empty: the email channel is off")

    audit_log = audit.audit_log_for(mongo, config.mongo, SERVICE, config.audit)
    # Delivery and escalation need only the store, so they are store tasks, started before the broker:
    # after a restart, pending deliveries and retries go out while the consumer group still rebalances.
    # On stop the runtime cancels them before closing the webhook client.
    runtime = base.runtime(on_start=[start],
                           store_tasks=[worker.run, statuses.run, escalator.run, rerouter.run,
                                        worker.refresh_gauges],
                           on_stop=[webhook.close, *([audit_log.close] if audit_log is not None else [])])
    keys = auth.KeyStore(db)
    router = build_router(store, keys, publisher, topics, config.alerts, box, secrets.forget, worker.wake,
                          audit.Auditor(audit_log, SERVICE, keys.lookup), resolve=resolve,
                          reroute=rerouter.reroute)
    app = service_api(runtime, title=TITLE, description=DESCRIPTION)
    app.include_router(router)
    # What the worker sends, documented as the OpenAPI document's `webhooks` (served by no route).
    app.webhooks.include_router(webhooks_router(config.alerts))
    # Every /v1 route needs a key: check it before a body is read (the routes' own KeyStore comes
    # after FastAPI has parsed the body). A second cache of the same keys; misses cost one look-up.
    # With it, the failed-authentication limit per peer and the request rate per key (`make_guard`).
    first = auth.KeyStore(db)
    guard, limits = make_guard(config.http, db, SERVICE)
    runtime.on_start.append(limits.ensure_indexes)
    authenticate_first(app, first.lookup, guard=guard, known=first.known)
    service = AlertsService(broker, mongo, runtime, app, config, store, handlers, worker, escalator, webhook,
                            spec_title=TITLE, spec_version="1.0.0", spec_description=DESCRIPTION)
    app.state.alerts = service
    return service


def create_app(config: AlertsConfig | None = None, resolve: Resolver = system_resolve) -> FastAPI:
    """The alerts HTTP app; its lifespan runs the consumers, the delivery worker and escalation."""
    return build(config or AlertsConfig(), resolve).app


def asyncapi_app(config: AlertsConfig | None = None) -> FastStream:
    """A FastStream app over the same broker, for `faststream docs gen services.alerts.app:asyncapi_app`."""
    return stream_app(build(config or AlertsConfig()))

