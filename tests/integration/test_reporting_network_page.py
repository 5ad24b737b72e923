"""The network and site page in a real headless Chromium (Debian `chromium`, driven by Playwright).

A demo tenant of two sites goes through the real consumers (scored sessions, alerts, their
supersessions and acknowledgements after various delays, published to the topics reporting
reads); the page is served by the reporting process. A network manager signs in, opens the
network page from the caseload page, picks a span, then a site; a site-bound key sees its own site
only. Every figure the page draws (chart marks and table cells) is compared with what the API
answers for the same scope and span. Screenshots are saved to test-artifacts/.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page
from pymongo import AsyncMongoClient

from services.reporting import rules
from shared.auth import create_key
from shared.events import AllianceDeterioration, SrsScored
from shared.mongo import Document
from tests.support.browser import CHROMIUM, chromium, sign_in
from tests.support.reporting import counters_verified
from tests.support.services import Namespace, ServiceProcess, service_fixture
from tests.support.wait import eventually
from tools.demo import DemoSpec, acknowledgement, demo_events, publish

SPEC = DemoSpec(tenant_id="demo-network", sites=("north", "south"), clinicians_per_site=2, clients_per_clinician=6,
                sessions=9, seed=23)
SERIES = ("sessions", "clients_seen", "pct_sessions_below_cutoff", "alerts_raised", "alerts_acknowledged",
          "median_seconds_to_acknowledge", "mean_change_first_to_latest")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")

reporting = service_fixture("reporting")
counters_agree_after_each_scenario = counters_verified()


@pytest.fixture(scope="module")
async def demo(namespace_m: Namespace, reporting: ServiceProcess) -> dict[str, Any]:
    """Publish the demo tenant, acknowledge two alerts in three after delays from minutes to
    days, and wait until the tenant's trends count every session, alert and acknowledgement."""
    events = list(demo_events(SPEC))
    raised = [e for e in events if isinstance(e, AllianceDeterioration)]
    acks = [acknowledgement(a, a.occurred_at + timedelta(minutes=7 * 3 ** (i % 6)))
            for i, a in enumerate(raised) if i % 3]
    await publish(namespace_m.kafka(), [*events, *acks])
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    try:
        key, _ = await create_key(mongo[namespace_m.database], SPEC.tenant_id, "read")
        south, _ = await create_key(mongo[namespace_m.database], SPEC.tenant_id, "read", "south")
    finally:
        await mongo.close()
    times = [e.administered_at for e in events if isinstance(e, SrsScored)] + [a.occurred_at for a in raised]
    span = {"from": rules.month_of(min(times)), "to": rules.month_of(max(times))}
    sessions = sum(isinstance(e, SrsScored) for e in events)

    async def counted() -> dict[str, Any] | None:
        body = await trends(reporting.url, key, "/v1/summary/trends", span)
        months = body["months"]
        totals = tuple(sum(m[k] for m in months) for k in ("sessions", "alerts_raised", "alerts_acknowledged"))
        return body if totals == (sessions, len({a.alert_id for a in raised}), len(acks)) else None

    await eventually(counted, timeout=90)
    return {"key": key, "south": south, "span": span}


async def trends(base: str, key: str, path: str, span: dict[str, str]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base) as http:
        res = await http.get(path, params=span, headers={"Authorization": f"Bearer {key}"})
    res.raise_for_status()
    body: dict[str, Any] = res.json()
    return body


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


def number(text: str) -> float | None:
    return None if text == "" else float(text)


async def assert_page_shows(page: Page, api: dict[str, Any]) -> None:
    """Every chart mark and table cell of the page holds the API's value for its month and series."""
    months = api["months"]
    drawn = await page.eval_on_selector_all(
        "#trend-charts [data-series]", "els => els.map(e => [e.dataset.series, e.dataset.month, e.dataset.value])")
    assert sorted((s, m, number(v)) for s, m, v in drawn) == sorted(
        (s, m["month"], float(m[s])) for m in months for s in SERIES if m[s] is not None)
    rows = page.locator("#trend-table tbody tr")
    assert await rows.count() == len(months)
    cells = await page.eval_on_selector_all(
        "#trend-table tbody td[data-field]",
        "els => els.map(e => [e.closest('tr').dataset.month, e.dataset.field, e.dataset.value])")
    assert {(m, f): number(v) for m, f, v in cells} == {
        (m["month"], f): (None if m[f] is None else float(m[f])) for m in months for f in (*SERIES, "episodes_ending")}


async def open_page(browser: Browser, base: str) -> tuple[Page, list[str]]:
    context = await browser.new_context(viewport={"width": 1300, "height": 1000})
    page = await context.new_page()
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("request", lambda r: failed.append(r.url) if not r.url.startswith(base) else None)
    return page, failed


async def show_span(page: Page, span: dict[str, str]) -> None:
    await page.fill("#from-month", span["from"])
    await page.fill("#to-month", span["to"])
    await page.click("#network-form button[type=submit]")
    await page.wait_for_function("m => document.querySelectorAll('#trend-table tbody tr').length === m",
                                 arg=len(rules.months_between(span["from"], span["to"])))


async def test_the_network_page_draws_the_tenants_monthly_trends_as_the_api_gives_them(
        browser: Browser, reporting: ServiceProcess, demo: dict[str, Any], artifacts: Path) -> None:
    page, failed = await open_page(browser, reporting.url)
    try:
        await sign_in(page, reporting.url, demo["key"])
        await page.wait_for_selector("#caseload:not([hidden])")
        await page.click("#nav-network")  # reachable from the caseload page
        await page.wait_for_selector("#trend-table:not([hidden])")
        assert "view=network" in page.url
        await show_span(page, demo["span"])
        api = await trends(reporting.url, demo["key"], "/v1/summary/trends", demo["span"])
        assert await page.locator("#site").input_value() == ""
        assert await page.locator("#site option").all_text_contents() == ["Whole network", "Site north", "Site south"]
        await assert_page_shows(page, api)
        assert sum(m["alerts_acknowledged"] for m in api["months"]) > 0
        assert any(m["median_seconds_to_acknowledge"] for m in api["months"])
        assert await page.locator("#trend-charts figure").count() == 5
        await page.screenshot(path=str(artifacts / "reporting-dashboard-network.png"), full_page=True)
    finally:
        await page.context.close()
    assert not failed


async def test_picking_a_site_shows_that_sites_trends(
        browser: Browser, reporting: ServiceProcess, demo: dict[str, Any], artifacts: Path) -> None:
    span = demo["span"]
    page, failed = await open_page(browser, reporting.url)
    try:
        await sign_in(page, reporting.url, demo["key"], query=f"?view=network&from={span['from']}&to={span['to']}")
        await page.wait_for_selector("#trend-table:not([hidden])")
        await page.select_option("#site", "north")
        await page.wait_for_function(
            "() => document.querySelector('#network-title').textContent.startsWith('Site north')")
        assert "site=north" in page.url
        north = await trends(reporting.url, demo["key"], "/v1/sites/north/trends", span)
        tenant = await trends(reporting.url, demo["key"], "/v1/summary/trends", span)
        assert north["months"] != tenant["months"]  # the site is a part of the network, not all of it
        await assert_page_shows(page, north)
        await page.screenshot(path=str(artifacts / "reporting-dashboard-site.png"), full_page=True)
    finally:
        await page.context.close()
    assert not failed


async def test_a_site_bound_key_sees_only_its_own_site(
        browser: Browser, reporting: ServiceProcess, demo: dict[str, Any]) -> None:
    span = demo["span"]
    page, failed = await open_page(browser, reporting.url)
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url))
    try:
        await sign_in(page, reporting.url, demo["south"],
                      query=f"?view=network&site=north&from={span['from']}&to={span['to']}")
        await page.wait_for_selector("#trend-table:not([hidden])")
        assert await page.locator("#site option").all_text_contents() == ["Site south"]
        await assert_page_shows(page, await trends(reporting.url, demo["south"], "/v1/sites/south/trends", span))
    finally:
        await page.context.close()
    assert not failed
    assert not [u for u in asked if "/summary/trends" in u or "/sites/north/" in u]


async def test_months_without_acknowledged_alerts_leave_gaps_not_zeros(
        browser: Browser, reporting: ServiceProcess, demo: dict[str, Any]) -> None:
    span = demo["span"]
    api = await trends(reporting.url, demo["key"], "/v1/summary/trends", span)
    empty = [m["month"] for m in api["months"] if m["median_seconds_to_acknowledge"] is None]
    assert empty  # the demo span has months without any acknowledged alert
    page, _ = await open_page(browser, reporting.url)
    try:
        await sign_in(page, reporting.url, demo["key"], query=f"?view=network&from={span['from']}&to={span['to']}")
        await page.wait_for_selector("#trend-table:not([hidden])")
        for month in empty:
            cell = page.locator(f"#trend-table tr[data-month='{month}'] td[data-field=median_seconds_to_acknowledge]")
            assert await cell.text_content() == "–"
            assert await page.locator(f"#trend-charts [data-series=median_seconds_to_acknowledge][data-month='{month}']"
                                      ).count() == 0
    finally:
        await page.context.close()
