"""`python -m tools.bench.reporting --scale` run small on the broker and store under test: it
generates, publishes and rebuilds both networks and reports every figure issue 15 asks for, each
target beside its figure. Timings are not checked here (the machine is shared); that every row is
there and every target has a verdict is."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from tests.support.stack import StackUnderTest
from tools.processes import ROOT

READS = ("trajectory", "caseload", "clinician summary", "site summary", "tenant summary", "tenant trends 24 mo",
         "site trends 24 mo", "clinician trends 24 mo")
SUMMARIES = ("clinician summary", "site summary", "tenant summary")


async def scale_run(stack: StackUnderTest, *args: str) -> dict[str, Any]:
    """The JSON report of `python -m tools.bench.reporting --scale` with these arguments."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLIANCE_KAFKA_BOOTSTRAP": stack.bootstrap,
           "ALLIANCE_KAFKA_IDEMPOTENCE": str(stack.idempotence).lower(), "ALLIANCE_MONGO_URL": stack.mongo_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.bench.reporting", "--scale", *args, "--raw-upserts", "2000", "--json", env=env,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    report: dict[str, Any] = json.loads(out)
    return report


async def test_a_small_scale_run_reports_every_figure_with_its_target(stack: StackUnderTest) -> None:
    report = await scale_run(stack, "--clients", "200", "--baseline-clients", "40", "--reads", "3")
    rows = {row["name"]: row for row in report["rows"]}

    expected = {"raw bulk upserts/s (same run)", "rebuild peak RSS MiB", "reporting API peak RSS MiB",
                *(f"{kind} {temp} @200" for kind in READS for temp in ("cold", "warm")),
                *(f"{kind} cold @40" for kind in SUMMARIES),
                *(f"reporting_{gen}_{name} @200" for gen in ("g2",) for name in ("clients", "counters", "alerts"))}
    assert expected <= rows.keys(), sorted(expected - rows.keys())
    assert any(name.startswith("rebuild events/s") for name in rows)
    targeted = [row for row in report["rows"] if row["target"]]
    assert {row["name"] for row in targeted} >= {
        "rebuild peak RSS MiB", "reporting API peak RSS MiB", *(f"{kind} cold @200" for kind in SUMMARIES),
        "tenant trends 24 mo cold @200"}
    assert all(row["ok"] in (True, False) for row in targeted)
    assert report["sessions"] >= 200 * 5


async def test_a_rebuild_only_run_reports_the_rebuild_against_the_raw_rate_and_no_reads(
        stack: StackUnderTest) -> None:
    report = await scale_run(stack, "--clients", "200", "--rebuild-only")
    names = {row["name"] for row in report["rows"]}

    assert {"raw bulk upserts/s (same run)", "rebuild peak RSS MiB", "reporting_g2_clients @200"} <= names
    assert any(name.startswith("rebuild events/s") for name in names)
    assert not any(kind in name for kind in READS for name in names)
    assert report["baseline_clients"] is None
