"""A validator whose host clock is off by ten minutes (PRICEWIRE_CLOCK_OFFSET_S, the injectable clock's hook):
nothing it does about it is silent, nothing it was sent is lost, and once its clock is put right (the process
started again on time) consensus flows again.

- Ten minutes ahead, every quote looks ten minutes old: each asset's last consensus is re-published `stale`,
  never a fresh-looking price from quotes it thinks are old (an asset that never had a price has nothing to
  re-publish: its quotes show as stale in `GET /api/v1/quality`).
- Ten minutes behind, every tick looks ten minutes in the future: each is dead-lettered `bad_timestamp`
  (one letter per tick, counted) and none moves the book, so a venue's honest quotes are never shadowed.

Counted as in the rest of the campaign (tests/counting.py): a ledger of the ticks JetStream acknowledged;
lost = acknowledged - consumed, consumed being at or below the settled validator consumer's ack floor (and,
behind, each also one dead letter); duplicated = a tick id twice in the log or among the letters, or a price
seq twice; "consensus again after" = from the skewed validator's exit to the first `ok` consensus of a tick
received after it, which includes the on-time validator's start.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.config import Settings, ValidatorSettings
from pricewire_common.events import Price, Tick, decode_dead_letter, decode_tick, encode
from tests.counting import (
    Ledger,
    acked_through,
    consensus_again_s,
    decided_twice,
    duplicated,
    first_fresh,
    fresh_assets,
    last_price,
    lost,
    seq_gaps,
)
from tests.factories import make_tick
from tests.pipeline import ServiceProcess, service_env
from tests.projections import events_in_log, prices_in_log, stored_messages
from tests.reliability import Outcome, record
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.fault]

SKEW_S = 600
VENUES = ("sim-a", "sim-b", "sim-c")
RECOVERY_S = 15.0
"""The stated time from the clock put right (the skewed validator gone) to an ok consensus again."""


async def publish_round(js: JetStreamContext, round_: int, ledger: Ledger) -> int:
    """One BTC tick per venue, stamped by this (correct) clock, each acknowledged into `ledger`; how many."""
    now = time.time_ns()
    for source in VENUES:
        tick = make_tick(
            id=f"{source}:BTC-USDT:clock:{round_}", source=source, price=Decimal(47000 + round_), ts_exchange=now,
            ts_received=now,
        )  # fmt: skip
        ledger.attempt(tick)
        await js.publish(subjects.tick(source, "BTC", "USDT"), encode(tick), headers={MSG_ID_HEADER: tick.id})
        ledger.ack(tick)
    return len(VENUES)


async def validator_letters(js: JetStreamContext) -> list[tuple[str, Tick]]:
    """The reason and the tick of every dead letter the validator wrote."""
    letters = [decode_dead_letter(m.data or b"") for m in await stored_messages(js, subjects.DLQ_STREAM)]
    return [(letter.reason, decode_tick(letter.payload)) for letter in letters if letter.service == "validator"]


async def settled(js: JetStreamContext) -> tuple[int, int]:
    """The validator consumer's (pending, ack pending)."""
    info = await js.consumer_info(subjects.TICKS_STREAM, "validator")
    return int(info.num_pending or 0), int(info.num_ack_pending or 0)


async def consumed(js: JetStreamContext) -> set[str]:
    """Ids of the ticks the validator took and acknowledged: at or below its consumer's ack floor, once settled."""
    await eventually(lambda: settled(js), lambda counts: counts == (0, 0), timeout=15, what="ticks settled")
    floor = await acked_through(js, subjects.TICKS_STREAM, "validator")
    return {tick.id for seq, tick in await events_in_log(js, subjects.TICKS_STREAM, decode_tick) if seq <= floor}


async def put_right(js: JetStreamContext, env: dict[str, str], tmp_path: Path, ledger: Ledger) -> float:
    """A validator on time in place of the skewed one: seconds from now to an ok consensus of a fresh tick."""
    fixed_ns = time.time_ns()
    with ServiceProcess("pricewire_validator", env, tmp_path / "put-right.log") as on_time:
        on_time.start()
        await eventually(on_time.started_count, lambda n: n >= 1, timeout=30, what="validator on time up")
        await publish_round(js, 100, ledger)
        await eventually(fresh_assets(js, ("BTC",), fixed_ns), lambda s: s == {"BTC"}, timeout=RECOVERY_S)
        await eventually(lambda: settled(js), lambda counts: counts == (0, 0), timeout=15, what="ticks settled")
        assert on_time.terminate() == 0
    return consensus_again_s(await first_fresh(js, ("BTC",), fixed_ns), ("BTC",), fixed_ns)


@pytest.fixture
def clock_settings(settings: Settings) -> Settings:
    return replace(settings, assets=("BTC",), validator=replace(ValidatorSettings(), heartbeat_s=1.0))


async def test_a_validator_ten_minutes_ahead_publishes_stale_never_fresh(
    clock_settings: Settings, nc: NATS, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, clock_settings.streams)
    env = service_env(clock_settings)
    ledger = Ledger()
    # First a validator on time: an `ok` consensus in the log.
    with ServiceProcess("pricewire_validator", env, tmp_path / "on-time.log") as on_time:
        on_time.start()
        await eventually(on_time.started_count, lambda n: n >= 1, timeout=30, what="validator up")
        await publish_round(js, 0, ledger)
        ok = await eventually(
            lambda: last_price(js, "BTC"), lambda p: p is not None and p.n_used == 3, timeout=15, what="ok"
        )
        assert on_time.terminate() == 0
    # Then one whose host clock runs ten minutes ahead, fed the same venues on time.
    skewed_env = {**env, "PRICEWIRE_CLOCK_OFFSET_S": str(SKEW_S)}
    with ServiceProcess("pricewire_validator", skewed_env, tmp_path / "ahead.log") as ahead:
        ahead.start()
        await eventually(ahead.started_count, lambda n: n >= 1, timeout=30, what="skewed validator up")
        for round_ in range(1, 4):
            await publish_round(js, round_, ledger)
        price = await eventually(
            lambda: last_price(js, "BTC"), lambda p: p is not None and ok is not None and p.seq > ok.seq, timeout=15,
            what="the skewed validator's event",
        )  # fmt: skip
        taken = await consumed(js)  # every tick it was sent, it took and acknowledged
        assert ahead.terminate() == 0
    # Its clock put right: consensus flows again, from the same log.
    again_s = await put_right(js, env, tmp_path, ledger)
    taken |= await consumed(js)
    prices = await prices_in_log(js)
    in_log = Counter(tick.id for _, tick in await events_in_log(js, subjects.TICKS_STREAM, decode_tick))
    record_clock(
        "ahead", ledger, missing=lost(ledger.acknowledged, taken), twice=duplicated(in_log), prices=prices,
        again_s=again_s,
    )  # fmt: skip

    assert ok is not None and ok.status == "ok"
    assert price is not None
    assert price.status == "stale"  # its quotes look ten minutes old to it: the last price, marked stale
    assert price.price == ok.price and price.n_used == 0
    assert all(q.reason == "stale" for q in price.sources)
    assert price.ts > time.time_ns() + (SKEW_S - 60) * 10**9  # stamped by its own (skewed) clock
    assert lost(ledger.acknowledged, taken) == set()
    assert duplicated(in_log) == set() and decided_twice(prices) == set() and seq_gaps(prices) == {}
    assert again_s <= RECOVERY_S


async def test_a_validator_ten_minutes_behind_dead_letters_every_tick_as_from_the_future(
    clock_settings: Settings, nc: NATS, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, clock_settings.streams)
    env = service_env(clock_settings)
    ledger = Ledger()
    with ServiceProcess(
        "pricewire_validator", {**env, "PRICEWIRE_CLOCK_OFFSET_S": str(-SKEW_S)}, tmp_path / "behind.log"
    ) as validator:
        validator.start()
        await eventually(validator.started_count, lambda n: n >= 1, timeout=30, what="validator up")
        sent = 0
        for round_ in range(4):
            sent += await publish_round(js, round_, ledger)
        letters = await eventually(
            lambda: validator_letters(js), lambda r: len(r) >= sent, timeout=15, what="every tick dead-lettered"
        )
        # Every tick settled: had one been decided from a future tick, its price would be stored by now.
        taken = await consumed(js)
        assert await last_price(js, "BTC") is None
        assert validator.terminate() == 0
    lettered = Counter(tick.id for _, tick in letters)
    again_s = await put_right(js, env, tmp_path, ledger)
    taken |= await consumed(js)
    prices = await prices_in_log(js)
    in_log = Counter(tick.id for _, tick in await events_in_log(js, subjects.TICKS_STREAM, decode_tick))
    skewed_ids = set(ledger.attempted[:sent])
    record_clock(
        "behind", ledger, missing=lost(ledger.acknowledged, taken), twice=duplicated(in_log, lettered),
        prices=prices, again_s=again_s,
    )  # fmt: skip

    assert [reason for reason, _ in letters] == ["bad_timestamp"] * sent  # one letter per tick, each saying why
    assert set(lettered) == skewed_ids  # the letters are the ticks it was sent while behind, each once
    assert duplicated(lettered) == set()
    assert lost(ledger.acknowledged, taken) == set()
    assert duplicated(in_log) == set() and decided_twice(prices) == set() and seq_gaps(prices) == {}
    assert all(p.ts_tick > max(t.ts_received for _, t in letters) for p in prices)  # no price from a lettered tick
    assert again_s <= RECOVERY_S


def record_clock(
    which: str, ledger: Ledger, *, missing: set[str], twice: set[str], prices: list[Price], again_s: float
) -> None:
    record(
        Outcome(
            scenario=f"validator clock 10 min {which}",
            load=f"{len(VENUES)} venues x 1 asset, rounds of ticks on time",
            fault=f"PRICEWIRE_CLOCK_OFFSET_S={'-' if which == 'behind' else ''}{SKEW_S}, then the validator "
            "started again on time; consensus again counted from the skewed one's exit",
            acknowledged=len(ledger.acknowledged),
            lost=len(missing),
            duplicated=len(twice) + len(decided_twice(prices)),
            recovery_s=again_s,
        )
    )
