"""The dashboard in a real headless Chromium over a real gateway (NATS, Redis, PostgreSQL): consensus events
published on NATS show on the cards, the candle charts, the venue table, the connection badge, and a signed-in
user's alerts and portfolio, all without a reload. Prices are set by the test, so the page's values are known."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from pricewire_cache_writer.db_projection import insert_prices
from pricewire_cache_writer.migrate import schema_variant
from pricewire_cache_writer.records import price_record
from pricewire_cli.embedded import free_port
from pricewire_common import subjects
from pricewire_common.clock import NS_PER_S
from pricewire_common.config import Settings
from pricewire_common.events import SourceQuote, encode
from pricewire_gateway.service import run
from tests.test_gateway import Gateway, cache, publish
from tests.test_gateway_auth import bearer, migrated, token, with_auth
from tests.test_gateway_core import make_price
from tests.test_page_browser import CHROMIUM, CHROMIUM_ARGS, CHROMIUM_MISSING
from tests.tools import require

pytestmark = pytest.mark.slow

WAIT_MS = 10_000
MINUTE_NS = 60 * NS_PER_S
DASH = "\N{EN DASH}"  # what the page shows between two numbers, and for a value not known yet


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = require(CHROMIUM, CHROMIUM_MISSING)
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@asynccontextmanager
async def gateway_on(settings: Settings, port: int) -> AsyncIterator[Gateway]:
    """The gateway (auth on) on a given port of 127.0.0.1, so a second one can take the first one's place."""
    settings = replace(with_auth(settings), gateway=replace(settings.gateway, host="127.0.0.1", port=port))
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(settings, stop, bound=bound))
    try:
        started: set[asyncio.Future[Any]] = {task, bound}
        await asyncio.wait(started, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        yield Gateway(f"http://127.0.0.1:{bound.result()}", settings, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


@asynccontextmanager
async def dashboard(settings: Settings, browser: Browser) -> AsyncIterator[tuple[Gateway, Page]]:
    """A gateway over a migrated database and the page open on it, its socket connected."""
    await migrated(settings)
    async with gateway_on(settings, 0) as gw:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{gw.url}/")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
        yield gw, page
        assert errors == []  # no script error on the way


def card(page: Page, asset: str) -> Locator:
    return page.locator(f'.card[data-asset="{asset}"]')


async def sign_in(page: Page, user: str) -> str:
    """Paste a token for `user` and sign in; the token used."""
    pasted = token(user)
    await page.fill("#token-input", pasted)
    await page.click("#signin-form button[type=submit]")
    await expect(page.locator("#user-name")).to_have_text(user, timeout=WAIT_MS)
    return pasted


def quotes(*entries: tuple[str, str, str, str | None]) -> tuple[SourceQuote, ...]:
    """(source, price, deviation %, reason) -> the event's venue quotes; a reason marks an excluded one."""
    return tuple(
        SourceQuote(
            source=source,
            symbol="BTC-USDT",
            price=Decimal(price),
            deviation_pct=Decimal(deviation),
            age_ms=250,
            outlier=reason is not None and reason.startswith("outlier"),
            reason=reason,
            weight=Decimal("0") if reason else Decimal("0.5000"),
        )
        for source, price, deviation, reason in entries
    )


async def test_a_card_shows_a_new_consensus_without_reload(
    settings: Settings, browser: Browser, nc: NATS, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, make_price("BTC", 1))  # 47000.50 ± 12.25, 24h -100.10 (-0.2125 %), 2 of 3
    async with dashboard(settings, browser) as (_, page):
        btc = card(page, "BTC")
        await expect(btc.locator(".price")).to_have_text("$47,000.50", timeout=WAIT_MS)
        await expect(btc.locator(".change")).to_have_text("24h: -100.10 (-0.2125%)")
        await expect(btc.locator(".confidence")).to_have_text("± $12.25")
        await expect(btc.locator(".band")).to_have_text(f"$46,988.25 {DASH} $47,012.75")
        await expect(btc.locator(".sources")).to_have_text("2/3")
        await expect(btc.locator(".anomaly")).to_be_hidden()
        await page.evaluate("() => { window.sameDocument = true; }")

        rise = make_price(
            "BTC",
            2,
            price=Decimal("67528.18"),
            confidence=Decimal("32.885"),  # in binary floats 67528.18 + 32.885 is 67561.06499999999
            change_24h=Decimal("50"),
            change_pct_24h=Decimal("0.1063"),
            status="degraded",
            n_used=1,
            anomaly=True,
        )
        await publish(nc, rise)
        await expect(btc.locator(".price")).to_have_text("$67,528.18", timeout=WAIT_MS)
        await expect(btc.locator(".band")).to_have_text(f"$67,495.295 {DASH} $67,561.065")
        await expect(btc.locator(".change")).to_have_text("24h: +50.00 (+0.1063%)")
        await expect(btc.locator(".change")).to_have_attribute("data-direction", "up")
        await expect(btc.locator(".status")).to_have_attribute("data-status", "degraded")
        await expect(btc.locator(".sources")).to_have_text("1/3")
        await expect(btc.locator(".anomaly")).to_be_visible()
        assert await page.evaluate("() => window.sameDocument") is True  # updated in place, not reloaded
        await expect(card(page, "ETH").locator(".price")).to_have_text(DASH)  # no ETH price was published


async def test_the_candle_chart_draws_the_history_and_extends_live(
    settings: Settings, browser: Browser, nc: NATS, redis_client: redis_asyncio.Redis
) -> None:
    now_ns = int(datetime.now(UTC).timestamp() * NS_PER_S)
    minute = now_ns - now_ns % MINUTE_NS
    # Five past minutes, one consensus each, as the cache_writer stores them: five candles.
    history = [
        make_price("BTC", seq, price=Decimal(100 + seq), ts=minute - (6 - seq) * MINUTE_NS + 10 * NS_PER_S)
        for seq in range(1, 6)
    ]
    await migrated(settings)
    conn = await asyncpg.connect(settings.database_url)
    try:
        records = [price_record(p, stream_seq=i) for i, p in enumerate(history, start=1)]
        await insert_prices(conn, records, candles=await schema_variant(conn) == "postgres")
    finally:
        await conn.close()
    await cache(redis_client, history[-1])
    async with dashboard(settings, browser) as (_, page):
        small = card(page, "BTC").locator("canvas.candles")
        big = page.locator("#chart")  # BTC, the first asset, is selected at start
        await expect(small).to_have_attribute("data-candles", "5", timeout=WAIT_MS)
        await expect(small).to_have_attribute("data-last-close", "105")
        await expect(big).to_have_attribute("data-candles", "5")
        await expect(page.locator("#detail")).to_have_attribute("data-asset", "BTC")

        # A live price in a new minute opens a sixth candle...
        await publish(nc, make_price("BTC", 6, price=Decimal("120.5"), ts=minute + 2 * NS_PER_S))
        await expect(small).to_have_attribute("data-candles", "6", timeout=WAIT_MS)
        await expect(small).to_have_attribute("data-last-close", "120.5")
        # ...and one in the same minute moves its close and high, adding no candle.
        await publish(nc, make_price("BTC", 7, price=Decimal("125"), ts=minute + 20 * NS_PER_S))
        await expect(big).to_have_attribute("data-last-close", "125", timeout=WAIT_MS)
        await expect(big).to_have_attribute("data-last-high", "125")
        await expect(big).to_have_attribute("data-candles", "6")
        assert await small.get_attribute("data-candles") == "6"
        label = await big.get_attribute("aria-label")
        assert label is not None and "BTC 1-minute candles: 6, last close $125.00" in label


async def test_the_venue_table_shows_why_a_quote_was_left_out(
    settings: Settings, browser: Browser, nc: NATS, redis_client: redis_asyncio.Redis
) -> None:
    first = make_price(
        "BTC",
        1,
        n_sources=3,
        n_used=2,
        sources=quotes(
            ("sim-a", "47000.40", "-0.0002", None),
            ("sim-b", "47001.00", "0.0011", None),
            ("sim-c", "51700.00", "10.0000", "outlier"),
        ),
    )
    await cache(redis_client, first)
    async with dashboard(settings, browser) as (_, page):
        rows = page.locator("#sources-body tr")
        outlier = page.locator('#sources-body tr[data-source="sim-c"]')
        await expect(rows).to_have_count(3, timeout=WAIT_MS)
        await expect(outlier).to_have_attribute("data-admitted", "false")
        await expect(outlier.locator("td.verdict")).to_have_text("excluded: outlier (deviation)")
        await expect(outlier.locator("td").nth(3)).to_have_text("+10.0000 %")
        await expect(page.locator('#sources-body tr[data-source="sim-a"] td.verdict')).to_have_text("admitted")
        await expect(page.locator('#sources-body tr[data-source="sim-a"] td').nth(6)).to_have_text("0.5000")

        # A live consensus replaces the table: the venue is now out by the MAD test.
        later = msgspec.structs.replace(
            first,
            seq=2,
            sources=quotes(
                ("sim-a", "47000.40", "-0.0002", None),
                ("sim-b", "47001.00", "0.0011", None),
                ("sim-c", "48200.00", "2.5000", "outlier_mad"),
            ),
        )
        await publish(nc, later)
        await expect(outlier.locator("td.verdict")).to_have_text("excluded: outlier (MAD test)", timeout=WAIT_MS)
        await expect(page.locator("#sources-body")).to_have_attribute("data-seq", "2")


async def test_the_connection_badge_follows_the_socket_and_it_reconnects(
    settings: Settings, browser: Browser, nc: NATS, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, make_price("BTC", 1))
    await migrated(settings)
    port = free_port()
    page = await browser.new_page()
    badge = page.locator("#connection")
    async with gateway_on(settings, port) as gw:
        await page.goto(f"{gw.url}/")
        await expect(badge).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
        await sign_in(page, "carol")
    # The gateway stopped: its sockets closed with 1001.
    await expect(badge).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
    await expect(badge).to_contain_text("reconnecting")
    async with gateway_on(settings, port) as gw, aiohttp.ClientSession() as http:
        await expect(badge).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
        # Joined again: a new consensus reaches the same page.
        await publish(nc, make_price("BTC", 2, price=Decimal("47555.55")))
        await expect(card(page, "BTC").locator(".price")).to_have_text("$47,555.55", timeout=WAIT_MS)
        # Signed in again: holdings changed elsewhere reach the page as a portfolio_update on the new socket.
        holdings = {"holdings": [{"symbol": "BTC", "amount": "2"}]}
        async with http.put(f"{gw.url}/api/v1/portfolio", json=holdings, headers=bearer("carol")) as response:
            assert response.status == 200
        await expect(page.locator("#pf-total")).to_have_text("$95,111.10", timeout=WAIT_MS)


async def test_an_alert_created_in_the_page_fires_in_the_page(
    settings: Settings, browser: Browser, nc: NATS, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, make_price("BTC", 1))  # 47000.50
    async with dashboard(settings, browser) as (_, page):
        await page.fill("#token-input", "not.a.token")
        await page.click("#signin-form button[type=submit]")
        await expect(page.locator("#signin-status")).to_contain_text("Sign-in refused", timeout=WAIT_MS)
        await expect(page.locator("#signed-in")).to_be_hidden()
        assert await page.evaluate("() => sessionStorage.getItem('pricewire.token')") is None
        pasted = await sign_in(page, "alice")
        assert await page.evaluate("() => sessionStorage.getItem('pricewire.token')") == pasted
        await page.select_option("#alert-symbol", "BTC")
        await page.select_option("#alert-type", "above")
        await page.click("#alert-form button[type=submit]")  # no target: the gateway's 400 is shown
        await expect(page.locator("#alert-error")).to_have_text(
            "Alert not created: alert_type 'above' needs target_price", timeout=WAIT_MS
        )
        await page.fill("#alert-target", "50000")
        await page.fill("#alert-note", "<b>breakout</b>")
        await page.click("#alert-form button[type=submit]")
        item = page.locator("#alert-list li[data-alert-id]")
        await expect(item).to_have_count(1, timeout=WAIT_MS)
        await expect(item.locator(".what")).to_have_text("BTC at or above $50,000.00")
        await expect(item.locator(".note")).to_have_text(" “<b>breakout</b>”")  # shown as text, not markup
        await expect(item).to_have_attribute("data-armed", "true")

        crossing = make_price("BTC", 2, price=Decimal("50100.75"))
        await nc.jetstream().publish(subjects.price("BTC"), encode(crossing))
        event = page.locator("#alert-events li.live")
        await expect(event).to_have_count(1, timeout=WAIT_MS)
        await expect(event).to_contain_text("BTC at or above $50,000.00: BTC at $50,100.75")
        await expect(item).to_have_attribute("data-armed", "false", timeout=WAIT_MS)

        # Deleting it in the page removes it on the server.
        await item.locator("button.delete").click()
        await expect(page.locator("#alert-list li[data-alert-id]")).to_have_count(0, timeout=WAIT_MS)
        await expect(page.locator("#alert-list")).to_have_attribute("data-count", "0")

        # A change alert takes a signed % and a window instead of a target.
        await page.select_option("#alert-type", "change_pct")
        await expect(page.locator("#alert-target")).to_be_hidden()
        await page.fill("#alert-pct", "-5")
        await page.fill("#alert-window", "600")
        await page.click("#alert-form button[type=submit]")
        await expect(page.locator("#alert-list li[data-alert-id] .what")).to_have_text(
            "BTC changes by -5 % within 600 s", timeout=WAIT_MS
        )
        await expect(page.locator("#alert-error")).to_have_text("")


async def test_a_portfolio_edited_in_the_page_is_valued_live(
    settings: Settings, browser: Browser, nc: NATS, redis_client: redis_asyncio.Redis
) -> None:
    eth = make_price("ETH", 3, price=Decimal("2500"), change_24h=Decimal("50"), change_pct_24h=Decimal("2.04"))
    await cache(redis_client, make_price("BTC", 7), eth)  # BTC 47000.50, 24h -100.10
    async with dashboard(settings, browser) as (_, page):
        await sign_in(page, "bob")
        rows = page.locator("#pf-rows .pf-row")
        await expect(rows).to_have_count(1, timeout=WAIT_MS)  # an empty row to start from
        await rows.nth(0).locator("select").select_option("BTC")
        await rows.nth(0).locator("input").fill("2")
        await page.click("#pf-add")
        await rows.nth(1).locator("select").select_option("ETH")
        await rows.nth(1).locator("input").fill("10")
        await page.click("#pf-form button[type=submit]")
        # 2 x 47000.50 + 10 x 2500; 24h: 2 x -100.10 + 10 x 50 = 299.80.
        total = page.locator("#pf-total")
        await expect(total).to_have_text("$119,001.00", timeout=WAIT_MS)
        await expect(page.locator("#pf-change")).to_contain_text("+299.80")
        await expect(page.locator('#pf-body tr[data-symbol="ETH"] td').nth(2)).to_have_text("$25,000.00")

        await publish(nc, make_price("BTC", 8, price=Decimal("48000")))  # revalued by portfolio_update
        await expect(total).to_have_text("$121,000.00", timeout=WAIT_MS)
        await expect(page.locator('#pf-body tr[data-symbol="BTC"] td').nth(2)).to_have_text("$96,000.00")
        if shot := os.environ.get("PRICEWIRE_SCREENSHOT"):  # a look at the page for a human, not committed
            await page.screenshot(path=shot, full_page=True)
