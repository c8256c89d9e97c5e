"""The live page in a real Chromium: cards fill and then update without a reload."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace

import pytest

from pricewire_cli.stack import run_stack
from pricewire_common.config import Settings
from tests.pipeline import running
from tests.tools import require

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_MISSING = "Debian's chromium is not installed (.ci/run installs it)"
# The flags a closed network needs: without them Chromium keeps dialling Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def test_page_shows_live_prices_that_update_without_reload(settings: Settings) -> None:
    chromium = require(CHROMIUM, CHROMIUM_MISSING)
    from playwright.async_api import async_playwright  # noqa: PLC0415 - only this test needs a browser

    settings = replace(settings, gateway=replace(settings.gateway, host="127.0.0.1", port=0))
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with running(asyncio.create_task(run_stack(settings, stop, bound=bound)), stop):
        port = await asyncio.wait_for(bound, timeout=20)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page()
                await page.goto(f"http://127.0.0.1:{port}/")
                assert await page.locator(".card").count() == len(settings.assets)
                btc = page.locator('.card[data-asset="BTC"]')
                await page.wait_for_function(
                    """() => document.querySelector('.card[data-asset="BTC"]').dataset.seq !== undefined""",
                    timeout=20_000,
                )
                first_seq = int(await btc.get_attribute("data-seq") or "0")
                first_price = await btc.locator(".price").inner_text()
                assert first_price.startswith("$")
                # A later consensus arrives over the WebSocket and the same page shows it: no reload.
                await page.wait_for_function(
                    """(seq) => Number(document.querySelector('.card[data-asset="BTC"]').dataset.seq) > seq""",
                    arg=first_seq,
                    timeout=20_000,
                )
                assert await btc.locator(".status").get_attribute("data-status") in {"ok", "degraded", "stale"}
                assert await page.locator("#connection").get_attribute("data-state") == "connected"
                for asset in settings.assets:
                    card = page.locator(f'.card[data-asset="{asset}"]')
                    await page.wait_for_function(
                        """(a) => document.querySelector(`.card[data-asset="${a}"]`).dataset.seq !== undefined""",
                        arg=asset,
                        timeout=20_000,
                    )
                    assert (await card.locator(".price").inner_text()).startswith("$")
            finally:
                await browser.close()
