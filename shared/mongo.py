"""MongoDB wiring: one place builds clients, so every service connects the same way."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from shared.settings import MongoSettings

Document = dict[str, Any]


def make_client(settings: MongoSettings) -> AsyncMongoClient[Document]:
    """An async client; it opens no connection until first used."""
    return AsyncMongoClient(
        settings.url,
        serverSelectionTimeoutMS=settings.timeout_ms,
        connectTimeoutMS=settings.timeout_ms,
        tz_aware=True,
        uuidRepresentation="standard",
    )


def database(client: AsyncMongoClient[Document], settings: MongoSettings) -> AsyncDatabase[Document]:
    """The configured database."""
    return client[settings.database]


async def ping(client: AsyncMongoClient[Document]) -> bool:
    """True when the store answers."""
    try:
        await client.admin.command("ping")
    except Exception:
        return False
    return True
