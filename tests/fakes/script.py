"""The steps a fake WebSocket venue plays on one connection, shared by the fakes that script them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Send:
    """Send one text frame."""

    frame: str


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait before the next step (the venue's pace, not a test's wait)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Drop:
    """Cut the TCP connection mid-stream, without a close frame."""


@dataclass(frozen=True, slots=True)
class Silence:
    """Send nothing more; keep the connection open until the client leaves."""


Step = Send | Pause | Drop | Silence
