"""`pricewire capture`: record the raw frames of the live venues to a capture file, without NATS.

The sources run as in the collector, but their sink only writes each frame to the file
(`sources.capture`); the ticks and rejections they yield are counted and logged, never published.
It stops on Ctrl-C/SIGTERM or after `--duration` seconds, and prints the frames written per source.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
import typer

from pricewire_collector.sources.base import Source
from pricewire_collector.sources.capture import CaptureWriter
from pricewire_collector.sources.registry import build_sources
from pricewire_collector.sources.resilience import Backoff
from pricewire_collector.sources.runtime import supervise
from pricewire_common.config import LIVE_SOURCES, Settings
from pricewire_common.errors import ConfigError, RejectedInput
from pricewire_common.events import SourceState, Tick
from pricewire_common.lifecycle import stop_on_signals
from pricewire_common.logs import configure_logging
from pricewire_common.waits import wait_event

__all__ = ["RecordingSink", "capture", "command", "parse_sources", "record"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class RecordingSink:
    """Implements `base.Sink`: frames go to the writer; ticks and rejections are only counted."""

    writer: CaptureWriter
    ticks: Counter[str] = field(default_factory=Counter)
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)

    def frame(self, source: str, frame: bytes, received_ns: int) -> None:
        self.writer(source, frame, received_ns)

    async def tick(self, tick: Tick) -> None:
        self.ticks[tick.source] += 1

    async def reject(self, error: RejectedInput, *, source: str, frame: bytes) -> None:
        self.rejected[source, error.reason] += 1
        log.warning("frame_rejected", source=source, reason=error.reason, detail=error.detail)

    async def state(self, source: str, state: SourceState, *, transport: str, detail: str | None = None) -> None:
        log.info("source_state", source=source, state=state, transport=transport, detail=detail)


def parse_sources(raw: str) -> tuple[str, ...]:
    """`binance,kraken` -> ("binance", "kraken"); ConfigError naming the unknown ones."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in LIVE_SOURCES]
    if not names or unknown:
        raise ConfigError("--sources", f"unknown sources {unknown or raw!r}; known: {', '.join(LIVE_SOURCES)}")
    return names


async def record(
    settings: Settings,
    out: Path,
    stop: asyncio.Event,
    *,
    duration_s: float | None = None,
    sources: Sequence[Source] | None = None,
) -> RecordingSink:
    """Run `sources` (default: those `settings.live.sources` names) into capture file `out` until `stop`
    is set, `duration_s` passes, or every source has ended."""
    if sources is None:
        sources = build_sources(settings)
    with CaptureWriter(out) as writer:
        sink = RecordingSink(writer)
        log.info("capture_started", out=str(out), sources=[s.name for s in sources], duration_s=duration_s)
        async with asyncio.TaskGroup() as group:
            if duration_s is not None:
                group.create_task(_stop_after(stop, duration_s))
            live = settings.live
            runs = []
            for source in sources:
                backoff = Backoff(live.backoff_initial_s, live.backoff_max_s)
                runs.append(group.create_task(supervise(source, sink, stop, backoff=backoff)))
            if runs:
                await asyncio.wait(runs)
            stop.set()  # every source ended on its own: the timer has nothing left to bound
        log.info(
            "capture_finished",
            out=str(out),
            frames=dict(writer.counts),
            ticks=dict(sink.ticks),
            rejected=sum(sink.rejected.values()),
        )
    return sink


async def _stop_after(stop: asyncio.Event, duration_s: float) -> None:
    await wait_event(stop, duration_s)
    stop.set()


def capture(settings: Settings, *, out: Path, duration_s: float | None) -> Counter[str]:
    """Record until Ctrl-C/SIGTERM or `duration_s`; returns the frames written per source."""

    async def main() -> Counter[str]:
        stop = asyncio.Event()
        stop_on_signals(stop)
        sink = await record(settings, out, stop, duration_s=duration_s)
        return sink.writer.counts

    return asyncio.run(main())


def command(*, out: Path, duration_s: float | None, sources: str | None) -> None:
    """`pricewire capture`: settings from the environment, then `capture`; prints the frames per source."""
    try:
        settings = Settings.from_env()
        if sources is not None:
            settings = replace(settings, live=replace(settings.live, sources=parse_sources(sources)))
        if duration_s is not None and not duration_s > 0:
            raise ConfigError("--duration", "must be a positive number of seconds")
        configure_logging(level=settings.log_level, fmt=settings.log_format)
        counts = capture(settings, out=out, duration_s=duration_s)
    except ConfigError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"wrote {sum(counts.values())} frames to {out}")
    for source, frames in sorted(counts.items()):
        typer.echo(f"  {source}: {frames}")
