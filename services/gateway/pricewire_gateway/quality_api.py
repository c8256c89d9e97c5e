"""`GET /api/v1/quality` and `GET /api/v1/quality/{asset}`: the data-quality view (`quality`) over the
latest price of each asset in Redis and the source board's connection states.

Thin: each handler reads the store, the clock and the board, and hands them to the pure view.
"""

from __future__ import annotations

from aiohttp import web

from pricewire_common.clock import iso_from_ns
from pricewire_gateway import messages
from pricewire_gateway.appkeys import CLOCK, RESOLVER, STORE
from pricewire_gateway.auth import require_price_reader
from pricewire_gateway.errors import RequestError
from pricewire_gateway.quality import FreshnessLimits, QualityList, asset_quality
from pricewire_gateway.rest import json_response
from pricewire_gateway.sources_api import BOARD

__all__ = ["LIMITS", "PATH", "get_quality", "install", "list_quality"]

PATH = "/api/v1/quality"
LIMITS = web.AppKey("freshness_limits", FreshnessLimits)


async def list_quality(request: web.Request) -> web.Response:
    """`GET /api/v1/quality`: every configured asset that has a price, in configured order."""
    require_price_reader(request)
    app = request.app
    assets = app[RESOLVER].assets
    prices = await app[STORE].get_many(assets)
    now_ns = app[CLOCK]()
    connections = app[BOARD].states()
    shown = {price.asset for price in prices}
    body = QualityList(
        assets=[asset_quality(p, now_ns=now_ns, limits=app[LIMITS], connections=connections) for p in prices],
        no_price=[asset for asset in assets if asset not in shown],
        timestamp=iso_from_ns(now_ns),
    )
    return json_response(messages.encode(body))


async def get_quality(request: web.Request) -> web.Response:
    """`GET /api/v1/quality/{asset}`: 404 `unknown_asset` or `no_price` when there is nothing to show."""
    require_price_reader(request)
    app = request.app
    asset = app[RESOLVER].require(request.match_info["asset"])
    price = await app[STORE].get(asset)
    if price is None:
        raise RequestError("no_price", f"no price for {asset} yet")
    body = asset_quality(price, now_ns=app[CLOCK](), limits=app[LIMITS], connections=app[BOARD].states())
    return json_response(messages.encode(body))


def install(app: web.Application, limits: FreshnessLimits) -> None:
    """Serve the quality view, with `limits` as the validator's max ages; the source board must be installed."""
    if BOARD not in app:
        raise ValueError("install the sources API first: the quality view shows each source's connection state")
    app[LIMITS] = limits
    app.router.add_get(PATH, list_quality)
    app.router.add_get(PATH + "/{asset}", get_quality)
