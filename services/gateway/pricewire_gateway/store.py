"""Reads of the latest prices from Redis: `price:<ASSET>:detail`, written by cache_writer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

import redis.asyncio as redis_asyncio
import structlog
from redis.exceptions import RedisError

from pricewire_common.errors import DecodeError
from pricewire_common.events import Price, decode_price
from pricewire_common.keys import detail_key
from pricewire_gateway.errors import CorruptEntry, StoreUnavailable

log = structlog.get_logger(__name__)

LookupResult = Literal["hit", "miss", "error"]


class PriceStore:
    """Latest Price per asset, as the Redis projection holds it."""

    def __init__(self, redis: redis_asyncio.Redis) -> None:
        self._redis = redis
        self.lookups: Counter[LookupResult] = Counter()
        """Per asset looked up: `hit`, `miss` (no entry, or an unreadable one) or `error` (Redis did not answer)."""
        self.corrupt = 0
        """Entries that did not decode (each one logged)."""

    async def get(self, asset: str) -> Price | None:
        """The asset's latest price, None if there is none; CorruptEntry if it does not decode."""
        key = detail_key(asset)
        try:
            raw = await self._redis.get(key)
        except RedisError as exc:
            self.lookups["error"] += 1
            raise StoreUnavailable("redis", str(exc) or type(exc).__name__) from exc
        self.lookups["miss" if raw is None else "hit"] += 1
        return None if raw is None else self._decode(key, raw)

    async def get_many(self, assets: Sequence[str]) -> list[Price]:
        """The latest prices of `assets` that have one, in that order (one MGET).

        An entry that does not decode is logged and counted, and left out so the others are served.
        """
        found = await self.lookup_many(assets)
        return [price for price in found.values() if price is not None]

    async def lookup_many(self, assets: Sequence[str]) -> dict[str, Price | None]:
        """Each asset's latest price, None for the assets with none, in `assets` order (one MGET).

        An asset whose entry does not decode is logged, counted and absent from the answer: it has an
        entry, just not a readable one.
        """
        if not assets:
            return {}
        keys = [detail_key(asset) for asset in assets]
        try:
            values = await self._redis.mget(keys)
        except RedisError as exc:
            self.lookups["error"] += len(keys)
            raise StoreUnavailable("redis", str(exc) or type(exc).__name__) from exc
        found: dict[str, Price | None] = {}
        hits = sum(1 for raw in values if raw is not None)
        self.lookups["hit"] += hits
        self.lookups["miss"] += len(keys) - hits
        for asset, key, raw in zip(assets, keys, values, strict=True):
            if raw is None:
                found[asset] = None
                continue
            try:
                found[asset] = self._decode(key, raw)
            except CorruptEntry:
                continue  # logged and counted by _decode
        return found

    def _decode(self, key: str, raw: bytes | str) -> Price:
        try:
            return decode_price(raw if isinstance(raw, bytes) else raw.encode())
        except DecodeError as exc:
            self.corrupt += 1
            log.error("cache_entry_corrupt", key=key, detail=exc.detail, corrupt_total=self.corrupt)
            raise CorruptEntry(key, exc.detail) from exc
