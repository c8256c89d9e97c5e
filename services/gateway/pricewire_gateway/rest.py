"""HTTP handlers: prices, health, readiness and the live page."""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from pricewire_common.clock import iso_from_ns
from pricewire_gateway import messages
from pricewire_gateway.appkeys import CLOCK, PAGE, PROBES, RESOLVER, STORE
from pricewire_gateway.errors import ErrorCode, RequestError

log = structlog.get_logger(__name__)

JSON = "application/json"
HTTP_STATUS: dict[ErrorCode, int] = {
    "unknown_asset": 404,
    "no_price": 404,
    "store_unavailable": 503,
    "bad_cache_entry": 500,
    "bad_message": 400,
    "unknown_type": 400,
    "unknown_room": 400,
}


def json_response(body: bytes, *, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON)


@web.middleware
async def request_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer a RequestError with its typed body and status."""
    try:
        return await handler(request)
    except RequestError as err:
        status = HTTP_STATUS[err.code]
        if status >= 500:
            log.warning("request_failed", path=request.path, code=err.code, error=str(err))
        return json_response(messages.encode(messages.error_frame(err)), status=status)


async def list_prices(request: web.Request) -> web.Response:
    """`GET /api/v1/prices`: every configured asset that has a price, in configured order."""
    app = request.app
    prices = await app[STORE].get_many(app[RESOLVER].assets)
    body = messages.PriceList(
        prices=[messages.price_data(price) for price in prices],
        timestamp=iso_from_ns(app[CLOCK]()),
    )
    return json_response(messages.encode(body))


async def get_price(request: web.Request) -> web.Response:
    """`GET /api/v1/prices/{asset}`: 404 `unknown_asset` or `no_price` when there is none to give."""
    asset = request.app[RESOLVER].require(request.match_info["asset"])
    price = await request.app[STORE].get(asset)
    if price is None:
        raise RequestError("no_price", f"no price for {asset} yet")
    return json_response(messages.encode(messages.price_data(price)))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return json_response(messages.encode(messages.Health()))


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when NATS, Redis and PostgreSQL all answer, else 503 with each check."""
    readiness = await request.app[PROBES].readiness()
    status = 200 if readiness.status == "ready" else 503
    if status != 200:
        log.info("not_ready", failing=[c.name for c in readiness.checks if not c.ok])
    return json_response(messages.encode(readiness), status=status)


async def index(request: web.Request) -> web.Response:
    """The live page."""
    return web.Response(body=request.app[PAGE], content_type="text/html", charset="utf-8")
