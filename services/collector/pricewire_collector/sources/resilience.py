"""Pure resilience policies, with time passed in: backoff with jitter, a token bucket, a circuit breaker."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(max_s, initial_s * 2**n))."""

    initial_s: float = 0.5
    max_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        cap = min(self.max_s, self.initial_s * (2**self.attempts))
        self.attempts = min(self.attempts + 1, 62)
        return self.rng.uniform(0.0, cap)

    def reset(self) -> None:
        """After a success: the next failure waits little again."""
        self.attempts = 0


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second, at most `capacity` saved up. Time is given in seconds (monotonic)."""

    rate: float
    capacity: float
    tokens: float = -1.0
    updated_s: float | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.capacity > 0:
            raise ValueError("rate and capacity must be positive")
        if self.tokens < 0:
            self.tokens = self.capacity

    @classmethod
    def per_minute(cls, limit: float) -> TokenBucket:
        """A venue's 'N per minute': N tokens at most, refilled evenly over the minute."""
        return cls(rate=limit / 60.0, capacity=limit)

    def _refill(self, now_s: float) -> None:
        if self.updated_s is not None and now_s > self.updated_s:
            self.tokens = min(self.capacity, self.tokens + (now_s - self.updated_s) * self.rate)
        self.updated_s = now_s if self.updated_s is None else max(self.updated_s, now_s)

    def delay(self, cost: float, now_s: float) -> float:
        """Seconds to wait before `cost` tokens are there (0 when they are)."""
        if cost > self.capacity:
            raise ValueError(f"a request of {cost} tokens never fits a bucket of {self.capacity}")
        self._refill(now_s)
        return 0.0 if self.tokens >= cost else (cost - self.tokens) / self.rate

    def take(self, cost: float, now_s: float) -> bool:
        """Spend `cost` tokens if they are there."""
        if self.delay(cost, now_s) > 0:
            return False
        self.tokens -= cost
        return True

    def drain(self, now_s: float, *, for_s: float) -> None:
        """The venue said 'too many requests, retry after `for_s`': spend everything until then."""
        self._refill(now_s)
        self.tokens = -for_s * self.rate


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class CircuitBreaker:
    """CLOSED until `failures` failures in a row; OPEN for `reset_s`; then HALF_OPEN lets one try through:
    success closes it, failure opens it again. Defaults as in the seeds: 5 failures, 60 s."""

    failures: int = 5
    reset_s: float = 60.0
    state: BreakerState = BreakerState.CLOSED
    consecutive: int = 0
    opened_s: float = 0.0

    def allows(self, now_s: float) -> bool:
        """May the primary path be tried now? Moves OPEN to HALF_OPEN once `reset_s` has passed."""
        if self.state is BreakerState.OPEN and now_s - self.opened_s >= self.reset_s:
            self.state = BreakerState.HALF_OPEN
        return self.state is not BreakerState.OPEN

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.consecutive = 0

    def record_failure(self, now_s: float) -> None:
        self.consecutive += 1
        if self.state is BreakerState.HALF_OPEN or self.consecutive >= self.failures:
            self.state = BreakerState.OPEN
            self.opened_s = now_s

    def retry_in(self, now_s: float) -> float:
        """Seconds until an OPEN breaker lets a try through (0 when it does now)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.reset_s - (now_s - self.opened_s))
