"""The cache writer: the Redis and PostgreSQL projections of the Pricewire log."""

from pricewire_cache_writer.db_projection import PostgresPrices, PostgresTicks, insert_prices, insert_ticks
from pricewire_cache_writer.errors import CacheWriterError, MigrationError, StoreUnavailable
from pricewire_cache_writer.migrate import apply_migrations, packaged_migrations
from pricewire_cache_writer.redis_projection import RedisPrices
from pricewire_cache_writer.service import SERVICE, run

__all__ = [
    "SERVICE",
    "CacheWriterError",
    "MigrationError",
    "PostgresPrices",
    "PostgresTicks",
    "RedisPrices",
    "StoreUnavailable",
    "apply_migrations",
    "insert_prices",
    "insert_ticks",
    "packaged_migrations",
    "run",
]
