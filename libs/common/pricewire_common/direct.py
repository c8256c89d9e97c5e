"""nats-py's client, with subscriptions whose messages go straight to a plain function.

nats-py hands each message of a subscription to its callback through an asyncio queue and a task of the
subscription's own, and parses every message's headers into a dict first: about 4 us a message, more
than half of what the client costs a pull reader at tens of thousands of messages a second
(`bench/pull_reader.py`: 7.8-9.4 us a message read through a callback subscription, 3.8-5.0 us direct).
A direct subscription's function is called from the client's read loop as each message is parsed; it
must not block or await (append and signal).

Its messages are nats-py `Msg`s with one difference, which is the reason for most of the saving: their
headers are parsed only when they carry a status (a pull request's end: 404, 408, 409...) or a trace
context (`traceparent`), the only headers a reader looks at; otherwise `headers` is None, as for a message
without any (the `Nats-Msg-Id` the log deduplicated on is not read back by a consumer).

This overrides nats-py's private `_process_msg` (pinned: nats-py 2.x); a direct subscription is otherwise
an ordinary one, re-sent on reconnect and removed by `unsubscribe`.

The client's parser is nats-py's with a fast path (`FrameParser`): nats-py deletes each message's bytes
from the front of its buffer as it goes, moving what is left of the 32 KiB read twice a message; whole
MSG and HMSG frames are taken here by offset, and the buffer is cut once per read.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

DirectCallback = Callable[[Msg], None]

_STATUS_LINE = b"NATS/1.0 "
"""How a header block with an inline status begins (`NATS/1.0 408 Request Timeout`); plain ones: `NATS/1.0\\r\\n`."""
_LOOKED_AT = b"traceparent"


class FrameParser(Parser):
    """Takes the whole MSG and HMSG frames at the head of the buffer by offset, and leaves the rest (a
    frame not all here yet waits for more; any other operation, and what follows it, goes to nats-py's)."""

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        if self.state != AWAITING_CONTROL_LINE:  # nats-py's parser is halfway through a message of its own
            await super().parse()
            return
        process = self.nc._process_msg
        pos = 0
        size = len(buf)
        try:
            while pos < size:
                headed = buf.startswith(b"HMSG ", pos)
                if not headed and not buf.startswith(b"MSG ", pos):
                    break
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return  # the control line is not all here
                args = bytes(buf[pos:eol]).split()
                # MSG <subject> <sid> [reply] <size>; HMSG <subject> <sid> [reply] <header size> <size>
                replied = len(args) == (6 if headed else 5)
                if not replied and len(args) != (5 if headed else 4):
                    break  # malformed: nats-py's parser raises its ProtocolError
                start = eol + 2
                stop = start + int(args[-1])
                if stop + 2 > size:
                    return  # the payload is not all here
                header_size = int(args[-2]) if headed else 0
                headers = bytes(buf[start : start + header_size]) if headed else None
                payload = bytes(buf[start + header_size : stop])
                pos = stop + 2
                await process(int(args[2]), args[1], args[3] if replied else b"", payload, headers)
        finally:
            del buf[:pos]
        if buf and self.buf is buf:  # (a reconnect resets the parser with a new buffer)
            await super().parse()


class DirectClient(Client):
    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, DirectCallback] = {}
        self._ps = FrameParser(self)

    async def subscribe_direct(self, subject: str, on_msg: DirectCallback) -> Subscription:
        """Subscribe to `subject`, each message handed to `on_msg` as it arrives (see the module)."""
        sub = await self.subscribe(subject)
        self._direct[sub._id] = on_msg
        return sub

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._direct.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        on_msg = self._direct.get(sid)
        if on_msg is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        parsed = None
        if headers and (headers.startswith(_STATUS_LINE) or _LOOKED_AT in headers):
            parsed = await self._process_headers(headers)
        on_msg(Msg(_client=self, subject=subject.decode(), reply=reply.decode(), data=data, headers=parsed, _sid=sid))
