"""Refused requests cost the refusing process no memory (issue 12, findings 2 and 3: a 4 MiB CSV cost
intake ~1 GiB before its 422; an unauthenticated 150 MB PUT raised alerts from 76 to 526 MiB before
its 401).

Each service runs as a real process (uvicorn, as in production); its peak resident set (VmHWM in
/proc/<pid>/status) is read once it is idle and ready, and again after the refusal. The bound is the
issue's: within +64 MiB of idle (the k8s limit is 512 Mi). The figures are printed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.support.apps import new_key
from tests.support.limits import peak_rss_mib, send_large_body
from tests.support.services import Namespace, running
from tools.processes import ServiceProcess

BOUND_MIB = 64
BODY_150_MB = 150 * 1000 * 1000
CSV_HEADER = ("submission_id,client_id,clinician_id,site_id,session_number,administered_at,"
              "relationship,goals,approach,overall,total")


@pytest.fixture
def intake(namespace: Namespace, log_dir: Path) -> Iterator[ServiceProcess]:
    with running(["intake"], namespace, log_dir) as procs:
        yield procs["intake"]


@pytest.fixture
def alerts(namespace: Namespace, log_dir: Path) -> Iterator[ServiceProcess]:
    with running(["alerts"], namespace, log_dir) as procs:
        yield procs["alerts"]


def four_mib_csv() -> bytes:
    """A valid-looking EHR export just under intake's 4 MiB body limit: ~56,000 rows, far past the
    1,000-row limit, so it is refused while parsing (422), not for its size."""
    when = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    lines = [CSV_HEADER]
    size = len(CSV_HEADER) + 1
    i = 0
    while True:
        line = f",p-{i},c-17,north,1,{when},9.1,8.4,9.0,8.8,"
        if size + len(line) + 1 > 4 * 1024 * 1024 - 64:
            break
        lines.append(line)
        size += len(line) + 1
        i += 1
    return ("\n".join(lines) + "\n").encode()


def growth(proc: ServiceProcess, refuse: Callable[[], None]) -> tuple[float, float]:
    """Peak RSS (MiB) of `proc` when idle, and after `refuse()` ran."""
    assert proc.proc is not None
    idle = peak_rss_mib(proc.proc.pid)
    refuse()
    return idle, peak_rss_mib(proc.proc.pid)


async def test_a_4_mib_csv_past_the_row_limit_is_refused_within_64_mib_of_intakes_idle_peak(
        intake: ServiceProcess, namespace: Namespace) -> None:
    key = await new_key(namespace, "submit")
    body = four_mib_csv()
    rows = body.count(b"\n") - 1
    answers: list[httpx.Response] = []

    def refuse() -> None:
        answers.append(httpx.post(intake.url + "/v1/submissions/csv", content=body, timeout=60, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "text/csv"}))

    idle, after = growth(intake, refuse)
    print(f"\nintake VmHWM idle {idle:.1f} MiB, after a {len(body) / 2**20:.2f} MiB CSV "
          f"({rows} rows) {after:.1f} MiB (+{after - idle:.1f} MiB); answer {answers[0].status_code}")
    assert answers[0].status_code == 422
    assert "at most 1000 rows per request" in answers[0].json()["errors"][0]["message"]
    assert after - idle < BOUND_MIB


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
async def test_a_150_mb_csv_body_is_refused_with_413_within_64_mib_of_intakes_idle_peak(
        intake: ServiceProcess, namespace: Namespace, chunked: bool) -> None:
    """Declared by `Content-Length`, it is refused before a byte is read; sent chunked, intake stops
    reading at its 4 MiB limit."""
    key = await new_key(namespace, "submit")
    statuses: list[int] = []

    def refuse() -> None:
        statuses.append(send_large_body(intake.port, "POST", "/v1/submissions/csv", BODY_150_MB, {
            "Authorization": f"Bearer {key}", "Content-Type": "text/csv"}, chunked=chunked))

    idle, after = growth(intake, refuse)
    print(f"\nintake VmHWM idle {idle:.1f} MiB, after a 150 MB {'chunked' if chunked else 'declared'} CSV body "
          f"{after:.1f} MiB (+{after - idle:.1f} MiB); answer {statuses[0]}")
    assert statuses == [413]
    async with httpx.AsyncClient() as http:
        assert (await http.get(intake.url + "/healthz")).status_code == 200
    assert after - idle < BOUND_MIB


async def test_an_unauthenticated_150_mb_body_is_refused_with_401_within_64_mib_of_intakes_idle_peak(
        intake: ServiceProcess) -> None:
    statuses: list[int] = []

    def refuse() -> None:
        statuses.append(send_large_body(intake.port, "POST", "/v1/submissions/batch", BODY_150_MB, {}))

    idle, after = growth(intake, refuse)
    print(f"\nintake VmHWM idle {idle:.1f} MiB, after an unauthenticated 150 MB POST {after:.1f} MiB "
          f"(+{after - idle:.1f} MiB); answer {statuses[0]}")
    assert statuses == [401]
    assert after - idle < BOUND_MIB


def test_an_unauthenticated_150_mb_put_is_refused_with_401_within_64_mib_of_alerts_idle_peak(
        alerts: ServiceProcess) -> None:
    statuses: list[int] = []

    def refuse() -> None:
        statuses.append(send_large_body(alerts.port, "PUT", "/v1/clinicians/x", BODY_150_MB, {}))

    idle, after = growth(alerts, refuse)
    assert httpx.get(alerts.url + "/healthz").status_code == 200
    print(f"\nalerts VmHWM idle {idle:.1f} MiB, after an unauthenticated 150 MB PUT {after:.1f} MiB "
          f"(+{after - idle:.1f} MiB); answer {statuses[0]}")
    assert statuses == [401]
    assert after - idle < 16  # stricter than the bound: alerts never reads the body (+0 MiB measured)
