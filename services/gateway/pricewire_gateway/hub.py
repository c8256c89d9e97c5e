"""Fan-out of live prices to WebSocket clients: subscriptions, rooms, and one writer task per client.

A price is encoded once and offered to every interested client's mailbox without awaiting anything,
so a slow client never holds back the feed or the other clients: its own writer falls behind and
its mailbox conflates. Replies to a client's requests go through a small FIFO on the same writer,
so a reply is never interleaved with (or overtaken by) the price frames it announces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterable
from typing import Protocol

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from pricewire_common.clock import Clock, iso_from_ns
from pricewire_common.events import Price
from pricewire_gateway import messages
from pricewire_gateway.fallback import Served
from pricewire_gateway.mailbox import Mailbox
from pricewire_gateway.tracing import SentFrames

log = structlog.get_logger(__name__)

PRICES_ROOM = "prices"
ROOMS = frozenset({PRICES_ROOM})
CONTROL_LIMIT = 32
"""Replies queued for one client before its reader waits (backpressure on a client that sends but never reads)."""
CLOSE_TIMEOUT_S = 2.0
"""How long a closing peer has to answer our close frame (aiohttp's own wait), plus a margin for us."""


class Client:
    """One WebSocket connection: what it follows, its mailbox, and its writer."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        *,
        client_id: int,
        traces: SentFrames | None = None,
        slow_after_s: float | None = None,
    ) -> None:
        self.id = client_id
        self._slow_after_s = slow_after_s
        """Longest one frame may wait for the peer to read before the connection is closed as too slow."""
        self.too_slow = False
        self._traces = traces
        self.ws = ws
        self._transport = request.transport
        self.assets: set[str] = set()
        self.rooms: set[str] = set()
        self.mailbox = Mailbox()
        self._control: asyncio.Queue[bytes] = asyncio.Queue(maxsize=CONTROL_LIMIT)
        self._ready = asyncio.Event()
        self._sending = False
        """The writer is sending a round: offers wait in the mailbox."""
        self.writer: asyncio.Task[None] | None = None

    def follows(self, asset: str) -> bool:
        return asset in self.assets or PRICES_ROOM in self.rooms

    def offer(self, asset: str, seq: int, frame: bytes, wire: bytes | None = None) -> None:
        """Queue a price frame, replacing an older one for the same asset.

        `wire` is the same frame as WebSocket bytes, built once for every client: a connection with nothing
        waiting, nothing being sent and nothing unread by its peer gets it written at once, without waking
        its writer (the fan-out of one price to a thousand clients was a thousand task switches and sends).
        Anything else goes through the mailbox, so a slow client is still conflated and timed.
        """
        if wire is not None and self._idle():
            if self.mailbox.mark_sent(asset, seq):
                assert self._transport is not None  # _idle checked it
                self._transport.write(wire)
            return
        if self.mailbox.offer(asset, seq, frame):
            self._ready.set()

    def _idle(self) -> bool:
        transport = self._transport
        return (
            not self._sending
            and self._traces is None  # a traced frame's send is a span: the writer makes it
            and not self.mailbox
            and self._control.empty()
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
            and not self.ws.closed
        )

    async def reply(self, frame: bytes) -> None:
        """Queue a reply; waits while CONTROL_LIMIT replies are already waiting."""
        await self._control.put(frame)
        self._ready.set()

    async def write_loop(self) -> None:
        """Send replies, then the latest prices, whenever there are some; ends when the socket does."""
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                # While a round is sent, offers queue behind it: a frame written at once could overtake an
                # older one of the same asset already taken from the mailbox.
                self._sending = True
                while not self._control.empty():
                    await self._send(self._control.get_nowait())
                # No await between the last empty() and take(): a reply queued now goes out first next round.
                for frame in self.mailbox.take():
                    span = None if self._traces is None else self._traces.sending(frame, client=self.id)
                    await self._send(frame)
                    if span is not None:
                        span.end()
                self._sending = False
        except ConnectionError as exc:
            log.debug("ws_write_ended", client=self.id, error=str(exc))
        except TimeoutError:
            # The peer left one frame unread for slow_after_s: conflation bounds its memory, but a
            # client that stays this far behind shows stale prices, so it is told to go (or cut off).
            self.too_slow = True
            log.info("ws_slow_client_closed", client=self.id, after_s=self._slow_after_s)
            await self.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too slow: frames left unread")

    async def _send(self, frame: bytes) -> None:
        if self._slow_after_s is None:
            await self.ws.send_frame(frame, WSMsgType.TEXT)
            return
        async with asyncio.timeout(self._slow_after_s):
            await self.ws.send_frame(frame, WSMsgType.TEXT)

    async def close(self, *, code: int, message: bytes) -> None:
        """Close with `code`; a peer that does not read (or answer within CLOSE_TIMEOUT_S) is cut off."""
        # Never cancel the writer first: aiohttp's writers share one drain future, and cancelling a
        # writer that waits on it would cancel this close too.
        if not self._unsent():
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S + 1):
                    await self.ws.close(code=code, message=message)
            except TimeoutError:
                log.info("ws_close_timeout", client=self.id)
        self.abort_if_stuck()

    def abort_if_stuck(self) -> None:
        """Drop the connection if data waits for a peer that does not read.

        A close frame would wait behind that data, and a closing transport waits to flush it forever.
        """
        if self._transport is not None and self._unsent():
            log.info("ws_aborted", client=self.id, unsent_bytes=self._transport.get_write_buffer_size())
            self._transport.abort()

    def _unsent(self) -> bool:
        return self._transport is not None and self._transport.get_write_buffer_size() > 0


class Watcher(Protocol):
    """A price follower that is not a WebSocket (an SSE stream): offered the same frames, never awaited."""

    def follows(self, asset: str) -> bool: ...

    def offer(self, asset: str, seq: int, frame: bytes) -> None: ...

    def end(self) -> None:
        """The hub is closing: stop."""


def websocket_text_frame(payload: bytes) -> bytes:
    """`payload` as one final, unmasked WebSocket text frame (RFC 6455 5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + payload


class Hub:
    """Who follows what, and the fan-out of each price to them."""

    def __init__(self, *, clock: Clock, traces: SentFrames | None = None, slow_client_s: float | None = None) -> None:
        self._clock = clock
        self._slow_client_s = slow_client_s
        self._traces = traces
        """Frames of sampled prices, whose sending each client's writer traces (tracing.py)."""
        self._clients: set[Client] = set()
        self._by_asset: dict[str, set[Client]] = {}
        self._rooms: dict[str, set[Client]] = {room: set() for room in ROOMS}
        self._watchers: set[Watcher] = set()
        self._ids = itertools.count(1)
        self._closing = False
        self.published = 0
        self.offered = 0
        self._conflated_gone = 0
        """Updates conflated for clients since disconnected."""

    def __len__(self) -> int:
        return len(self._clients)

    def attach(self, ws: web.WebSocketResponse, request: web.Request) -> Client:
        """Register a connection and start its writer."""
        client = Client(ws, request, client_id=next(self._ids), traces=self._traces, slow_after_s=self._slow_client_s)
        client.writer = asyncio.create_task(client.write_loop(), name=f"ws-writer-{client.id}")
        self._clients.add(client)
        log.info("ws_connected", client=client.id, clients=len(self._clients), peer=request.remote)
        return client

    @property
    def conflated(self) -> int:
        """Updates replaced by a newer one before a slow client could be sent them, since the hub started."""
        return self._conflated_gone + sum(client.mailbox.conflated for client in self._clients)

    @property
    def closing(self) -> bool:
        return self._closing

    async def detach(self, client: Client) -> None:
        """Forget a connection and stop its writer."""
        if client not in self._clients:
            return
        self._clients.discard(client)
        self._conflated_gone += client.mailbox.conflated
        for followers in (*self._by_asset.values(), *self._rooms.values()):
            followers.discard(client)
        client.abort_if_stuck()
        if client.writer is not None:
            client.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client.writer
        log.info("ws_disconnected", client=client.id, clients=len(self._clients), conflated=client.mailbox.conflated)

    def subscribe(self, client: Client, assets: Iterable[str]) -> None:
        for asset in assets:
            client.assets.add(asset)
            self._by_asset.setdefault(asset, set()).add(client)

    def unsubscribe(self, client: Client, assets: Iterable[str]) -> None:
        for asset in assets:
            client.assets.discard(asset)
            self._by_asset.get(asset, set()).discard(client)
            if not client.follows(asset):
                client.mailbox.forget(asset)

    def join(self, client: Client, room: str) -> None:
        client.rooms.add(room)
        self._rooms[room].add(client)

    def leave(self, client: Client, room: str) -> None:
        client.rooms.discard(room)
        self._rooms[room].discard(client)
        for asset in client.mailbox.assets():
            if not client.follows(asset):
                client.mailbox.forget(asset)

    def watch(self, watcher: Watcher) -> None:
        self._watchers.add(watcher)

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def frame(self, price: Price, *, stale: bool = False) -> bytes:
        """The `price_update` frame of `price`, stamped now, with its age now; `stale` when read from PostgreSQL."""
        now_ns = self._clock()
        update = messages.PriceUpdate(
            data=messages.price_data(price, now_ns=now_ns, stale=stale), timestamp=iso_from_ns(now_ns)
        )
        return messages.encode(update)

    def publish(self, price: Price) -> int:
        """Offer one live price to everyone following its asset; encoded once. Returns how many."""
        followers = self._by_asset.get(price.asset, set()) | self._rooms[PRICES_ROOM]
        watchers = [watcher for watcher in self._watchers if watcher.follows(price.asset)]
        self.published += 1
        if not followers and not watchers:
            return 0
        frame = self.frame(price)
        if self._traces is not None:
            self._traces.offered(frame)
        wire = websocket_text_frame(frame)
        for client in followers:
            client.offer(price.asset, price.seq, frame, wire)
        for watcher in watchers:
            watcher.offer(price.asset, price.seq, frame)
        self.offered += len(followers) + len(watchers)
        return len(followers) + len(watchers)

    def offer_snapshot(self, client: Client, prices: Iterable[Served]) -> None:
        """Offer the latest known prices to one client that just started following them."""
        for served in prices:
            price = served.price
            if client.follows(price.asset):
                client.offer(price.asset, price.seq, self.frame(price, stale=served.stale))

    async def close_all(self) -> None:
        """Refuse new clients and close every connection with 1001 (going away)."""
        self._closing = True
        for watcher in list(self._watchers):
            watcher.end()
        clients = list(self._clients)
        async with asyncio.TaskGroup() as group:
            for client in clients:
                group.create_task(client.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown"))
        for client in clients:
            await self.detach(client)
        log.info("ws_all_closed", clients=len(clients))
