"""A validator whose host clock is off by ten minutes (PRICEWIRE_CLOCK_OFFSET_S, the injectable clock's hook):
nothing it does about it is silent.

- Ten minutes ahead, every quote looks ten minutes old: each asset's last consensus is re-published `stale`,
  never a fresh-looking price from quotes it thinks are old (an asset that never had a price has nothing to
  re-publish: its quotes show as stale in `GET /api/v1/quality`).
- Ten minutes behind, every tick looks ten minutes in the future: each is dead-lettered `bad_timestamp`
  (one letter per tick, counted) and none moves the book, so a venue's honest quotes are never shadowed.
"""

from __future__ import annotations

import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.config import Settings, ValidatorSettings
from pricewire_common.events import Price, decode_dead_letter, decode_price, encode
from tests.factories import make_tick
from tests.pipeline import ServiceProcess, service_env
from tests.projections import stored_messages
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.fault]

SKEW_S = 600
VENUES = ("sim-a", "sim-b", "sim-c")


async def publish_round(js: JetStreamContext, round_: int) -> int:
    """One BTC tick per venue, stamped by this (correct) clock; how many."""
    now = time.time_ns()
    for source in VENUES:
        tick = make_tick(
            id=f"{source}:BTC-USDT:clock:{round_}", source=source, price=Decimal(47000 + round_), ts_exchange=now,
            ts_received=now,
        )  # fmt: skip
        await js.publish(subjects.tick(source, "BTC", "USDT"), encode(tick), headers={MSG_ID_HEADER: tick.id})
    return len(VENUES)


async def last_btc(js: JetStreamContext) -> Price | None:
    try:
        raw = await js.get_last_msg(subjects.PRICES_STREAM, subjects.price("BTC"))
    except NotFoundError:  # none yet
        return None
    return decode_price(raw.data or b"")


async def validator_letters(js: JetStreamContext) -> list[str]:
    """The reason of every dead letter the validator wrote."""
    letters = await stored_messages(js, subjects.DLQ_STREAM)
    return [decode_dead_letter(m.data or b"").reason for m in letters if m.subject == subjects.dead_letter("validator")]


async def settled(js: JetStreamContext) -> tuple[int, int]:
    """The validator consumer's (pending, ack pending)."""
    info = await js.consumer_info(subjects.TICKS_STREAM, "validator")
    return int(info.num_pending or 0), int(info.num_ack_pending or 0)


@pytest.fixture
def clock_settings(settings: Settings) -> Settings:
    return replace(settings, assets=("BTC",), validator=replace(ValidatorSettings(), heartbeat_s=1.0))


async def test_a_validator_ten_minutes_ahead_publishes_stale_never_fresh(
    clock_settings: Settings, nc: NATS, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, clock_settings.streams)
    env = service_env(clock_settings)
    # First a validator on time: an `ok` consensus in the log.
    with ServiceProcess("pricewire_validator", env, tmp_path / "on-time.log") as on_time:
        on_time.start()
        await eventually(on_time.started_count, lambda n: n >= 1, timeout=30, what="validator up")
        await publish_round(js, 0)
        ok = await eventually(lambda: last_btc(js), lambda p: p is not None and p.n_used == 3, timeout=15, what="ok")
        assert on_time.terminate() == 0
    # Then one whose host clock runs ten minutes ahead, fed the same venues on time.
    skewed_env = {**env, "PRICEWIRE_CLOCK_OFFSET_S": str(SKEW_S)}
    with ServiceProcess("pricewire_validator", skewed_env, tmp_path / "ahead.log") as ahead:
        ahead.start()
        await eventually(ahead.started_count, lambda n: n >= 1, timeout=30, what="skewed validator up")
        for round_ in range(1, 4):
            await publish_round(js, round_)
        price = await eventually(
            lambda: last_btc(js), lambda p: p is not None and ok is not None and p.seq > ok.seq, timeout=15,
            what="the skewed validator's event",
        )  # fmt: skip
        assert ahead.terminate() == 0

    assert ok is not None and ok.status == "ok"
    assert price is not None
    assert price.status == "stale"  # its quotes look ten minutes old to it: the last price, marked stale
    assert price.price == ok.price and price.n_used == 0
    assert all(q.reason == "stale" for q in price.sources)
    assert price.ts > time.time_ns() + (SKEW_S - 60) * 10**9  # stamped by its own (skewed) clock


async def test_a_validator_ten_minutes_behind_dead_letters_every_tick_as_from_the_future(
    clock_settings: Settings, nc: NATS, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, clock_settings.streams)
    env = {**service_env(clock_settings), "PRICEWIRE_CLOCK_OFFSET_S": str(-SKEW_S)}
    with ServiceProcess("pricewire_validator", env, tmp_path / "validator.log") as validator:
        validator.start()
        await eventually(validator.started_count, lambda n: n >= 1, timeout=30, what="validator up")
        sent = 0
        for round_ in range(4):
            sent += await publish_round(js, round_)
        reasons = await eventually(
            lambda: validator_letters(js), lambda r: len(r) >= sent, timeout=15, what="every tick dead-lettered"
        )
        # Every tick settled: had one been decided from a future tick, its price would be stored by now.
        await eventually(lambda: settled(js), lambda counts: counts == (0, 0), timeout=15, what="ticks settled")
        assert await last_btc(js) is None
        assert validator.terminate() == 0

    assert reasons == ["bad_timestamp"] * sent  # one letter per tick, each saying why
