"""`pricewire replay` and `pricewire rebuild`: the arguments, the progress display and the summary.

The work itself is `pricewire_cache_writer.replay`; this module only turns options into its arguments,
shows how far each stream has got (a rich progress bar on a terminal, a plain line a second otherwise,
both on stderr) and prints the summary on stdout.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TextIO, cast

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from pricewire_cache_writer.errors import CacheWriterError, RebuildRefused, ReplayStopped
from pricewire_cache_writer.replay import WHICH, OnProgress, ReplaySummary, StartAt, StreamProgress, Which
from pricewire_cache_writer.replay import rebuild as rebuild_projections
from pricewire_cache_writer.replay import replay as replay_projections
from pricewire_common.config import Settings
from pricewire_common.logs import configure_logging

PLAIN_EVERY_S = 1.0


class UsageError(ValueError):
    """An option the user must change; the message says how."""


def parse_which(raw: str) -> Which:
    if raw not in WHICH:
        raise UsageError(f"--projection must be one of {', '.join(WHICH)}, not {raw!r}")
    return cast(Which, raw)


def parse_start(*, seq: int | None, since: str | None) -> StartAt:
    """`--seq N` or `--from TIME` (ISO 8601 with a zone) into a start; neither: the first message retained."""
    if seq is not None and since is not None:
        raise UsageError("give --from or --seq, not both")
    if seq is not None:
        if seq < 1:
            raise UsageError(f"--seq is a stream sequence, 1 or more, not {seq}")
        return seq
    if since is None:
        return None
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        raise UsageError(f"--from {since!r} is not an ISO 8601 time, e.g. 2026-11-22T10:00:00Z") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise UsageError(f"--from {since!r} has no time zone: add Z for UTC, e.g. {since}Z")
    return moment


def summary_lines(summary: ReplaySummary, *, command: str) -> list[str]:
    """The summary as printed: one line per stream, then the total."""
    lines = []
    if summary.emptied:
        lines.append(f"{command}: emptied {', '.join(summary.emptied)}, then replayed the whole retained log")
    for s in summary.streams:
        span = f"seq {s.first_seq}..{s.through_seq}" if s.first_seq else "nothing to replay"
        lines.append(
            f"{s.stream:<7} -> {', '.join(s.projections)}: {s.applied:,} events applied, {s.rejected:,} rejected"
            f" ({span}, stream ends at {s.last_seq}) in {s.elapsed_s:.2f} s, {s.rate:,.0f} events/s"
        )
    lines.append(
        f"total: {summary.applied:,} events applied, {summary.rejected:,} rejected"
        f" in {summary.elapsed_s:.2f} s, {summary.rate:,.0f} events/s"
    )
    return lines


class PlainProgress:
    """A line per stream at most once a second, for a log file or a pipe."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._last: dict[str, float] = {}

    def __call__(self, progress: StreamProgress) -> None:
        now = time.monotonic()
        if not progress.done and now - self._last.get(progress.stream, 0.0) < PLAIN_EVERY_S:
            return
        self._last[progress.stream] = now
        state = "done" if progress.done else f"{progress.fraction:.0%}"
        print(
            f"{progress.stream}: {state}, through seq {progress.through_seq} of {progress.last_seq},"
            f" {progress.applied:,} applied, {progress.rate:,.0f}/s",
            file=self._out,
            flush=True,
        )


class RichProgress:
    """One bar per stream on the terminal."""

    def __init__(self, bars: Progress) -> None:
        self._bars = bars
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, progress: StreamProgress) -> None:
        task = self._tasks.get(progress.stream)
        if task is None:
            task = self._bars.add_task(progress.stream, total=1.0)
            self._tasks[progress.stream] = task
        self._bars.update(
            task,
            completed=progress.fraction,
            description=f"{progress.stream} {progress.applied:,} events, {progress.rate:,.0f}/s",
        )


@contextmanager
def progress_display() -> Iterator[OnProgress]:
    if not sys.stderr.isatty():
        yield PlainProgress(sys.stderr)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"))
    with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True)) as bars:
        yield RichProgress(bars)


def _configure(settings: Settings) -> None:
    # On a terminal the progress bars are the display; the logs say only what goes wrong.
    level = settings.log_level if not sys.stderr.isatty() or settings.log_level == "debug" else "warning"
    configure_logging(level=level, fmt=settings.log_format)


def _finish(summary: ReplaySummary, command: str) -> None:
    for line in summary_lines(summary, command=command):
        typer.echo(line)


def _fail(exc: CacheWriterError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    if isinstance(exc, ReplayStopped):
        typer.echo(f"to carry on: pricewire replay --seq {exc.resume_seq} (for {exc.stream})", err=True)
    if isinstance(exc, RebuildRefused):
        typer.echo("the log's retention is PRICEWIRE_TICKS_MAX_AGE_S / PRICEWIRE_PRICES_MAX_AGE_S;", err=True)
        typer.echo("rebuild with --force to drop those rows anyway", err=True)
    return typer.Exit(1)


def replay_command(
    settings: Settings, *, projection: str, seq: int | None, since: str | None, batch: int | None
) -> None:
    """Run `pricewire replay`; exit 2 on bad options, 1 when the replay stops early."""
    try:
        which = parse_which(projection)
        start = parse_start(seq=seq, since=since)
    except UsageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _configure(settings)
    try:
        with progress_display() as on_progress:
            summary = asyncio.run(
                replay_projections(settings, projection=which, start=start, batch=batch, on_progress=on_progress)
            )
    except CacheWriterError as exc:
        raise _fail(exc) from exc
    _finish(summary, "replay")


def rebuild_command(settings: Settings, *, projection: str, batch: int | None, force: bool) -> None:
    """Run `pricewire rebuild`; exit 2 on bad options, 1 when refused or stopped early."""
    try:
        which = parse_which(projection)
    except UsageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _configure(settings)
    try:
        with progress_display() as on_progress:
            summary = asyncio.run(
                rebuild_projections(settings, projection=which, batch=batch, force=force, on_progress=on_progress)
            )
    except CacheWriterError as exc:
        raise _fail(exc) from exc
    _finish(summary, "rebuild")
