"""Capture files: the record format, the writer as the collector's frame tap, and `pricewire capture`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from typer.testing import CliRunner

from pricewire_cli.app import app
from pricewire_cli.capture_cmd import RecordingSink, parse_sources, record
from pricewire_collector.service import run as collector_run
from pricewire_collector.sources.base import Sink, VenueFrameError
from pricewire_collector.sources.capture import CaptureRecord, CaptureWriter, decode_record, encode_record
from pricewire_collector.sources.registry import build_sources
from pricewire_collector.sources.runtime import FrameTap
from pricewire_common import subjects
from pricewire_common.config import Settings
from pricewire_common.errors import ConfigError
from pricewire_common.events import decode_dead_letter, decode_tick
from tests.factories import make_tick
from tests.fakes.coinbase import FakeCoinbase, heartbeat, ticker
from tests.fakes.script import Send, Silence, Step
from tests.test_collector import stream_messages

R0 = 1_700_000_000_000_000_000


def test_a_frame_survives_the_round_trip_on_one_line() -> None:
    frame = '{"stream":"btcusdt@bookTicker","data":{"b":"47000.10"}}\n\t"quoted" €'.encode()
    line = encode_record("binance", frame, R0 + 7)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1  # a newline inside the frame is escaped
    record = decode_record(line)
    assert record == CaptureRecord(source="binance", received_ns=R0 + 7, frame=frame.decode())
    assert record.frame.encode() == frame


def test_the_record_has_the_documented_shape() -> None:
    assert encode_record("kraken", b'{"channel":"heartbeat"}', 5) == (
        b'{"source":"kraken","received_ns":5,"frame":"{\\"channel\\":\\"heartbeat\\"}"}\n'
    )


def test_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    record = decode_record(encode_record("kraken", b"\xff\xfegarbage", 1))
    assert record.frame == "\ufffd\ufffdgarbage"


@pytest.mark.parametrize(
    "line",
    [b"", b"not json", b'{"source": "binance", "frame": "{}"}', b'{"source": 1, "received_ns": 2, "frame": "x"}'],
)
def test_a_malformed_line_is_a_malformed_frame(line: bytes) -> None:
    with pytest.raises(VenueFrameError) as caught:
        decode_record(line)
    assert caught.value.reason == "malformed_frame"


def test_the_writer_is_a_frame_tap_and_flushes_on_close(tmp_path: Path) -> None:
    path = tmp_path / "capture.ndjson"
    writer = CaptureWriter(path)
    tap: FrameTap = writer  # what CollectorSink(tap=...) takes
    tap("binance", b'{"a": 1}', R0)
    tap("kraken", b'{"b": 2}', R0 + 1)
    tap("binance", b'{"c": 3}', R0 + 2)
    writer.close()
    writer.close()
    assert writer.closed
    records = [decode_record(line) for line in path.read_bytes().splitlines()]
    assert [(r.source, r.received_ns, r.frame) for r in records] == [
        ("binance", R0, '{"a": 1}'),
        ("kraken", R0 + 1, '{"b": 2}'),
        ("binance", R0 + 2, '{"c": 3}'),
    ]
    assert writer.counts == {"binance": 2, "kraken": 1}


@dataclass
class ScriptedSource:
    """A source of the tests' own: delivers its frames, then ends or waits for `stop`."""

    name: str
    frames: int
    ends: bool = True
    delivered: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        await sink.state(self.name, "connected", transport="websocket")
        for n in range(self.frames):
            sink.frame(self.name, f'{{"n": {n}}}'.encode(), R0 + n)
            await sink.tick(make_tick(source=self.name, id=f"{self.name}:{n}"))
        await sink.reject(VenueFrameError("bad", reason="invalid_price"), source=self.name, frame=b"{}")
        self.delivered.set()
        if not self.ends:
            await stop.wait()
        await sink.state(self.name, "stopped", transport="websocket")


async def test_record_writes_every_frame_of_every_source_and_counts_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "out.ndjson"
    sources = [ScriptedSource("alpha", 3), ScriptedSource("beta", 2)]
    sink = await asyncio.wait_for(record(Settings(), out, asyncio.Event(), sources=sources), timeout=5)
    assert sink.writer.closed
    assert sink.writer.counts == {"alpha": 3, "beta": 2}
    assert sink.ticks == {"alpha": 3, "beta": 2}
    assert sink.rejected == {("alpha", "invalid_price"): 1, ("beta", "invalid_price"): 1}
    records = [decode_record(line) for line in out.read_bytes().splitlines()]
    assert sorted((r.source, r.frame) for r in records) == [
        ("alpha", '{"n": 0}'),
        ("alpha", '{"n": 1}'),
        ("alpha", '{"n": 2}'),
        ("beta", '{"n": 0}'),
        ("beta", '{"n": 1}'),
    ]


async def test_record_ends_after_its_duration(tmp_path: Path) -> None:
    out = tmp_path / "out.ndjson"
    stop = asyncio.Event()
    sink = await asyncio.wait_for(
        record(Settings(), out, stop, duration_s=0.2, sources=[ScriptedSource("alpha", 2, ends=False)]), timeout=5
    )
    assert stop.is_set()
    assert sink.writer.counts == {"alpha": 2}
    assert len(out.read_bytes().splitlines()) == 2


async def test_record_ends_when_stop_is_set(tmp_path: Path) -> None:
    stop = asyncio.Event()
    source = ScriptedSource("alpha", 1, ends=False)
    running = asyncio.create_task(record(Settings(), tmp_path / "out.ndjson", stop, sources=[source]))
    await asyncio.wait_for(source.delivered.wait(), timeout=5)
    assert not running.done()
    stop.set()
    sink = await asyncio.wait_for(running, timeout=5)
    assert sink.writer.counts == {"alpha": 1}


def test_sources_are_checked_against_the_live_venues() -> None:
    assert parse_sources(" Binance,kraken,binance ") == ("binance", "kraken")
    with pytest.raises(ConfigError, match="nope"):
        parse_sources("binance,nope")
    with pytest.raises(ConfigError):
        parse_sources(" , ")


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--sources", "binance,nope"], "unknown sources"), (["--duration", "0"], "positive")],
)
def test_the_command_refuses_bad_options_with_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["capture", "--out", str(tmp_path / "x.ndjson"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "x.ndjson").exists()


# --- live source -> capture file -> replay: the same ticks and the same rejections ----------------------


@dataclass(slots=True)
class WatchedSink(RecordingSink):
    """A recording sink that tells when `expected` frames are written."""

    expected: int = 0
    written: asyncio.Event = field(default_factory=asyncio.Event)

    def frame(self, source: str, frame: bytes, received_ns: int) -> None:
        RecordingSink.frame(self, source, frame, received_ns)
        if sum(self.writer.counts.values()) >= self.expected:
            self.written.set()


async def test_a_capture_of_a_live_venue_replays_into_the_ticks_it_carried(
    nats_url: str, nc: NATS, tmp_path: Path
) -> None:
    script: list[Step] = [
        Send(ticker("BTC-USD", 101, "47000.50")),
        Send(heartbeat("BTC-USD", 102)),
        Send("{not json"),
        Send(ticker("ETH-USD", 201, "2500.25")),
        Silence(),
    ]
    out = tmp_path / "coinbase.ndjson"
    async with FakeCoinbase([script]) as fake:
        base = Settings()
        live = replace(base.live, sources=("coinbase",), coinbase_ws_url=fake.url, replay_speed=0)
        settings = replace(base, nats_url=nats_url, assets=("BTC", "ETH"), live=live)
        with CaptureWriter(out) as writer:
            sink = WatchedSink(writer, expected=5)  # the subscriptions frame, then the script's four
            stop = asyncio.Event()
            (source,) = build_sources(settings)
            running = asyncio.create_task(source.run(sink, stop))
            await asyncio.wait_for(sink.written.wait(), timeout=10)
            stop.set()
            await asyncio.wait_for(running, timeout=5)
    assert sink.ticks == {"coinbase": 2}
    assert sink.rejected == {("coinbase", "malformed_frame"): 1}
    assert [decode_record(line).source for line in out.read_bytes().splitlines()] == ["coinbase"] * 5

    await asyncio.wait_for(collector_run(replace(settings, feed=f"replay:{out}"), asyncio.Event()), timeout=10)
    ticks = [decode_tick(data) for _, data, _ in await stream_messages(nc.jetstream(), subjects.TICKS_STREAM)]
    assert [(t.source, t.symbol, t.price) for t in ticks] == [
        ("coinbase", "BTC-USD", Decimal("47000.50")),
        ("coinbase", "ETH-USD", Decimal("2500.25")),
    ]
    letters = [decode_dead_letter(d) for _, d, _ in await stream_messages(nc.jetstream(), subjects.DLQ_STREAM)]
    assert [(d.subject, d.reason, d.payload) for d in letters] == [("venue.coinbase", "malformed_frame", b"{not json")]
