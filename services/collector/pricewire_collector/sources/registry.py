"""Which module implements which live source. Imported lazily: a deployment loads only what it runs.

Each venue module exposes `NAME`, `build(settings) -> Source` and `build_parser(settings) -> Parser`.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

from pricewire_collector.sources.base import Parser, Source
from pricewire_common.config import LIVE_SOURCES, Settings
from pricewire_common.errors import ConfigError

MODULES = {
    "binance": "pricewire_collector.sources.binance",
    "coinbase": "pricewire_collector.sources.coinbase",
    "kraken": "pricewire_collector.sources.kraken",
    "coingecko": "pricewire_collector.sources.coingecko",
    "ccxt": "pricewire_collector.sources.ccxt_source",
}
assert set(MODULES) == set(LIVE_SOURCES)


class _VenueModule(Protocol):
    NAME: str

    def build(self, settings: Settings) -> Source: ...

    def build_parser(self, settings: Settings) -> Parser: ...


def _module(name: str) -> _VenueModule:
    try:
        path = MODULES[name]
    except KeyError:
        raise ConfigError("PRICEWIRE_SOURCES", f"no source named {name!r}; known: {', '.join(MODULES)}") from None
    return cast(_VenueModule, importlib.import_module(path))


def build_sources(settings: Settings) -> list[Source]:
    """The sources `settings.live.sources` names, in that order."""
    return [_module(name).build(settings) for name in settings.live.sources]


def build_parser(name: str, settings: Settings) -> Parser:
    """The frame parser of source `name` (for replay and benchmarks).

    A ccxt exchange records its frames under its own id (`bitstamp`): the ccxt parser reads them all.
    """
    if name not in MODULES and name in settings.live.ccxt_exchanges:
        name = "ccxt"
    return _module(name).build_parser(settings)
