"""The Redis projection of PRICES: latest price per asset, its detail, and a pub/sub fan-out.

One Lua script applies an event atomically and only if it is newer than what Redis holds,
so a redelivered or reordered event changes nothing and publishes nothing.

Only an `ok` or `degraded` consensus (re)starts the TTL of `price:<A>` and `price:<A>:detail`.
A `stale` one (the validator repeats the last consensus every heartbeat while no venue is usable)
updates them in place without extending their TTL, and does not bring them back once they have
expired: a market that stays stale loses its Redis price TTL seconds after its last live consensus.
Its seq is still recorded and the event still published.

The same script advances `projection:cache-redis:seq`, the stream sequence the projection has dealt
with, so the offset and the keys change in one atomic step (see progress.py).

A replay (replay.py) writes through the same script with two differences: it publishes nothing (clients
of the `prices` channel must not see history again as live updates), and a key's expiry counts from the
event's own time rather than from now, so a replayed consensus older than the TTL is not brought back as
a live price, and a recent one expires when the live writer's copy would have.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple

import redis.asyncio as redis_asyncio
import structlog

from pricewire_cache_writer.errors import redis_guard
from pricewire_cache_writer.progress import Written
from pricewire_cache_writer.records import check_price
from pricewire_common.clock import NS_PER_MS
from pricewire_common.events import Price, decode_price, encode
from pricewire_common.keys import PRICES_CHANNEL, detail_key, price_key, projection_seq_key, seq_key

log = structlog.get_logger(__name__)

STORE = "redis"
MS_PER_S = 1_000

# Seqs are non-negative integers in canonical decimal text, so comparing lengths and then
# text is exact at any size (Lua numbers are doubles, exact only up to 2^53).
_NEWER_LUA = """
local function newer(a, b)
  return #a > #b or (#a == #b and a > b)
end
"""

# KEYS: price:<A>, price:<A>:detail, price:<A>:seq, projection:<name>:seq
# ARGV: seq, price, event JSON, TTL in seconds, channel ('' publishes nothing), status,
#       stream seq ('' to leave the offset alone), expiry as a Unix time in ms ('' for TTL seconds from now)
# Returns {1 if applied else 0, the projection's offset after this call ('' when it has none)}.
# The offset advances for an event that is not applied too: the message has been dealt with.
# A stale event uses SET XX KEEPTTL: it rewrites a key that exists and keeps its expiry, and
# writes nothing where the key has expired. An expiry time already past (PXAT, Redis 6.2+) leaves
# no key, as the live writer's copy would have expired by now.
APPLY_PRICE_LUA = (
    _NEWER_LUA
    + """
local offset = redis.call('GET', KEYS[4]) or ''
if ARGV[7] ~= '' and (offset == '' or newer(ARGV[7], offset)) then
  redis.call('SET', KEYS[4], ARGV[7])
  offset = ARGV[7]
end
local current = redis.call('GET', KEYS[3])
if current and not newer(ARGV[1], current) then
  return {0, offset}
end
if ARGV[6] == 'stale' then
  redis.call('SET', KEYS[1], ARGV[2], 'XX', 'KEEPTTL')
  redis.call('SET', KEYS[2], ARGV[3], 'XX', 'KEEPTTL')
elseif ARGV[8] and ARGV[8] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[8])
  redis.call('SET', KEYS[2], ARGV[3], 'PXAT', ARGV[8])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
end
redis.call('SET', KEYS[3], ARGV[1])
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[3])
end
return {1, offset}
"""
)

# KEYS: projection:<name>:seq; ARGV: stream seq. Returns the offset after this call.
# For a batch whose every message was dead-lettered: they are dealt with, the offset moves past them.
ADVANCE_LUA = (
    _NEWER_LUA
    + """
local offset = redis.call('GET', KEYS[1])
if not offset or newer(ARGV[1], offset) then
  redis.call('SET', KEYS[1], ARGV[1])
  offset = ARGV[1]
end
return offset
"""
)


class StreamPrice(NamedTuple):
    """A Price event and its sequence in the PRICES stream."""

    price: Price
    stream_seq: int


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
        channel: str | None = PRICES_CHANNEL,
        expire_from_event: bool = False,
    ) -> None:
        """`channel=None` publishes nothing; `expire_from_event` counts a key's TTL from the event's `ts`."""
        self._client = client
        self._ttl_s = ttl_s
        self._assets = frozenset(assets)
        self._channel = channel or ""
        self._expire_from_event = expire_from_event
        self._offset_key = projection_seq_key(self.name)
        # Registered once: calls run EVALSHA and reload the script if the server lost it.
        self._script = client.register_script(APPLY_PRICE_LUA)
        self._advance = client.register_script(ADVANCE_LUA)

    @classmethod
    def for_replay(cls, client: redis_asyncio.Redis, *, ttl_s: int, assets: Collection[str]) -> RedisPrices:
        """The projection as a replay writes it: silent, with expiries counted from each event's time."""
        return cls(client, ttl_s=ttl_s, assets=assets, channel=None, expire_from_event=True)

    def decode(self, subject: str, payload: bytes, stream_seq: int) -> StreamPrice:
        """The price in a PRICES message; raises RejectedInput (`unknown_asset` for an asset not in `assets`)."""
        return StreamPrice(check_price(decode_price(payload), subject=subject, assets=self._assets), stream_seq)

    def _call(self, price: Price, stream_seq: int | None) -> tuple[list[str], list[str | bytes | int]]:
        keys = [price_key(price.asset), detail_key(price.asset), seq_key(price.asset), self._offset_key]
        args: list[str | bytes | int] = [
            str(price.seq),
            str(price.price),
            encode(price),
            self._ttl_s,
            self._channel,
            price.status,
            "" if stream_seq is None else str(stream_seq),
            str(price.ts // NS_PER_MS + self._ttl_s * MS_PER_S) if self._expire_from_event else "",
        ]
        return keys, args

    async def apply(self, price: Price, *, stream_seq: int | None = None) -> bool:
        """Apply one event; True when it was newer than Redis's and so applied.

        With `stream_seq`, the projection's offset advances to it in the same script.
        """
        keys, args = self._call(price, stream_seq)
        with redis_guard():
            applied, _ = await self._script(keys=keys, args=args)
        return bool(applied)

    async def apply_all(self, prices: Sequence[Price]) -> list[bool]:
        """Apply events in order in one round trip; one flag per event, as `apply` returns."""
        flags, _ = await self._apply_batch([StreamPrice(p, 0) for p in prices], through_seq=None)
        return flags

    async def _apply_batch(self, items: Sequence[StreamPrice], *, through_seq: int | None) -> tuple[list[bool], int]:
        # One pipeline, executed in order: the closing ADVANCE runs only after every event's script,
        # so the offset it returns never covers an event Redis does not hold.
        with redis_guard():
            async with self._client.pipeline(transaction=False) as pipe:
                for price, stream_seq in items:
                    keys, args = self._call(price, None if through_seq is None else stream_seq)
                    await self._script(keys=keys, args=args, client=pipe)
                if through_seq is not None:
                    await self._advance(keys=[self._offset_key], args=[str(through_seq)], client=pipe)
                results = await pipe.execute()
        if through_seq is None:
            return [bool(r[0]) for r in results], 0
        return [bool(r[0]) for r in results[:-1]], int(results[-1])

    async def write(self, items: Sequence[StreamPrice], *, through_seq: int) -> Written:
        """Apply a batch and advance the offset to `through_seq`; an older or repeated event is skipped,
        which is not a rejection."""
        applied, offset = await self._apply_batch(items, through_seq=through_seq)
        log.debug("prices_applied", consumer=self.name, applied=sum(applied), skipped=applied.count(False))
        return Written(applied_seq=offset)

    async def load_offset(self) -> int:
        """The offset Redis holds (0 when none)."""
        with redis_guard():
            raw = await self._client.get(self._offset_key)
        return 0 if raw is None else int(raw)
