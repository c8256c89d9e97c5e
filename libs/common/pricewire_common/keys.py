"""Every Redis key and channel Pricewire uses, in one place (the cache_writer writes, the gateway reads)."""

from __future__ import annotations

PRICES_CHANNEL = "prices"
"""Pub/sub channel: each applied Price event, as JSON."""


def price_key(asset: str) -> str:
    """`price:<ASSET>`: the consensus price as decimal text, with a TTL."""
    return f"price:{asset}"


def detail_key(asset: str) -> str:
    """`price:<ASSET>:detail`: the whole Price event as JSON, with the same TTL."""
    return f"price:{asset}:detail"


def seq_key(asset: str) -> str:
    """`price:<ASSET>:seq`: the seq of the last applied event, without TTL."""
    return f"price:{asset}:seq"


PROJECTION_STATUS_KEY = "projection:status"
"""Hash: one field per projection (`cache-redis`, `cache-db-ticks`, `cache-db-prices`), its status as JSON
(applied_seq, stream_last_seq, lag, store_up, ...), rewritten by the cache_writer every second."""


def projection_seq_key(projection: str) -> str:
    """`projection:<name>:seq`: the stream sequence the Redis projection `<name>` applied through, no TTL."""
    return f"projection:{projection}:seq"
