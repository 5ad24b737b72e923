"""The alerts service in-process against a fresh namespace, with what drives it from outside:
the webhook receiver, a publisher of the events it consumes, and the store; and the outcome alerts
(the ORS) scoring publishes, built with the real models."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from pymongo import AsyncMongoClient

from services.alerts.app import AlertsConfig, create_app
from services.alerts.settings import AlertsSettings, SmtpSettings
from shared import ids
from shared.events import OutcomeAlert, OutcomeAlertStatusChanged, OutcomeInstrument, Severity
from shared.mongo import Document
from shared.topic_admin import ensure_topics
from shared.topics import Topics
from tests.support.apps import serving
from tests.support.services import Namespace
from tests.support.stack import StackUnderTest
from tools.harness import EventPublisher
from tools.receiver import WebhookReceiver


@dataclass
class AlertsApp:
    ns: Namespace
    topics: Topics
    client: httpx.AsyncClient  # calls the app
    receiver: WebhookReceiver
    publisher: EventPublisher
    mongo: AsyncMongoClient[Document]
    app: FastAPI

    @property
    def db(self) -> Any:
        return self.mongo[self.ns.database]


@asynccontextmanager
async def alerts_app(stack: StackUnderTest, settings: AlertsSettings,
                     smtp: SmtpSettings | None = None) -> AsyncIterator[AlertsApp]:
    """Alerts with `settings` (and no mail unless `smtp`), its lifespan run, ready to answer."""
    ns = Namespace.fresh(stack)
    await ensure_topics(ns.kafka())
    app = create_app(AlertsConfig(kafka=ns.kafka(), mongo=ns.mongo(), alerts=settings,
                                  smtp=smtp or SmtpSettings(host="")))
    publisher = EventPublisher(stack.bootstrap)
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(stack.mongo_url, tz_aware=True)
    with WebhookReceiver() as receiver:
        await publisher.start()
        try:
            async with serving(app) as client:
                yield AlertsApp(ns, ns.kafka().topics(), client, receiver, publisher, mongo, app)
        finally:
            await publisher.stop()
            await mongo.close()


# ---- outcome alerts, as scoring publishes them (docs/outcome.md) ------------------------------

NOT_ON_TRACK_ADVICE = "discuss with the client how they are doing; consider changing the approach or a referral"


def outcome_alert(tenant_id: str, clinician_id: str, client_id: str, *, site_id: str = "site-a",
                  episode_id: str | None = None, session_number: int = 6, revision: int = 1,
                  triggers: Sequence[str] = ("reliable_deterioration", "not_on_track"),
                  severity: Severity = Severity.CRITICAL, submission_id: str | None = None) -> OutcomeAlert:
    """Revision `revision` of the outcome alert of an ORS session whose total fell from 23.0 at
    intake to 17.4 (a reliable deterioration, and no reliable improvement by session 6). Without
    `episode_id` every call is its own episode, hence its own alert."""
    sid = submission_id or uuid.uuid4().hex
    episode = episode_id or f"ep-{sid[:12]}"
    alert_id = ids.alert_id(tenant_id, client_id, OutcomeInstrument.ORS, episode, session_number)
    now = datetime.now(UTC)
    return OutcomeAlert(
        event_id=ids.alert_event_id(alert_id, revision), tenant_id=tenant_id, occurred_at=now, submission_id=sid,
        site_id=site_id, clinician_id=clinician_id, client_id=client_id, episode_id=episode,
        instrument=OutcomeInstrument.ORS, session_number=session_number, administered_at=now - timedelta(minutes=5),
        alert_id=alert_id, triggers=list(triggers), severity=severity, total=17.4, cutoff=25.0, intake_total=23.0,
        change_from_intake=-5.6, previous_total=21.0, change_from_previous=-3.6, advice=NOT_ON_TRACK_ADVICE,
        accepted_at=now, revision=revision)


def outcome_ended(alert: OutcomeAlert, status: str, revision: int | None = None) -> OutcomeAlertStatusChanged:
    """Scoring's `superseded` / `withdrawn` of an outcome alert, ending `revision` (default: the alert's)."""
    rev = alert.revision if revision is None else revision
    identity = alert.model_dump(include={"tenant_id", "alert_id", "site_id", "clinician_id", "client_id", "instrument",
                                         "episode_id", "session_number"})
    return OutcomeAlertStatusChanged(event_id=ids.alert_status_event_id(alert.tenant_id, alert.alert_id, status, rev),
                                     occurred_at=datetime.now(UTC), status=status, revision=rev, **identity)
