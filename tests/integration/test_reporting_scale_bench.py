"""`python -m tools.bench.reporting --scale` run small on the broker and store under test: it
generates, publishes and rebuilds both networks and reports every figure issue 15 asks for, each
target beside its figure. Timings are not checked here (the machine is shared); that every row is
there and every target has a verdict is."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.support.stack import StackUnderTest
from tools.processes import ROOT

READS = ("trajectory", "caseload", "site summary", "tenant summary", "tenant trends 24 mo", "site trends 24 mo",
         "clinician trends 24 mo")


async def test_a_small_scale_run_reports_every_figure_with_its_target(stack: StackUnderTest) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLIANCE_KAFKA_BOOTSTRAP": stack.bootstrap,
           "ALLIANCE_KAFKA_IDEMPOTENCE": str(stack.idempotence).lower(), "ALLIANCE_MONGO_URL": stack.mongo_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.bench.reporting", "--scale", "--clients", "200", "--baseline-clients", "40",
        "--reads", "3", "--raw-upserts", "2000", "--json", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(out)
    rows = {row["name"]: row for row in report["rows"]}

    expected = {"raw bulk upserts/s (same run)", "rebuild peak RSS MiB", "reporting API peak RSS MiB",
                *(f"{kind} {temp} @200" for kind in READS for temp in ("cold", "warm")),
                "site summary cold @40", "tenant summary cold @40",
                *(f"reporting_{gen}_{name} @200" for gen in ("g2",) for name in ("clients", "counters", "alerts"))}
    assert expected <= rows.keys(), sorted(expected - rows.keys())
    assert any(name.startswith("rebuild events/s") for name in rows)
    targeted = [row for row in report["rows"] if row["target"]]
    assert {row["name"] for row in targeted} >= {
        "rebuild peak RSS MiB", "reporting API peak RSS MiB", "site summary cold @200", "tenant summary cold @200",
        "tenant trends 24 mo cold @200"}
    assert all(row["ok"] in (True, False) for row in targeted)
    assert report["sessions"] >= 200 * 5
