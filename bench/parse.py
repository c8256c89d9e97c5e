"""Time a venue's frame parser on a file of raw frames and print one JSON line.

    python bench/parse.py binance /tmp/bookticker.ndjson --repeat 5
    python bench/parse.py binance /tmp/bookticker.ndjson --repeat 5 --compare-cryptofeed

FILE holds one raw venue frame per line (`bench/frames_binance_bookticker.py` writes Binance
`bookTicker` frames). Every frame goes through `registry.build_parser(VENUE, Settings.from_env())`
into tick events; frames the parser rejects are counted per reason. `frames_per_s` is all frames of
all passes over the time spent inside `parse`. Each pass gets a fresh parser (built outside the timing),
since parsers that keep per-symbol sequence state would refuse a second pass as out of order. Logging is
set to warnings only, so a parser's info lines on control frames do not end up in the figures.

`--compare-cryptofeed` (Binance `bookTicker` frames only) also feeds the same frames, in the same run,
to cryptofeed's own Binance message handler (what cryptofeed calls its TICKER channel), offline: its
symbol table is seeded from the frames and no connection is made. Passes alternate between the two so
both see the same machine state; the JSON then holds cryptofeed's `frames_per_s` and the ratio. The
figures are comparable because both sides take the frame as text off the socket and end with one
Decimal bid/ask quote object per frame; cryptofeed is not a dependency of Pricewire:

    .venv/bin/pip install cryptofeed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from pricewire_collector.sources.base import Parser
from pricewire_collector.sources.capture import decode_record
from pricewire_collector.sources.registry import build_parser
from pricewire_common.config import Settings
from pricewire_common.errors import ConfigError, RejectedInput
from pricewire_common.logs import configure_logging

BINANCE_QUOTES = ("USDT", "USDC", "FDUSD", "BUSD", "TUSD", "USD", "BTC", "ETH", "BNB", "EUR")
"""Quote assets tried, longest first, to split a Binance symbol for cryptofeed's symbol table."""


@dataclass
class Timing:
    """What one side did over all its passes."""

    frames: int = 0
    outputs: int = 0
    seconds: float = 0.0
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def read_frames(path: Path, *, capture_of: str | None = None) -> list[bytes]:
    """The non-blank lines of `path`, without their line ends; with `capture_of`, `path` is a capture
    file (`pricewire capture`, tests/fixtures/*.ndjson) and the frames are that source's records."""
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    if capture_of is None:
        return lines
    records = [decode_record(line) for line in lines]
    return [record.frame.encode() for record in records if record.source == capture_of]


def time_parser(parser: Parser, frames: Sequence[bytes], timing: Timing, *, received_ns: int) -> None:
    """One pass of `parser` over `frames`, added to `timing`."""
    ticks = 0
    rejected = timing.rejected
    parse = parser.parse
    start = time.perf_counter()
    for frame in frames:
        try:
            ticks += len(parse(frame, received_ns))
        except RejectedInput as err:
            rejected[err.reason] += 1
    timing.seconds += time.perf_counter() - start
    timing.frames += len(frames)
    timing.outputs += ticks


class CryptofeedBinance:
    """cryptofeed's Binance feed object, built offline, its TICKER callback counting quotes."""

    def __init__(self, frames: Sequence[bytes]) -> None:
        try:
            from cryptofeed.defines import TICKER  # noqa: PLC0415
            from cryptofeed.exchanges import Binance  # noqa: PLC0415
            from cryptofeed.symbols import Symbols  # noqa: PLC0415
        except ImportError as exc:
            raise SystemExit("--compare-cryptofeed needs cryptofeed: .venv/bin/pip install cryptofeed") from exc
        self.count = 0
        self.kept: list[Any] | None = None
        # The symbol table cryptofeed would download from /api/v3/exchangeInfo, made from the frames.
        symbols = sorted({json.loads(frame)["data"]["s"] for frame in frames})
        info = {"symbols": [_exchange_info_entry(s) for s in symbols]}
        mapping, extra = Binance._parse_symbol_data(info)
        Symbols.set(Binance.id, mapping, extra)
        self.feed = Binance(symbols=list(mapping), channels=[TICKER], callbacks={TICKER: self._on_ticker})

    async def _on_ticker(self, ticker: Any, receipt_timestamp: float) -> None:
        self.count += 1
        if self.kept is not None:
            self.kept.append(ticker)

    async def quotes(self, texts: Sequence[str]) -> list[Any]:
        """The ticker objects of `texts` (untimed)."""
        self.kept = []
        try:
            for text in texts:
                await self.feed.message_handler(text, None, time.time())
            return self.kept
        finally:
            self.kept = None

    async def time_pass(self, texts: Sequence[str], timing: Timing) -> None:
        handler = self.feed.message_handler
        before = self.count
        received = time.time()
        start = time.perf_counter()
        for text in texts:
            await handler(text, None, received)
        timing.seconds += time.perf_counter() - start
        timing.frames += len(texts)
        timing.outputs += self.count - before

    async def close(self) -> None:
        await self.feed.shutdown()


def _exchange_info_entry(symbol: str) -> dict[str, Any]:
    for quote in sorted(BINANCE_QUOTES, key=len, reverse=True):
        if symbol.endswith(quote) and len(symbol) > len(quote):
            base = symbol.removesuffix(quote)
            return {"symbol": symbol, "baseAsset": base, "quoteAsset": quote, "filters": [{"tickSize": "0.01"}]}
    raise SystemExit(f"cannot split Binance symbol {symbol!r} by its quote asset")


async def same_quotes(parser: Parser, cryptofeed: CryptofeedBinance, frames: Sequence[bytes]) -> bool:
    """Untimed check: both sides read the same (symbol, bid, ask) out of the frames."""
    ours: list[tuple[str, Decimal | None, Decimal | None]] = []
    for frame in frames:
        try:
            ours.extend((t.symbol, t.bid, t.ask) for t in parser.parse(frame, time.time_ns()))
        except RejectedInput:
            continue
    theirs = await cryptofeed.quotes([frame.decode() for frame in frames])
    return ours == [(str(t.symbol), t.bid, t.ask) for t in theirs]


async def run(venue: str, path: Path, *, repeat: int, compare: bool, capture: bool = False) -> dict[str, Any]:
    frames = read_frames(path, capture_of=venue if capture else None)
    if not frames:
        raise SystemExit(f"{path} holds no frames")
    try:
        settings = Settings.from_env()
        parser = build_parser(venue, settings)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from exc
    ours, theirs = Timing(), Timing()
    cryptofeed = CryptofeedBinance(frames) if compare else None
    texts = [frame.decode() for frame in frames]  # cryptofeed gets what its websocket library hands it: str
    received_ns = time.time_ns()
    try:
        for _ in range(repeat):
            time_parser(build_parser(venue, settings), frames, ours, received_ns=received_ns)
            if cryptofeed is not None:
                await cryptofeed.time_pass(texts, theirs)
        result: dict[str, Any] = {
            "venue": venue,
            "file": str(path),
            "frames": len(frames),
            "repeat": repeat,
            "ticks": ours.outputs // repeat,
            "rejected": dict(ours.rejected),
            "seconds": round(ours.seconds, 4),
            "frames_per_s": round(ours.frames_per_s),
            "python": platform.python_version(),
        }
        if cryptofeed is not None:
            result["cryptofeed"] = {
                "version": _version("cryptofeed"),
                "quotes": theirs.outputs // repeat,
                "seconds": round(theirs.seconds, 4),
                "frames_per_s": round(theirs.frames_per_s),
                "same_quotes": await same_quotes(parser, cryptofeed, frames[:1000]),
            }
            result["ratio_vs_cryptofeed"] = round(ours.frames_per_s / theirs.frames_per_s, 2)
    finally:
        if cryptofeed is not None:
            await cryptofeed.close()
    return result


def _version(package: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version(package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("venue", help="source name: binance, coinbase, kraken, coingecko, ccxt")
    parser.add_argument("file", type=Path, help="one raw venue frame per line")
    parser.add_argument("--repeat", type=int, default=1, help="passes over the file")
    parser.add_argument("--capture", action="store_true", help="FILE is a capture file: parse VENUE's frames in it")
    parser.add_argument(
        "--compare-cryptofeed", action="store_true", help="also time cryptofeed's Binance handler (bookTicker)"
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.compare_cryptofeed and args.venue != "binance":
        parser.error("--compare-cryptofeed only applies to binance bookTicker frames")
    configure_logging(level="warning", fmt="json")
    work = run(args.venue, args.file, repeat=args.repeat, compare=args.compare_cryptofeed, capture=args.capture)
    result = asyncio.run(work)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
