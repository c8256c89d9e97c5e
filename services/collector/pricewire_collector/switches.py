"""Sources an admin has paused: the collector's side of `md.control.source.<source>` (the seeds' realtime start/stop).

The gateway's admin endpoint sends a `SourceCommand` as a core NATS request; the collector that runs the
source applies it and answers. A paused live source is stopped (its connection closed) and started again on
resume; a paused simulated venue's ticks are skipped. Either way the source's `md.source.<source>` status
says `stopped` with who paused it, and `connected` again on resume. A pause lasts until a resume or until
the collector restarts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection

import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from pricewire_common import control, subjects
from pricewire_common.clock import Clock
from pricewire_common.errors import RejectedInput
from pricewire_common.events import SourceState, SourceStatus, encode

log = structlog.get_logger(__name__)

Announce = Callable[[str, SourceState, str | None], Awaitable[None]]
"""Publish a source's state: (source, state, detail)."""


class SourceSwitches:
    """Paused sources of this collector; `on_command` is the `md.control.source.*` subscription callback."""

    def __init__(self, sources: Collection[str], *, announce: Announce) -> None:
        self._sources = frozenset(sources)
        self._announce = announce
        self._paused: set[str] = set()
        self._changed: dict[str, asyncio.Event] = {name: asyncio.Event() for name in self._sources}

    @property
    def paused(self) -> frozenset[str]:
        return frozenset(self._paused)

    def is_paused(self, source: str) -> bool:
        return source in self._paused

    def changed(self, source: str) -> asyncio.Event:
        """Set (and left set until `clear`) whenever the source is paused or resumed."""
        return self._changed[source]

    async def apply(self, source: str, command: control.SourceCommand) -> control.SourceCommandResult:
        if source not in self._sources:
            return control.SourceCommandResult(source=source, known=False, paused=False)
        pause = command.action == "pause"
        if pause != (source in self._paused):
            if pause:
                self._paused.add(source)
            else:
                self._paused.discard(source)
            self._changed[source].set()
            log.info("source_switched", source=source, action=command.action, by=command.by)
            detail = f"{'paused' if pause else 'resumed'} by {command.by}"
            await self._announce(source, "stopped" if pause else "connected", detail)
        return control.SourceCommandResult(source=source, known=True, paused=source in self._paused)

    async def on_command(self, msg: Msg) -> None:
        source = msg.subject.rpartition(".")[2]
        try:
            command = control.decode_command(msg.data)
        except RejectedInput as err:
            # A request, not a stream message: nothing to dead-letter or redeliver; the asker gets no answer.
            log.warning("source_command_rejected", subject=msg.subject, error=err.detail)
            return
        result = await self.apply(source, command)
        if msg.reply:
            await msg.respond(control.encode(result))


async def wait_while_paused(switches: SourceSwitches, source: str, stop: asyncio.Event) -> None:
    """Return once `source` is not paused, or `stop` is set."""
    while switches.is_paused(source) and not stop.is_set():
        changed = switches.changed(source)
        changed.clear()
        if not switches.is_paused(source):
            return
        waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


def run_stop(switches: SourceSwitches, source: str, stop: asyncio.Event) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """An event set when `stop` is set or `source` gets paused, and the task that sets it (cancel it after)."""
    event = asyncio.Event()

    async def link() -> None:
        await wait_until_paused_or(switches, source, stop)
        event.set()

    return event, asyncio.create_task(link(), name=f"run-stop-{source}")


async def wait_until_paused_or(switches: SourceSwitches, source: str, stop: asyncio.Event) -> None:
    while not switches.is_paused(source) and not stop.is_set():
        changed = switches.changed(source)
        changed.clear()
        if switches.is_paused(source):
            return
        waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


def status_publisher(js: JetStreamContext, *, transport: str, clock: Clock) -> Announce:
    """Announce a state straight onto `md.source.<source>` (for the simulated venues, which have no sink state)."""

    async def announce(source: str, state: SourceState, detail: str | None) -> None:
        status = SourceStatus(source=source, state=state, transport=transport, detail=detail, ts=clock())
        try:
            await js.publish(subjects.source_status(source), encode(status))
        except (NatsError, TimeoutError) as exc:
            log.warning("source_state_not_published", source=source, error=repr(exc))

    return announce
