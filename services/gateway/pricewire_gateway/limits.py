"""What one WebSocket connection may do: frame size, frame rate, subscriptions, and how far behind it may fall.

`RateLimit` is a pure token bucket (time passed in), so the flood rule is tested without a socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from pricewire_common.config import GatewaySettings
from pricewire_gateway.errors import RequestError


@dataclass(frozen=True, slots=True, kw_only=True)
class WsLimits:
    """The per-connection limits, from GatewaySettings (read once at start)."""

    max_frame_bytes: int = 64 * 1024
    max_messages_per_s: float = 20.0
    max_subscriptions: int = 64
    slow_client_s: float = 10.0

    @classmethod
    def from_settings(cls, gateway: GatewaySettings) -> WsLimits:
        return cls(
            max_frame_bytes=gateway.ws_max_frame_bytes,
            max_messages_per_s=gateway.ws_max_messages_per_s,
            max_subscriptions=gateway.ws_max_subscriptions,
            slow_client_s=gateway.ws_slow_client_s,
        )


WS_LIMITS = web.AppKey("ws_limits", WsLimits)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamLimits:
    """What an SSE reader of `GET /api/v1/stream` gets (stream_api.py)."""

    heartbeat_s: float = 15.0
    """Quiet time before a heartbeat comment."""
    slow_client_s: float = 10.0
    """Longest one write may wait for the reader before the stream is dropped."""


STREAM_LIMITS = web.AppKey("stream_limits", StreamLimits)


def install(app: web.Application, gateway: GatewaySettings) -> None:
    """The limits of WebSocket clients and SSE readers, from the settings read at start."""
    app[WS_LIMITS] = WsLimits.from_settings(gateway)
    app[STREAM_LIMITS] = StreamLimits(heartbeat_s=gateway.sse_heartbeat_s, slow_client_s=gateway.ws_slow_client_s)


class RateLimit:
    """A token bucket: `rate` frames a second on average, bursts of up to `burst`; pure, time passed in."""

    def __init__(self, *, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = now

    def allow(self, now: float) -> bool:
        """Take one token if there is one; False means the sender is over its rate."""
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def check_subscriptions(following: set[str], adding: list[str], *, limit: int) -> None:
    """Refuse (whole) a subscribe that would make a connection follow more than `limit` assets."""
    after = len(following.union(adding))
    if after > limit:
        raise RequestError(
            "too_many_subscriptions",
            f"this frame would make {after} subscriptions; a connection may hold at most {limit}",
        )
