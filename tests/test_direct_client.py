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
from tests.waiting import eventually

WAIT_S = 10.0
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_messages_reach_the_function_in_order_with_only_the_headers_looked_at(nc: NATS) -> None:
    assert isinstance(nc, DirectClient)  # what bus.connect makes
    got: list[Msg] = []
    sub = await nc.subscribe_direct("direct.test", got.append)
    await nc.publish("direct.test", b"plain")
    await nc.publish("direct.test", b"deduplicated", headers={MSG_ID_HEADER: "m1"})
    await nc.publish("direct.test", b"traced", headers={MSG_ID_HEADER: "m2", TRACEPARENT: TRACE})
    await nc.flush()
    await eventually(lambda: asyncio.sleep(0, len(got)), lambda n: n == 3, timeout=WAIT_S, what="three messages")

    assert [m.data for m in got] == [b"plain", b"deduplicated", b"traced"]
    assert {m.subject for m in got} == {"direct.test"}
    assert [m.headers for m in got] == [None, None, {MSG_ID_HEADER: "m2", TRACEPARENT: TRACE}]

    await sub.unsubscribe()
    await nc.publish("direct.test", b"after")
    await nc.flush()
    assert not nc._direct
    assert len(got) == 3


async def test_a_status_reaches_the_function_with_its_headers(nc: NATS) -> None:
    """A pull request on an empty consumer ends with a 404 status: a reader must see it to ask again."""
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    await js.pull_subscribe(subjects.ALL_TICKS, durable="direct-status", stream=subjects.TICKS_STREAM)
    got: list[Msg] = []
    inbox = nc.new_inbox()
    assert isinstance(nc, DirectClient)
    sub = await nc.subscribe_direct(inbox, got.append)
    request = json.dumps({"batch": 1, "no_wait": True}).encode()
    await nc.publish(f"{NEXT_MSG_API}.{subjects.TICKS_STREAM}.direct-status", request, reply=inbox)
    await eventually(lambda: asyncio.sleep(0, len(got)), lambda n: n == 1, timeout=WAIT_S, what="the status")
    await sub.unsubscribe()

    (status,) = got
    assert status.headers is not None
    assert status.headers[Header.STATUS] == "404"
    assert status.data == b""
