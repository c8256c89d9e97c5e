"""The consume loop every projection shares: fetch a batch, decode, write, then settle each message.

Outcomes map to acks as the house rules say: written -> ack; RejectedInput -> dead letter +
term; the store is down -> nak with a delay (JetStream keeps the message) and back off.
Each projection runs its own loop on its own durable consumer, so one store being down
never stalls another.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Generic, Protocol, TypeVar

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry.trace import Span

from pricewire_cache_writer.errors import StoreUnavailable
from pricewire_cache_writer.progress import Progress, Written
from pricewire_common.consumer import ConsumerTally, batches, prefetched_batches, stream_seq
from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import RejectedInput
from pricewire_common.tracing import Tracing, end_all, traceparent_of
from pricewire_common.waits import wait_event

RETRY_DELAY_S = 1.0
"""How long a message waits before redelivery, and the loop before its next fetch, while a store is down."""

T = TypeVar("T")


class Projection(Protocol[T]):
    """A store-side view of one stream: decodes messages into items and writes batches of them."""

    @property
    def name(self) -> str:
        """The durable consumer's name."""
        ...

    @property
    def store(self) -> str:
        """The store written to, for logs: `redis` or `postgres`."""
        ...

    def decode(self, subject: str, payload: bytes, stream_seq: int) -> T:
        """The item of one message; raises RejectedInput for input that can never be stored."""
        ...

    async def write(self, items: Sequence[T], *, through_seq: int) -> Written:
        """Write the items and advance the projection's offset to `through_seq` in the same atomic step.

        `items` may be empty (every message of the batch was rejected): the offset still advances.
        Returns the offset then held and the items the store refused, by index. Raises StoreUnavailable.
        """
        ...

    async def load_offset(self) -> int:
        """The offset the store holds now (0 when none). Raises StoreUnavailable."""
        ...


@dataclass(slots=True, kw_only=True)
class _Prepared(Generic[T]):
    """A decoded batch waiting for its write: the messages not settled yet (by position), the decoded items
    with their messages, the stream sequence the batch reaches, and its trace spans."""

    unsettled: dict[int, Msg]
    good: list[tuple[int, Msg]] = field(default_factory=list)
    items: list[T] = field(default_factory=list)
    through_seq: int = 0
    spans: list[Span] = field(default_factory=list)
    failed: bool = False


class Projector(Generic[T]):
    """Runs one projection over one durable pull consumer until `stop` is set."""

    def __init__(
        self,
        sub: JetStreamContext.PullSubscription,
        projection: Projection[T],
        *,
        stream: str,
        dead_letters: DeadLetters,
        batch_size: int,
        batch_wait_s: float,
        retry_delay_s: float = RETRY_DELAY_S,
        nc: NATS | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """With `nc`, batches come through a prefetching pull reader on that connection (see consumer.py).
        With `tracing`, each message that carries a traceparent gets a `process` span over its batch."""
        self._tracing = tracing if tracing is not None and tracing.enabled else None
        self._traced = {"pricewire.store": projection.store}
        self._sub = sub
        self._nc = nc
        self._projection = projection
        self.stream = stream
        self._dead_letters = dead_letters
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_s
        self._retry_delay_s = retry_delay_s
        self._store_down = False
        self._log = structlog.get_logger(__name__).bind(consumer=projection.name, store=projection.store)
        self.progress = Progress()
        self.tally = ConsumerTally()
        """What its consumer delivered, and delivered again (for the metrics)."""

    @property
    def name(self) -> str:
        return self._projection.name

    @property
    def store(self) -> str:
        return self._projection.store

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; the batch in hand is always finished first."""
        await self._load_offset()
        self._log.info("projector_started", applied_seq=self.progress.applied_seq)
        # One batch is written while the next is fetched and decoded, so the bus's and the decoder's
        # per-message cost overlaps the store's round trip; writes still go one after another, in order.
        in_flight: asyncio.Task[bool] | None = None
        try:
            while not stop.is_set():
                try:
                    async for msgs in self._batches(stop):
                        prepared = await self._prepare(msgs)
                        if in_flight is not None and not await in_flight:
                            await self._pause(stop)
                        in_flight = asyncio.create_task(self._finish(prepared), name=f"{self.name}-batch")
                except TimeoutError:
                    # An empty fetch that nats-py sometimes reports as a bare asyncio.TimeoutError,
                    # which batches() does not catch: nothing went wrong, fetch again.
                    continue
                except nats.errors.Error:
                    # The bus itself hiccuped; the client reconnects on its own.
                    self._log.exception("fetch_failed")
                    await self._pause(stop)
            if in_flight is not None:
                await in_flight
        except asyncio.CancelledError:
            # Unsettled messages come back after the ack wait.
            if in_flight is not None:
                in_flight.cancel()
            raise
        self._log.info("projector_stopped", **asdict(self.progress))

    def _batches(self, stop: asyncio.Event) -> AsyncIterator[list[Msg]]:
        if self._nc is None:
            return batches(self._sub, batch=self._batch_size, wait_s=self._batch_wait_s, stop=stop, tally=self.tally)
        # The pull reader keeps the next request on its way: nats-py's fetch costs more per message than
        # the store's write does.
        return prefetched_batches(
            self._nc, self._sub, batch=self._batch_size, wait_s=self._batch_wait_s, stop=stop, tally=self.tally
        )

    async def _load_offset(self) -> None:
        # Only for the report: writing does not depend on it, so a store that is down now only
        # leaves the offset unknown (0) until the first batch commits.
        try:
            self.progress.applied_seq = await self._projection.load_offset()
        except StoreUnavailable as exc:
            self._on_store_down(exc, 0)

    async def close(self) -> None:
        """Stop the subscription; a message delivered to it after the last fetch is redelivered later.

        Without this, draining the connection waits on the pull inbox's queue, where a late status
        message (the expiry of the last pull request) stays unread until the drain times out.
        """
        await self._sub.unsubscribe()

    async def _handle(self, msgs: list[Msg]) -> bool:
        """Settle every message of the batch; False when the caller should back off."""
        return await self._finish(await self._prepare(msgs))

    async def _prepare(self, msgs: list[Msg]) -> _Prepared[T]:
        """Decode the batch (rejects are dead-lettered and settled here); never raises but for cancellation."""
        # A `process` span for each message that carries a trace; [] and nothing made for the others.
        tracing = self._tracing
        spans = [] if tracing is None else tracing.process_traced(msgs, consumer=self.name, attributes=self._traced)
        prepared: _Prepared[T] = _Prepared(unsettled=dict(enumerate(msgs)), spans=spans)
        unsettled = prepared.unsettled
        try:
            # The offset covers the dead-lettered messages too: they are dealt with for good.
            prepared.through_seq = max(stream_seq(msg) for msg in msgs)
            for position, msg in list(unsettled.items()):
                try:
                    prepared.items.append(self._projection.decode(msg.subject, msg.data, stream_seq(msg)))
                except RejectedInput as err:
                    await self._reject(msg, err)
                    del unsettled[position]
                else:
                    prepared.good.append((position, msg))
        except Exception:
            await self._fail(prepared)
        return prepared

    async def _finish(self, prepared: _Prepared[T]) -> bool:
        """Write a prepared batch and settle it; False when the caller should back off."""
        try:
            return not prepared.failed and await self._write(prepared)
        except Exception:
            await self._fail(prepared)
            return False
        finally:
            end_all(prepared.spans)

    async def _fail(self, prepared: _Prepared[T]) -> None:
        # The boundary: a bug or a bus failure (say, the dead-letter publish timed out).
        # Nothing is lost: what is not settled yet comes back after the delay.
        unsettled = prepared.unsettled
        self._log.exception("batch_failed", messages=len(unsettled), unsettled=len(unsettled))
        prepared.failed = True
        await self._nak(list(unsettled.values()))
        unsettled.clear()

    async def _write(self, prepared: _Prepared[T]) -> bool:
        """Write the decoded items and settle their messages; settled messages leave `unsettled`."""
        items, good, unsettled = prepared.items, prepared.good, prepared.unsettled
        try:
            written = await self._projection.write(items, through_seq=prepared.through_seq)
        except StoreUnavailable as exc:
            self._on_store_down(exc, len(items))
            await self._nak([msg for _, msg in good])
            unsettled.clear()
            return False
        self._on_store_up()
        refused = written.refused
        for index, (position, msg) in enumerate(good):
            if index in refused:
                await self._reject(msg, refused[index])
            else:
                await msg.ack()
            del unsettled[position]
        self.progress.applied_seq = max(self.progress.applied_seq, written.applied_seq)
        self.progress.written += len(items) - len(refused)
        self.progress.batches += 1
        return True

    async def _reject(self, msg: Msg, err: RejectedInput) -> None:
        seq = stream_seq(msg)
        await self._dead_letters.reject(
            err, subject=msg.subject, payload=msg.data, stream_seq=seq, traceparent=traceparent_of(msg)
        )
        await msg.term()
        self.progress.rejected += 1

    async def _nak(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                await msg.nak(delay=self._retry_delay_s)
            except nats.errors.Error:
                # Unsettled, the message is redelivered after the consumer's ack wait anyway.
                self._log.exception("nak_failed", stream_seq=stream_seq(msg))
        self.progress.retried += len(msgs)

    def _on_store_down(self, exc: StoreUnavailable, messages: int) -> None:
        self.progress.store_up = False
        if not self._store_down:
            self._store_down = True
            self._log.exception("store_unavailable", detail=exc.detail, messages=messages)
        else:
            self._log.warning("store_still_unavailable", detail=exc.detail, messages=messages)

    def _on_store_up(self) -> None:
        self.progress.store_up = True
        if self._store_down:
            self._store_down = False
            self._log.info("store_recovered")

    async def _pause(self, stop: asyncio.Event) -> None:
        # Back off, but wake at once for a stop.
        await wait_event(stop, self._retry_delay_s)
