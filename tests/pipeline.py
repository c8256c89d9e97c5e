"""Helpers for tests that run whole services: the stack in-process, a service as a child process,
and what the log holds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from pricewire_common.config import Settings
from pricewire_common.events import decode_tick
from pricewire_common.lifecycle import DUMP_SIGNAL

STOP_TIMEOUT_S = 30.0
"""How long a service may take to stop on SIGTERM (Kubernetes' default grace period)."""


@asynccontextmanager
async def running(work: asyncio.Task[None], stop: asyncio.Event) -> AsyncIterator[asyncio.Task[None]]:
    """Stop `work` on the way out and surface its error, if it had one."""
    try:
        yield work
    finally:
        stop.set()
        await asyncio.wait_for(work, timeout=30)


def service_env(settings: Settings) -> dict[str, str]:
    """The environment a service process needs to reach this test's servers."""
    return {
        **os.environ,
        "NATS_URL": settings.nats_url,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "PRICEWIRE_ASSETS": ",".join(settings.assets),
        "PRICEWIRE_DB_BATCH_WAIT_S": str(settings.cache.batch_wait_s),
        "PRICEWIRE_LOG_FORMAT": "json",
        "PRICEWIRE_ACK_WAIT_S": str(settings.streams.ack_wait_s),
        "PRICEWIRE_VALIDATOR_LEASE_S": str(settings.validator.lease_s),
        "PRICEWIRE_GATEWAY_HOST": "127.0.0.1",
        "PRICEWIRE_GATEWAY_PORT": "0",
        "PRICEWIRE_METRICS_PORT": "0",  # several services on one machine: each takes a free ops port
    }


class ServiceProcess:
    """One service as its own process (`python -m pricewire_<name>`), to be killed like a real crash."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path) -> None:
        self.module = module
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Never leave a child behind, whatever the test did."""
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # our own interpreter and module
                [sys.executable, "-m", self.module], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    async def started_count(self) -> int:
        """How many times the service logged that it is consuming (`<service>_started`)."""
        service = self.module.removeprefix("pricewire_")
        return await self.logged(f"{service}_started")

    async def logged(self, event: str) -> int:
        """How many log lines of this process carry `event`."""
        return self.log_path.read_bytes().count(f'"{event}"'.encode())

    def lines(self, event: str) -> list[dict[str, object]]:
        """This process's log lines of `event`, decoded (a line a SIGKILL cut short is not one)."""
        entries = []
        for line in self.log_path.read_bytes().splitlines():
            if f'"{event}"'.encode() not in line:
                continue
            try:
                entry = msgspec.json.decode(line, type=dict[str, object])
            except msgspec.DecodeError:
                continue  # the last line of a killed process, half written
            if entry.get("event") == event:
                entries.append(entry)
        return entries

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the process (a pause, not a crash: a stalled VM, a long GC), SIGCONT on the way out."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self) -> int:
        """SIGTERM and wait: the graceful path; returns the exit code.

        A service still running after 30 s is asked for its tasks' stacks (DUMP_SIGNAL), killed, and the
        test fails with what it was waiting on.
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.send_signal(DUMP_SIGNAL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2)  # time to write the dump; it is not expected to exit
            self.kill()
            dumps = [line for line in self.log_path.read_text().splitlines() if '"tasks_dumped"' in line]
            raise AssertionError(f"{self.module} did not stop within {STOP_TIMEOUT_S} s of SIGTERM: {dumps}") from None


async def tick_ids_in_log(js: JetStreamContext, stream: str) -> list[str]:
    """The `id` of every tick the stream holds, in stream order."""
    info = await js.stream_info(stream)
    expected = info.state.messages
    sub = await js.pull_subscribe("md.tick.>", stream=stream)
    ids: list[str] = []
    try:
        while len(ids) < expected:
            try:
                msgs = await sub.fetch(500, timeout=2)
            except NatsTimeoutError:
                break
            for msg in msgs:
                ids.append(decode_tick(msg.data).id)
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return ids
