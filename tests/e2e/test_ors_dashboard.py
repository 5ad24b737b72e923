"""The combined trajectory page end to end (issue 16): ORS and SRS forms posted to intake, scored by
scoring, alerted by alerts and materialized by reporting (the four service processes on the real
local broker and store), then read in a real headless Chromium - the ORS line with its cutoff and
reliable change band, the SRS line with its cutoff, both kinds of alert marked. The screenshot is
kept under test-artifacts/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_ors_pipeline import ors, post_all, srs
from tests.support.browser import CHROMIUM, chromium, sign_in
from tests.support.services import ServiceProcess
from tests.support.wait import eventually

pytestmark = [pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")]

CLIENT = "client-ors-page"


async def test_the_trajectory_page_shows_both_scales_of_the_posted_sessions_with_both_kinds_of_alert(
    services: dict[str, ServiceProcess], keys: dict[str, str], artifacts: Path,
) -> None:
    # The ORS falls 6 points from its intake by session 3 (reliable deterioration: an outcome
    # alert); the SRS falls below its cutoff in the same session (an alliance alert, outcome at risk).
    await post_all(services, keys, [
        ors(CLIENT, 1, 20.0), srs(CLIENT, 1, (9.5, 9.5, 9.5, 9.5)),
        ors(CLIENT, 2, 21.0), srs(CLIENT, 2, (9.5, 9.5, 9.6, 9.5)),
        ors(CLIENT, 3, 14.0), srs(CLIENT, 3, (8.0, 7.5, 8.0, 8.0)),
    ])
    read = {"Authorization": f"Bearer {keys['read']}"}
    reporting = services["reporting"].url

    async def shown() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=15) as http:
            res = await http.get(f"{reporting}/v1/clients/{CLIENT}/trajectory", headers=read)
        return res.json() if res.status_code == 200 else {"status": res.status_code, "body": res.text}

    def both_alerts(body: dict[str, Any]) -> bool:
        rows = body.get("aligned", [])
        return bool(len(rows) == 3 and all(r["srs"] and r["ors"] for r in rows) and rows[2]["srs"]["alert"] and
                    rows[2]["ors"]["alert"] and rows[2]["srs"]["alert"].get("outcome_at_risk"))

    trajectory = await eventually(shown, until=both_alerts, timeout=90)
    outcome = trajectory["outcome"]
    assert (outcome["intake_total"], outcome["reliable_change_band"]) == (20.0, {"low": 15.0, "high": 25.0})
    assert outcome["sessions"][2]["change"] == "reliable_deterioration"

    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 1280, "height": 1400})
        page = await context.new_page()
        try:
            await sign_in(page, reporting, keys["read"], query=f"?client={CLIENT}&instrument=SRS")
            await page.wait_for_selector("#outcome-chart svg path.ors-line")
            chart = page.locator("#outcome-chart svg.combined")
            assert await chart.locator("circle.ors-point").count() == 3
            assert await chart.locator("circle.srs-point").count() == 3
            assert await chart.locator("path.srs-line").count() == 1
            assert await chart.locator("line.ors-cutoff").get_attribute("data-value") == "25"
            assert await chart.locator("line.srs-cutoff").count() == 1
            band = chart.locator("rect.rci-band")
            assert (await band.get_attribute("data-low"), await band.get_attribute("data-high")) == ("15", "25")
            assert await chart.locator("rect.outcome-marker[data-session='3']").count() == 1
            alliance = chart.locator("circle.alliance-marker[data-session='3']")
            assert await alliance.get_attribute("data-severity") == "critical"
            await page.screenshot(path=str(artifacts / "e2e-ors-trajectory-page.png"), full_page=True)
        finally:
            await context.close()
