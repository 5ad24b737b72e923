"""Operator commands of the alerts service (mounted as `alliance alerts ...`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from services.alerts.store import AlertsStore
from shared.mongo import database, make_client
from shared.settings import MongoSettings

app = typer.Typer(help="alerts service commands.", no_args_is_help=True)

T = TypeVar("T")


def _with_store(job: Callable[[AlertsStore], Awaitable[T]]) -> T:
    async def go() -> T:
        settings = MongoSettings()
        client = make_client(settings)
        try:
            return await job(AlertsStore(database(client, settings)))
        finally:
            await client.close()

    return asyncio.run(go())


@app.command("deliveries")
def deliveries(
    tenant: Annotated[str, typer.Option(help="tenant id")],
    status: Annotated[str | None, typer.Option(help="pending | delivered | failed | cancelled")] = "failed",
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 50,
) -> None:
    """List a tenant's deliveries (by default the failed, dead-lettered ones)."""
    rows = _with_store(lambda s: s.list_deliveries(tenant, None, status, None, limit))
    for d in rows:
        typer.echo(f"{d['_id']}  {d['status']:9}  {d['channel']:7}  {d['recipient']:40}  attempts={d['attempts']}  "
                   f"{d.get('last_error') or ''}")
    typer.echo(f"{len(rows)} deliveries", err=True)


@app.command("retry")
def retry(
    tenant: Annotated[str, typer.Option(help="tenant id")],
    delivery_id: Annotated[list[str] | None, typer.Option("--id", help="only these deliveries (repeatable)")] = None,
) -> None:
    """Put failed deliveries back on the schedule with a fresh attempt budget."""
    n = _with_store(lambda s: s.requeue_failed(tenant, delivery_id or None))
    typer.echo(f"requeued {n} deliveries")
