"""One WebSocket connection of the hub: what it follows, its mailbox, and its writer task.

Replies to the client's requests, and pushed user frames (alerts), go through a FIFO on the writer, so
a reply is never interleaved with (or overtaken by) the price frames it announces. A client that stays
behind (one frame unread too long, or its FIFO full when an alert comes) leaves the fan-out at once and
is closed with 1008 and a reason, sent after what it was already sent; one that does not read even that
within LEAVE_GRACE_S is cut off.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from pricewire_gateway.mailbox import Mailbox
from pricewire_gateway.tracing import SentFrames

log = structlog.get_logger(__name__)

PRICES_ROOM = "prices"
ROOMS = frozenset({PRICES_ROOM})
CONTROL_LIMIT = 32
"""Replies queued for one client before its reader waits (backpressure on a client that sends but never reads)."""
PUSH_LIMIT = 256
"""Frames queued for one client (replies and pushes) past which a pushed frame is refused and the client closed:
more than one price may fire all 100 of a user's alerts, and a healthy client's writer sends them in a moment."""
CLOSE_TIMEOUT_S = 2.0
"""How long a closing peer has to answer our close frame (aiohttp's own wait), plus a margin for us."""
LEAVE_GRACE_S = 5.0
"""How long a client closed as too slow has to read what it was sent and the close frame before it is cut off."""
TOO_SLOW: Final = b"too slow: frames left unread"
ALERTS_UNREAD: Final = b"too slow: alerts left unread"


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
        on_leave: Callable[[Client], None] | None = None,
    ) -> None:
        self.id = client_id
        self._slow_after_s = slow_after_s
        """Longest one frame may wait for the peer to read before the connection is closed as too slow."""
        self.too_slow = False
        self._on_leave = on_leave
        """Told when the client starts closing as too slow (the hub stops offering it prices)."""
        self._traces = traces
        self.ws = ws
        self._transport = request.transport
        self.assets: set[str] = set()
        self.rooms: set[str] = set()
        self.mailbox = Mailbox()
        self._control: deque[bytes] = deque()
        self._room = asyncio.Event()
        """Set when the writer took a frame from `_control` (or will take no more): a waiting reply may go in."""
        self._ready = asyncio.Event()
        self._sending = False
        """The writer is sending a round: offers wait in the mailbox."""
        self.writer: asyncio.Task[None] | None = None
        self.leaving: asyncio.Task[None] | None = None
        """The close of a client that stayed behind (or whose sign-in ran out), once started (leave)."""
        self._leave_timer: asyncio.TimerHandle | None = None

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
            and self.leaving is None
            and self._traces is None  # a traced frame's send is a span: the writer makes it
            and not self.mailbox
            and not self._control
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
            and not self.ws.closed
        )

    async def reply(self, frame: bytes) -> None:
        """Queue a reply; waits while CONTROL_LIMIT frames are already waiting. Dropped once the client leaves."""
        while len(self._control) >= CONTROL_LIMIT and self._writing():
            self._room.clear()
            await self._room.wait()
        if self._writing():
            self._control.append(frame)
            self._ready.set()

    def push(self, frame: bytes) -> bool:
        """Queue a frame without waiting; False (and the client leaves) when PUSH_LIMIT frames already wait.

        A pushed frame is never conflated: one the client cannot take means it misses it, so it is told to go
        (and may read what it missed elsewhere) rather than kept on without it.
        """
        if not self._writing():
            return False
        if len(self._control) >= PUSH_LIMIT:
            log.info("ws_slow_client_closed", client=self.id, reason="alerts_unread", queued=len(self._control))
            self.leave(ALERTS_UNREAD)
            return False
        self._control.append(frame)
        self._ready.set()
        return True

    def _writing(self) -> bool:
        return self.leaving is None and (self.writer is None or not self.writer.done())

    async def write_loop(self) -> None:
        """Send replies, then the latest prices, whenever there are some; ends when the socket does."""
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                # While a round is sent, offers queue behind it: a frame written at once could overtake an
                # older one of the same asset already taken from the mailbox.
                self._sending = True
                while self._control:
                    frame = self._control.popleft()
                    self._room.set()
                    await self._send(frame)
                # No await between the last check and take(): a reply queued now goes out first next round.
                for frame in self.mailbox.take():
                    span = None if self._traces is None else self._traces.sending(frame, client=self.id)
                    await self._send(frame)
                    if span is not None:
                        span.end()
                self._sending = False
        except ConnectionError as exc:
            log.debug("ws_write_ended", client=self.id, error=str(exc))
        finally:
            self._room.set()  # a reply waiting for room goes nowhere now: let its reader go on

    async def _send(self, frame: bytes) -> None:
        if self.leaving is not None:  # nothing may follow the close frame
            raise ConnectionResetError("the client is closed as too slow")
        if self._slow_after_s is None:
            await self.ws.send_frame(frame, WSMsgType.TEXT)
            return
        # A timer, not a timeout: cancelling a send would cancel aiohttp's drain future, which every writer
        # of the connection shares, and with it the close frame that tells the client why it goes.
        timer = asyncio.get_running_loop().call_later(self._slow_after_s, self._stayed_behind)
        try:
            await self.ws.send_frame(frame, WSMsgType.TEXT)
        finally:
            timer.cancel()

    def _stayed_behind(self) -> None:
        # The peer left one frame unread for slow_after_s: conflation bounds its memory, but a client
        # that stays this far behind shows stale prices, so it is told to go (or cut off).
        self.too_slow = True
        log.info("ws_slow_client_closed", client=self.id, reason="frames_unread", after_s=self._slow_after_s)
        self.leave(TOO_SLOW)

    def leave_after(self, delay_s: float, reason: bytes) -> None:
        """`leave(reason)` in `delay_s` seconds (when a sign-in runs out); a later call replaces an earlier one."""
        self.cancel_leave_after()
        self._leave_timer = asyncio.get_running_loop().call_later(max(0.0, delay_s), self.leave, reason)

    def cancel_leave_after(self) -> None:
        if self._leave_timer is not None:
            self._leave_timer.cancel()
            self._leave_timer = None

    def leave(self, reason: bytes) -> None:
        """Start closing the client: out of the fan-out now, closed with 1008 and `reason` after what it was sent."""
        if self.leaving is not None:
            return
        self.cancel_leave_after()
        if self._on_leave is not None:
            self._on_leave(self)
        self.leaving = asyncio.get_running_loop().create_task(self._close_behind(reason), name=f"ws-leave-{self.id}")
        self._room.set()

    async def _close_behind(self, reason: bytes) -> None:
        """Send the close frame after what the peer was already sent, and wait for all of it to leave."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            # aiohttp's drain waits for the low-water mark: 0 makes it "everything, the close frame too, is
            # with the kernel", so the connection is not cut off with the reason still in our buffer.
            transport.set_write_buffer_limits(high=0, low=0)
        try:
            async with asyncio.timeout(LEAVE_GRACE_S):
                await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=reason)
        except TimeoutError:
            log.info("ws_close_timeout", client=self.id, unread_s=LEAVE_GRACE_S)
        except ConnectionError as exc:
            log.debug("ws_close_failed", client=self.id, error=str(exc))
        finally:
            self.abort_if_stuck()

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

    def abort(self) -> None:
        """Drop the connection now, whatever it still has to send."""
        if self._transport is not None:
            self._transport.abort()

    def _unsent(self) -> bool:
        return self._transport is not None and self._transport.get_write_buffer_size() > 0
