"""A fake CoinGecko on loopback: `GET /api/v3/simple/price` with scripted answers.

Answers come from `script` (first in, first out), then `default`. It can answer 429 with a Retry-After
for its first calls, send garbage, answer slowly, and go down (connection refused) and come back on the same port.
Every request is logged with its monotonic arrival time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType

from aiohttp import web

from tests.fakes.server import serve

PATH = "/api/v3/simple/price"


@dataclass(frozen=True, slots=True)
class Answer:
    """One scripted HTTP answer."""

    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    """How long the fake takes to answer (cut short when it goes down)."""


@dataclass(frozen=True, slots=True)
class Logged:
    """One request the fake received."""

    at: float
    """time.monotonic() on arrival."""
    query: dict[str, str]
    status: int


def simple_price_body(coins: dict[str, dict[str, str | int | None]]) -> bytes:
    """A documented `/simple/price` body; values given as strings are written as JSON numbers with those digits."""
    parts = []
    for coin_id, fields in coins.items():
        members = ", ".join(f"{json.dumps(name)}: {_number(value)}" for name, value in fields.items())
        parts.append(f"{json.dumps(coin_id)}: {{{members}}}")
    return ("{" + ", ".join(parts) + "}").encode()


def _number(value: str | int | None) -> str:
    if value is None:
        return "null"
    return str(Decimal(value)) if isinstance(value, str) else str(value)


def rate_limited(retry_after: str | None = "1") -> Answer:
    """CoinGecko's 429 answer (its documented error body)."""
    body = b'{"status": {"error_code": 429, "error_message": "You\'ve exceeded the Rate Limit."}}'
    return Answer(body, status=429, headers={} if retry_after is None else {"Retry-After": retry_after})


class FakeCoinGecko:
    """Use as `async with FakeCoinGecko(default=...) as fake:`; `fake.url` is the API base URL."""

    def __init__(self, *, default: Answer, script: list[Answer] | None = None) -> None:
        self.default = default
        self.script: deque[Answer] = deque(script or ())
        self.requests: list[Logged] = []
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/api/v3"

    async def _handle(self, request: web.Request) -> web.Response:
        answer = self.script.popleft() if self.script else self.default
        self.requests.append(Logged(time.monotonic(), dict(request.query), answer.status))
        async with self._changed:
            self._changed.notify_all()
        if answer.delay_s > 0:
            # A slow venue; going down ends the wait, so the server's shutdown never waits on a slow answer.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=answer.delay_s)
        return web.Response(
            body=answer.body, status=answer.status, headers=answer.headers, content_type="application/json"
        )

    async def up(self) -> None:
        """Listen (again, on the same port once it had one)."""
        self._closing.clear()
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        self._runner, self._port = await serve(app, port=self._port)

    async def down(self) -> None:
        """Stop listening and close every connection: clients get 'connection refused'."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_requests(self, count: int, *, timeout: float) -> list[Logged]:
        """Wait until `count` requests have arrived (TimeoutError after `timeout` s)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= count)
            return list(self.requests)

    async def __aenter__(self) -> FakeCoinGecko:
        await self.up()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.down()
