"""The replay source on a real JetStream: capture file -> parser -> collector sink -> TICKS, DLQ, SOURCES."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pricewire_collector.publisher import Publisher
from pricewire_collector.service import run as collector_run
from pricewire_collector.sources.base import Parser, VenueFrameError
from pricewire_collector.sources.capture import CaptureWriter, decode_record
from pricewire_collector.sources.replay import ReplayClock, ReplaySource, build_replay
from pricewire_collector.sources.runtime import CollectorSink
from pricewire_common import subjects
from pricewire_common.bus import ensure_streams
from pricewire_common.clock import NS_PER_S
from pricewire_common.config import DEFAULT_ASSETS, Settings, StreamSettings
from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import ConfigError
from pricewire_common.events import (
    DeadLetter,
    SourceStatus,
    Tick,
    decode_dead_letter,
    decode_source_status,
    decode_tick,
)
from tests.test_collector import stream_messages

R0 = 1_700_000_000_000_000_000
"""When the capture was recorded (2023): far too old for the validator, had it been kept."""
MS = 1_000_000


class _TinyFrame(msgspec.Struct):
    s: str
    p: str
    t: int


_TINY = msgspec.json.Decoder(_TinyFrame)


class TinyParser:
    """A venue of the tests' own: `{"s": BASE, "p": price, "t": ms}` -> one BASE-USD tick; `s` "hb" is a heartbeat."""

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        try:
            data = _TINY.decode(frame)
        except msgspec.DecodeError as exc:
            raise VenueFrameError(str(exc), reason="malformed_frame") from exc
        if data.s == "hb":
            return []
        price = Decimal(data.p)
        if not price > 0:
            raise VenueFrameError(f"price {data.p}", reason="invalid_price")
        return [
            Tick(
                id=f"tiny:{data.s}-USD:{data.t}",
                source="tiny",
                symbol=f"{data.s}-USD",
                base=data.s,
                quote="USD",
                price=price,
                ts_exchange=data.t * MS,
                ts_received=received_ns,
            )
        ]


def tiny_parsers(name: str, settings: Settings) -> Parser:
    if name != "tiny":
        raise ConfigError("PRICEWIRE_SOURCES", f"no source named {name!r}")
    return TinyParser()


def tiny_frame(n: int, price: str = "47000.50", base: str = "BTC") -> bytes:
    return json.dumps({"s": base, "p": price, "t": R0 // MS + n}).encode()


def write_capture(path: Path, frames: Sequence[tuple[int, bytes]], *, source: str = "tiny") -> Path:
    """A capture file of `frames` (recorded at R0 + offset ns), written through the writer as a tap would."""
    with CaptureWriter(path) as tap:
        for offset_ns, frame in frames:
            tap(source, frame, R0 + offset_ns)
    return path


@contextlib.asynccontextmanager
async def collector_sink(nc: NATS) -> AsyncIterator[tuple[CollectorSink, Publisher]]:
    """The collector's own sink and publisher on the test's NATS."""
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    dead_letters = DeadLetters(js, service="collector")
    async with Publisher(nc, dead_letters=dead_letters, assets=DEFAULT_ASSETS) as publisher:
        yield CollectorSink(js, publisher, dead_letters), publisher


def replay_of(path: Path, *, speed: float) -> ReplaySource:
    settings = replace(Settings(), live=replace(Settings().live, replay_speed=speed))
    return build_replay(settings, path=str(path), parsers=tiny_parsers)


async def ticks_in(nc: NATS) -> list[Tick]:
    return [decode_tick(data) for _, data, _ in await stream_messages(nc.jetstream(), subjects.TICKS_STREAM)]


async def dead_letters_in(nc: NATS) -> list[DeadLetter]:
    return [decode_dead_letter(data) for _, data, _ in await stream_messages(nc.jetstream(), subjects.DLQ_STREAM)]


async def states_in(nc: NATS) -> list[SourceStatus]:
    messages = await stream_messages(nc.jetstream(), subjects.SOURCES_STREAM)
    return [decode_source_status(data) for _, data, _ in messages]


def test_the_replay_clock_keeps_relative_time_scaled_by_speed() -> None:
    once = ReplayClock(first_recorded_ns=R0, start_wall_ns=5 * NS_PER_S, start_loop_s=100.0, speed=1)
    assert once.due_s(R0 + 2 * NS_PER_S) == 102.0
    assert once.stamp(R0 + 2 * NS_PER_S, now_ns=1) == R0 + 2 * NS_PER_S + (5 * NS_PER_S - R0)
    twice = replace(once, speed=2)
    assert twice.due_s(R0 + 2 * NS_PER_S) == 101.0
    assert twice.stamp(R0 + 2 * NS_PER_S, now_ns=1) == 6 * NS_PER_S
    flat_out = replace(once, speed=0)
    assert flat_out.due_s(R0 + 3600 * NS_PER_S) == 100.0
    assert flat_out.stamp(R0 + 3600 * NS_PER_S, now_ns=42) == 42


@pytest.mark.parametrize("speed", [1.0, 2.0])
async def test_replayed_ticks_are_published_fresh_at_the_recorded_pace(nc: NATS, tmp_path: Path, speed: float) -> None:
    offsets = [0, 40 * MS, 41 * MS, 120 * MS]
    frames = [tiny_frame(0), b'{"s": "hb", "p": "0", "t": 0}', tiny_frame(1, "47001"), tiny_frame(2, "47002.5")]
    path = write_capture(tmp_path / "tiny.ndjson", list(zip(offsets, frames, strict=True)))
    source = replay_of(path, speed=speed)
    async with collector_sink(nc) as (sink, publisher):
        wall_before, loop_before = time.time_ns(), time.monotonic()
        await asyncio.wait_for(source.run(sink, asyncio.Event()), timeout=5)
        elapsed_s = time.monotonic() - loop_before
        await publisher.wait_for(lambda stats: stats.published == 3, timeout=5)
    assert elapsed_s >= 0.12 / speed  # the last frame waited for its recorded offset
    ticks = await ticks_in(nc)
    assert [(t.id, t.price) for t in ticks] == [
        (f"tiny:BTC-USD:{R0 // MS}", Decimal("47000.50")),
        (f"tiny:BTC-USD:{R0 // MS + 1}", Decimal("47001")),
        (f"tiny:BTC-USD:{R0 // MS + 2}", Decimal("47002.5")),
    ]
    assert [t.ts_exchange for t in ticks] == [R0, R0 + MS, R0 + 2 * MS]  # the venue's own times, untouched
    received = [t.ts_received for t in ticks]
    assert wall_before <= received[0] <= wall_before + NS_PER_S  # fresh, not 2023
    assert [r - received[0] for r in received] == [0, round(41 * MS / speed), round(120 * MS / speed)]
    assert sink.counts["tiny"].frames == 4
    states = [(s.source, s.state, s.transport) for s in await states_in(nc)]
    assert states == [
        ("replay", "connected", "replay"),
        ("tiny", "connected", "replay"),
        ("tiny", "stopped", "replay"),
        ("replay", "stopped", "replay"),
    ]


async def test_bad_lines_and_bad_frames_go_to_the_dead_letters_and_the_replay_goes_on(nc: NATS, tmp_path: Path) -> None:
    path = write_capture(tmp_path / "mixed.ndjson", [(0, tiny_frame(0)), (MS, tiny_frame(1, price="-3"))])
    with path.open("ab") as file:
        file.write(b"this is not a capture line\n")
        file.write(b'{"source": "tiny", "frame": "no received_ns"}\n')
        file.write(b"\n")
        file.write(b'{"source": "nope", "received_ns": 1700000000002000000, "frame": "{}"}\n')
        file.write(b'{"source": "Bad.Name", "received_ns": 1700000000002000000, "frame": "{}"}\n')
        file.write(b'{"source": "tiny", "received_ns": 1700000000003000000, "frame": "{\\"s\\": \\"BTC\\"}"}\n')
    write_tail = CaptureWriter(tmp_path / "tail.ndjson")
    write_tail("tiny", tiny_frame(9), R0 + 4 * MS)
    write_tail.close()
    with path.open("ab") as file:
        file.write((tmp_path / "tail.ndjson").read_bytes())
    source = replay_of(path, speed=0)
    async with collector_sink(nc) as (sink, publisher):
        await asyncio.wait_for(source.run(sink, asyncio.Event()), timeout=5)
        await publisher.wait_for(lambda stats: stats.published == 2, timeout=5)
    assert [t.id for t in await ticks_in(nc)] == [f"tiny:BTC-USD:{R0 // MS}", f"tiny:BTC-USD:{R0 // MS + 9}"]
    letters = [(d.service, d.subject, d.reason) for d in await dead_letters_in(nc)]
    assert letters == [
        ("collector", "venue.tiny", "invalid_price"),
        ("collector", "venue.replay", "malformed_frame"),
        ("collector", "venue.replay", "malformed_frame"),
        ("collector", "venue.replay", "unknown_source"),
        ("collector", "venue.replay", "malformed_frame"),
        ("collector", "venue.tiny", "malformed_frame"),
    ]
    letter = (await dead_letters_in(nc))[1]
    assert letter.payload == b"this is not a capture line\n"  # the raw line, for a human to look at
    assert letter.detail.startswith("line 3:")
    assert source.lines == 8
    assert dict(sink.counts["tiny"].rejected) == {"invalid_price": 1, "malformed_frame": 1}


async def test_a_replayed_frame_with_one_bad_item_gives_its_good_ticks_and_is_dead_lettered(
    nc: NATS, tmp_path: Path
) -> None:
    coins = {"bitcoin": {"usd": 67187.33, "last_updated_at": 1711356300}, "ethereum": {"usd": 0, "last_updated_at": 2}}
    body = json.dumps(coins).encode()
    path = write_capture(tmp_path / "coingecko.ndjson", [(0, body)], source="coingecko")
    settings = replace(Settings(), live=replace(Settings().live, replay_speed=0))
    source = build_replay(settings, path=str(path))
    async with collector_sink(nc) as (sink, publisher):
        await asyncio.wait_for(source.run(sink, asyncio.Event()), timeout=5)
        await publisher.wait_for(lambda stats: stats.published == 1, timeout=5)
    assert [(t.id, t.price) for t in await ticks_in(nc)] == [("coingecko:BTC-USD:1711356300", Decimal("67187.33"))]
    letters = [(d.subject, d.reason, d.payload) for d in await dead_letters_in(nc)]
    assert letters == [("venue.coingecko", "invalid_price", body)]


async def test_speed_zero_replays_an_hour_of_capture_at_once(nc: NATS, tmp_path: Path) -> None:
    n = 1000
    path = write_capture(tmp_path / "hour.ndjson", [(i * 3600 * NS_PER_S // n, tiny_frame(i)) for i in range(n)])
    source = replay_of(path, speed=0)
    async with collector_sink(nc) as (sink, publisher):
        start = time.monotonic()
        await asyncio.wait_for(source.run(sink, asyncio.Event()), timeout=10)
        stats = await publisher.wait_for(lambda stats: stats.published == n, timeout=10)
        elapsed_s = time.monotonic() - start
    assert elapsed_s < 5
    assert stats.dropped == 0
    ticks = await ticks_in(nc)
    assert len({t.id for t in ticks}) == n
    now = time.time_ns()
    assert all(now - 10 * NS_PER_S < t.ts_received <= now for t in ticks)  # stamped at delivery, all fresh


async def test_a_replay_waiting_for_its_next_frame_stops_at_once(nc: NATS, tmp_path: Path) -> None:
    path = write_capture(tmp_path / "slow.ndjson", [(0, tiny_frame(0)), (3600 * NS_PER_S, tiny_frame(1))])
    source = replay_of(path, speed=1)
    first: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

    async def on_tick(msg: Msg) -> None:
        if not first.done():
            first.set_result(msg)

    await nc.subscribe(f"{subjects.TICK_ROOT}.tiny.>", cb=on_tick)
    async with collector_sink(nc) as (sink, _):
        stop = asyncio.Event()
        running = asyncio.create_task(source.run(sink, stop))
        await asyncio.wait_for(first, timeout=5)
        stop.set()
        await asyncio.wait_for(running, timeout=2)
    assert len(await ticks_in(nc)) == 1
    last = (await states_in(nc))[-1]
    assert (last.source, last.state, last.detail) == ("replay", "stopped", "stopped after 2 lines")


def test_a_missing_capture_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no capture file"):
        build_replay(Settings(), path=str(tmp_path / "absent.ndjson"))
    path = write_capture(tmp_path / "one.ndjson", [(0, tiny_frame(0))])
    with pytest.raises(ValueError, match="speed"):
        ReplaySource(path, settings=Settings(), speed=-1)


# --- bench/parse.py: the same parsers, timed offline ------------------------------------------------

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_frames(tmp_path: Path, n: int) -> Path:
    frames = subprocess.run(
        [sys.executable, str(BENCH / "frames_binance_bookticker.py"), "--n", str(n)],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    assert frames.count(b"\n") == n
    path = tmp_path / "bookticker.ndjson"
    path.write_bytes(frames)
    return path


def bench_parse(*args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, str(BENCH / "parse.py"), *args], check=True, capture_output=True, timeout=30)
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


def test_bench_parse_times_the_binance_parser_on_generated_frames(tmp_path: Path) -> None:
    path = bench_frames(tmp_path, 300)
    result = bench_parse("binance", str(path), "--repeat", "2")
    assert (result["venue"], result["frames"], result["repeat"]) == ("binance", 300, 2)
    assert result["ticks"] == 300
    assert result["rejected"] == {}
    assert isinstance(result["frames_per_s"], int)
    assert result["frames_per_s"] > 0


@pytest.mark.skipif(importlib.util.find_spec("cryptofeed") is None, reason="cryptofeed is not installed")
def test_bench_parse_compares_with_cryptofeed_on_the_same_frames(tmp_path: Path) -> None:
    result = bench_parse("binance", str(bench_frames(tmp_path, 300)), "--compare-cryptofeed")
    theirs = result["cryptofeed"]
    assert isinstance(theirs, dict)
    assert theirs["quotes"] == 300
    assert theirs["same_quotes"] is True
    assert isinstance(result["ratio_vs_cryptofeed"], float | int)
    assert result["ratio_vs_cryptofeed"] > 0


# --- the collector service with --feed replay:FILE and the venues' own parsers ------------------------

FIXTURES = sorted((Path(__file__).resolve().parent / "fixtures").glob("*.ndjson"))


async def replay_service(nats_url: str, path: Path) -> None:
    """The collector with `--feed replay:<path>` at full speed: it ends when the capture does."""
    base = Settings()
    settings = replace(base, nats_url=nats_url, feed=f"replay:{path}", live=replace(base.live, replay_speed=0))
    await asyncio.wait_for(collector_run(settings, asyncio.Event()), timeout=15)


def recorded_sources(path: Path) -> set[str]:
    return {decode_record(line).source for line in path.read_bytes().splitlines() if line.strip()}


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
async def test_each_shipped_capture_replays_through_its_venue_parser(nats_url: str, nc: NATS, fixture: Path) -> None:
    sources = recorded_sources(fixture)
    started = time.time_ns()
    await replay_service(nats_url, fixture)
    ticks = await ticks_in(nc)
    assert ticks, f"{fixture.name} gave no ticks"
    assert {t.source for t in ticks} <= sources | {"bitstamp"}
    assert all(started <= t.ts_received <= time.time_ns() for t in ticks)
    assert {(s.source, s.state) for s in await states_in(nc)} >= {("replay", "connected"), ("replay", "stopped")}


async def test_generated_binance_frames_replay_into_binance_ticks(nats_url: str, nc: NATS, tmp_path: Path) -> None:
    frames = bench_frames(tmp_path, 50).read_bytes().splitlines()
    path = write_capture(tmp_path / "binance.ndjson", [(i * MS, f) for i, f in enumerate(frames)], source="binance")
    await replay_service(nats_url, path)
    ticks = await ticks_in(nc)
    assert len(ticks) == 50
    assert {t.source for t in ticks} == {"binance"}
    assert {t.quote for t in ticks} == {"USDT"}
    assert (await nc.jetstream().stream_info(subjects.DLQ_STREAM)).state.messages == 0
