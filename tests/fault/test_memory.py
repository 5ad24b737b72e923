"""Memory stays flat: a service's resident set after 100,000 events is within 1.5x of its
resident set after 10,000 (no per-event state kept in memory)."""

from __future__ import annotations

from pathlib import Path

import httpx

from shared.topic_admin import ensure_topics
from tests.fault.helpers import make_tenant, post_batch, submission
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest

TOTAL = 100_000
BATCH = 1000


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_intake_memory_after_100k_submissions_is_within_1_5x_of_after_10k(
        fault_stack: StackUnderTest, log_dir: Path) -> None:
    ns = Namespace.fresh(fault_stack)
    await ensure_topics(ns.kafka())
    keys = await make_tenant(ns, "acme")
    with running(["intake"], ns, log_dir, extra_env={"ALLIANCE_INTAKE_RATE_PER_SECOND": "1000000",
                                                     "ALLIANCE_INTAKE_RATE_BURST": "1000000"}) as procs:
        proc = procs["intake"].proc
        assert proc is not None
        rss_10k = 0
        async with httpx.AsyncClient(timeout=60) as http:
            for n in range(TOTAL // BATCH):
                # distinct clients and sessions: every event is new to the service
                items = [submission(n * BATCH + i, 1 + n % 50) for i in range(BATCH)]
                assert len(await post_batch(http, procs["intake"].url, keys.submit, items)) == BATCH
                if (n + 1) * BATCH == 10_000:
                    rss_10k = rss_bytes(proc.pid)
        rss_100k = rss_bytes(proc.pid)
    print(f"\nintake RSS after 10k: {rss_10k / 2**20:.1f} MiB, after 100k: {rss_100k / 2**20:.1f} MiB, "
          f"ratio {rss_100k / rss_10k:.2f}")
    assert rss_100k <= 1.5 * rss_10k
