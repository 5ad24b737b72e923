"""Operator commands of the alerts service (mounted as `alliance alerts ...`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from services.alerts.rules import Outcome
from services.alerts.secretbox import KeyringError, Row, new_key, open_legacy
from services.alerts.settings import AlertsSettings
from services.alerts.store import AlertsStore, DeliveryStatus
from shared import audit
from shared.mongo import database, make_client
from shared.settings import MongoSettings

app = typer.Typer(help="alerts service commands.", no_args_is_help=True)
secrets_app = typer.Typer(help="The keyring that encrypts stored webhook signing secrets.", no_args_is_help=True)
app.add_typer(secrets_app, name="secrets")

T = TypeVar("T")


def _with_store(job: Callable[[AlertsStore], Awaitable[T]]) -> T:
    async def go() -> T:
        settings = MongoSettings()
        client = make_client(settings, admin=True)
        try:
            return await job(AlertsStore(database(client, settings)))
        finally:
            await client.close()

    return asyncio.run(go())


@app.command("deliveries")
def deliveries(
    tenant: Annotated[str | None, typer.Option(help="tenant id; default: every tenant")] = None,
    status: Annotated[DeliveryStatus, typer.Option(help="the deliveries in this state")] = "failed",
    outcome: Annotated[Outcome | None, typer.Option(help="only those whose last attempt ended so (no_secret and "
                                                         "blocked wait for an operator)")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many, newest first")] = 50,
) -> None:
    """List deliveries (by default the failed, dead-lettered ones) with their tenant and last error."""
    rows = _with_store(lambda s: s.operator_deliveries(tenant, status, outcome, limit))
    for d in rows:
        typer.echo(f"{d.delivery_id}  {d.tenant_id}  {d.status:9}  {d.channel:7}  {d.recipient:40}  "
                   f"attempts={d.attempts}  {d.last_outcome or '-':9}  {d.last_error or ''}")
    typer.echo(f"{len(rows)} deliveries", err=True)


@app.command("retry")
def retry(
    tenant: Annotated[str, typer.Option(help="tenant id")],
    delivery_id: Annotated[list[str] | None, typer.Option("--id", help="only these deliveries (repeatable)")] = None,
) -> None:
    """Put failed deliveries back on the schedule with a fresh attempt budget."""
    n = _with_store(lambda s: s.requeue_failed(tenant, delivery_id or None))
    asyncio.run(audit.record_cli(tenant_id=tenant, action="delivery.retry", target=",".join(delivery_id or []) or "*"))
    typer.echo(f"requeued {n} deliveries")


@secrets_app.command("new-key")
def secrets_new_key(
    key_id: Annotated[str, typer.Option("--id", help="key id (1-32 of A-Za-z0-9_-), e.g. the date")],
    file: Annotated[Path | None, typer.Option(help="write it to this file (mode 0600) unless the file exists, "
                                                   "instead of printing it")] = None,
) -> None:
    """Print a fresh keyring entry `id:base64key` for ALLIANCE_ALERTS_SECRETS_KEYS.

    Rotation: put it second in every replica's keyring, then first, then run `reseal`, then
    drop the old entry."""
    try:
        entry = new_key(key_id)
    except KeyringError as exc:
        raise typer.BadParameter(str(exc), param_hint="--id") from None
    if file is None:
        typer.echo(entry)
    elif file.exists():
        typer.echo(f"{file} exists: kept", err=True)
    else:
        # Created 0600 from the start: the key is never readable by others, not even briefly.
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(entry + "\n")
        typer.echo(f"wrote a new key {key_id!r} to {file}", err=True)


@secrets_app.command("reseal")
def secrets_reseal(
    legacy_key: Annotated[str, typer.Option(help="the retired ALLIANCE_ALERTS_SECRETS_KEY, to migrate sb1 values",
                                            envvar="ALLIANCE_ALERTS_LEGACY_SECRETS_KEY")] = "",
) -> None:
    """Re-seal every stored signing secret under the first key of ALLIANCE_ALERTS_SECRETS_KEYS
    (values under older keys, plain ones, and with --legacy-key those of the retired sb1 box)."""
    box = AlertsSettings().secret_box()
    if not box.encrypting:
        raise typer.BadParameter("ALLIANCE_ALERTS_SECRETS_KEYS is empty: nothing to seal with")
    failed: list[str] = []

    def reseal(stored: str, row: Row) -> str | None:
        if box.current(stored):
            return None
        try:
            legacy = stored.startswith("sb1:") and legacy_key
            plain = open_legacy(stored, legacy_key) if legacy else box.open(stored, row)
        except ValueError as exc:
            failed.append(f"{list(row)}: {exc}")
            return None
        return box.seal(plain, row)

    n = _with_store(lambda s: s.reseal_secrets(reseal))
    for line in failed:
        typer.echo(f"not resealed {line}", err=True)
    typer.echo(f"resealed {n} secrets under key {box.sealing_key_id!r}")
    if failed:
        raise typer.Exit(1)


@secrets_app.command("rotate")
def secrets_rotate(
    legacy_key: Annotated[str, typer.Option(help="the retired ALLIANCE_ALERTS_SECRETS_KEY, to migrate sb1 values",
                                            envvar="ALLIANCE_ALERTS_LEGACY_SECRETS_KEY")] = "",
) -> None:
    """Finish a key rotation without downtime: re-seal every stored secret under the keyring's first key.

    The rotation: `alliance secrets new-key --id <new>`; add it *second* in every replica's
    ALLIANCE_ALERTS_SECRETS_KEYS (all can open what it seals) and roll them; move it *first* (it
    seals) and roll again; `alliance secrets rotate` (this command, = `reseal`); then drop the old key."""
    secrets_reseal(legacy_key)
