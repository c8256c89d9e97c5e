"""Backoff, token bucket and circuit breaker: pure policies, time passed in."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricewire_collector.sources.resilience import Backoff, BreakerState, CircuitBreaker, TokenBucket


def test_backoff_grows_exponentially_under_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(initial_s=0.5, max_s=4.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert len(set(delays)) == len(delays)  # jitter: no two reconnects in lockstep
    backoff.reset()
    assert backoff.next_delay() <= 0.5


@given(
    limit=st.integers(min_value=1, max_value=6000),
    cost=st.integers(min_value=1, max_value=50),
    steps=st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=200),
)
def test_a_token_bucket_never_lets_more_through_than_capacity_plus_refill(
    limit: int, cost: int, steps: list[float]
) -> None:
    bucket = TokenBucket.per_minute(limit)
    if cost > bucket.capacity:
        with pytest.raises(ValueError):
            bucket.delay(cost, 0.0)
        return
    now, spent = 0.0, 0
    for step in steps:
        now += step
        if bucket.take(cost, now):
            spent += cost
        else:
            assert bucket.delay(cost, now) > 0
    assert spent <= bucket.capacity + bucket.rate * now + 1e-6


def test_a_token_bucket_waits_exactly_as_long_as_the_refill_needs() -> None:
    bucket = TokenBucket(rate=2.0, capacity=2.0)
    assert bucket.take(2, 0.0)
    assert bucket.delay(1, 0.0) == pytest.approx(0.5)
    assert not bucket.take(1, 0.4)
    assert bucket.take(1, 0.5)


def test_retry_after_drains_the_bucket_for_that_long() -> None:
    bucket = TokenBucket.per_minute(60)  # 1 per second, 60 saved up
    bucket.drain(10.0, for_s=30.0)
    assert bucket.delay(1, 10.0) == pytest.approx(31.0)
    assert not bucket.take(1, 39.9)
    assert bucket.take(1, 41.0)


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """Read afresh: each call may have moved the state."""
    return breaker.state


def test_the_breaker_opens_after_five_failures_half_opens_after_60_s_and_closes_on_success() -> None:
    breaker = CircuitBreaker()  # the seeds' defaults
    for t in range(4):
        breaker.record_failure(float(t))
        assert breaker.allows(float(t))
    breaker.record_failure(4.0)
    assert state_of(breaker) is BreakerState.OPEN
    assert not breaker.allows(30.0)
    assert breaker.retry_in(30.0) == pytest.approx(34.0)
    assert breaker.allows(64.0)
    assert state_of(breaker) is BreakerState.HALF_OPEN
    breaker.record_success()
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.consecutive == 0


def test_a_failed_half_open_try_opens_the_breaker_again_at_once() -> None:
    breaker = CircuitBreaker(failures=2, reset_s=10.0)
    breaker.record_failure(0.0)
    breaker.record_failure(1.0)
    assert breaker.allows(11.0)  # half open
    breaker.record_failure(11.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows(12.0)
    assert breaker.allows(21.0)
