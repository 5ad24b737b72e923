"""Intake as a real process (`python -m services.intake`, uvicorn): `alliance import FILE.csv` reports
per row, and the body limit holds for chunked uploads on the real server. (The schemathesis run over
its OpenAPI is in tests/security/test_api_contracts.py, with alerts' and reporting's.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from services.intake.cli import import_csv
from tests.integration.test_intake_api import Keys, TopicReader, make_keys
from tests.support.services import Namespace, ServiceProcess, running


@pytest.fixture(scope="module")
async def proc_keys(namespace_m: Namespace) -> Keys:
    return await make_keys(namespace_m)


@pytest.fixture(scope="module")
def intake_proc(namespace_m: Namespace, proc_keys: Keys, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServiceProcess]:
    logs = tmp_path_factory.mktemp("intake-proc-logs")
    with running(["intake"], namespace_m, logs, extra_env={"ALLIANCE_INTAKE_RATE_PER_SECOND": "100000",
                                                       "ALLIANCE_INTAKE_RATE_BURST": "100000"}) as procs:
        yield procs["intake"]
    log_text = (logs / "intake.log").read_text()
    # the service's own log must never carry client ids (every generated and CSV client id starts so)
    assert "p-cli-" not in log_text


@pytest.mark.asyncio(loop_scope="session")
async def test_chunked_body_over_the_limit_is_413_on_the_real_server(intake_proc: ServiceProcess,
                                                                      proc_keys: Keys) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b" " * 4096

    async with httpx.AsyncClient(timeout=15) as http:
        r = await http.post(f"{intake_proc.url}/v1/submissions", content=chunks(), headers={
            "Authorization": f"Bearer {proc_keys.submit}", "Content-Type": "application/json"})
    assert r.status_code == 413


def _csv(path: Path, rows: int, bad_lines: set[int]) -> None:
    when = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    lines = ["client_id,clinician_id,site_id,session_number,administered_at,relationship,goals,approach,overall,total"]
    for i in range(rows):
        line = len(lines) + 1
        goals = "12.5" if line in bad_lines else "8.4"
        lines.append(f"p-cli-{i},c-17,north,{1 + i % 20},{when},9.1,{goals},9.0,8.8,")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.asyncio(loop_scope="session")
async def test_alliance_import_sends_chunks_and_reports_rejected_rows_by_line(
        intake_proc: ServiceProcess, proc_keys: Keys, namespace_m: Namespace, tmp_path: Path) -> None:
    file = tmp_path / "export.csv"
    _csv(file, 1200, bad_lines={5, 1100})
    cli = typer.Typer()
    cli.command()(import_csv)
    result = await asyncio.to_thread(CliRunner().invoke, cli, [str(file), "--url", intake_proc.url],
                                     env={"ALLIANCE_API_KEY": proc_keys.submit, "COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "1200 rows: 1198 accepted, 2 rejected" in result.output
    table = result.output[result.output.index("rejected rows"):]
    assert "│    5 │" in table and "│ 1100 │" in table and "items.goals" in table
    assert "1200/1200" in result.output  # the progress bar reached the end

    reader = TopicReader(namespace_m.stack.bootstrap, namespace_m.kafka().topics().submitted)
    await reader.start()
    try:
        last = (await reader.wait_for(_derived_id(file, 1201)))[0]
    finally:
        await reader.stop()
    assert json.loads(last.value)["client_id"] == "p-cli-1199"


@pytest.mark.asyncio(loop_scope="session")
async def test_importing_the_same_file_again_reuses_its_submission_ids(
        intake_proc: ServiceProcess, proc_keys: Keys, namespace_m: Namespace, tmp_path: Path) -> None:
    from services.intake.cli import run_import

    file = tmp_path / "again.csv"
    _csv(file, 3, bad_lines=set())
    for _ in range(2):
        report = await asyncio.to_thread(run_import, file, intake_proc.url, proc_keys.submit)
        assert (report.accepted, report.rejected) == (3, [])
    reader = TopicReader(namespace_m.stack.bootstrap, namespace_m.kafka().topics().submitted)
    await reader.start()
    try:
        for line in (2, 3, 4):
            recs = await reader.wait_for(_derived_id(file, line), count=2)
            assert len({json.loads(r.value)["event_id"] for r in recs}) == 1
    finally:
        await reader.stop()


def _derived_id(file: Path, line: int) -> str:
    """The id intake derives for a row of `_csv` (key of tenant acme): from its session, not its line."""
    from services.intake.csvformat import parse_csv, session_submission_id

    [row] = [r for r in parse_csv(file.read_text()).rows if r.line == line]
    d = row.data
    return session_submission_id("acme", d["client_id"], "SRS", None, d["session_number"],
                                 datetime.fromisoformat(d["administered_at"]))


@pytest.mark.asyncio(loop_scope="session")
async def test_alliance_import_with_an_unknown_key_fails_with_exit_2(intake_proc: ServiceProcess,
                                                                     tmp_path: Path) -> None:
    file = tmp_path / "x.csv"
    _csv(file, 2, bad_lines=set())
    cli = typer.Typer()
    cli.command()(import_csv)
    result = await asyncio.to_thread(CliRunner().invoke, cli, [str(file), "--url", intake_proc.url, "--key", "ak_x"])
    assert result.exit_code == 2
    assert "401" in result.output


@pytest.mark.asyncio(loop_scope="session")
async def test_alliance_import_of_a_file_mixing_srs_and_ors_publishes_each_to_its_topic_once(
        intake_proc: ServiceProcess, proc_keys: Keys, namespace_m: Namespace, tmp_path: Path) -> None:
    from services.intake.cli import run_import
    from services.intake.csvformat import parse_csv, session_submission_id

    when = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    file = tmp_path / "mixed.csv"
    file.write_text("\n".join([
        "instrument,client_id,clinician_id,site_id,session_number,administered_at,client_age,"
        "individually,interpersonally,socially,relationship,goals,approach,overall,total",
        f"ORS,p-cli-ors,c-17,north,1,{when},16,4.1,5.0,4.8,,,,4.5,",
        f"SRS,p-cli-ors,c-17,north,1,{when},,,,,9.1,8.4,9.0,8.8,",
    ]) + "\n")
    for _ in range(2):  # importing it again changes nothing: the same submission ids
        report = await asyncio.to_thread(run_import, file, intake_proc.url, proc_keys.submit)
        assert (report.accepted, report.rejected) == (2, [])
    ors_row, srs_row = (r.data for r in parse_csv(file.read_text()).rows)
    ors_id, srs_id = (session_submission_id("acme", d["client_id"], d["instrument"], None, 1,
                                            datetime.fromisoformat(d["administered_at"])) for d in (ors_row, srs_row))
    topics = namespace_m.kafka().topics()
    for topic, sid, instrument in ((topics.ors_submitted, ors_id, "ORS"), (topics.submitted, srs_id, "SRS")):
        reader = TopicReader(namespace_m.stack.bootstrap, topic)
        await reader.start()
        try:
            recs = await reader.wait_for(sid, count=2)
            assert len({json.loads(r.value)["event_id"] for r in recs}) == 1
            assert {json.loads(r.value)["instrument"] for r in recs} == {instrument}
        finally:
            await reader.stop()
