"""Real headless Chromium for the dashboard tests: Debian's `chromium`, driven by Playwright."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium for the length of the block."""
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            await b.close()


async def sign_in(page: Page, base: str, key: str, clinician: str = "", query: str = "") -> None:
    """Open the dashboard (with `query`) and sign in with a read key (and a clinician, if given)."""
    await page.goto(f"{base}/dashboard{query}")
    await page.fill("#key", key)
    if clinician:
        await page.fill("#clinician", clinician)
    await page.click("#signin button[type=submit]")


@asynccontextmanager
async def trajectory_page(base: str, key: str, client: str, instrument: str = "SRS",
                          height: int = 1200) -> AsyncIterator[Page]:
    """The dashboard's trajectory page of `client` on `instrument`, signed in with a read key, in a
    fresh headless Chromium, for the length of the block."""
    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 1280, "height": height})
        try:
            page = await context.new_page()
            await sign_in(page, base, key, query=f"?client={client}&instrument={instrument}")
            yield page
        finally:
            await context.close()
