"""Operator commands of the reporting service (mounted as `alliance reporting ...`)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.reporting.rebuild import RebuildResult, TruncatedLog, rebuild
from services.reporting.settings import ReportingSettings
from services.reporting.store import Generations, RebuildInProgress, ReportingStore
from shared import audit
from shared.mongo import database, make_client
from shared.settings import AuditSettings, KafkaSettings, MongoSettings

app = typer.Typer(help="reporting service commands.", no_args_is_help=True)


@app.command("rebuild")
def rebuild_command(
    force: Annotated[bool, typer.Option(help="take over the building slot of a rebuild that died")] = False,
    keep_old: Annotated[bool, typer.Option(help="keep every older generation (default: keep only the previous)")]
    = False,
    idle_seconds: Annotated[float, typer.Option(help="finish when the log stays silent this long")] = 10.0,
    allow_truncated_log: Annotated[bool, typer.Option(help="rebuild even though retention deleted the oldest "
                                                           "scored events (trajectories will lack them)")] = False,
) -> None:
    """Replay srs.scored.v1 (+ alerts) from the beginning into fresh collections, then switch over.

    The live API keeps answering from the current collections until the switch; live consumers
    write into both while the rebuild runs.
    """
    with Progress(TextColumn("[bold]replaying[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("events"),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("replay", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=max(total, done) or None)

        try:
            result: RebuildResult = asyncio.run(rebuild(KafkaSettings(), MongoSettings(), ReportingSettings(),
                                                        progress=progress, force=force, drop_old=not keep_old,
                                                        idle_seconds=idle_seconds,
                                                        allow_truncated=allow_truncated_log))
        except (RebuildInProgress, TruncatedLog) as exc:
            typer.echo(f"rebuild refused: {exc}", err=True)
            raise typer.Exit(2) from exc
    typer.echo(f"replayed {result.events} events ({result.skipped} undecodable skipped) in "
               f"{result.replay_seconds:.1f}s ({result.events_per_second:.0f}/s) into {result.generation}")
    typer.echo(f"switched: {result.previous} -> {result.generation}"
               + (f"; dropped {', '.join(result.dropped)}" if result.dropped else ""))


@app.command("generation")
def generation_command() -> None:
    """Show which read-model generation the API serves (and any rebuild in progress)."""

    async def go() -> str:
        settings = MongoSettings()
        client = make_client(settings, admin=True)
        try:
            state = await Generations(database(client, settings), 0.1).ensure()
        finally:
            await client.close()
        return f"active={state.active} building={state.building or '-'} previous={state.previous or '-'}"

    typer.echo(asyncio.run(go()))


async def verify_generation(mongo: MongoSettings, gen: str | None = None) -> tuple[str, dict[str, tuple[
        dict[str, int], dict[str, int]]]]:
    """(generation checked, differences) of the counters against the records (`ReportingStore.verify`);
    the active generation unless `gen` names one."""
    client = make_client(mongo, admin=True)
    try:
        db = database(client, mongo)
        target = gen or (await Generations(db, 0.1).ensure()).active
        return target, await ReportingStore(db).verify(target)
    finally:
        await client.close()


@app.command("verify")
def verify_command(
    generation: Annotated[str | None, typer.Option(help="the generation to check (default: the active one)")]
    = None,
) -> None:
    """Recompute the incremental indices from the records and alerts and compare them with the counters.

    Exits 1 when any counter differs (each difference printed as one JSON line), 0 when all agree.
    """
    gen, differences = asyncio.run(verify_generation(MongoSettings(), generation))
    for counter, (expected, held) in differences.items():
        typer.echo(json.dumps({"counter": counter, "from_records": expected, "counters": held},
                              separators=(",", ":"), sort_keys=True))
    if differences:
        typer.echo(f"{gen}: {len(differences)} counters differ from the records", err=True)
        raise typer.Exit(1)
    typer.echo(f"{gen}: the counters agree with the records")


audit_app = typer.Typer(help="The access audit trail (mounted as `alliance audit ...`).", no_args_is_help=True)


@audit_app.command("export")
def audit_export(
    since: Annotated[datetime | None, typer.Option(help="only entries at or after this time (ISO 8601, UTC if no "
                                                         "offset); default: all", formats=[
        "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"])] = None,
    tenant: Annotated[str | None, typer.Option(help="one tenant; default: every tenant")] = None,
    client: Annotated[str | None, typer.Option(help="only entries about this client")] = None,
) -> None:
    """Print audit entries as JSON lines, oldest first (the export itself is recorded)."""
    start = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since

    async def go() -> int:
        mongo_settings, settings = MongoSettings(), AuditSettings()
        mongo = make_client(mongo_settings, admin=True)
        try:
            trail = audit.audit_collection(mongo, mongo_settings, settings)
            # An export of every tenant's trail is recorded under tenant `*`.
            await audit.write_now(trail, tenant_id=tenant or "*", action="audit.export", client_id=client)
            count, after = 0, None
            while True:
                docs, more = await audit.read_page(trail, audit.query(tenant, client, start, after), 1000)
                for doc in docs:
                    typer.echo(json.dumps(audit.view(doc), separators=(",", ":")))
                count += len(docs)
                if not more:
                    return count
                after = (docs[-1]["at"], docs[-1]["_id"])
        finally:
            await mongo.close()

    typer.echo(f"{asyncio.run(go())} audit entries", err=True)
