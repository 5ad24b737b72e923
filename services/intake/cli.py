"""Operator commands of the intake service (mounted as `alliance intake ...`), and `alliance import`.

`alliance import FILE.csv --key KEY [--url URL]` sends an EHR export (columns: see
`services.intake.csvformat`; SRS and ORS rows, mixed as the export has them) to intake's CSV
endpoint in chunks, with a progress bar, retrying 429/503 answers after their Retry-After, and
prints a report of the rejected rows by line number.
Rows without a `submission_id` get one that intake derives from the row's session (tenant, client,
instrument, episode, session number, UTC date), so importing the same cumulative export again
(e.g. after an interruption) changes nothing, and a changed row corrects its session.
Exit status: 0 all rows accepted, 1 some rows rejected, 2 the import could not run.

`alliance clients transfer CLIENT --tenant T --site S` moves a client to another site, as an
operator: it publishes the same `ClientTransfer` record as `POST /v1/clients/{client_id}/transfer`
straight to the broker (no API key; it needs the broker settings, `ALLIANCE_KAFKA_*`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from services.intake.csvformat import CsvRow, parse_csv, to_csv
from services.intake.models import check_id, transfer_event, transfer_records
from shared import audit
from shared.kafka import OutboundRecord, Publisher, make_broker
from shared.settings import KafkaSettings
from shared.unreachable import EXIT_UNREACHABLE, describe

app = typer.Typer(help="intake service commands.", no_args_is_help=True)
clients_app = typer.Typer(help="Clients: which site owns them.", no_args_is_help=True)

MAX_ATTEMPTS = 30


class ImportFailed(Exception):
    """The import cannot go on (bad file, bad key, intake unreachable)."""


@dataclass
class Rejection:
    line: int
    submission_id: str | None
    errors: list[tuple[str | None, str]]


@dataclass
class ImportReport:
    rows: int = 0
    accepted: int = 0
    rejected: list[Rejection] = field(default_factory=list)


def _post_chunk(http: httpx.Client, url: str, key: str, header: list[str], rows: list[CsvRow],
                sleep: Callable[[float], None]) -> list[dict[str, Any]]:
    # The chunk is sent as a CSV file of its own: intake derives the ids of rows without one (it
    # knows the key's tenant); results come back by index within the chunk.
    body = to_csv(header, rows).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "text/csv"}
    last = ""
    for _ in range(MAX_ATTEMPTS):
        try:
            r = http.post(f"{url}/v1/submissions/csv", content=body, headers=headers)
        except httpx.TransportError as exc:
            last = f"intake unreachable: {exc!r}"
            sleep(1.0)
            continue
        if r.status_code == 200:
            results: list[dict[str, Any]] = r.json()["results"]
            return results
        if r.status_code in (429, 503):
            last = f"{r.status_code}: {_messages(r)}"
            sleep(min(30.0, float(r.headers.get("retry-after", "1") or 1)))
            continue
        raise ImportFailed(f"intake answered {r.status_code}: {_messages(r)}")
    raise ImportFailed(f"gave up after {MAX_ATTEMPTS} attempts; last answer {last}")


def _messages(r: httpx.Response) -> str:
    try:
        errors = r.json()["errors"]
        return "; ".join(f"{e.get('field') or '-'}: {e.get('message')}" for e in errors)
    except Exception:
        return r.text[:300]


def run_import(path: Path, url: str, key: str, chunk: int = 500, http: httpx.Client | None = None,
               progress: Progress | None = None, sleep: Callable[[float], None] = time.sleep) -> ImportReport:
    """Import a CSV file through the CSV endpoint in chunks; the report of accepted and rejected rows."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFailed(f"{path} is not UTF-8 text: {exc}") from None
    parsed = parse_csv(text)
    if parsed.errors:
        raise ImportFailed("; ".join(f"{f or 'file'}: {m}" for f, m in parsed.errors))
    report = ImportReport(rows=len(parsed.rows))
    sendable = []
    for row in parsed.rows:
        if row.errors:
            report.rejected.append(Rejection(row.line, row.data.get("submission_id"), row.errors))
        else:
            sendable.append(row)
    client = http or httpx.Client(timeout=60)
    task = progress.add_task("importing", total=len(parsed.rows)) if progress else None
    if progress is not None and task is not None:
        progress.advance(task, len(parsed.rows) - len(sendable))
    try:
        for start in range(0, len(sendable), chunk):
            rows = sendable[start:start + chunk]
            for result in _post_chunk(client, url.rstrip("/"), key, parsed.header, rows, sleep):
                row = rows[result["index"]]
                if result["status"] == "accepted":
                    report.accepted += 1
                else:
                    report.rejected.append(Rejection(row.line, result.get("submission_id"),
                                                     [(e.get("field"), e.get("message", "")) for e in
                                                      result.get("errors", [])]))
            if progress is not None and task is not None:
                progress.advance(task, len(rows))
    finally:
        if http is None:
            client.close()
    report.rejected.sort(key=lambda r: r.line)
    return report


def print_report(report: ImportReport, console: Console) -> None:
    """The rejected rows by line, then a summary."""
    if report.rejected:
        table = Table(title="rejected rows", show_lines=False)
        table.add_column("line", justify="right")
        table.add_column("submission_id")
        table.add_column("field")
        table.add_column("message")
        for rej in report.rejected:
            for i, (f, m) in enumerate(rej.errors or [(None, "rejected")]):
                table.add_row(str(rej.line) if i == 0 else "", (rej.submission_id or "-") if i == 0 else "",
                              f or "-", m)
        console.print(table)
    console.print(f"{report.rows} rows: {report.accepted} accepted, {len(report.rejected)} rejected")


def import_csv(
    path: Annotated[Path, typer.Argument(help="the CSV export", exists=True, dir_okay=False, readable=True)],
    url: str = typer.Option("http://127.0.0.1:8001", help="intake base URL"),
    key: str = typer.Option(..., envvar="ALLIANCE_API_KEY", help="API key with role submit"),
) -> None:
    """Import an EHR export (CSV) into intake with a progress bar; report the rejected rows.

    Header row, any order: client_id, clinician_id, site_id, session_number, administered_at
    (required); submission_id, instrument, episode_id, client_age (optional); relationship, goals,
    approach, overall (all four) for SRS rows, individually, interpersonally, socially, overall for
    ORS/CORS/YCORS rows, or total. One file may mix both. Empty cell = absent. Exit 0 all accepted,
    1 some rejected, 2 failed.
    """
    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            report = run_import(path, url, key, progress=progress)
    except (ImportFailed, OSError) as exc:
        console.print(f"[red]import failed:[/red] {exc}")
        raise typer.Exit(2) from None
    print_report(report, console)
    if report.rejected:
        raise typer.Exit(1)


app.command("import")(import_csv)


async def publish_transfer(kafka: KafkaSettings, tenant: str, client: str, site: str,
                           requested_by: str = "operator-cli") -> str:
    """Publish one client transfer (its copies on both submitted topics, as intake does) and wait
    for the broker's acknowledgements; its event id."""
    event = transfer_event(tenant, client, site, requested_by, datetime.now(UTC))
    topics, corr = kafka.topics(), str(uuid.uuid4())
    broker = make_broker(kafka, "intake-cli")
    try:
        await broker.start()  # inside the try: a broker that never answered is closed too
        await Publisher(broker, kafka.publish_timeout_seconds).publish_all([OutboundRecord(
            topics.ors_submitted if r.outcome else topics.submitted, r.value, r.key, correlation_id=corr,
            headers=dict(r.headers or {})) for r in transfer_records(event)])
    finally:
        await broker.stop()
    return event.event_id


@clients_app.command("transfer")
def clients_transfer(
    client: Annotated[str, typer.Argument(help="the client id")],
    tenant: Annotated[str, typer.Option(help="tenant id")],
    site: Annotated[str, typer.Option(help="the site that owns the client from now on")],
) -> None:
    """Move a client to another site (what a tenant-wide admin key does with
    POST /v1/clients/{client_id}/transfer): scoring re-publishes its current sessions with the new site."""
    for name, hint, value in (("tenant_id", "--tenant", tenant), ("client_id", "CLIENT", client),
                              ("site_id", "--site", site)):
        errors = check_id(name, value)
        if errors:
            raise typer.BadParameter(errors[0][1], param_hint=hint)
    try:
        event_id = asyncio.run(publish_transfer(KafkaSettings(), tenant, client, site))
    except Exception as exc:
        typer.echo(describe(exc) or f"transfer not accepted: the broker did not acknowledge ({type(exc).__name__}: "
                                    f"{exc})", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    asyncio.run(audit.record_cli(tenant_id=tenant, action="client.transfer", client_id=client, target=site))
    typer.echo(f"transfer accepted: event {event_id}, site {site}")
