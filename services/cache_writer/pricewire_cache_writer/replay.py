"""Replay and rebuild: the log applied again to the projections, through their own write paths, then exit.

A replay reads each stream through an ephemeral pull consumer of its own (no acks, removed at the end
or, if the process dies, by the server after `INACTIVE_S`), so the cache_writer's durable consumers and
their acks are never touched. It reads from a stream sequence, a time, or the first message retained,
up to the stream's last sequence when the replay began, and writes in batches with the same
`write(items, through_seq=...)` the cache_writer uses: newest seq wins in Redis, `ON CONFLICT DO NOTHING`
in PostgreSQL (candles merged from the rows actually inserted), offsets moved forward with GREATEST.
Replaying what a projection holds therefore changes nothing. The Redis projection is written silently
and with expiries counted from each event's time (see `RedisPrices.for_replay`).

A rebuild empties the projection first (reset.py), then replays the whole retained log. The order is
what keeps a running cache_writer safe: the stream's last sequence is read *after* the emptying, so a
batch the cache_writer committed before it is replayed, and one committed after it is kept. The
projection's offset ends at that last sequence, written in the statement (Redis: the pipeline) of the
last batch, or higher if the cache_writer has gone further meanwhile. Its durable consumers are left as
they are: they deliver by their own acks in JetStream, never by the stored offset, so nothing after
the rebuild is skipped, and anything they deliver again is a no-op.

A consumer delivers in stream order; a gap in its own sequence (a message lost over a reconnect) or a
consumer the server removed makes the replay open a new one after the last sequence applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, get_args

import asyncpg
import nats.errors
import redis.asyncio as redis_asyncio
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from pricewire_cache_writer.db_projection import PostgresPrices, PostgresTicks
from pricewire_cache_writer.errors import ReplayStopped, StoreUnavailable
from pricewire_cache_writer.migrate import Variant, apply_migrations, schema_variant
from pricewire_cache_writer.progress import Written
from pricewire_cache_writer.projector import Projection
from pricewire_cache_writer.redis_projection import RedisPrices
from pricewire_cache_writer.reset import check_retained, empty_postgres, empty_redis
from pricewire_cache_writer.timescale import refresh_candles
from pricewire_common import subjects
from pricewire_common.bus import connect, drain_or_close
from pricewire_common.config import Settings
from pricewire_common.consumer import PullReader, stream_seq
from pricewire_common.errors import RejectedInput

log = structlog.get_logger(__name__)

Which = Literal["redis", "db", "all"]
WHICH: Final[tuple[str, ...]] = get_args(Which)

StartAt = int | datetime | None
"""A stream sequence (each stream replayed starts at it), a time (UTC), or None: the first message retained."""

INACTIVE_S: Final = 60.0
"""The server removes a replay's consumer after this long without a pull request (a killed replay)."""
IDLE_S: Final = 5.0
"""With nothing delivered this long, the replay asks the server how its consumer stands."""
WAIT_S: Final = 1.0
"""How long one pull request stays open."""
GIVE_UP_AFTER_S: Final = 60.0
"""A store down this long stops the replay (ReplayStopped says where to resume)."""
RETRY_DELAY_S: Final = 1.0


@dataclass(slots=True)
class StreamProgress:
    """How far the replay of one stream has got."""

    stream: str
    projections: tuple[str, ...]
    last_seq: int = 0
    """The stream's last sequence when the replay began: where it ends."""
    first_seq: int = 0
    """The first sequence delivered (0 until one is)."""
    through_seq: int = 0
    """The last sequence applied to every projection."""
    applied: int = 0
    """Messages written to every projection (whether or not the store already held them)."""
    rejected: int = 0
    """Messages a projection refuses (the cache_writer dead-lettered them when it first met them)."""
    retried: int = 0
    """Batch writes retried while a store was down."""
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0
    done: bool = False

    @property
    def fraction(self) -> float:
        """Share of the sequences to replay that are behind us, 0 to 1."""
        if self.done:
            return 1.0
        if not self.first_seq or self.last_seq <= self.first_seq:
            return 0.0
        return min(1.0, (self.through_seq - self.first_seq + 1) / (self.last_seq - self.first_seq + 1))

    @property
    def rate(self) -> float:
        """Messages replayed per second so far."""
        return (self.applied + self.rejected) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def tick(self) -> None:
        self.elapsed_s = time.monotonic() - self.started


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What a replay or rebuild did, stream by stream."""

    streams: tuple[StreamProgress, ...]
    elapsed_s: float
    emptied: tuple[str, ...] = ()
    """The stores emptied first (a rebuild): `redis`, `postgres`."""

    @property
    def applied(self) -> int:
        return sum(s.applied for s in self.streams)

    @property
    def rejected(self) -> int:
        return sum(s.rejected for s in self.streams)

    @property
    def rate(self) -> float:
        return (self.applied + self.rejected) / self.elapsed_s if self.elapsed_s > 0 else 0.0


OnProgress = Callable[[StreamProgress], None]


@dataclass(frozen=True, slots=True)
class Decoded:
    """One batch, decoded for each projection of its stream."""

    first_seq: int
    through_seq: int
    messages: int
    rejected: int
    items: list[list[Any]]
    """Per projection, in the replay's order: the items of the messages it accepts."""


def consumer_config(stream: str, start: StartAt, filter_subject: str) -> ConsumerConfig:
    """An ephemeral pull consumer without acks, delivering from `start`."""
    config = ConsumerConfig(
        description=f"pricewire replay of {stream}",
        ack_policy=AckPolicy.NONE,
        filter_subject=filter_subject,
        inactive_threshold=INACTIVE_S,
        deliver_policy=DeliverPolicy.ALL,
        mem_storage=True,
    )
    if isinstance(start, datetime):
        if start.tzinfo is None or start.utcoffset() is None:
            raise ValueError("a replay's start time must carry a time zone")
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = start
    elif start is not None:
        if start < 1:
            raise ValueError(f"a stream sequence starts at 1, not {start}")
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start
    return config


def ends_batch(msg: Msg, last_seq: int) -> bool:
    """True when the replay is over with `msg`: it reached the end, or nothing is left after it."""
    return stream_seq(msg) >= last_seq or msg.metadata.num_pending == 0


class StreamReplay:
    """Replays one stream into its projections, a batch at a time, until the stream's last sequence."""

    def __init__(
        self,
        nc: NATS,
        *,
        stream: str,
        filter_subject: str,
        projections: Sequence[Projection[Any]],
        batch: int,
        on_progress: OnProgress | None = None,
        retry_delay_s: float = RETRY_DELAY_S,
        give_up_after_s: float = GIVE_UP_AFTER_S,
        idle_s: float = IDLE_S,
    ) -> None:
        if batch < 1:
            raise ValueError(f"a replay batch holds at least one message, not {batch}")
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self._filter = filter_subject
        self._projections = tuple(projections)
        self._batch = batch
        self._on_progress = on_progress
        self._retry_delay_s = retry_delay_s
        self._give_up_after_s = give_up_after_s
        self._idle_s = idle_s
        self.progress = StreamProgress(stream=stream, projections=tuple(p.name for p in projections))
        self._drained = False
        self._handed_out = 0
        """The last stream sequence handed out to be written."""
        self._log = log.bind(stream=stream, projections=list(self.progress.projections))

    async def run(self, start: StartAt) -> StreamProgress:
        """Replay from `start` to the stream's last sequence now; raises ReplayStopped if a store stays down."""
        try:
            info = await self._js.stream_info(self.stream)
        except NotFoundError:
            messages = 0  # no stream yet: nothing was ever published
        else:
            messages = int(info.state.messages)
            self.progress.last_seq = int(info.state.last_seq)
        self._log.info("replay_started", start=str(start), last_seq=self.progress.last_seq)
        if messages:
            async with self._consumer(start) as deliveries:
                # A batch is decoded (Python's work) while the one before is written (the store's), and
                # written only once that one is: offsets and progress still move batch after batch.
                in_flight: asyncio.Task[None] | None = None
                try:
                    async for msgs in deliveries:
                        batch = self._decode(msgs)
                        if in_flight is not None:
                            await in_flight
                        in_flight = asyncio.create_task(self._store(batch), name=f"replay-{self.stream}-write")
                    if in_flight is not None:
                        await in_flight
                finally:
                    if in_flight is not None and not in_flight.done():
                        in_flight.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await in_flight
        self.progress.done = True
        self._report()
        self._log.info("replay_finished", applied=self.progress.applied, rejected=self.progress.rejected)
        return self.progress

    def _report(self) -> None:
        self.progress.tick()
        if self._on_progress is not None:
            self._on_progress(self.progress)

    @contextlib.asynccontextmanager
    async def _consumer(self, start: StartAt) -> AsyncIterator[AsyncIterator[list[Msg]]]:
        """The batches to apply, in stream order and up to the last sequence, through as many consumers
        as it takes; each one is deleted on the way out."""
        names: list[str] = []
        deliveries = self._deliveries(start, names)
        try:
            yield deliveries
        finally:
            await deliveries.aclose()  # its pull reader stops listening, even when the replay failed
            for name in names:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await self._js.delete_consumer(self.stream, name)

    async def _deliveries(self, start: StartAt, names: list[str]) -> AsyncGenerator[list[Msg], None]:
        last_seq = self.progress.last_seq
        while True:
            info = await self._js.add_consumer(self.stream, consumer_config(self.stream, start, self._filter))
            assert info.name is not None  # the server names an ephemeral consumer
            names.append(info.name)
            if not info.num_pending:
                return  # nothing from `start` on
            reader = PullReader(self._nc, stream=self.stream, consumer=info.name, batch=self._batch, wait_s=WAIT_S)
            await reader.open()
            try:
                async for msgs in self._read(reader, info.name):
                    batch = [m for m in msgs if stream_seq(m) <= last_seq]
                    if batch:
                        self._handed_out = stream_seq(batch[-1])
                        yield batch
                    if ends_batch(msgs[-1], last_seq):
                        return
            finally:
                await reader.close()
            if self._drained:
                # The server has nothing more, though the end was not seen: the rest expired meanwhile.
                self._log.warning("replay_end_not_seen", through_seq=self.progress.through_seq)
                return
            # A gap or a lost consumer: a new one carries on after what was handed out (which is written,
            # or being written, or the replay fails).
            start = self._handed_out + 1 if self._handed_out else start
            self._log.warning("replay_consumer_reopened", start=str(start))

    async def _read(self, reader: PullReader, consumer: str) -> AsyncIterator[list[Msg]]:
        """Batches from one consumer, until a gap in its deliveries or until the server has no more of it
        (removed: `_drained` stays False; nothing pending: True)."""
        expected = 1  # the consumer's own sequence of its next delivery
        never = asyncio.Event()  # the replay ends by what it reads, not by a signal
        self._drained = False
        while True:
            try:
                async with asyncio.timeout(self._idle_s):
                    msgs = await reader.next_batch(never)
            except TimeoutError:
                try:
                    state = await self._js.consumer_info(self.stream, consumer)
                except NotFoundError:
                    return
                if not state.num_pending:
                    self._drained = True
                    return
                continue
            for index, msg in enumerate(msgs):
                if int(msg.metadata.sequence.consumer) != expected:
                    if index:
                        yield msgs[:index]
                    return
                expected += 1
            yield msgs

    def _decode(self, msgs: list[Msg]) -> Decoded:
        """Each projection's items of the batch; a message any projection refuses counts as rejected."""
        seqs = [stream_seq(msg) for msg in msgs]
        rejected: set[int] = set()
        items: list[list[Any]] = []
        for projection in self._projections:
            decoded: list[Any] = []
            for index, (msg, seq) in enumerate(zip(msgs, seqs, strict=True)):
                try:
                    decoded.append(projection.decode(msg.subject, msg.data, seq))
                except RejectedInput:
                    rejected.add(index)
            items.append(decoded)
        return Decoded(first_seq=seqs[0], through_seq=seqs[-1], messages=len(msgs), rejected=len(rejected), items=items)

    async def _store(self, batch: Decoded) -> None:
        written = await asyncio.gather(
            *(
                self._write(projection, items, batch.through_seq, first_seq=batch.first_seq)
                for projection, items in zip(self._projections, batch.items, strict=True)
            )
        )
        refused = max((len(w.refused) for w in written), default=0)
        self.progress.first_seq = self.progress.first_seq or batch.first_seq
        self.progress.rejected += batch.rejected + refused
        self.progress.applied += batch.messages - batch.rejected - refused
        self.progress.through_seq = batch.through_seq
        self._report()

    async def _write(
        self, projection: Projection[Any], items: list[Any], through_seq: int, *, first_seq: int
    ) -> Written:
        """Write a batch, waiting for a store that is down; ReplayStopped once it stayed down too long."""
        down_since: float | None = None
        while True:
            try:
                return await projection.write(items, through_seq=through_seq)
            except StoreUnavailable as exc:
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if now - down_since >= self._give_up_after_s:
                    raise ReplayStopped(self.stream, first_seq, str(exc)) from exc
                self.progress.retried += 1
                self._log.warning("replay_store_unavailable", projection=projection.name, detail=exc.detail)
                await asyncio.sleep(self._retry_delay_s)  # a backoff, not a poll: the write is the probe


# -- the whole replay: stores, streams, summary ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stores:
    """The connections a replay writes through; a store not replayed into is None."""

    nc: NATS
    pool: asyncpg.Pool | None
    redis: redis_asyncio.Redis | None
    variant: Variant


POOL_MAX_SIZE: Final = 4
DB_COMMAND_TIMEOUT_S: Final = 60.0
REDIS_TIMEOUT_S: Final = 5.0


@contextlib.asynccontextmanager
async def open_stores(settings: Settings, which: Which) -> AsyncIterator[Stores]:
    """Connect to NATS and to the stores `which` names; PostgreSQL gets its migrations first.

    The streams are not created or reconfigured here: a replay run with other limits in its
    environment must not change the log's retention.
    """
    if which not in WHICH:
        raise ValueError(f"projection must be one of {', '.join(WHICH)}, not {which!r}")
    async with AsyncExitStack() as stack:
        nc = await connect(settings.nats_url, name="pricewire-replay", auth=settings.nats_auth)
        stack.push_async_callback(drain_or_close, nc)
        pool: asyncpg.Pool | None = None
        variant: Variant = "postgres"
        if which in ("db", "all"):
            pool = await asyncpg.create_pool(
                settings.database_url, min_size=1, max_size=POOL_MAX_SIZE, command_timeout=DB_COMMAND_TIMEOUT_S
            )
            stack.push_async_callback(pool.close)
            async with pool.acquire() as conn:
                await apply_migrations(conn, timescaledb=settings.cache.timescaledb)
                variant = await schema_variant(conn)
        client: redis_asyncio.Redis | None = None
        if which in ("redis", "all"):
            client = redis_asyncio.Redis.from_url(
                settings.redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )
            stack.push_async_callback(client.aclose)
        yield Stores(nc=nc, pool=pool, redis=client, variant=variant)


def plan(stores: Stores, settings: Settings) -> list[tuple[str, str, list[Projection[Any]]]]:
    """(stream, filter subject, projections) for each stream with something to replay into."""
    ticks: list[Projection[Any]] = []
    prices: list[Projection[Any]] = []
    if stores.redis is not None:
        prices.append(RedisPrices.for_replay(stores.redis, ttl_s=settings.cache.price_ttl_s, assets=settings.assets))
    if stores.pool is not None:
        ticks.append(PostgresTicks(stores.pool, assets=settings.assets))
        prices.append(PostgresPrices(stores.pool, assets=settings.assets, candles=stores.variant == "postgres"))
    steps = [(subjects.TICKS_STREAM, subjects.ALL_TICKS, ticks), (subjects.PRICES_STREAM, subjects.ALL_PRICES, prices)]
    return [step for step in steps if step[2]]


async def replay_into(
    stores: Stores,
    settings: Settings,
    *,
    start: StartAt = None,
    batch: int | None = None,
    on_progress: OnProgress | None = None,
) -> ReplaySummary:
    """Replay every stream `stores` has projections for, side by side; then refresh TimescaleDB's candles."""
    began = time.monotonic()
    runs = [
        StreamReplay(
            stores.nc,
            stream=stream,
            filter_subject=filter_subject,
            projections=projections,
            batch=batch or settings.cache.batch_size,
            on_progress=on_progress,
        )
        for stream, filter_subject, projections in plan(stores, settings)
    ]
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(run.run(start), name=f"replay-{run.stream}") for run in runs]
    except BaseExceptionGroup as group:
        stopped = group.subgroup(ReplayStopped)
        if stopped is None:
            raise
        raise _first(stopped) from group
    if stores.pool is not None and stores.variant == "timescaledb":
        async with stores.pool.acquire() as conn:
            await refresh_candles(conn)  # the replayed rows are older than the refresh policies reach
    return ReplaySummary(streams=tuple(t.result() for t in tasks), elapsed_s=time.monotonic() - began)


def _first(group: BaseExceptionGroup[ReplayStopped]) -> ReplayStopped:
    inner = group.exceptions[0]
    return inner if isinstance(inner, ReplayStopped) else _first(inner)


async def replay(
    settings: Settings,
    *,
    projection: Which = "all",
    start: StartAt = None,
    batch: int | None = None,
    on_progress: OnProgress | None = None,
) -> ReplaySummary:
    """Apply the log again to `projection` from `start` (see StartAt) to each stream's last sequence now.

    Raises ReplayStopped when a store stays down longer than GIVE_UP_AFTER_S.
    """
    async with open_stores(settings, projection) as stores:
        return await replay_into(stores, settings, start=start, batch=batch, on_progress=on_progress)


async def rebuild(
    settings: Settings,
    *,
    projection: Which = "all",
    batch: int | None = None,
    force: bool = False,
    on_progress: OnProgress | None = None,
) -> ReplaySummary:
    """Empty `projection`, then replay the whole retained log into it.

    Unless `force`, refuses (RebuildRefused) when PostgreSQL holds rows the log no longer has.
    """
    began = time.monotonic()
    async with open_stores(settings, projection) as stores:
        emptied: list[str] = []
        if stores.pool is not None:
            async with stores.pool.acquire() as conn:
                if not force:
                    await check_retained(conn, stores.nc.jetstream())
                await empty_postgres(conn, stores.variant)
            emptied.append("postgres")
        if stores.redis is not None:
            await empty_redis(stores.redis)
            emptied.append("redis")
        # Only now is each stream's last sequence read (see the module's docstring).
        summary = await replay_into(stores, settings, batch=batch, on_progress=on_progress)
    return ReplaySummary(streams=summary.streams, elapsed_s=time.monotonic() - began, emptied=tuple(emptied))
