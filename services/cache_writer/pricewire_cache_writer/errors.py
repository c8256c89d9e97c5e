"""Errors of the cache writer, and which store failures are worth a retry.

PricewireError
└── CacheWriterError       base of this package
    ├── StoreUnavailable   Redis or PostgreSQL cannot be reached now: nak and retry later
    ├── MigrationError     the packaged migrations are malformed (fails at start)
    ├── CandleQueryError   a candle query's parameters are wrong (a client's 400)
    ├── ReplayStopped      a replay gave up on a store that stayed down; says where to resume
    └── RebuildRefused     a rebuild would drop rows the log no longer holds
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import redis.exceptions

from pricewire_common.errors import PricewireError


class CacheWriterError(PricewireError):
    """Base of every error raised by the cache writer."""


class StoreUnavailable(CacheWriterError):
    """A store is down or unreachable; the input is kept on the log and retried."""

    def __init__(self, store: str, detail: str) -> None:
        super().__init__(f"{store} unavailable: {detail}")
        self.store = store
        self.detail = detail


class MigrationError(CacheWriterError):
    """A migration file is misnamed or the set of versions has a gap or a duplicate."""


class CandleQueryError(CacheWriterError, ValueError):
    """An unknown interval, a time without a zone, an empty window or a limit out of range; the message
    says which, in words fit for the client that sent it."""


class ReplayStopped(CacheWriterError):
    """A replay stopped before its end: a store stayed down longer than the replay waits for it.

    Everything before `resume_seq` in `stream` is applied; `pricewire replay --seq <resume_seq>` carries on.
    """

    def __init__(self, stream: str, resume_seq: int, detail: str) -> None:
        super().__init__(f"replay of {stream} stopped at stream sequence {resume_seq}: {detail}")
        self.stream = stream
        self.resume_seq = resume_seq
        self.detail = detail


class RebuildRefused(CacheWriterError):
    """The table holds rows older than the log's retention: emptying it would lose them for good."""

    def __init__(self, table: str, stream: str, detail: str) -> None:
        super().__init__(f"not rebuilding: {table} {detail}, older than what {stream} still holds")
        self.table = table
        self.stream = stream
        self.detail = detail


REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError (a restarting server)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica during a failover
    OSError,
)
"""Redis errors that mean "cannot serve us now", as opposed to a bad command."""

POSTGRES_DOWN: tuple[type[Exception], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError is an OSError too
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing" (but see below)
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, starting up, canceled
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # deadlock or serialization failure
)
"""PostgreSQL errors that mean "cannot serve us now", as opposed to bad data or a bug."""

# Client-side InterfaceErrors that mean "our input is wrong", not "the connection is gone".
_POSTGRES_CLIENT_FAULTS: tuple[type[Exception], ...] = (
    asyncpg.exceptions._base.DataError,
    asyncpg.exceptions._base.ClientConfigurationError,
)


@contextmanager
def redis_guard() -> Iterator[None]:
    """Raise StoreUnavailable for Redis being down; let any other error through."""
    try:
        yield
    except REDIS_DOWN as exc:
        raise StoreUnavailable("redis", str(exc) or type(exc).__name__) from exc


@contextmanager
def postgres_guard() -> Iterator[None]:
    """Raise StoreUnavailable for PostgreSQL being down; let any other error through."""
    try:
        yield
    except _POSTGRES_CLIENT_FAULTS:
        raise
    except POSTGRES_DOWN as exc:
        raise StoreUnavailable("postgres", str(exc) or type(exc).__name__) from exc
