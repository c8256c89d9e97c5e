"""Serving a fake venue's aiohttp app on loopback, the one way every fake does it."""

from __future__ import annotations

from aiohttp import web


async def serve(app: web.Application, *, port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve `app` on 127.0.0.1 (`port` 0: a free one; a fixed one: the same port again after a restart).

    Returns the runner (clean it up to stop) and the port it listens on. A short shutdown timeout: a fake's
    open WebSockets must not hold a test's teardown.
    """
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, int(runner.addresses[0][1])
