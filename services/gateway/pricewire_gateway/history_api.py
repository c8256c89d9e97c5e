"""`GET /api/v1/history/{asset}` (OHLCV candles) and `GET /api/v1/ticks/{asset}` (raw ticks), from PostgreSQL.

Thin: each handler resolves the asset, checks the parameters (`params`), reads the archive and hands
the rows to the views (`history`). Bad parameters are 400 `bad_parameter`, an unknown asset 404
`unknown_asset` (as for prices), PostgreSQL down 503 `store_unavailable`.
"""

from __future__ import annotations

from aiohttp import web

from pricewire_common.clock import datetime_from_ns, iso_from_ns
from pricewire_gateway import history
from pricewire_gateway.appkeys import ARCHIVE, CLOCK, RESOLVER
from pricewire_gateway.auth import require_price_reader
from pricewire_gateway.params import history_query, ticks_query
from pricewire_gateway.rest import json_response

__all__ = ["HISTORY_PATH", "TICKS_PATH", "get_history", "get_ticks", "install"]

HISTORY_PATH = "/api/v1/history/{asset}"
TICKS_PATH = "/api/v1/ticks/{asset}"


async def get_history(request: web.Request) -> web.Response:
    """Candles of the asset's consensus price, oldest first."""
    require_price_reader(request)
    app = request.app
    asset = app[RESOLVER].require(request.match_info["asset"])
    now_ns = app[CLOCK]()
    query = history_query(asset, request.query.items(), now=datetime_from_ns(now_ns))
    found, truncated = await app[ARCHIVE].candles(query)
    body = history.CandleList(
        symbol=asset,
        interval=query.interval,
        start=history.iso_ms(query.start),
        end=history.iso_ms(query.end),
        candles=[history.candle_view(candle) for candle in found],
        truncated=truncated,
        timestamp=iso_from_ns(now_ns),
    )
    return json_response(history.encode(body))


async def get_ticks(request: web.Request) -> web.Response:
    """The asset's raw ticks (every venue and quote currency, or one `source`), newest first."""
    require_price_reader(request)
    app = request.app
    asset = app[RESOLVER].require(request.match_info["asset"])
    query = ticks_query(asset, request.query.items())
    found, truncated = await app[ARCHIVE].ticks(query)
    body = history.TickList(
        symbol=asset,
        source=query.source,
        start=None if query.start is None else history.iso_us(query.start),
        end=None if query.end is None else history.iso_us(query.end),
        ticks=[history.tick_view(row) for row in found],
        truncated=truncated,
        timestamp=iso_from_ns(app[CLOCK]()),
    )
    return json_response(history.encode(body))


def install(app: web.Application) -> None:
    """Serve the history endpoints; the app must hold the archive (ARCHIVE)."""
    if ARCHIVE not in app:
        raise ValueError("the history endpoints read the archive: put it in the app first")
    app.router.add_get(HISTORY_PATH, get_history)
    app.router.add_get(TICKS_PATH, get_ticks)
