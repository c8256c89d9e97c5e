"""Fan-out of live prices to WebSocket clients (client.py) and SSE watchers: subscriptions and rooms.

A price is encoded once and offered to every interested client's mailbox without awaiting anything,
so a slow client never holds back the feed or the other clients: its own writer falls behind and
its mailbox conflates. A client that stays behind leaves the fan-out (and the count) as it starts closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

import structlog
from aiohttp import WSCloseCode, web

from pricewire_common.clock import Clock, iso_from_ns
from pricewire_common.events import Price
from pricewire_gateway import messages
from pricewire_gateway.client import PRICES_ROOM, ROOMS, Client
from pricewire_gateway.fallback import Served
from pricewire_gateway.tracing import SentFrames

log = structlog.get_logger(__name__)


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
        self._leaving: set[Client] = set()
        """Clients closing as too slow: out of the fan-out and the count, still connected."""
        self._by_asset: dict[str, set[Client]] = {}
        self._rooms: dict[str, set[Client]] = {room: set() for room in ROOMS}
        self._watchers: set[Watcher] = set()
        self._ids = itertools.count(1)
        self._closing = False
        self.published = 0
        self.offered = 0
        self._conflated_gone = 0
        """Updates conflated for clients since disconnected."""
        self.closed: Counter[str] = Counter()
        """Clients this hub closed, by reason (`too_slow`, `flood`): the metric's counts."""

    def __len__(self) -> int:
        return len(self._clients)

    def attach(self, ws: web.WebSocketResponse, request: web.Request) -> Client:
        """Register a connection and start its writer."""
        client = Client(
            ws,
            request,
            client_id=next(self._ids),
            traces=self._traces,
            slow_after_s=self._slow_client_s,
            on_leave=self._leave,
        )
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

    def _forget(self, client: Client) -> None:
        """Offer `client` nothing more and stop counting it."""
        if client in self._clients:
            self._clients.discard(client)
            self._conflated_gone += client.mailbox.conflated
        for followers in (*self._by_asset.values(), *self._rooms.values()):
            followers.discard(client)

    def _leave(self, client: Client) -> None:
        """`client` started closing as too slow: out of the fan-out and the count, kept until it is detached."""
        self._forget(client)
        self._leaving.add(client)
        self.closed["too_slow"] += 1

    async def detach(self, client: Client) -> None:
        """Forget a connection and stop its writer (and its close, if it was leaving)."""
        if client not in self._clients and client not in self._leaving:
            return
        self._forget(client)
        self._leaving.discard(client)
        client.cancel_leave_after()
        client.abort_if_stuck()
        if client.writer is not None:
            client.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client.writer
        if client.leaving is not None:
            # Bounded by LEAVE_GRACE_S, and short: the close already reached the peer, or the abort ended it.
            await client.leaving
        log.info("ws_disconnected", client=client.id, clients=len(self._clients), conflated=client.mailbox.conflated)

    def subscribe(self, client: Client, assets: Iterable[str]) -> None:
        if client not in self._clients:
            return  # leaving: it follows nothing more
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
        if client not in self._clients:
            return
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
        leaving = list(self._leaving)
        for client in leaving:  # a shutdown does not wait for a slow reader to take its close frame
            client.abort()
        async with asyncio.TaskGroup() as group:
            for client in clients:
                group.create_task(client.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown"))
        for client in clients + leaving:
            await self.detach(client)
        log.info("ws_all_closed", clients=len(clients), leaving=len(leaving))
