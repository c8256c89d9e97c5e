"""The operations port of the services without an HTTP API (collector, validator, cache_writer).

`GET /metrics` (Prometheus text format), `GET /healthz` (the process and its event loop answer) and
`GET /readyz` (200 when every dependency check passes, else 503, with each check's result as JSON).
Checks run concurrently, each bounded by PROBE_TIMEOUT_S, the way the gateway probes its own.
The gateway serves the same `/metrics` on its own port (`install_metrics`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import asyncpg
import msgspec
import redis.asyncio as redis_asyncio
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from redis.exceptions import RedisError

from pricewire_common.errors import PricewireError
from pricewire_common.metrics import CONTENT_TYPE, Exposition

__all__ = [
    "PROBE_TIMEOUT_S",
    "Check",
    "CheckResult",
    "NotReady",
    "OpsServer",
    "Readiness",
    "install_metrics",
    "nats_check",
    "postgres_check",
    "readiness",
    "redis_check",
]

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S = 2.0
JSON = "application/json"


class NotReady(PricewireError):
    """A dependency answered, but not as a ready one does."""


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    """One dependency's answer to `/readyz`."""

    name: str
    ok: bool
    error: str | None = None


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /readyz` of a service: `ready` when every check passed, else `unavailable`."""

    service: str
    status: Literal["ready", "unavailable"]
    checks: list[CheckResult]


Probe = Callable[[], Awaitable[None]]
"""Returns when the dependency is ready; raises NotReady (or the client's own error) when it is not."""


@dataclass(frozen=True, slots=True)
class Check:
    """A named readiness probe."""

    name: str
    probe: Probe


# The errors a probe's dependency raises when it is down: a check reports them, anything else is a bug.
_DOWN: tuple[type[BaseException], ...] = (
    NotReady,
    RedisError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
)


async def _run(check: Check) -> CheckResult:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await check.probe()
    except TimeoutError:
        return CheckResult(name=check.name, ok=False, error=f"no answer within {PROBE_TIMEOUT_S} s")
    except _DOWN as exc:
        return CheckResult(name=check.name, ok=False, error=f"{type(exc).__name__}: {exc}")
    return CheckResult(name=check.name, ok=True)


async def readiness(service: str, checks: Sequence[Check]) -> Readiness:
    """Every check, run concurrently."""
    results = list(await asyncio.gather(*(_run(check) for check in checks)))
    return Readiness(service=service, status="ready" if all(r.ok for r in results) else "unavailable", checks=results)


def nats_check(nc: NATS) -> Check:
    async def probe() -> None:
        if not nc.is_connected:
            raise NotReady("not connected")

    return Check("nats", probe)


def redis_check(client: redis_asyncio.Redis) -> Check:
    async def probe() -> None:
        if not await client.ping():
            raise NotReady("PING was not answered with PONG")

    return Check("redis", probe)


def postgres_check(pool: asyncpg.Pool) -> Check:
    async def probe() -> None:
        if await pool.fetchval("SELECT 1") != 1:
            raise NotReady("SELECT 1 did not return 1")

    return Check("postgres", probe)


def install_metrics(app: web.Application, exposition: Exposition) -> None:
    """Serve `exposition` at `GET /metrics` of `app`."""

    async def metrics(request: web.Request) -> web.Response:
        body = await exposition.render()
        # CONTENT_TYPE carries its own charset parameter: set the header whole, not through content_type.
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/metrics", metrics)


class OpsServer:
    """`/metrics`, `/healthz` and `/readyz` on `host:port` (port 0: any free port, see `port`)."""

    def __init__(self, *, service: str, exposition: Exposition, checks: Sequence[Check], host: str, port: int) -> None:
        self.service = service
        self.checks = tuple(checks)
        self._host = host
        self._port = port
        self._app = web.Application()
        install_metrics(self._app, exposition)
        self._app.router.add_get("/healthz", self._healthz)
        self._app.router.add_get("/readyz", self._readyz)
        self._runner: web.AppRunner | None = None
        self.port = port
        """The port bound, once started."""

    async def readiness(self) -> Readiness:
        return await readiness(self.service, self.checks)

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        self.port = int(self._runner.addresses[0][1])
        log.info("ops_listening", host=self._host, port=self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OpsServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=JSON)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = await self.readiness()
        if ready.status != "ready":
            log.info("not_ready", failed=[c.name for c in ready.checks if not c.ok])
        return web.Response(
            body=msgspec.json.encode(ready), status=200 if ready.status == "ready" else 503, content_type=JSON
        )
