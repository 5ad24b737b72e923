"""The SRS and the ORS in one clinical record, through the four service processes on the real local
broker and store (docs/clinical-records.md, "Session identity"; docs/outcome.md):

- a submission id names one submission of one scale: an EHR that posts both forms of a session
  under its appointment id gets both sessions scored, neither superseding the other, both in the
  trajectory, and each answered by reporting's submission status (`scale=alliance|outcome`);
- a client whose only sessions are ORS sessions (the ORS is given at the start of a session, so
  this is every client between the two forms) has a trajectory: no SRS sessions, its outcome
  series filled.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_ors_pipeline import START
from tests.support.browser import CHROMIUM, trajectory_page
from tests.support.services import Namespace, ServiceProcess
from tests.support.wait import eventually
from tools.recorder import Record, TopicRecorder

pytestmark = pytest.mark.asyncio(loop_scope="session")


def form(client_id: str, session: int, instrument: str, total: float, *, submission_id: str | None = None,
         site_id: str = "north") -> dict[str, Any]:
    """A session's form: the ORS at its start, the SRS 50 minutes later (a week between sessions)."""
    at = START + timedelta(days=7 * session, minutes=50 if instrument == "SRS" else 0)
    quarter = round(total / 4, 1)
    values = (quarter, quarter, quarter, round(total - 3 * quarter, 1))
    names = (("individually", "interpersonally", "socially", "overall") if instrument == "ORS"
             else ("relationship", "goals", "approach", "overall"))
    body: dict[str, Any] = {"client_id": client_id, "clinician_id": "c-17", "site_id": site_id,
                            "instrument": instrument, "session_number": session, "administered_at": at.isoformat(),
                            "items": dict(zip(names, values, strict=True))}
    if submission_id is not None:
        body["submission_id"] = submission_id
    return body


async def post_all(http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
                   forms: list[dict[str, Any]]) -> None:
    for body in forms:
        r = await http.post(f"{services['intake'].url}/v1/submissions", json=body,
                            headers={"Authorization": f"Bearer {keys['submit']}"})
        assert r.status_code == 202, r.text


async def read(http: httpx.AsyncClient, url: str, keys: dict[str, str], **params: str) -> httpx.Response:
    return await http.get(url, params=params, headers={"Authorization": f"Bearer {keys['read']}"})


async def trajectory(http: httpx.AsyncClient, services: dict[str, ServiceProcess], keys: dict[str, str],
                     client_id: str) -> dict[str, Any]:
    """The client's trajectory as reporting shows it now (or the refusal, so that a wait shows it)."""
    r = await read(http, f"{services['reporting'].url}/v1/clients/{client_id}/trajectory", keys)
    return r.json() if r.status_code == 200 else {"status": r.status_code, "body": r.text}


def about(client_id: str, records: list[Record]) -> list[dict[str, Any]]:
    return [b for b in (json.loads(r.value) for r in records) if b["client_id"] == client_id]


async def test_an_srs_and_an_ors_posted_under_one_submission_id_are_two_submissions_scored_and_shown(
    services: dict[str, ServiceProcess], keys: dict[str, str], namespace_m: Namespace,
) -> None:
    client, topics = "client-shared-ids", namespace_m.kafka().topics()
    async with httpx.AsyncClient(timeout=15) as http:
        await post_all(http, services, keys, [
            form(client, 1, "ORS", 20.0, submission_id="appt-0001"), form(client, 1, "SRS", 38.0,
                                                                             submission_id="appt-0001"),
            form(client, 2, "SRS", 37.0, submission_id="appt-0002"), form(client, 2, "ORS", 22.0,
                                                                             submission_id="appt-0002"),
        ])

        def both_sessions(records: list[Record]) -> bool:
            return len(about(client, records)) >= 2

        async with (TopicRecorder(namespace_m.stack.bootstrap, topics.scored) as srs_scored,
                    TopicRecorder(namespace_m.stack.bootstrap, topics.ors_scored) as ors_scored):
            srs_events = about(client, await srs_scored.until(both_sessions, timeout=60))
            ors_events = about(client, await ors_scored.until(both_sessions, timeout=60))
        for events, instrument in ((srs_events, "SRS"), (ors_events, "ORS")):
            assert sorted((e["submission_id"], e["instrument"], e["session_number"], e["revision"], e["supersedes"])
                          for e in events) == [("appt-0001", instrument, 1, 1, None),
                                               ("appt-0002", instrument, 2, 1, None)]
        assert not {e["event_id"] for e in srs_events} & {e["event_id"] for e in ors_events}

        def both_scales_shown(body: dict[str, Any]) -> bool:
            return len(body.get("sessions", [])) == 2 and len((body.get("outcome") or {}).get("sessions", [])) == 2

        shown = await eventually(lambda: trajectory(http, services, keys, client), until=both_scales_shown, timeout=60)
        assert [(s["submission_id"], s["total"]) for s in shown["sessions"]] == [("appt-0001", 38.0),
                                                                                ("appt-0002", 37.0)]
        assert [(s["submission_id"], s["total"]) for s in shown["outcome"]["sessions"]] == [("appt-0001", 20.0),
                                                                                           ("appt-0002", 22.0)]

        url = f"{services['reporting'].url}/v1/submissions/appt-0002"
        default, alliance, outcome = [(await read(http, url, keys, **q)).json()
                                      for q in ({}, {"scale": "alliance"}, {"scale": "outcome"})]
        assert default == alliance
        assert [(b["status"], b["scale"], b["instrument"], b["total"], b["revision"])
                for b in (alliance, outcome)] == [("scored", "alliance", "SRS", 37.0, 1),
                                                  ("scored", "outcome", "ORS", 22.0, 1)]


async def test_the_rejected_submissions_listing_names_the_scale_of_each_rejection(
    services: dict[str, ServiceProcess], keys: dict[str, str],
) -> None:
    client = "client-shared-rejected"
    async with httpx.AsyncClient(timeout=15) as http:
        await post_all(http, services, keys, [form(client, 1, "SRS", 38.0, submission_id="appt-r-1")])
        # The same appointment's forms from a site that does not own the client: both refused.
        await post_all(http, services, keys, [
            form(client, 2, "ORS", 20.0, submission_id="appt-r-2", site_id="south"),
            form(client, 2, "SRS", 36.0, submission_id="appt-r-2", site_id="south")])

        async def appointment_listed() -> list[dict[str, Any]]:
            r = await read(http, f"{services['reporting'].url}/v1/submissions", keys)
            return [s for s in r.json()["submissions"] if s["submission_id"] == "appt-r-2"]

        listed = await eventually(appointment_listed, until=lambda mine: len(mine) == 2, timeout=60)
        assert sorted((s["scale"], s["instrument"], s["reason"]) for s in listed) == [
            ("alliance", "SRS", "site_conflict"), ("outcome", "ORS", "site_conflict")]


async def test_a_client_with_only_ors_sessions_has_a_trajectory_with_its_outcome_series(
    services: dict[str, ServiceProcess], keys: dict[str, str],
) -> None:
    client = "client-ors-only"
    async with httpx.AsyncClient(timeout=15) as http:
        await post_all(http, services, keys, [form(client, 1, "ORS", 20.0), form(client, 2, "ORS", 24.0)])

        shown = await eventually(lambda: trajectory(http, services, keys, client), timeout=60,
                                 until=lambda body: len((body.get("outcome") or {}).get("sessions", [])) == 2)
    assert (shown["instrument"], shown["sessions"], shown["alerts"], shown["latest_total"], shown["at_risk"]) == (
        "SRS", [], [], None, False)
    assert [(s["session_number"], s["total"]) for s in shown["outcome"]["sessions"]] == [(1, 20.0), (2, 24.0)]
    assert (shown["site_id"], shown["clinician_id"], shown["episode_id"]) == (
        "north", "c-17", shown["outcome"]["episode_id"])
    assert [[a["srs"], a["ors"]["total"]] for a in shown["aligned"]] == [[None, 20.0], [None, 24.0]]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
async def test_the_trajectory_page_of_a_client_with_only_ors_sessions_shows_its_outcome_series(
    services: dict[str, ServiceProcess], keys: dict[str, str], artifacts: Path,
) -> None:
    client, reporting = "client-ors-only-page", services["reporting"].url
    async with httpx.AsyncClient(timeout=15) as http:
        await post_all(http, services, keys, [form(client, 1, "ORS", 20.0), form(client, 2, "ORS", 14.0)])

        async def scored_both() -> bool:
            r = await read(http, f"{reporting}/v1/clients/{client}/trajectory", keys)
            return r.status_code == 200 and len(r.json()["outcome"]["sessions"]) == 2

        await eventually(scored_both, timeout=60)
    async with trajectory_page(reporting, keys["read"], client) as page:
        await page.wait_for_selector("#outcome-chart svg path.ors-line")
        chart = page.locator("#outcome-chart svg.combined")
        assert await chart.locator("circle.ors-point").count() == 2
        assert await chart.locator("circle.srs-point").count() == 0
        assert "outcome sessions only" in (await page.locator("#detail-meta").text_content() or "")
        assert await page.locator("#no-alliance").is_visible()
        assert await page.locator("#detail-chart svg").count() == 0
        await page.screenshot(path=str(artifacts / "e2e-ors-only-trajectory-page.png"), full_page=True)
