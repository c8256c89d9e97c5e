"""Temporal anomaly: a rolling z-score of each new consensus price against the asset's recent ones.

Pure: no I/O, no clock. The window holds the last `window` published consensus prices of one asset.
A new price is scored against it before it joins:

    z = (p - mean) / stdev        (sample stdev of the window, n - 1)

`score` is None until the window holds `max(2, window // 2)` prices, or when the window is flat
(stdev 0) or too degenerate for float arithmetic to say anything finite. `anomaly` is `|z| > threshold`.
The statistic is float: it is evidence about a price, never a price, so no venue's digits are at stake.
The event carries z rounded half-even to 2 decimals (`published`); the flag reads the unrounded z.
"""

from __future__ import annotations

import math
from collections import deque
from decimal import Decimal

__all__ = ["DEFAULT_THRESHOLD", "DEFAULT_WINDOW", "RollingZScore", "published"]

DEFAULT_WINDOW = 20
DEFAULT_THRESHOLD = 3.0
_Z_PLACES = Decimal("0.01")
_Z_ZERO = Decimal("0.00")


class RollingZScore:
    """The last `window` consensus prices of one asset, and how unusual a new one is against them."""

    def __init__(self, window: int = DEFAULT_WINDOW, threshold: float = DEFAULT_THRESHOLD) -> None:
        if window < 2:
            raise ValueError(f"an anomaly window needs at least 2 prices, not {window}")
        if not threshold > 0 or not math.isfinite(threshold):
            raise ValueError(f"an anomaly threshold must be a positive number, not {threshold}")
        self.window = window
        self.threshold = threshold
        self.min_count = max(2, window // 2)
        """Prices the window needs before it scores: fewer say too little about the asset's usual moves."""
        self._values: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._values)

    def score(self, price: Decimal) -> float | None:
        """The z-score of `price` against the window, or None when the window cannot tell; changes nothing."""
        if len(self._values) < self.min_count:
            return None
        x = float(price)
        if not math.isfinite(x):
            return None
        # Scaled by the largest magnitude so the squares cannot overflow; z does not depend on the scale.
        scale = max(abs(x), *(abs(v) for v in self._values))
        if scale == 0:
            return None
        values = [v / scale for v in self._values]
        n = len(values)
        mean = math.fsum(values) / n
        stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
        if stdev == 0:
            return None
        z = (x / scale - mean) / stdev
        return z if math.isfinite(z) else None

    def is_anomaly(self, z: float | None) -> bool:
        """Whether a z-score from `score` flags an anomaly."""
        return z is not None and abs(z) > self.threshold

    def add(self, price: Decimal) -> None:
        """`price` joins the window (the oldest leaves when it is full); a non-finite one is ignored."""
        x = float(price)
        if math.isfinite(x):
            self._values.append(x)

    def observe(self, price: Decimal) -> float | None:
        """`score` then `add`: the z of `price` against the prices before it."""
        z = self.score(price)
        self.add(price)
        return z


def published(z: float | None) -> Decimal | None:
    """`z` as the event carries it: a decimal rounded half-even to 2 places (never `-0.00`)."""
    if z is None:
        return None
    rounded = Decimal(format(z, ".2f"))
    return _Z_ZERO if rounded == 0 else rounded
