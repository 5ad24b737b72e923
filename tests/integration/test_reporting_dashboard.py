"""The trajectory page in a real headless Chromium (Debian `chromium`, driven by Playwright).

Demo data goes through the real consumers (events published to the topics the service reads),
the page is served by the reporting process, and a person's path is followed: sign in with a
read key, see the caseload with charts, click a client, see the full trajectory of the current
episode, pick an earlier episode. Screenshots are saved to test-artifacts/.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser
from pymongo import AsyncMongoClient

from shared.auth import create_key
from shared.events import AlertStatus, AllianceDeterioration, Severity, SrsScored
from shared.mongo import Document
from tests.support.browser import CHROMIUM, chromium, sign_in
from tests.support.outcome_events import outcome_alert_for, outcome_series, outcome_status, publish_outcome
from tests.support.reporting import counters_verified
from tests.support.services import Namespace, ServiceProcess, service_fixture
from tests.support.wait import eventually
from tools.demo import DemoSpec, acknowledgement, demo_events, deterioration_for, publish, scored

SPEC = DemoSpec(tenant_id="demo-dash", sites=("north", "south"), clinicians_per_site=1, clients_per_clinician=7,
                sessions=9, seed=11)
CLINICIAN = "north-c1"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")


reporting = service_fixture("reporting")
counters_agree_after_each_scenario = counters_verified()


@pytest.fixture(scope="module")
async def demo(namespace_m: Namespace, reporting: ServiceProcess) -> dict[str, Any]:
    """Publish the demo tenant and wait until the clinician's whole caseload is materialized."""
    events = list(demo_events(SPEC))
    # clinicians acknowledged every other alert (drawn dashed)
    acks = [acknowledgement(e) for e in events if isinstance(e, AllianceDeterioration)][::2]
    await publish(namespace_m.kafka(), [*events, *acks])
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    try:
        key, _ = await create_key(mongo[namespace_m.database], SPEC.tenant_id, "read")
    finally:
        await mongo.close()
    scored = [e for e in events if isinstance(e, SrsScored) and e.clinician_id == CLINICIAN]
    # per client and instrument, the episodes with their session counts; the caseload shows the
    # current one (that of the most recently administered session)
    episodes: dict[tuple[str, str], dict[str | None, int]] = {}
    newest: dict[tuple[str, str], SrsScored] = {}
    for e in scored:
        ck = (e.client_id, e.instrument.value)
        episodes.setdefault(ck, {}).setdefault(e.episode_id, 0)
        episodes[ck][e.episode_id] += 1
        if ck not in newest or e.administered_at > newest[ck].administered_at:
            newest[ck] = e
    sessions = {ck: episodes[ck][newest[ck].episode_id] for ck in episodes}
    current = {(k[0], k[1], e.episode_id) for k, e in newest.items()}
    alerts = [e for e in events if isinstance(e, AllianceDeterioration) and e.clinician_id == CLINICIAN
              and (e.client_id, e.instrument.value, e.episode_id) in current]

    async def loaded() -> dict[str, Any] | None:
        async with httpx.AsyncClient(base_url=reporting.url) as http:
            res = await http.get(f"/v1/clinicians/{CLINICIAN}/caseload", headers={"Authorization": f"Bearer {key}"})
        if res.status_code != 200:
            return None
        body: dict[str, Any] = res.json()
        have = {(c["client_id"], c["instrument"]): c["session_count"] for c in body["clients"]}
        marks = sum(len(c["alerts"]) for c in body["clients"])
        acked = sum(a["acknowledged"] for c in body["clients"] for a in c["alerts"])
        mine = {a.alert_id for a in alerts}
        return body if have == sessions and marks == len(mine) and acked == len(
            [a for a in acks if a.alert_id in mine]) else None

    caseload = await eventually(loaded, timeout=60)
    return {"key": key, "caseload": caseload, "sessions": sessions, "alerts": len(alerts),
            "acknowledged": len([a for a in acks if a.alert_id in {x.alert_id for x in alerts}]),
            "episodes": episodes}


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


async def test_caseload_charts_then_a_click_opens_the_full_trajectory(
        browser: Browser, reporting: ServiceProcess, demo: dict[str, Any], artifacts: Path) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(reporting.url) else None)
    try:
        await sign_in(page, reporting.url, demo["key"], CLINICIAN)
        expected = demo["caseload"]["clients"]
        await page.wait_for_selector(f"#cards li.card >> nth={len(expected) - 1}")
        cards = page.locator("#cards li.card")
        assert await cards.count() == len(expected)
        # every card has its chart: a line through one point per session, and the cutoff line
        for i, entry in enumerate(expected):
            card = cards.nth(i)
            assert await card.get_attribute("data-client") == entry["client_id"]
            assert await card.locator("svg.chart path.line").count() == 1
            assert await card.locator("svg.chart circle.point").count() == entry["session_count"]
            assert await card.locator("svg.chart line.cutoff").count() == 1
        # at-risk clients first, and the alerts marked on the charts
        risk = [await cards.nth(i).evaluate("e => e.classList.contains('at-risk')") for i in range(len(expected))]
        assert any(risk) and risk == sorted(risk, reverse=True)
        assert await page.locator("#cards svg.chart circle.alert-marker").count() == demo["alerts"] > 0
        assert await page.locator("#cards svg.chart circle.alert-marker.acknowledged").count() == demo[
            "acknowledged"] > 0
        await page.screenshot(path=str(artifacts / "reporting-dashboard-caseload.png"), full_page=True)

        first = expected[0]
        await cards.nth(0).click()
        await page.wait_for_selector("#detail svg.chart path.line")
        assert await page.locator("#detail").is_visible()
        assert await page.locator("#detail svg.chart circle.point").count() == first["session_count"]
        assert await page.locator("#detail-table tbody tr").count() == first["session_count"]
        assert await page.locator("#detail svg.chart line.cutoff").count() == 1
        assert first["client_id"] in (await page.text_content("#detail-title") or "")
        assert f"client={first['client_id']}" in page.url
        await page.screenshot(path=str(artifacts / "reporting-dashboard-trajectory.png"), full_page=True)

        await page.click("#back")
        await page.wait_for_selector("#cards li.card")
        assert await page.locator("#caseload").is_visible()
    finally:
        await context.close()
    assert not failed
    assert not outside  # the page needs no other origin


async def test_a_deep_link_opens_the_clients_trajectory_after_sign_in(
        browser: Browser, reporting: ServiceProcess, demo: dict[str, Any]) -> None:
    entry = demo["caseload"]["clients"][-1]
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await sign_in(page, reporting.url, demo["key"],
                      query=f"?client={entry['client_id']}&instrument={entry['instrument']}")
        await page.wait_for_selector("#detail svg.chart path.line")
        assert await page.locator("#detail svg.chart circle.point").count() == entry["session_count"]
    finally:
        await context.close()


async def test_the_detail_page_offers_the_clients_other_episodes(
        browser: Browser, reporting: ServiceProcess, demo: dict[str, Any], artifacts: Path) -> None:
    (client, instrument), counts = next((k, v) for k, v in sorted(demo["episodes"].items()) if len(v) > 1)
    entry = next(c for c in demo["caseload"]["clients"] if c["client_id"] == client)
    older = next(e for e in counts if e != entry["episode_id"])
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    try:
        await sign_in(page, reporting.url, demo["key"], query=f"?client={client}&instrument={instrument}")
        await page.wait_for_selector("#detail svg.chart path.line")
        assert await page.locator("#episode-picker").is_visible()
        assert await page.locator("#episode option").count() == len(counts)
        assert await page.locator("#episode").input_value() == entry["episode_id"]
        assert await page.locator("#detail-table tbody tr").count() == counts[entry["episode_id"]]
        await page.select_option("#episode", older)
        await page.wait_for_function(
            "n => document.querySelectorAll('#detail-table tbody tr').length === n", arg=counts[older])
        assert f"episode={older}".replace("/", "%2F") in page.url
        assert await page.locator("#detail svg.chart circle.point").count() == counts[older]
        assert older in (await page.text_content("#detail-title") or "")
        await page.screenshot(path=str(artifacts / "reporting-dashboard-older-episode.png"), full_page=True)
        await page.go_back()
        await page.wait_for_function(
            "n => document.querySelectorAll('#detail-table tbody tr').length === n", arg=counts[entry["episode_id"]])
    finally:
        await context.close()


async def test_a_wrong_key_is_sent_back_to_sign_in(browser: Browser, reporting: ServiceProcess,
                                                   demo: dict[str, Any]) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await sign_in(page, reporting.url, "ak_wrong", CLINICIAN)
        await page.wait_for_selector("#signin-error:not(:empty)")
        assert await page.locator("#signin").is_visible()
        assert await page.locator("#cards li.card").count() == 0
    finally:
        await context.close()


ORS_TENANT = "demo-ors"
ORS_CLIENT = "ors-1"
# An episode where the outcome falls while the alliance holds, then both fall: the ORS from an intake of
# 18 to 11 (reliable deterioration at sessions 5 and 6), the SRS dropping at session 6.
ORS_TOTALS = [18.0, 17.0, 15.5, 14.0, 12.5, 11.0]
SRS_TOTALS = [38.0, 37.5, 37.0, 37.5, 36.5, 31.0]


@pytest.fixture(scope="module")
async def outcome_demo(namespace_m: Namespace, reporting: ServiceProcess) -> dict[str, Any]:
    """One client's episode on both scales through the real consumers: an outcome alert raised at
    session 5 and superseded by session 6's, an alliance alert at session 6 with outcome_at_risk."""
    srs, previous = [], None
    for n, total in enumerate(SRS_TOTALS, start=1):
        srs.append(scored(ORS_TENANT, ORS_CLIENT, n, total, episode_id="ep-1", previous_total=previous,
                          clinician_id=CLINICIAN))
        previous = total
    alliance = deterioration_for(srs[-1])
    assert alliance is not None
    alliance = alliance.model_copy(update={"outcome_at_risk": True, "severity": Severity.CRITICAL})
    ors = outcome_series(ORS_TENANT, ORS_CLIENT, ORS_TOTALS, clinician_id=CLINICIAN)
    earlier, latest = outcome_alert_for(ors[4]), outcome_alert_for(ors[5])
    await publish(namespace_m.kafka(), [*srs, alliance])
    await publish_outcome(namespace_m.kafka(), [*ors, earlier, latest, outcome_status(earlier, AlertStatus.SUPERSEDED)])
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    try:
        key, _ = await create_key(mongo[namespace_m.database], ORS_TENANT, "read")
    finally:
        await mongo.close()

    async def loaded() -> dict[str, Any] | None:
        async with httpx.AsyncClient(base_url=reporting.url) as http:
            res = await http.get(f"/v1/clients/{ORS_CLIENT}/trajectory", headers={"Authorization": f"Bearer {key}"})
        body: dict[str, Any] = res.json() if res.status_code == 200 else {}
        marks = [r for r in body.get("aligned", []) for scale in ("srs", "ors") if (r[scale] or {}).get("alert")]
        superseded = [a for a in (body.get("outcome") or {}).get("alerts", []) if a["status"] == "superseded"]
        return body if len(body.get("sessions", [])) == 6 and len(marks) == 3 and superseded else None

    return {"key": key, "trajectory": await eventually(loaded, timeout=60)}


async def test_the_trajectory_page_draws_the_ors_with_its_band_and_the_srs_with_both_kinds_of_alert(
        browser: Browser, reporting: ServiceProcess, outcome_demo: dict[str, Any], artifacts: Path) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 1400})
    page = await context.new_page()
    try:
        await sign_in(page, reporting.url, outcome_demo["key"], query=f"?client={ORS_CLIENT}&instrument=SRS")
        await page.wait_for_selector("#outcome-chart svg path.ors-line")
        assert await page.locator("#outcome").is_visible()
        chart = page.locator("#outcome-chart svg.combined")
        # the ORS line with its cutoff and the reliable change band (intake 18 ± 5), the SRS line with its cutoff
        assert await chart.locator("circle.ors-point").count() == len(ORS_TOTALS)
        assert await chart.locator("circle.srs-point").count() == len(SRS_TOTALS)
        assert await chart.locator("path.srs-line").count() == 1
        assert await chart.locator("line.ors-cutoff").get_attribute("data-value") == "25"
        assert await chart.locator("line.srs-cutoff").get_attribute("data-value") == str(
            outcome_demo["trajectory"]["cutoff"]).removesuffix(".0")
        band = chart.locator("rect.rci-band")
        assert (await band.get_attribute("data-low"), await band.get_attribute("data-high")) == ("13", "23")
        # the points sit where the API says: a point below the band's foot is lower on the page
        below = await chart.locator("circle.ors-point[data-session='6']").get_attribute("cy")
        foot = await band.evaluate("r => r.y.baseVal.value + r.height.baseVal.value")
        assert below is not None and float(below) > foot
        # alerts of both kinds on their sessions: the superseded outcome alert faint, the alliance one critical
        outcome_marks = chart.locator("rect.outcome-marker")
        assert await outcome_marks.count() == 2
        assert await chart.locator("rect.outcome-marker.superseded[data-session='5']").count() == 1
        alliance = chart.locator("circle.alliance-marker")
        assert (await alliance.count(), await alliance.get_attribute("data-severity"),
                await alliance.get_attribute("data-session")) == (1, "critical", "6")
        rows = page.locator("#outcome-table tbody tr")
        assert await rows.count() == len(ORS_TOTALS)
        last = rows.nth(len(ORS_TOTALS) - 1)
        assert "reliable deterioration" in (await last.text_content() or "")
        assert "outcome at risk" in (await last.locator("td.alliance-alert").text_content() or "")
        # the SRS chart above is unchanged: one point per alliance session
        assert await page.locator("#detail-chart svg.chart circle.point").count() == len(SRS_TOTALS)
        await page.screenshot(path=str(artifacts / "reporting-dashboard-outcome.png"), full_page=True)
    finally:
        await context.close()


async def test_a_client_without_ors_sessions_shows_no_outcome_chart(
        browser: Browser, reporting: ServiceProcess, demo: dict[str, Any]) -> None:
    entry = demo["caseload"]["clients"][0]
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await sign_in(page, reporting.url, demo["key"], query=f"?client={entry['client_id']}&instrument=SRS")
        await page.wait_for_selector("#detail svg.chart path.line")
        assert await page.locator("#outcome").is_hidden()
    finally:
        await context.close()
