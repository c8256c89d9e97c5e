"""Direct subscriptions (`direct.DirectClient`): messages straight to a function, headers parsed only when looked at."""

from __future__ import annotations

import asyncio
import json

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Header

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.config import StreamSettings
from pricewire_common.consumer import NEXT_MSG_API
from pricewire_common.direct import DirectClient
from pricewire_common.tracing import TRACEPARENT

WAIT_S = 10.0
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Collected:
    """What a direct subscription's function was handed; `wait(n)` until it holds `n` messages."""

    def __init__(self) -> None:
        self.msgs: list[Msg] = []
        self._grew = asyncio.Event()

    def __call__(self, msg: Msg) -> None:
        self.msgs.append(msg)
        self._grew.set()

    async def wait(self, n: int) -> list[Msg]:
        async with asyncio.timeout(WAIT_S):
            while len(self.msgs) < n:
                self._grew.clear()
                await self._grew.wait()
        return self.msgs


async def test_messages_reach_the_function_in_order_with_only_the_headers_looked_at(nc: NATS) -> None:
    assert isinstance(nc, DirectClient)  # what bus.connect makes
    got = Collected()
    sub = await nc.subscribe_direct("direct.test", got)
    await nc.publish("direct.test", b"plain")
    await nc.publish("direct.test", b"deduplicated", headers={MSG_ID_HEADER: "m1"})
    await nc.publish("direct.test", b"traced", headers={MSG_ID_HEADER: "m2", TRACEPARENT: TRACE})
    msgs = await got.wait(3)

    assert [m.data for m in msgs] == [b"plain", b"deduplicated", b"traced"]
    assert {m.subject for m in msgs} == {"direct.test"}
    assert [m.headers for m in msgs] == [None, None, {MSG_ID_HEADER: "m2", TRACEPARENT: TRACE}]

    await sub.unsubscribe()
    after = Collected()
    other = await nc.subscribe_direct("direct.test", after)
    await nc.publish("direct.test", b"after")
    assert [m.data for m in await after.wait(1)] == [b"after"]  # delivered, to the live subscription only
    await other.unsubscribe()
    assert not nc._direct
    assert len(got.msgs) == 3


async def test_a_status_reaches_the_function_with_its_headers(nc: NATS) -> None:
    """A pull request on an empty consumer ends with a 404 status: a reader must see it to ask again."""
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    await js.pull_subscribe(subjects.ALL_TICKS, durable="direct-status", stream=subjects.TICKS_STREAM)
    got = Collected()
    inbox = nc.new_inbox()
    assert isinstance(nc, DirectClient)
    sub = await nc.subscribe_direct(inbox, got)
    request = json.dumps({"batch": 1, "no_wait": True}).encode()
    await nc.publish(f"{NEXT_MSG_API}.{subjects.TICKS_STREAM}.direct-status", request, reply=inbox)
    (status,) = await got.wait(1)
    await sub.unsubscribe()

    assert status.headers is not None
    assert status.headers[Header.STATUS] == "404"
    assert status.data == b""
