"""The poll loop of the REST sources (CoinGecko, ccxt): one request per interval, within a token bucket.

`poll` owns the loop; a venue supplies `request` (one HTTP round trip, raw body out) and a pure `Parser`.
Outcomes of a request:

- a body: `connected`; the body goes to `base.deliver` (its ticks to `sink.tick`, a `VenueFrameError`
  to `sink.reject` after the frame's good ticks; polling goes on); then the next poll is one interval away.
- `RateLimited` (HTTP 429/418): the bucket is drained for the venue's Retry-After; the state does not
  change (the venue answers, it only asks us to slow down), a warning is logged.
- `PollFailed` (connection refused, 5xx, timeout...): `reconnecting`, and the next try waits a `Backoff`.

Every wait is stop-aware, the request in flight too: `stop` cancels it, and nothing is delivered after
`stop`. At the end the source reports `stopped`.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

import aiohttp
import structlog

from pricewire_collector.sources.base import Parser, Sink, count_request, deliver
from pricewire_collector.sources.resilience import Backoff, TokenBucket
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.errors import PricewireError
from pricewire_common.events import SourceState
from pricewire_common.waits import wait_event

__all__ = [
    "TRANSPORT",
    "PollFailed",
    "RateLimited",
    "Request",
    "http_get",
    "poll",
    "retry_after_s",
    "wait_or_stop",
]

log = structlog.get_logger(__name__)

TRANSPORT = "rest"
DEFAULT_RETRY_AFTER_S = 60.0
"""How long a 429/418 without a usable Retry-After header pauses the source."""
REQUEST_TIMEOUT_S = 10.0
"""A request that takes longer is a failure (the connection may be half dead)."""


class PollError(PricewireError):
    """One poll request did not yield a body."""


class RateLimited(PollError):
    """The venue answered 'too many requests' (HTTP 429, or 418 when it bans for a while)."""

    def __init__(self, status: int, retry_after_s: float) -> None:
        super().__init__(f"HTTP {status}, retry after {retry_after_s} s")
        self.status = status
        self.retry_after_s = retry_after_s


class PollFailed(PollError):
    """The venue could not be reached or answered with an error (5xx, timeout, refused...)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


Request = Callable[[], Awaitable[bytes]]
"""One request to the venue: the raw response body, or RateLimited / PollFailed."""


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` or until `stop` is set; True when stopped."""
    if seconds > 0 and not stop.is_set():
        await wait_event(stop, seconds)
    return stop.is_set()


def retry_after_s(
    headers: Mapping[str, str], *, default: float = DEFAULT_RETRY_AFTER_S, now_s: float | None = None
) -> float:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date); `default` when absent or unreadable."""
    # Case-insensitive: aiohttp's headers are, but ccxt hands over a plain dict.
    raw = next((value for name, value in headers.items() if name.lower() == "retry-after"), None)
    if raw is None:
        return default
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return default
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        now = datetime.now(UTC).timestamp() if now_s is None else now_s
        return max(0.0, when.timestamp() - now)
    return seconds if 0 <= seconds < float("inf") else default


async def http_get(
    session: aiohttp.ClientSession,
    url: str,
    *,
    params: Mapping[str, str] | None = None,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> bytes:
    """GET `url`; the body of a 2xx answer, else RateLimited (429/418) or PollFailed."""
    try:
        async with session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            body = await response.read()
            if response.status in (429, 418):
                raise RateLimited(response.status, retry_after_s(response.headers))
            if not 200 <= response.status < 300:
                raise PollFailed(f"HTTP {response.status} {response.reason}: {body[:200]!r}")
            return body
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PollFailed(repr(exc)) from exc


async def _unless_stopped(request: Awaitable[bytes], stop: asyncio.Event) -> bytes | None:
    """The body `request` gives, or None as soon as `stop` is set: a slow venue must not hold up a shutdown,
    so the request in flight is then cancelled (and its answer, should it come at the same moment, dropped)."""
    work = asyncio.ensure_future(request)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((work, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()  # no-op once it is done
        stopped.cancel()
        await asyncio.wait((work, stopped))
    if stop.is_set():
        if not work.cancelled():
            work.exception()  # a failure that raced the stop is moot; fetched so asyncio does not report it
        return None
    return work.result()


class _States:
    """Reports a state to the sink only when it changes."""

    def __init__(self, sink: Sink, name: str) -> None:
        self._sink = sink
        self._name = name
        self.current: SourceState | None = None

    async def set(self, state: SourceState, detail: str | None = None) -> None:
        if state != self.current:
            self.current = state
            await self._sink.state(self._name, state, transport=TRANSPORT, detail=detail)


async def poll(
    *,
    name: str,
    request: Request,
    parser: Parser,
    sink: Sink,
    stop: asyncio.Event,
    interval_s: float,
    bucket: TokenBucket,
    backoff: Backoff,
    cost: float = 1.0,
    clock: Clock = wall_clock,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Poll `request` every `interval_s` (never faster than `bucket` allows) until `stop`; see the module doc."""
    states = _States(sink, name)
    await states.set("connecting")
    while not stop.is_set():
        delay = bucket.delay(cost, monotonic())
        if delay > 0:
            # Exactly the time until the bucket holds a request's worth, then look again.
            await wait_or_stop(stop, delay)
            continue
        bucket.take(cost, monotonic())
        try:
            body = await _unless_stopped(request(), stop)
        except RateLimited as err:
            count_request(sink, name, "rate_limited")
            bucket.drain(monotonic(), for_s=err.retry_after_s)
            log.warning("source_rate_limited", source=name, status=err.status, retry_after_s=err.retry_after_s)
            continue
        except PollFailed as err:
            count_request(sink, name, "failed")
            await states.set("reconnecting", err.detail)
            wait_s = backoff.next_delay()
            log.warning("source_poll_failed", source=name, error=err.detail, retry_in_s=round(wait_s, 3))
            await wait_or_stop(stop, wait_s)
            continue
        if body is None:
            break  # stopped while the request was in flight: nothing more is delivered
        count_request(sink, name, "ok")
        backoff.reset()
        await states.set("connected")
        await deliver(name, parser, sink, body, clock())
        await wait_or_stop(stop, interval_s)
    await states.set("stopped")
