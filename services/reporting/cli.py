"""Operator commands of the reporting service (mounted as `alliance reporting ...`)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.reporting.rebuild import RebuildResult, TruncatedLog, rebuild
from services.reporting.settings import ReportingSettings
from services.reporting.store import Generations, RebuildInProgress
from shared.mongo import database, make_client
from shared.settings import KafkaSettings, MongoSettings

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
        client = make_client(settings)
        try:
            state = await Generations(database(client, settings), 0.1).ensure()
        finally:
            await client.close()
        return f"active={state.active} building={state.building or '-'} previous={state.previous or '-'}"

    typer.echo(asyncio.run(go()))
