"""Webhook delivery of alert firings: POST the firing as JSON, retried with bounded exponential backoff.

Retried: connection errors, timeouts, 408, 429 and 5xx. Not retried: other 4xx (the receiver refuses
this request; sending it again would not change that). Each delivery runs as its own task so a slow
receiver never holds back the alert consumer; tasks are kept and cancelled on close.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

import aiohttp
import structlog

from pricewire_common.config import AlertSettings
from pricewire_gateway.alerts import AlertFired, encode_fired

log = structlog.get_logger(__name__)

_RETRY_STATUSES: Final = frozenset({408, 429})
EVENT_ID_HEADER: Final = "X-Pricewire-Alert-Event"
"""The firing's id: a receiver that got a retry after a lost answer can tell it is the same firing."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one delivery ended."""

    delivered: bool
    attempts: int
    last_error: str | None


def backoff_s(attempt: int, *, initial_s: float, max_s: float) -> float:
    """The wait after failed attempt number `attempt` (1-based): initial, doubled each time, at most max."""
    return float(min(max_s, initial_s * 2 ** (attempt - 1)))


class Webhooks:
    """Sends firings to their alerts' webhook URLs."""

    def __init__(self, session: aiohttp.ClientSession, settings: AlertSettings) -> None:
        self._session = session
        self._settings = settings
        self._tasks: set[asyncio.Task[Outcome]] = set()
        self.delivered = 0
        self.failed = 0

    def send(self, url: str, fired: AlertFired) -> asyncio.Task[Outcome]:
        """Start delivering `fired` to `url` in the background."""
        task = asyncio.create_task(self.deliver(url, fired), name=f"webhook-{fired.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def deliver(self, url: str, fired: AlertFired) -> Outcome:
        body = encode_fired(fired)
        headers = {"Content-Type": "application/json", EVENT_ID_HEADER: str(fired.id)}
        timeout = aiohttp.ClientTimeout(total=self._settings.webhook_timeout_s)
        error = ""
        attempts = self._settings.webhook_attempts
        for attempt in range(1, attempts + 1):
            try:
                async with self._session.post(url, data=body, headers=headers, timeout=timeout) as response:
                    if response.status < 300:
                        self.delivered += 1
                        log.info("webhook_delivered", event_id=fired.id, alert=fired.alert_id, attempts=attempt)
                        return Outcome(delivered=True, attempts=attempt, last_error=None)
                    error = f"HTTP {response.status}"
                    if response.status < 500 and response.status not in _RETRY_STATUSES:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = repr(exc)
            if attempt < attempts:
                log.info("webhook_retry", event_id=fired.id, attempt=attempt, error=error)
                await asyncio.sleep(
                    backoff_s(
                        attempt, initial_s=self._settings.webhook_backoff_s, max_s=self._settings.webhook_backoff_max_s
                    )
                )
        self.failed += 1
        log.warning("webhook_failed", event_id=fired.id, alert=fired.alert_id, url=url, error=error)
        return Outcome(delivered=False, attempts=attempt, last_error=error)

    async def close(self) -> None:
        """Cancel deliveries still retrying (logged as lost)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            log.warning("webhooks_abandoned", pending=len(tasks))
            await asyncio.gather(*tasks, return_exceptions=True)
