"""Durable pull consumers: the one way services read the log.

The loop that owns a consumer maps outcomes to acks: success -> ack; a retryable failure
(a store is down) -> nak with a delay, so JetStream keeps the message; a permanent one
(RejectedInput) -> dead letter + term.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, Header

from pricewire_common.direct import DirectClient
from pricewire_common.waits import wait_event

log = structlog.get_logger(__name__)

DEFAULT_ACK_WAIT_S = 10.0
NEXT_MSG_API = "$JS.API.CONSUMER.MSG.NEXT"
"""Where a pull request for a consumer's next messages goes (the JetStream API, no domain or prefix)."""
REQUEST_GRACE_S = 1.0
"""How long past its expiry a pull request that never reported its end is still taken to be open."""
_END_OF_REQUEST = frozenset({"404", "408"})
"""Statuses that end a pull request in the normal course: no messages (404), expired (408)."""
_IDLE_HEARTBEAT = "100"


async def durable_pull(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    filter_subject: str,
    ack_wait_s: float = DEFAULT_ACK_WAIT_S,
    max_ack_pending: int = 20_000,
) -> JetStreamContext.PullSubscription:
    """Bind to (creating if needed) a durable pull consumer that starts at the beginning of the stream."""
    config = ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        filter_subject=filter_subject,
    )
    return await js.pull_subscribe(filter_subject, durable=durable, stream=stream, config=config)


async def batches(
    sub: JetStreamContext.PullSubscription,
    *,
    batch: int,
    wait_s: float,
    stop: asyncio.Event,
    tally: ConsumerTally | None = None,
) -> AsyncIterator[list[Msg]]:
    """Yield batches of up to `batch` messages until `stop` is set (counted in `tally`, if given).

    Each fetch waits on the server at most `wait_s`, which bounds how long a stop takes to notice.
    """
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch, timeout=wait_s)
        except TimeoutError:  # nats-py raises its own subclass or, from _fetch_n, the plain one
            continue
        except ConnectionClosedError:
            return  # the connection was closed under us: the service is shutting down
        except NatsError as exc:
            # Reconnecting, a stale connection, a slow consumer: the client recovers by itself;
            # the consumer's state is on the server, so the next fetch carries on where this one stopped.
            log.warning("fetch_failed", error=repr(exc))
            await wait_event(stop, wait_s)
            continue
        if msgs:
            if tally is not None:
                tally_batch(tally, msgs)
            yield msgs


@dataclass(slots=True)
class ConsumerTally:
    """What a reader received from its consumer, for the service's metrics (read at scrape time)."""

    delivered: int = 0
    redelivered: int = 0
    """Messages delivered more than once: nak'd, or their ack wait ran out (the delivery count in the ack
    subject), or delivered again by a consumer made anew where an earlier one stopped (`again_through`)."""
    again_through: int = 0
    """The stream seq up to which the consumer delivers again what an earlier consumer of the same name
    delivered and nobody acked (made anew at its ack floor); 0 once past it, or when there is none."""


_V1_ACK_DOTS = 8
"""`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`"""


def tally_batch(tally: ConsumerTally, msgs: list[Msg]) -> None:
    """Count a batch of one consumer: one C-level prefix test per message, no metadata parsed on the way."""
    if not msgs:
        return
    tally.delivered += len(msgs)
    first = msgs[0].reply
    if first.count(".") == _V1_ACK_DOTS:
        # Every message of the batch shares the `$JS.ACK.<stream>.<consumer>.` prefix; a first delivery reads "1." next.
        start = len(first) - len(first.split(".", 4)[4])
        tally.redelivered += sum(1 for msg in msgs if not msg.reply.startswith("1.", start))
    else:  # the longer form with a domain and an account hash: let nats-py read it
        tally.redelivered += sum(1 for msg in msgs if msg.metadata.num_delivered > 1)
    if tally.again_through:
        _tally_again(tally, msgs)


def _tally_again(tally: ConsumerTally, msgs: list[Msg]) -> None:
    """Count as redelivered the first deliveries (by the new consumer's count) of ticks up to `again_through`:
    its deliveries begin at the ack floor, in stream order, so the first one past it ends the count."""
    for msg in msgs:
        if stream_seq(msg) > tally.again_through:
            tally.again_through = 0
            return
        if msg.metadata.num_delivered == 1:  # a later delivery was counted already, above
            tally.redelivered += 1


class PullReader:
    """Keeps a pull request open on a durable consumer and hands out what it delivered, a batch at a time.

    nats-py's `fetch` waits on each message with a task, a timer and a uuid of its own, and asks the
    server for more only once the batch is in hand: at tens of thousands of messages a second that costs
    more than the consumer's own work, and the round trip stalls it. Here the messages of a request land
    in a queue (a direct subscription, `direct`, whose function only appends), and the next request goes
    out as soon as the previous one is done, while the batch before is still being handled. At most two
    batches wait or are on their way (a request that outlived its expiry unannounced, as across a server
    restart, may add one more batch); ones left here when the reader closes come back after the
    consumer's ack wait.

    With a `gather_s`, the reader polls instead (the validator): a no-wait request for a batch, answered at
    once with what the consumer holds, and after an answer that came back short the next request only
    `gather_s` later. An open request has the server write each message as it is stored, so a reader that
    keeps up wakes (and the server writes) once a message; a poll, once a batch. A tick waits at most
    `gather_s` and a round trip more before it is delivered. A poll that found nothing is followed by a
    request for one message that waits on the server (up to `wait_s`): an idle reader does not poll the
    server every `gather_s`, and the first tick after a lull is delivered as it lands. The poll after it
    goes out as soon as that tick is handed out, without a gather: under load, a poll that found nothing
    is a blip between two bursts, and the ticks landing behind the first must not wait a gather more
    (with one, they waited 1-1.6 ms more: asyncio's timers wait in whole milliseconds).
    """

    def __init__(
        self,
        nc: NATS,
        *,
        stream: str,
        consumer: str,
        batch: int,
        wait_s: float,
        tally: ConsumerTally | None = None,
        gather_s: float = 0.0,
    ) -> None:
        """`gather_s`: how long messages may gather on the server between polls (0: keep a request open and
        hand out whatever is there). Each batch costs its handler something of its own (a decision per asset,
        an ack, a write) and each wake-up a system call or two, so waiting a little buys CPU on a busy reader."""
        if batch < 1 or wait_s <= 0 or gather_s < 0:
            raise ValueError(
                f"a pull reader needs batch >= 1, wait_s > 0 and gather_s >= 0, not {batch}, {wait_s} and {gather_s}"
            )
        self._nc = nc
        self._gather_s = gather_s
        self._polling = gather_s > 0
        """With a gather, the reader polls: a no-wait request for a batch, and after one that came back short,
        the next only `gather_s` later; so the server writes a batch at once, not each message as it lands,
        and a reader that keeps up wakes once a batch, not once a message."""
        self._next_poll = 0.0
        self._idle = False
        """Polling, the last request ended with nothing delivered: the next one waits on the server."""
        self._waiting = False
        """Polling, the open request is the one that waits for the first message after a lull."""
        self._resumed = False
        """Polling, the first message after a lull is queued: the next poll goes out as it is handed out."""
        self._next_subject = f"{NEXT_MSG_API}.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._batch = batch
        self._wait_s = wait_s
        self._expires_ns = round(wait_s * 1e9)
        self._arrived: deque[Msg] = deque()
        self._signal = asyncio.Event()
        self._credit = 0
        """Messages the open request may still deliver; 0 when none is open."""
        self._asked = 0
        """Messages the last request asked for."""
        self._open_until = 0.0
        self._not_before = 0.0
        """After an unexpected status, no request before this (a deleted consumer must not spin the loop)."""
        self._sub: Subscription | None = None
        self.tally = ConsumerTally() if tally is None else tally

    @classmethod
    async def bind(
        cls,
        nc: NATS,
        sub: JetStreamContext.PullSubscription,
        *,
        batch: int,
        wait_s: float,
        tally: ConsumerTally | None = None,
        gather_s: float = 0.0,
    ) -> PullReader:
        """A reader of the consumer behind `sub` (which it leaves unused: close that one as before)."""
        info = await sub.consumer_info()
        reader = cls(
            nc,
            stream=info.stream_name,
            consumer=info.name,
            batch=batch,
            wait_s=wait_s,
            tally=tally,
            gather_s=gather_s,
        )
        await reader.open()
        return reader

    async def open(self) -> None:
        if isinstance(self._nc, DirectClient):
            self._sub = await self._nc.subscribe_direct(self._inbox, self._take)
        else:  # a plain nats-py client (each message through the subscription's queue and task)
            self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def close(self) -> None:
        """Stop listening; messages still queued or on their way come back after the ack wait."""
        if self._sub is not None and not self._nc.is_closed:
            await self._sub.unsubscribe()
        self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        self._take(msg)

    def _take(self, msg: Msg) -> None:
        """Queue a message; wake `next_batch` only when it has something to do: a first message, a full
        batch, a request to renew (its credit spent, or ended by a status)."""
        status = msg.headers.get(Header.STATUS) if msg.headers else None
        if status is None:
            arrived = self._arrived
            arrived.append(msg)
            self._credit -= 1
            if self._credit > 0 and len(arrived) != self._batch and (self._polling or len(arrived) > 1):
                return
            if self._waiting:  # the lull is over: this one is handed out before the next poll, which follows at once
                self._waiting, self._resumed = False, True
        elif status == _IDLE_HEARTBEAT:
            return
        else:
            delivered = self._asked - max(0, self._credit)
            self._credit = 0  # the request is over: a new one may go out
            if self._polling:
                self._waiting = False
                self._idle = delivered == 0
                self._next_poll = time.monotonic() + self._gather_s  # it came back short: gather a while
            if status not in _END_OF_REQUEST:  # 409: consumer deleted or changed, leadership moved...
                self._not_before = time.monotonic() + self._wait_s
                description = msg.headers.get(Header.DESCRIPTION, "") if msg.headers else ""
                log.warning("pull_request_ended", status=status, description=description)
        self._signal.set()

    async def _ask(self) -> None:
        """Send a request for what the queue lacks of a batch, unless one is still open."""
        now = time.monotonic()
        if now < self._not_before:
            return
        if self._credit > 0:
            if now < self._open_until:
                return
            self._credit, self._waiting = 0, False  # written off: it outlived its expiry unannounced (a restart)
        if self._polling:
            if len(self._arrived) >= self._batch or self._resumed:
                return
            if self._idle and not self._arrived:  # the last request found nothing: wait on the server for more
                wanted = 1
                request = json.dumps({"batch": wanted, "expires": self._expires_ns}).encode()
                self._idle, self._waiting = False, True
            elif now < self._next_poll:
                return
            else:
                wanted = self._batch
                request = json.dumps({"batch": wanted, "no_wait": True}).encode()
        else:
            # Two batches ahead: while one is handled the other is here or on its way, so the server always
            # has a request to fill (with one, each batch waited a round trip for the request after it).
            wanted = 2 * self._batch - len(self._arrived)
            if wanted < self._batch:
                return
            request = json.dumps({"batch": wanted, "expires": self._expires_ns}).encode()
        await self._nc.publish(self._next_subject, request, reply=self._inbox)
        self._credit = self._asked = wanted
        self._open_until = now + self._wait_s + REQUEST_GRACE_S

    async def next_batch(self, stop: asyncio.Event) -> list[Msg]:
        """Up to `batch` messages, as soon as a batch is ready (`_ready`); [] once `stop` is set (noticed
        within `wait_s`)."""
        while not stop.is_set():
            await self._ask()
            wait_s = self._ready()
            arrived = self._arrived
            if wait_s <= 0:
                msgs = [arrived.popleft() for _ in range(min(self._batch, len(arrived)))]
                self._count(msgs)
                if self._resumed:  # what landed behind the lull's first message is not held back a gather
                    self._resumed, self._next_poll = False, 0.0
                await self._ask()  # the next batch is on its way while this one is handled
                return msgs
            self._signal.clear()
            await wait_event(self._signal, wait_s)
        return []

    def _ready(self) -> float:
        """0 when a batch can be handed out, else how long to wait at most before looking again.

        Ready: `batch` messages queued; or, polling, the poll is in (its request over); or, not polling,
        any message queued."""
        arrived = self._arrived
        if len(arrived) >= self._batch:
            return 0.0
        if not self._polling:
            return 0.0 if arrived else self._wait_s
        if self._credit > 0:  # a poll is open: until it is in (its status, or its last message), or written off
            return max(0.001, min(self._wait_s, self._open_until - time.monotonic()))
        if arrived:
            return 0.0
        # Nothing open, nothing here: until the next poll may go out (at least a millisecond: no spin).
        return max(0.001, max(self._next_poll, self._not_before) - time.monotonic())

    def _count(self, msgs: list[Msg]) -> None:
        tally_batch(self.tally, msgs)


async def prefetched_batches(
    nc: NATS,
    sub: JetStreamContext.PullSubscription,
    *,
    batch: int,
    wait_s: float,
    stop: asyncio.Event,
    tally: ConsumerTally | None = None,
    gather_s: float = 0.0,
) -> AsyncIterator[list[Msg]]:
    """Like `batches`, through a `PullReader` on `sub`'s consumer: the next batch is fetched while one is handled.

    `tally` (if given) counts what the reader received, for the service's metrics; `gather_s` > 0: poll,
    letting messages gather on the server this long after a short answer (`PullReader`).
    """
    reader = await PullReader.bind(nc, sub, batch=batch, wait_s=wait_s, tally=tally, gather_s=gather_s)
    try:
        while not stop.is_set():
            try:
                msgs = await reader.next_batch(stop)
            except ConnectionClosedError:
                return  # the connection was closed under us: the service is shutting down
            except NatsError as exc:
                # A request the client could not send (its buffer full while reconnecting, say): as in `batches`,
                # the consumer's state is on the server, so the next request carries on where this one stopped.
                log.warning("fetch_failed", error=repr(exc))
                await wait_event(stop, wait_s)
                continue
            if msgs:
                yield msgs
    finally:
        await reader.close()


def stream_seq(msg: Msg) -> int:
    """The message's sequence number in its stream, read straight from the ack subject.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>` (and the longer
    form with a domain and an account hash, `...ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<stream
    seq>...`); nats-py's `metadata` parses every field (times included) and cost more than the decode.
    """
    tokens = msg.reply.split(".")
    if len(tokens) == _V1_ACK_DOTS + 1:
        return int(tokens[5])
    return int(msg.metadata.sequence.stream)


async def close_pull(sub: JetStreamContext.PullSubscription) -> None:
    """Unsubscribe a pull subscription before the connection drains.

    nats-py takes fetched messages off the queue without marking them done, so `drain()` would wait
    its whole timeout on a pull subscription still open.
    """
    await sub.unsubscribe()
