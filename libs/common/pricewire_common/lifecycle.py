"""Graceful shutdown: SIGTERM and SIGINT set an event the service waits on; SIGUSR1 logs what every task awaits."""

from __future__ import annotations

import asyncio
import gc
import inspect
import signal

import structlog

log = structlog.get_logger(__name__)

DUMP_SIGNAL = signal.SIGUSR1
"""Logs `tasks_dumped`: the stack of every task, for a service that will not stop or has stalled."""


def stop_on_signals(stop: asyncio.Event) -> None:
    """Make SIGTERM and SIGINT set `stop`, and DUMP_SIGNAL log every task's stack (call inside the running loop)."""
    loop = asyncio.get_running_loop()

    def request_stop(signum: int) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)
    loop.add_signal_handler(DUMP_SIGNAL, dump_tasks)


def dump_tasks() -> None:
    """Log the await chain of every task of the running loop, outermost coroutine first."""
    stacks = {f"{task.get_name()} ({_state(task)})": await_chain(task.get_coro()) for task in asyncio.all_tasks()}
    log.warning("tasks_dumped", tasks=len(stacks), stacks=stacks)


def await_chain(awaitable: object) -> list[str]:
    """`file:line in function` of each coroutine, generator or async generator down the chain of awaits.

    `Task.print_stack` shows only a suspended task's outermost frame, not what that frame is waiting on.
    """
    chain = []
    while awaitable is not None:
        frame = next(
            (getattr(awaitable, a) for a in ("cr_frame", "ag_frame", "gi_frame") if hasattr(awaitable, a)), None
        )
        if frame is not None:
            chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaitable = _awaited_by(awaitable)
    return chain


def _awaited_by(awaitable: object) -> object | None:
    for attribute in ("cr_await", "ag_await", "gi_yieldfrom"):
        if hasattr(awaitable, attribute):
            awaited: object | None = getattr(awaitable, attribute)
            return awaited
    # `async for` awaits the generator's asend(), which names its generator only to the garbage collector.
    return next((r for r in gc.get_referents(awaitable) if inspect.isasyncgen(r)), None)


def _state(task: asyncio.Task[object]) -> str:
    return "cancelling" if task.cancelling() else "pending"
