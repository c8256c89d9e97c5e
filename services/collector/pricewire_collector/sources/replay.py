"""The replay source: a capture file fed back through the venues' own parsers, like a live source.

`--feed replay:FILE` runs it. Each line (see `capture`) is parsed by the parser of the source that
recorded it, and its ticks and rejections go to the sink exactly as the live source would deliver them
(rejected frames on `venue.<source>`; a line that is not a capture record on `venue.replay`, reason
`malformed_frame`). Pace: the recorded one divided by `settings.live.replay_speed` (1 = as recorded,
2 = twice as fast, 0 = as fast as possible); every wait ends when `stop` is set.

Receive times: a replayed frame must look fresh to the validator (it drops stale quotes), so its
recorded `received_ns` is moved to the moment the replay delivers it on the recorded schedule:
`start + (received_ns - first received_ns) / speed`. At speed 1 that is every recorded time shifted by
(now - first recorded time), so the relative timing of the capture is kept exactly; at speed 0 there is
no schedule and a frame is stamped with the clock when it is delivered. `ts_exchange` is the venue's
own and stays as recorded; tick ids come from the frames, so a frame replayed twice dedupes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from pricewire_collector.sources import registry
from pricewire_collector.sources.base import Parser, Sink, deliver
from pricewire_collector.sources.capture import CaptureRecord, decode_record
from pricewire_common import subjects
from pricewire_common.clock import NS_PER_S, Clock, wall_clock
from pricewire_common.config import Settings
from pricewire_common.errors import ConfigError, InvalidEvent, RejectedInput
from pricewire_common.waits import wait_event

__all__ = ["NAME", "TRANSPORT", "ParserFactory", "ReplayClock", "ReplaySource", "build_replay"]

log = structlog.get_logger(__name__)

NAME = "replay"
TRANSPORT = "replay"

ParserFactory = Callable[[str, Settings], Parser]
"""How a recorded source name becomes its parser: `registry.build_parser` unless a test passes its own."""


@dataclass(frozen=True, slots=True)
class ReplayClock:
    """Maps recorded receive times onto the replay's run: when each is due, and the stamp it gets."""

    first_recorded_ns: int
    start_wall_ns: int
    start_loop_s: float
    speed: float

    def due_s(self, recorded_ns: int) -> float:
        """The loop time at which a frame recorded at `recorded_ns` is delivered."""
        if self.speed == 0:
            return self.start_loop_s
        return self.start_loop_s + (recorded_ns - self.first_recorded_ns) / self.speed / NS_PER_S

    def stamp(self, recorded_ns: int, now_ns: int) -> int:
        """The `received_ns` a replayed frame gets (`now_ns`: the wall clock at delivery)."""
        if self.speed == 0:
            return now_ns
        return self.start_wall_ns + round((recorded_ns - self.first_recorded_ns) / self.speed)


class ReplaySource:
    """Implements `base.Source` over one capture file."""

    def __init__(
        self,
        path: Path,
        *,
        settings: Settings,
        speed: float,
        parsers: ParserFactory = registry.build_parser,
        clock: Clock = wall_clock,
    ) -> None:
        if not speed >= 0:
            raise ValueError(f"replay speed must be >= 0, not {speed}")
        self._path = path
        self._settings = settings
        self._speed = speed
        self._parsers = parsers
        self._clock = clock
        self._cache: dict[str, Parser] = {}
        self.lines = 0
        """Capture lines read so far (blank lines excepted)."""

    @property
    def name(self) -> str:
        return NAME

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        """Deliver the file once, on schedule, then report `stopped` for the replay and each venue seen."""
        await sink.state(NAME, "connected", transport=TRANSPORT, detail=str(self._path))
        loop = asyncio.get_running_loop()
        schedule: ReplayClock | None = None
        venues: list[str] = []
        with self._path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                if stop.is_set():
                    break
                if not line.strip():
                    continue
                self.lines += 1
                try:
                    record = _record(line, number)
                except RejectedInput as err:
                    await sink.reject(err, source=NAME, frame=line)
                    continue
                if schedule is None:
                    schedule = ReplayClock(record.received_ns, self._clock(), loop.time(), self._speed)
                if not await _wait_until(schedule.due_s(record.received_ns), loop, stop):
                    break
                parser = self._parser(record.source)
                if parser is None:
                    unknown = RejectedInput(f"line {number}: no parser for {record.source!r}", reason="unknown_source")
                    await sink.reject(unknown, source=NAME, frame=line)
                    continue
                if record.source not in venues:
                    venues.append(record.source)
                    await sink.state(record.source, "connected", transport=TRANSPORT, detail=str(self._path))
                received_ns = schedule.stamp(record.received_ns, self._clock())
                await deliver(record.source, parser, sink, record.frame.encode(), received_ns)
        eof = not stop.is_set()
        detail = f"end of capture after {self.lines} lines" if eof else f"stopped after {self.lines} lines"
        log.info("replay_finished", path=str(self._path), lines=self.lines, sources=venues, complete=eof)
        for source in (*venues, NAME):
            await sink.state(source, "stopped", transport=TRANSPORT, detail=detail)

    def _parser(self, source: str) -> Parser | None:
        parser = self._cache.get(source)
        if parser is None:
            try:
                parser = self._cache[source] = self._parsers(source, self._settings)
            except ConfigError:
                return None
        return parser


def _record(line: bytes, number: int) -> CaptureRecord:
    """The capture record of a line, its source a valid source name; RejectedInput otherwise."""
    try:
        record = decode_record(line)
        subjects.check_source(record.source)
    except InvalidEvent as err:
        raise InvalidEvent(f"line {number}: {err.detail}", reason="malformed_frame") from err
    except RejectedInput as err:
        raise RejectedInput(f"line {number}: {err.detail}", reason=err.reason) from err
    return record


async def _wait_until(due_s: float, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> bool:
    """Wait for loop time `due_s`, or until `stop`; False when stopped. Always lets other tasks run."""
    delay = due_s - loop.time()
    if delay <= 0:
        await asyncio.sleep(0)  # a frame already due still yields: the publisher must get to send
        return not stop.is_set()
    await wait_event(stop, delay)
    return not stop.is_set()


def build_replay(
    settings: Settings,
    *,
    path: str,
    parsers: ParserFactory = registry.build_parser,
    clock: Clock = wall_clock,
) -> ReplaySource:
    """The replay of capture file `path` at `settings.live.replay_speed`; ConfigError if there is no such file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError("PRICEWIRE_FEED", f"no capture file at {path}")
    return ReplaySource(file, settings=settings, speed=settings.live.replay_speed, parsers=parsers, clock=clock)
