"""REST polling for a WebSocket venue while its circuit breaker is open (Coinbase, Kraken).

A round asks each `Endpoint` once (one token of the venue's public `TokenBucket` per request) and hands
each body to that endpoint's pure `Parser` through `base.deliver`; rounds are `poll_s` apart. The loop
returns as soon as the breaker lets a WebSocket try through (HALF_OPEN), so the source can dial again.
A 429/418 answer drains the bucket for its Retry-After (`polling.retry_after_s`); any other failure
(refused, 5xx, 4xx, timeout) is logged and the next round tries again: the WebSocket side decides when
the venue is back. The bucket belongs to the fallback, so it keeps its account across breaker cycles.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
import structlog

from pricewire_collector.sources.base import Parser, Sink, count_request, deliver
from pricewire_collector.sources.polling import PollFailed, RateLimited, http_get, wait_or_stop
from pricewire_collector.sources.resilience import CircuitBreaker, TokenBucket
from pricewire_common.clock import Clock, wall_clock

__all__ = ["REST_POLL_S", "TRANSPORT", "Endpoint", "RestFallback"]

log = structlog.get_logger(__name__)

TRANSPORT = "rest"
REST_POLL_S = 2.0
"""How often a fallback round runs."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One REST request of a round, and the parser of its answer."""

    url: str
    parser: Parser
    params: Mapping[str, str] = field(default_factory=dict)


class RestFallback:
    """Polls `endpoints` every `poll_s` within `bucket` until the breaker allows a WebSocket try; see the module doc."""

    def __init__(
        self,
        *,
        name: str,
        endpoints: Sequence[Endpoint],
        bucket: TokenBucket,
        poll_s: float = REST_POLL_S,
        clock: Clock = wall_clock,
    ) -> None:
        self.name = name
        self.endpoints = tuple(endpoints)
        self.bucket = bucket
        self.poll_s = poll_s
        self._clock = clock

    async def run(
        self, session: aiohttp.ClientSession, sink: Sink, stop: asyncio.Event, breaker: CircuitBreaker
    ) -> None:
        """Poll until `breaker` lets a WebSocket try through (or `stop`)."""
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while not stop.is_set():
            now = loop.time()
            if breaker.allows(now):
                return
            wait_s = next_round - now
            if wait_s <= 0:
                await self._round(session, sink, stop, breaker)
                next_round = loop.time() + self.poll_s
                continue
            await wait_or_stop(stop, min(wait_s, breaker.retry_in(now)))

    async def _round(
        self, session: aiohttp.ClientSession, sink: Sink, stop: asyncio.Event, breaker: CircuitBreaker
    ) -> None:
        """Each endpoint once, as the bucket allows; stops early when the breaker or `stop` says so."""
        loop = asyncio.get_running_loop()
        for endpoint in self.endpoints:
            while (delay := self.bucket.delay(1, loop.time())) > 0:
                if breaker.allows(loop.time()):
                    return
                if await wait_or_stop(stop, min(delay, breaker.retry_in(loop.time()))):
                    return
            self.bucket.take(1, loop.time())
            try:
                body = await http_get(session, endpoint.url, params=endpoint.params)
            except RateLimited as err:
                count_request(sink, self.name, "rate_limited")
                self.bucket.drain(loop.time(), for_s=err.retry_after_s)
                log.warning(
                    "source_rate_limited",
                    source=self.name,
                    transport=TRANSPORT,
                    status=err.status,
                    retry_after_s=err.retry_after_s,
                )
                continue
            except PollFailed as err:
                count_request(sink, self.name, "failed")
                log.warning("source_rest_failed", source=self.name, url=endpoint.url, error=err.detail)
                continue
            count_request(sink, self.name, "ok")
            await deliver(self.name, endpoint.parser, sink, body, self._clock())
