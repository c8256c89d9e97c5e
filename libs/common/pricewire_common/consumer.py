"""Durable pull consumers: the one way services read the log.

The loop that owns a consumer maps outcomes to acks: success -> ack; a retryable failure
(a store is down) -> nak with a delay, so JetStream keeps the message; a permanent one
(RejectedInput) -> dead letter + term.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

log = structlog.get_logger(__name__)

DEFAULT_ACK_WAIT_S = 10.0


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
) -> AsyncIterator[list[Msg]]:
    """Yield batches of up to `batch` messages until `stop` is set.

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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait_s)
            continue
        if msgs:
            yield msgs


def stream_seq(msg: Msg) -> int:
    """The message's sequence number in its stream."""
    return int(msg.metadata.sequence.stream)


async def close_pull(sub: JetStreamContext.PullSubscription) -> None:
    """Unsubscribe a pull subscription before the connection drains.

    nats-py takes fetched messages off the queue without marking them done, so `drain()` would wait
    its whole timeout on a pull subscription still open.
    """
    await sub.unsubscribe()
