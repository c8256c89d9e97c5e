"""Query parameters of the history endpoints, checked and completed with their defaults: pure, no I/O.

Every bad parameter (unknown, repeated, unparsable, out of range, a window that ends before it starts)
becomes BadParameter with a message naming the parameter and what it accepts, so a client sees its
mistake in the 400 it gets instead of an empty answer.

Times are ISO 8601 with a zone (`Z` or an offset such as `+01:00`); a time without one is refused
rather than guessed. A `+` sent unencoded in a query string arrives as a space
(`...T10:00:00 01:00`): that space is read as the `+` it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from pricewire_cache_writer.candles import INTERVALS
from pricewire_common import subjects
from pricewire_common.errors import InvalidEvent
from pricewire_gateway.errors import BadParameter

DEFAULT_INTERVAL: Final = "1m"
DEFAULT_LIMIT: Final = 500
MAX_LIMIT: Final = 5_000

HISTORY_PARAMS: Final = ("interval", "start", "end", "limit")
TICKS_PARAMS: Final = ("source", "start", "end", "limit")

_LIMIT = re.compile(r"\d{1,9}", re.ASCII)
# A date and time, a space, then what can only be an offset: the `+` a query string turned into a space.
_UNENCODED_PLUS = re.compile(r"(\S+[Tt]\S*\d) (\d{2}(?::?\d{2})?)")


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """The candles to read: those of `interval` whose bucket begins in [start, end), the latest `limit`."""

    asset: str
    interval: str
    start: datetime
    end: datetime
    limit: int


@dataclass(frozen=True, slots=True)
class TicksQuery:
    """The ticks to read, newest first: `source` (None: every source), `ts_exchange` in [start, end)."""

    asset: str
    source: str | None
    start: datetime | None
    end: datetime | None
    limit: int


def single_values(pairs: Iterable[tuple[str, str]], *, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query's parameters by name; BadParameter for a name not in `allowed` or given twice."""
    values: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter {name!r}; this endpoint takes {', '.join(allowed)}")
        if name in values:
            raise BadParameter(name, f"{name} is given more than once")
        values[name] = value
    return values


def parse_time(name: str, text: str) -> datetime:
    """An aware UTC datetime (microseconds; finer digits are cut) from ISO 8601 text with a zone."""
    repaired = _UNENCODED_PLUS.sub(r"\1+\2", text.strip())
    try:
        value = datetime.fromisoformat(repaired)
    except ValueError as exc:
        raise BadParameter(
            name, f"{name} must be an ISO 8601 time such as 2026-11-20T10:00:00Z; got {text!r} ({exc})"
        ) from exc
    if value.utcoffset() is None:
        raise BadParameter(
            name, f"{name} must carry a time zone: end it with Z or an offset such as +01:00; got {text!r}"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise BadParameter(name, f"{name} is out of range: {text!r}") from exc


def parse_limit(text: str | None) -> int:
    """`limit`: DEFAULT_LIMIT when absent, else a whole number from 1 to MAX_LIMIT."""
    if text is None:
        return DEFAULT_LIMIT
    if _LIMIT.fullmatch(text) is None or not 1 <= int(text) <= MAX_LIMIT:
        raise BadParameter("limit", f"limit must be a whole number from 1 to {MAX_LIMIT}; got {text!r}")
    return int(text)


def parse_interval(text: str | None) -> str:
    """`interval`: DEFAULT_INTERVAL when absent, else one of the candle intervals."""
    if text is None:
        return DEFAULT_INTERVAL
    if text not in INTERVALS:
        raise BadParameter("interval", f"interval must be one of {', '.join(INTERVALS)}; got {text!r}")
    return text


def _optional_time(values: dict[str, str], name: str) -> datetime | None:
    text = values.get(name)
    return None if text is None else parse_time(name, text)


def _ordered(start: datetime, end: datetime) -> None:
    if end <= start:
        raise BadParameter(
            "end", f"start ({start.isoformat()}) must be before end ({end.isoformat()}); the window is [start, end)"
        )


def history_query(asset: str, pairs: Iterable[tuple[str, str]], *, now: datetime) -> HistoryQuery:
    """The candle query a request asks for, with the defaults filled in.

    Without `start` and `end` the window is the `limit` intervals up to now; with one of them it is the
    `limit` intervals on that side of it; with both it is theirs, and the latest `limit` candles in it
    are served.
    """
    values = single_values(pairs, allowed=HISTORY_PARAMS)
    interval = parse_interval(values.get("interval"))
    limit = parse_limit(values.get("limit"))
    start = _optional_time(values, "start")
    end = _optional_time(values, "end")
    span = timedelta(seconds=INTERVALS[interval].seconds * limit)
    try:
        if start is None:
            end = end or now
            start = end - span
        elif end is None:
            end = start + span
    except OverflowError as exc:
        raise BadParameter(
            "start" if start is None else "end", f"the window of {limit} x {interval} leaves the calendar"
        ) from exc
    _ordered(start, end)
    return HistoryQuery(asset=asset, interval=interval, start=start, end=end, limit=limit)


def ticks_query(asset: str, pairs: Iterable[tuple[str, str]]) -> TicksQuery:
    """The tick query a request asks for: no `start` or `end` leaves that side open."""
    values = single_values(pairs, allowed=TICKS_PARAMS)
    source = values.get("source")
    if source is not None:
        try:
            subjects.check_source(source)
        except InvalidEvent as exc:
            raise BadParameter(
                "source", f"source must be a venue name such as binance or sim-a; got {source!r}"
            ) from exc
    start = _optional_time(values, "start")
    end = _optional_time(values, "end")
    if start is not None and end is not None:
        _ordered(start, end)
    return TicksQuery(asset=asset, source=source, start=start, end=end, limit=parse_limit(values.get("limit")))
