"""Temporal anomaly: a rolling z-score of each new consensus move against the asset's recent moves.

Pure: no I/O, no clock. The window holds the log returns `ln(p_i / p_(i-1))` between the asset's last
`window + 1` published consensus prices. A new price is scored by the return that would bring it in:

    r = ln(p / p_last)        z = (r - mean) / max(stdev, MIN_STDEV)        (sample stdev, n - 1)

Returns, not price levels: a price that trends (as markets do) drifts away from the mean of its own
recent levels, so a z-score of levels flags ordinary trends (2.8 % of the prices of a plain random walk
came out `anomaly`); the moves of a random walk are what is stationary, and an unusual move is what a
glitch or a crash looks like. MIN_STDEV (1 bp) keeps a flat window (a stablecoin, a quiet market) from
calling the smallest tick a 1000-sigma event while a real jump after it still scores far past the
threshold. `score` is None until the window holds `max(2, window // 2)` returns, or when float arithmetic
cannot say anything finite. `anomaly` is `|z| > threshold`. The statistic is float: it is evidence about
a price, never a price, so no venue's digits are at stake. The event carries z rounded half-even to
2 decimals (`published`); the flag reads the unrounded z.
"""

from __future__ import annotations

import math
from collections import deque
from decimal import Decimal

__all__ = ["DEFAULT_THRESHOLD", "DEFAULT_WINDOW", "MIN_STDEV", "RollingZScore", "published"]

DEFAULT_WINDOW = 20
DEFAULT_THRESHOLD = 3.0
MIN_STDEV = 1e-4
"""The smallest spread of log returns a window is taken to have: one basis point."""
_Z_PLACES = Decimal("0.01")
_Z_ZERO = Decimal("0.00")


def _positive_float(price: Decimal) -> float | None:
    x = float(price)
    return x if 0 < x < math.inf else None


class RollingZScore:
    """The last `window` consensus moves of one asset, and how unusual the move to a new price is."""

    def __init__(self, window: int = DEFAULT_WINDOW, threshold: float = DEFAULT_THRESHOLD) -> None:
        if window < 2:
            raise ValueError(f"an anomaly window needs at least 2 prices, not {window}")
        if not threshold > 0 or not math.isfinite(threshold):
            raise ValueError(f"an anomaly threshold must be a positive number, not {threshold}")
        self.window = window
        self.threshold = threshold
        self.min_count = max(2, window // 2)
        """Moves the window needs before it scores: fewer say too little about the asset's usual moves."""
        self._returns: deque[float] = deque(maxlen=window)
        self._last: float | None = None

    def __len__(self) -> int:
        """Moves held."""
        return len(self._returns)

    def score(self, price: Decimal) -> float | None:
        """The z-score of the move to `price` against the window, or None when it cannot tell; changes nothing."""
        x = _positive_float(price)
        if x is None or self._last is None or len(self._returns) < self.min_count:
            return None
        r = math.log(x / self._last)
        n = len(self._returns)
        mean = math.fsum(self._returns) / n
        stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in self._returns) / (n - 1))
        z = (r - mean) / max(stdev, MIN_STDEV)
        return z if math.isfinite(z) else None

    def is_anomaly(self, z: float | None) -> bool:
        """Whether a z-score from `score` flags an anomaly."""
        return z is not None and abs(z) > self.threshold

    def add(self, price: Decimal) -> None:
        """`price` becomes the last one, its move joins the window (the oldest leaves when it is full);
        a price that is not a positive finite float is ignored."""
        x = _positive_float(price)
        if x is None:
            return
        if self._last is not None:
            r = math.log(x / self._last)
            if math.isfinite(r):
                self._returns.append(r)
        self._last = x

    def observe(self, price: Decimal) -> float | None:
        """`score` then `add`: the z of the move to `price` against the moves before it."""
        z = self.score(price)
        self.add(price)
        return z


def published(z: float | None) -> Decimal | None:
    """`z` as the event carries it: a decimal rounded half-even to 2 places (never `-0.00`)."""
    if z is None:
        return None
    rounded = Decimal(format(z, ".2f"))
    return _Z_ZERO if rounded == 0 else rounded
