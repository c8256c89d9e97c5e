"""Stream provisioning and de-duplication on a real JetStream."""

from __future__ import annotations

from dataclasses import replace

from nats.aio.client import Client as NATS

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.config import StreamSettings


async def test_streams_are_provisioned_idempotently_and_updated(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    await ensure_streams(js, StreamSettings())
    longer = replace(StreamSettings(), ticks_max_age_s=48 * 3600)
    await ensure_streams(js, longer)
    info = await js.stream_info(subjects.TICKS_STREAM)
    assert info.config.max_age == 48 * 3600
    assert info.config.subjects == [subjects.ALL_TICKS]
    names = {s.config.name for s in await js.streams_info()}
    assert {subjects.TICKS_STREAM, subjects.PRICES_STREAM, subjects.DLQ_STREAM} <= names


async def test_a_retried_publish_with_the_same_id_is_stored_once(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    subject = subjects.tick("sim-a", "BTC", "USDT")
    first = await js.publish(subject, b"{}", headers={MSG_ID_HEADER: "tick-1"})
    again = await js.publish(subject, b"{}", headers={MSG_ID_HEADER: "tick-1"})
    assert not first.duplicate
    assert again.duplicate
    info = await js.stream_info(subjects.TICKS_STREAM)
    assert info.state.messages == 1
