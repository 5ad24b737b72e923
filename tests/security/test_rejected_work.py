"""Intake's rejected work is bounded and paid for (issue 12, finding 2: a 4 MiB CSV cost ~1 GiB and
6 s of CPU, every row built before the row limit was checked, then a 422 that cost no rate-limit
tokens).

A CSV is parsed as a stream that stops at the row limit + 1 (and at the first row over
`ALLIANCE_INTAKE_MAX_CSV_ROW_CHARS`) without building the rest; a request refused with 413/415/422
spends tokens for what was read and parsed, so the key's next request waits. Peak memory of the
real process while a 4 MiB CSV is refused: test_peak_memory.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.intake.csvformat import parse_csv
from tests.support.apps import build_app, client, new_key
from tests.support.services import Namespace

HEADER = ("submission_id,client_id,clinician_id,site_id,session_number,administered_at,"
          "relationship,goals,approach,overall,total")
ROW = "\n,p-1,c-17,north,1,2026-11-25T14:05:00+00:00,,,,,36.5"
# 3 submissions per one-day window: nothing frees up during a test.
THREE_A_DAY = {"rate_per_second": 3 / 86_400, "rate_burst": 3}


def submission() -> dict[str, object]:
    return {"instrument": "SRS", "client_id": "p-8812", "clinician_id": "c-17", "site_id": "north",
            "session_number": 3, "administered_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
            "items": {"relationship": 9.1, "goals": 8.4, "approach": 9.0, "overall": 8.8}}


def test_parsing_stops_at_the_first_row_past_the_limit() -> None:
    f = parse_csv(HEADER + ROW * 50_000, max_rows=10)
    assert f.too_many_rows and not f.errors
    assert len(f.rows) == 10  # the rows before the limit, not the 50,000 of the file


def test_a_file_at_the_limit_is_not_too_many_rows() -> None:
    f = parse_csv(HEADER + ROW * 10 + "\n\n", max_rows=10)
    assert not f.too_many_rows and len(f.rows) == 10


def test_a_row_longer_than_the_limit_refuses_the_file_without_building_rows() -> None:
    text = HEADER + "\n,p-1,c-17,north,1,2026-11-25T14:05:00+00:00,,,,,36.5\n," + "x" * 5000 + ",c,n,1,t,,,,,1\n"
    f = parse_csv(text, max_row_chars=4096)
    assert f.rows == []
    assert f.errors == [(None, "line 3: a row may hold at most 4096 characters")]


async def test_rejected_bodies_spend_tokens_so_invalid_requests_are_not_free(namespace: Namespace) -> None:
    key = await new_key(namespace, "submit")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with client(build_app("intake", namespace, intake=THREE_A_DAY)) as http:
        statuses = [(await http.post("/v1/submissions", content=b"{not json", headers=headers)).status_code
                    for _ in range(3)]
        assert statuses == [422, 422, 422]
        # The key's 3 are spent: the next request is refused before its body is read, a valid one too.
        r = await http.post("/v1/submissions", content=b"{not json", headers=headers)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert (await http.post("/v1/submissions", json=submission(), headers=headers)).status_code == 429


async def test_a_csv_past_the_row_limit_is_refused_while_parsing_and_charged_for_its_rows(
        namespace: Namespace) -> None:
    key = await new_key(namespace, "submit")
    auth = {"Authorization": f"Bearer {key}"}
    async with client(build_app("intake", namespace, intake={**THREE_A_DAY, "rate_burst": 100})) as http:
        r = await http.post("/v1/submissions/csv", content=(HEADER + ROW * 5000 + "\n").encode(),
                            headers={**auth, "Content-Type": "text/csv"})
        assert r.status_code == 422
        assert "at most 1000 rows per request, got more" in r.json()["errors"][0]["message"]
        # 1001 rows parsed, charged up to the burst (100): even one submission must wait.
        r = await http.post("/v1/submissions", json=submission(), headers=auth)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
