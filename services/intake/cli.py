"""Operator commands of the intake service (mounted as `alliance intake ...`), and `alliance import`.

`alliance import FILE.csv --key KEY [--url URL]` sends an EHR export (columns: see
`services.intake.csvformat`) to intake's batch endpoint in chunks, with a progress bar, retrying
429/503 answers after their Retry-After, and prints a report of the rejected rows by line number.
Rows without a `submission_id` get one derived from the file's content and line, so importing the
same file again (e.g. after an interruption) creates no duplicates.
Exit status: 0 all rows accepted, 1 some rows rejected, 2 the import could not run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from services.intake.csvformat import CsvRow, parse_csv

app = typer.Typer(help="intake service commands.", no_args_is_help=True)

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


def _post_chunk(http: httpx.Client, url: str, key: str, rows: list[CsvRow],
                sleep: Callable[[float], None]) -> list[dict[str, Any]]:
    body = {"submissions": [r.data for r in rows]}
    last = ""
    for _ in range(MAX_ATTEMPTS):
        try:
            r = http.post(f"{url}/v1/submissions/batch", json=body, headers={"Authorization": f"Bearer {key}"})
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
    """Import a CSV file through the batch endpoint; the report of accepted and rejected rows."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFailed(f"{path} is not UTF-8 text: {exc}") from None
    parsed = parse_csv(text, hashlib.sha256(raw).hexdigest())
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
            for result in _post_chunk(client, url.rstrip("/"), key, rows, sleep):
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
    (required); submission_id, instrument, episode_id (optional); relationship, goals, approach,
    overall (all four) or total. Empty cell = absent. Exit 0 all accepted, 1 some rejected, 2 failed.
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
