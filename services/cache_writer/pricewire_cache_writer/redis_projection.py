"""The Redis projection of PRICES: latest price per asset, its detail, and a pub/sub fan-out.

One Lua script applies an event atomically and only if it is newer than what Redis holds,
so a redelivered or reordered event changes nothing and publishes nothing.

Only an `ok` or `degraded` consensus (re)starts the TTL of `price:<A>` and `price:<A>:detail`.
A `stale` one (the validator repeats the last consensus every heartbeat while no venue is usable)
updates them in place without extending their TTL, and does not bring them back once they have
expired: a market that stays stale loses its Redis price TTL seconds after its last live consensus.
Its seq is still recorded and the event still published.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import redis.asyncio as redis_asyncio
import structlog

from pricewire_cache_writer.errors import redis_guard
from pricewire_cache_writer.records import check_price
from pricewire_common.errors import RejectedInput
from pricewire_common.events import Price, decode_price, encode
from pricewire_common.keys import PRICES_CHANNEL, detail_key, price_key, seq_key

log = structlog.get_logger(__name__)

STORE = "redis"

# KEYS: price:<A>, price:<A>:detail, price:<A>:seq
# ARGV: seq, price, event JSON, TTL in seconds, channel, status
# Seqs are non-negative integers in canonical decimal text, so comparing lengths and then
# text is exact at any size (Lua numbers are doubles, exact only up to 2^53).
# A stale event uses SET XX KEEPTTL: it rewrites a key that exists and keeps its expiry, and
# writes nothing where the key has expired.
APPLY_PRICE_LUA = """
local current = redis.call('GET', KEYS[3])
if current then
  local seq = ARGV[1]
  if #seq < #current or (#seq == #current and seq <= current) then
    return 0
  end
end
if ARGV[6] == 'stale' then
  redis.call('SET', KEYS[1], ARGV[2], 'XX', 'KEEPTTL')
  redis.call('SET', KEYS[2], ARGV[3], 'XX', 'KEEPTTL')
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
end
redis.call('SET', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[5], ARGV[3])
return 1
"""


class RedisPrices:
    """Applies Price events to Redis keys and the `prices` channel, newest seq wins."""

    name = "cache-redis"
    store = STORE

    def __init__(
        self,
        client: redis_asyncio.Redis,
        *,
        ttl_s: int,
        assets: Collection[str],
        channel: str = PRICES_CHANNEL,
    ) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._assets = frozenset(assets)
        self._channel = channel
        # Registered once: calls run EVALSHA and reload the script if the server lost it.
        self._script = client.register_script(APPLY_PRICE_LUA)

    def decode(self, subject: str, payload: bytes, stream_seq: int) -> Price:
        """The price in a PRICES message; raises RejectedInput (`unknown_asset` for an asset not in `assets`)."""
        return check_price(decode_price(payload), subject=subject, assets=self._assets)

    def _call(self, price: Price) -> tuple[list[str], list[str | bytes | int]]:
        keys = [price_key(price.asset), detail_key(price.asset), seq_key(price.asset)]
        args: list[str | bytes | int] = [
            str(price.seq),
            str(price.price),
            encode(price),
            self._ttl_s,
            self._channel,
            price.status,
        ]
        return keys, args

    async def apply(self, price: Price) -> bool:
        """Apply one event; True when it was newer than Redis's and so applied."""
        keys, args = self._call(price)
        with redis_guard():
            applied = await self._script(keys=keys, args=args)
        return bool(applied)

    async def apply_all(self, prices: Sequence[Price]) -> list[bool]:
        """Apply events in order in one round trip; one flag per event, as `apply` returns."""
        with redis_guard():
            async with self._client.pipeline(transaction=False) as pipe:
                for price in prices:
                    keys, args = self._call(price)
                    await self._script(keys=keys, args=args, client=pipe)
                results = await pipe.execute()
        return [bool(r) for r in results]

    async def write(self, prices: Sequence[Price]) -> Mapping[int, RejectedInput]:
        """Apply a batch; an older or repeated event is skipped, which is not a rejection."""
        applied = await self.apply_all(prices)
        log.debug("prices_applied", consumer=self.name, applied=sum(applied), skipped=applied.count(False))
        return {}
