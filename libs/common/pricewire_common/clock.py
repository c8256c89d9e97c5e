"""Time as integer nanoseconds since the Unix epoch, UTC; injectable so tests can skew it."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], int]

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def wall_clock() -> int:
    """The system's wall clock in ns."""
    return time.time_ns()


def skewed(clock: Clock, offset_s: float) -> Clock:
    """`clock` moved by `offset_s` seconds (itself when 0): a host whose clock is off, for fault tests."""
    if offset_s == 0:
        return clock
    offset_ns = round(offset_s * NS_PER_S)
    return lambda: clock() + offset_ns


def iso_from_ns(ts_ns: int) -> str:
    """ISO 8601 UTC text with millisecond precision and a `Z` suffix."""
    # Whole seconds first: a float division would round 20.999999999 s up to 21 s.
    return f"{_second_text(ts_ns // NS_PER_S)}.{(ts_ns // NS_PER_MS) % 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _second_text(seconds: int) -> str:
    # strftime costs more than the rest of a REST price answer's encoding; the seconds a gateway formats
    # are mostly the few current ones (every answer, frame and event carries two or three of them).
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def datetime_from_ns(ts_ns: int) -> datetime:
    """An aware UTC datetime (microsecond precision) for storage."""
    return _EPOCH + timedelta(microseconds=ts_ns // 1000)


def ns_from_datetime(dt: datetime) -> int:
    """Integer ns of an aware datetime, exact to the microsecond."""
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def ns_from_rfc3339(text: str) -> int:
    """Integer ns since the epoch of an RFC 3339 time, exact to the ns (digits beyond are cut).

    Raises ValueError for anything else.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    whole = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC)
    ns = ns_from_datetime(whole) + (int(fraction[:9].ljust(9, "0")) if fraction else 0)
    if zulu is None:
        offset_s = int(off_h) * 3600 + int(off_m) * 60
        ns -= (offset_s if sign == "+" else -offset_s) * NS_PER_S
    return ns
