"""The cache writer: the Redis and PostgreSQL projections of the Pricewire log."""

from pricewire_cache_writer.candles import INTERVALS, Candle, candles
from pricewire_cache_writer.db_projection import PostgresPrices, PostgresTicks, insert_prices, insert_ticks
from pricewire_cache_writer.errors import (
    CacheWriterError,
    CandleQueryError,
    MigrationError,
    RebuildRefused,
    ReplayStopped,
    StoreUnavailable,
)
from pricewire_cache_writer.migrate import apply_migrations, packaged_migrations, schema_variant
from pricewire_cache_writer.progress import ProjectionStatus, decode_status
from pricewire_cache_writer.redis_projection import RedisPrices
from pricewire_cache_writer.replay import ReplaySummary, rebuild, replay
from pricewire_cache_writer.service import SERVICE, run

__all__ = [
    "INTERVALS",
    "SERVICE",
    "CacheWriterError",
    "Candle",
    "CandleQueryError",
    "MigrationError",
    "PostgresPrices",
    "PostgresTicks",
    "ProjectionStatus",
    "RebuildRefused",
    "RedisPrices",
    "ReplayStopped",
    "ReplaySummary",
    "StoreUnavailable",
    "apply_migrations",
    "candles",
    "decode_status",
    "insert_prices",
    "insert_ticks",
    "packaged_migrations",
    "rebuild",
    "replay",
    "run",
    "schema_variant",
]
