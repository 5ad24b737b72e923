"""The alerts service in-process against a fresh namespace, with what drives it from outside:
the webhook receiver, a publisher of the events it consumes, and the store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from pymongo import AsyncMongoClient

from services.alerts.app import AlertsConfig, create_app
from services.alerts.settings import AlertsSettings, SmtpSettings
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
