"""HTTP handlers: prices, health, readiness and the live page."""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from pricewire_common.clock import iso_from_ns
from pricewire_gateway import messages
from pricewire_gateway.appkeys import CLOCK, LATEST, PAGE, PROBES, RESOLVER
from pricewire_gateway.auth import require_price_reader
from pricewire_gateway.errors import ErrorCode, RequestError

log = structlog.get_logger(__name__)

JSON = "application/json"
HTTP_STATUS: dict[ErrorCode, int] = {
    "unknown_asset": 404,
    "no_price": 404,
    "store_unavailable": 503,
    "bad_cache_entry": 500,
    "bad_message": 400,
    "bad_parameter": 400,
    "unknown_type": 400,
    "unknown_room": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "collector_unavailable": 503,
    "too_many_subscriptions": 400,
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
        response = json_response(messages.encode(messages.error_frame(err)), status=status)
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750: the scheme the client should use
        return response


async def list_prices(request: web.Request) -> web.Response:
    """`GET /api/v1/prices`: every configured asset that has a price, in configured order.

    From Redis, and from PostgreSQL (`stale`) for the assets Redis has none for.
    """
    require_price_reader(request)
    app = request.app
    served = await app[LATEST].get_many(app[RESOLVER].assets)
    now_ns = app[CLOCK]()
    body = messages.PriceList(
        prices=[messages.price_data(s.price, now_ns=now_ns, stale=s.stale) for s in served],
        timestamp=iso_from_ns(now_ns),
    )
    return json_response(messages.encode(body))


async def get_price(request: web.Request) -> web.Response:
    """`GET /api/v1/prices/{asset}`: 404 `unknown_asset` or `no_price`, 503 when no store could tell."""
    require_price_reader(request)
    app = request.app
    served = await app[LATEST].get(app[RESOLVER].require(request.match_info["asset"]))
    body = messages.price_data(served.price, now_ns=app[CLOCK](), stale=served.stale)
    return json_response(messages.encode(body))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return json_response(messages.encode(messages.Health()))


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while NATS and at least one store answer (`degraded` when one store does not), else 503."""
    readiness = await request.app[PROBES].readiness()
    status = 503 if readiness.status == "unavailable" else 200
    if readiness.status != "ready":
        log.info("not_ready", status=readiness.status, failing=[c.name for c in readiness.checks if not c.ok])
    return json_response(messages.encode(readiness), status=status)


async def index(request: web.Request) -> web.Response:
    """The live page."""
    return web.Response(body=request.app[PAGE], content_type="text/html", charset="utf-8")
