"""The direct client's parser (`direct.FrameParser`) against nats-py's own, on the same bytes cut anywhere."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st
from nats.protocol.parser import Parser

from pricewire_common.direct import FrameParser


class Recorder:
    """What a parser hands the client: the collaborator interface nats-py's Parser calls back."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.seen.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: dict[str, object]) -> None:
        self.seen.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.seen.append(("err", err))


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-$>*", min_size=1, max_size=12)
payload = st.binary(max_size=64)
header_block = st.sampled_from(
    [
        b"NATS/1.0\r\nNats-Msg-Id: m1\r\n\r\n",
        b"NATS/1.0 408 Request Timeout\r\n\r\n",
        b"NATS/1.0 404\r\n\r\n",
        b"NATS/1.0\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
    ]
)


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["msg", "hmsg", "ping", "pong", "ok", "info"]))
    if kind in ("msg", "hmsg"):
        subject = draw(token).encode()
        sid = draw(st.integers(1, 10_000))
        reply = draw(st.none() | token)
        data = draw(payload)
        middle = b"" if reply is None else b" " + reply.encode()
        if kind == "msg":
            return b"MSG %s %d%s %d\r\n%s\r\n" % (subject, sid, middle, len(data), data)
        headers = draw(header_block)
        size = len(headers) + len(data)
        return b"HMSG %s %d%s %d %d\r\n%s%s\r\n" % (subject, sid, middle, len(headers), size, headers, data)
    return {
        "ping": b"PING\r\n",
        "pong": b"PONG\r\n",
        "ok": b"+OK\r\n",
        "info": b'INFO {"server_id":"x","max_payload":1048576}\r\n',
    }[kind]


def feed(parser: Parser, wire: bytes, cuts: list[int]) -> None:
    async def run() -> None:
        last = 0
        for cut in [*sorted({c % (len(wire) + 1) for c in cuts}), len(wire)]:
            await parser.parse(wire[last:cut])
            last = cut

    asyncio.run(run())


@given(st.lists(frame(), max_size=30), st.lists(st.integers(0, 10_000), max_size=12))
def test_the_fast_parser_hands_over_what_nats_py_parses_however_the_bytes_arrive(
    frames: list[bytes], cuts: list[int]
) -> None:
    wire = b"".join(frames)
    ours, theirs = Recorder(), Recorder()
    feed(FrameParser(ours), wire, cuts)
    feed(Parser(theirs), wire, [])
    assert ours.seen == theirs.seen
    assert len([s for s in ours.seen if s[0] == "msg"]) == sum(f.startswith((b"MSG", b"HMSG")) for f in frames)
