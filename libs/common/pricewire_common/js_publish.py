"""JetStream publishes whose acks come back on one subscription of the publisher's own, decoded by msgspec.

nats-py's `publish_async` draws a random token for each publish (a system call), takes a semaphore, and
hands each ack to a callback through its subscription's queue and task, which parses it with the json
module. Here a publish's reply subject is the publisher's inbox and a counter, and its ack is taken
straight from the client's read loop (`direct`): about 20 us of CPU less a publish with its ack
(`bench/js_publish.py`, 20,000 publishes in rounds of three, as the validator sends its prices: 42-44
against 65-68 us). A future
resolves to a `PubAck`, or fails with the error the server answered (always a plain `APIError`, where
nats-py picks a subclass; and where nats-py's callback raises on an error answer and leaves its future
unresolved, here the future fails).
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.api import Header, PubAck
from nats.js.errors import APIError, NoStreamResponseError

from pricewire_common.direct import DirectClient

NO_RESPONDERS = "503"
"""The status the server answers on the reply subject when no stream takes the subject."""
PURGE_AT = 10_000
"""Futures held before the ones already done (given up on: their ack never came) are dropped."""


class _Error(msgspec.Struct):
    code: int | None = None
    err_code: int | None = None
    description: str | None = None


class _Ack(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    domain: str | None = None
    error: _Error | None = None


_DECODE_ACK = msgspec.json.Decoder(_Ack)


class AckedPublisher:
    """Publishes to JetStream without waiting; each publish's future resolves when the log answers."""

    def __init__(self, nc: NATS, *, purge_at: int = PURGE_AT) -> None:
        self._nc = nc
        self._purge_at = purge_at
        self._prefix = ""
        self._sub: Subscription | None = None
        self._sent = 0
        self._waiting: dict[str, asyncio.Future[PubAck]] = {}

    async def publish(self, subject: str, payload: bytes, *, headers: dict[str, str]) -> asyncio.Future[PubAck]:
        """Send `payload` to `subject`; the future resolves to the log's `PubAck`, or fails with the error the
        server answered (`APIError`; `NoStreamResponseError` when no stream takes the subject). A future
        cancelled (given up on) is dropped when its ack comes, or in the next purge if it never does."""
        if self._sub is None:
            await self._open()
        self._sent += 1
        token = str(self._sent)
        ack: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        if len(self._waiting) >= self._purge_at:
            self._waiting = {t: f for t, f in self._waiting.items() if not f.done()}
        self._waiting[token] = ack
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except BaseException:  # not sent: nothing will answer it
            del self._waiting[token]
            ack.cancel()
            raise
        return ack

    @property
    def unanswered(self) -> int:
        """Publishes held for their ack: still awaited, or given up on and not yet purged."""
        return len(self._waiting)

    async def close(self) -> None:
        """Stop listening for acks (a closed or draining connection has dropped the subscription itself)."""
        sub, self._sub = self._sub, None
        if sub is not None and not (self._nc.is_closed or self._nc.is_draining):
            with contextlib.suppress(NatsError):  # the connection went away meanwhile: nothing left to close
                await sub.unsubscribe()

    async def _open(self) -> None:
        self._prefix = self._nc.new_inbox() + "."
        if isinstance(self._nc, DirectClient):
            self._sub = await self._nc.subscribe_direct(self._prefix + "*", self._answered)
        else:  # a plain nats-py client (each ack through the subscription's queue and task)
            self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        self._answered(msg)

    def _answered(self, msg: Msg) -> None:
        ack = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if ack is None or ack.done():
            return
        if msg.headers and msg.headers.get(Header.STATUS) == NO_RESPONDERS:
            ack.set_exception(NoStreamResponseError())
            return
        try:
            answer = _DECODE_ACK.decode(msg.data)
        except msgspec.DecodeError as exc:
            ack.set_exception(APIError(description=f"an ack that is not one: {exc}: {msg.data[:200]!r}"))
            return
        if answer.error is not None:
            error = answer.error
            ack.set_exception(APIError(code=error.code, err_code=error.err_code, description=error.description))
            return
        ack.set_result(PubAck(stream=answer.stream, seq=answer.seq, domain=answer.domain, duplicate=answer.duplicate))
