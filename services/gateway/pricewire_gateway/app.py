"""The aiohttp application: routes and the collaborators they use, passed in explicitly."""

from __future__ import annotations

from aiohttp import web

from pricewire_common.clock import Clock
from pricewire_gateway import openapi, rest, stream_api, ws
from pricewire_gateway.appkeys import ARCHIVE, CLOCK, HUB, LATEST, PAGE, PROBES, RESOLVER, STORE
from pricewire_gateway.archive import Archive
from pricewire_gateway.auth import PUBLIC_PRICES
from pricewire_gateway.health import Probes
from pricewire_gateway.hub import Hub
from pricewire_gateway.latest import LatestPrices
from pricewire_gateway.page import STATIC_DIR, render_index
from pricewire_gateway.store import PriceStore
from pricewire_gateway.symbols import SymbolResolver


def build_app(
    *,
    hub: Hub,
    store: PriceStore,
    archive: Archive,
    resolver: SymbolResolver,
    probes: Probes,
    clock: Clock,
    public_prices: bool = True,
) -> web.Application:
    """The gateway's routes over the given hub, stores and probes; `public_prices` False: price reads need a token."""
    app = web.Application(middlewares=[rest.request_errors])
    app[PUBLIC_PRICES] = public_prices
    app[HUB] = hub
    app[STORE] = store
    app[ARCHIVE] = archive
    app[LATEST] = LatestPrices(store, archive)
    app[RESOLVER] = resolver
    app[PROBES] = probes
    app[CLOCK] = clock
    app[PAGE] = render_index(resolver.assets)
    app.router.add_get("/", rest.index)
    app.router.add_get("/healthz", rest.healthz)
    app.router.add_get("/readyz", rest.readyz)
    app.router.add_get("/api/v1/prices", rest.list_prices)
    app.router.add_get("/api/v1/prices/{asset}", rest.get_price)
    app.router.add_get("/api/v1/stream", stream_api.stream_prices)
    app.router.add_get("/ws", ws.serve_socket)
    app.router.add_static("/static/", STATIC_DIR)
    openapi.install(app, version="1", public_prices=public_prices)
    return app
