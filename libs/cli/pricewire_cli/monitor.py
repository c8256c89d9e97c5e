"""`pricewire monitor`: consensus prices in a live terminal table, from the gateway's WebSocket."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import aiohttp
import msgspec
import structlog
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pricewire_common.lifecycle import stop_on_signals
from pricewire_common.waits import wait_event

log = structlog.get_logger(__name__)

RECONNECT_MAX_S = 10.0
STATUS_STYLE = {"ok": "green", "degraded": "yellow", "stale": "red"}


class PriceData(msgspec.Struct, kw_only=True):
    """The part of a `price_update` the monitor shows."""

    symbol: str
    price: Decimal
    status: str
    confidence: Decimal
    n_sources: int
    n_used: int
    timestamp: str
    change_percent_24h: Decimal | None = None


class Frame(msgspec.Struct, kw_only=True):
    type: str
    data: PriceData | None = None


_FRAME = msgspec.json.Decoder(Frame, float_hook=Decimal)


def decode_frame(payload: str | bytes) -> Frame:
    """A gateway frame, its numbers read as exact Decimals."""
    return _FRAME.decode(payload)


def table(prices: dict[str, PriceData]) -> Table:
    """The rows the monitor prints, one per asset, in arrival order."""
    view = Table(title="Pricewire consensus (USD)", expand=False)
    for column in ("asset", "price", "± conf", "24h %", "status", "sources", "updated"):
        view.add_column(column, justify="right" if column not in ("asset", "status") else "left")
    for asset, p in prices.items():
        change = "-" if p.change_percent_24h is None else f"{p.change_percent_24h:+.2f}%"
        view.add_row(
            asset,
            f"{p.price:,}",
            f"{p.confidence:,}",
            change,
            f"[{STATUS_STYLE.get(p.status, 'white')}]{p.status}[/]",
            f"{p.n_used}/{p.n_sources}",
            p.timestamp[11:23],
        )
    return view


async def watch(url: str) -> None:
    """Follow the gateway's price stream until Ctrl-C, reconnecting with backoff."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    prices: dict[str, PriceData] = {}
    delay = 0.5
    console = Console()
    with Live(table(prices), console=console, refresh_per_second=8) as live:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    async with session.ws_connect(url, heartbeat=20) as ws:
                        delay = 0.5
                        await ws.send_json({"type": "join_room", "room": "prices"})
                        async for message in ws:
                            if message.type != aiohttp.WSMsgType.TEXT:
                                break
                            frame = decode_frame(message.data)
                            if frame.type == "price_update" and frame.data is not None:
                                prices[frame.data.symbol] = frame.data
                                live.update(table(prices))
                            if stop.is_set():
                                break
                except (aiohttp.ClientError, OSError, msgspec.DecodeError) as exc:
                    live.console.print(f"[red]disconnected[/]: {exc}; retrying in {delay:.1f}s")
                    if not await wait_event(stop, delay):
                        delay = min(delay * 2, RECONNECT_MAX_S)
