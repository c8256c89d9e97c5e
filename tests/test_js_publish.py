"""JetStream publishes acked on the publisher's own subscription, on a real NATS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from pricewire_common.bus import MSG_ID_HEADER
from pricewire_common.js_publish import AckedPublisher

WAIT_S = 10.0


async def stream(nc: NATS, name: str) -> str:
    """A fresh stream of its own on `<name>.>` (a shared server may hold one from an earlier run); returns a
    subject it takes."""
    js = nc.jetstream()
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(name)
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"]))
    return f"{name}.x"


@pytest.fixture(params=["direct", "nats-py"])
async def client(request: pytest.FixtureRequest, nc: NATS, nats_url: str) -> AsyncIterator[NATS]:
    """The services' client (acks straight from the read loop), or a plain nats-py one (through a callback)."""
    if request.param == "direct":
        yield nc
        return
    plain = NATS()
    await plain.connect(nats_url)
    yield plain
    await plain.close()


async def test_each_publish_resolves_to_its_own_ack(client: NATS) -> None:
    nc = client
    subject = await stream(nc, "ACKED_ORDER")
    publisher = AckedPublisher(nc)
    try:
        acks = [await publisher.publish(subject, b"%d" % i, headers={MSG_ID_HEADER: f"m{i}"}) for i in range(5)]
        again = await publisher.publish(subject, b"0 again", headers={MSG_ID_HEADER: "m0"})
        answers = await asyncio.wait_for(asyncio.gather(*acks, again), timeout=WAIT_S)
    finally:
        await publisher.close()

    assert [(a.stream, a.seq, a.duplicate) for a in answers[:5]] == [("ACKED_ORDER", i, False) for i in range(1, 6)]
    assert (answers[5].seq, answers[5].duplicate) == (1, True)  # the log kept the first, and says so
    assert publisher.unanswered == 0
    stored = await nc.jetstream().get_msg("ACKED_ORDER", 3)
    assert stored.data == b"2"


async def test_a_refused_publish_fails_with_the_servers_error(nc: NATS) -> None:
    subject = await stream(nc, "ACKED_REFUSED")
    publisher = AckedPublisher(nc)
    try:
        refused = await publisher.publish(subject, b"x", headers={"Nats-Expected-Last-Sequence": "41"})
        with pytest.raises(APIError) as raised:
            await asyncio.wait_for(refused, timeout=WAIT_S)
        nowhere = await publisher.publish("no.stream.takes.this", b"x", headers={})
        with pytest.raises(NoStreamResponseError):
            await asyncio.wait_for(nowhere, timeout=WAIT_S)
    finally:
        await publisher.close()

    assert raised.value.code == 400
    assert raised.value.err_code == 10071  # JSStreamWrongLastSequenceErrF
    assert "last sequence" in (raised.value.description or "")


async def test_publishes_given_up_on_are_purged(nc: NATS) -> None:
    # A subject someone listens on but nobody stores: no ack ever comes, and no 503 either.
    swallowed = await nc.subscribe("acked.swallowed")
    publisher = AckedPublisher(nc, purge_at=3)
    try:
        lost = [await publisher.publish("acked.swallowed", b"x", headers={}) for _ in range(3)]
        for ack in lost:
            ack.cancel()  # given up on, as the price publisher does after its ack timeout
        kept = await publisher.publish("acked.swallowed", b"x", headers={})
    finally:
        await publisher.close()
        await swallowed.unsubscribe()

    assert publisher.unanswered == 1
    assert not kept.done()
