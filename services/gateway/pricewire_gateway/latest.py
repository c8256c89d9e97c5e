"""The latest price of each asset as the price endpoints serve it: Redis first, PostgreSQL when Redis has none.

The I/O around `fallback`: ask Redis, ask PostgreSQL only about what Redis could not give (so a
healthy gateway never touches the database for prices), and let the pure decision pick the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from pricewire_gateway.archive import Archive
from pricewire_gateway.errors import StoreUnavailable
from pricewire_gateway.fallback import Archived, Live, Served, choose_many, choose_one, missing
from pricewire_gateway.store import PriceStore

log = structlog.get_logger(__name__)


class LatestPrices:
    """Latest prices from the Redis projection, falling back to the PostgreSQL one."""

    def __init__(self, store: PriceStore, archive: Archive) -> None:
        self._store = store
        self._archive = archive
        self.fallbacks = 0
        """Prices served from PostgreSQL because Redis had none to give."""

    async def get(self, asset: str) -> Served:
        """One asset's price; RequestError `no_price` or `store_unavailable` when neither store gives one.

        A Redis entry that does not decode raises CorruptEntry: a projection defect is reported, not
        hidden behind an older price.
        """
        live: Live
        try:
            live = {asset: await self._store.get(asset)}
        except StoreUnavailable as exc:
            live = exc
        served = choose_one(asset, live, await self._archived([asset], live))
        self._count([served])
        return served

    async def get_many(self, assets: Sequence[str]) -> list[Served]:
        """The price of every asset of `assets` either store has one for, in that order.

        StoreUnavailable only when neither store answered.
        """
        live: Live
        try:
            live = await self._store.lookup_many(assets)
        except StoreUnavailable as exc:
            live = exc
        served = choose_many(assets, live, await self._archived(assets, live))
        self._count(served)
        return served

    async def _archived(self, assets: Sequence[str], live: Live) -> Archived | None:
        wanted = missing(assets, live)
        if not wanted:
            return None
        try:
            return await self._archive.latest(wanted)
        except StoreUnavailable as exc:
            log.warning(
                "archive_unavailable", assets=wanted, error=exc.detail, redis_down=isinstance(live, StoreUnavailable)
            )
            return exc

    def _count(self, served: Sequence[Served]) -> None:
        stale = [s.price for s in served if s.stale]
        if stale:
            self.fallbacks += len(stale)
            log.info("served_from_archive", assets=[p.asset for p in stale], fallbacks_total=self.fallbacks)
