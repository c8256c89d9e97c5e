"""The typed keys under which the application holds its collaborators (no module-level state)."""

from __future__ import annotations

from aiohttp import web

from pricewire_common.clock import Clock
from pricewire_gateway.archive import Archive
from pricewire_gateway.health import Probes
from pricewire_gateway.hub import Hub
from pricewire_gateway.latest import LatestPrices
from pricewire_gateway.store import PriceStore
from pricewire_gateway.symbols import SymbolResolver

HUB = web.AppKey("hub", Hub)
STORE = web.AppKey("store", PriceStore)
LATEST = web.AppKey("latest", LatestPrices)
ARCHIVE = web.AppKey("archive", Archive)
RESOLVER = web.AppKey("resolver", SymbolResolver)
PROBES = web.AppKey("probes", Probes)
CLOCK = web.AppKey[Clock]("clock")
PAGE = web.AppKey("page", bytes)
