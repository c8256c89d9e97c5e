"""Graceful shutdown: SIGTERM and SIGINT set an event the service waits on."""

from __future__ import annotations

import asyncio
import signal

import structlog

log = structlog.get_logger(__name__)


def stop_on_signals(stop: asyncio.Event) -> None:
    """Make SIGTERM and SIGINT set `stop` (call from inside the running loop)."""
    loop = asyncio.get_running_loop()

    def request_stop(signum: int) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)
