"""The simulated feed: several venues quoting every asset around one shared random walk.

Pure and deterministic: no I/O, no clock (time comes in as `now_ns`), randomness from
`random.Random(seed)`. The same seed, run id and sequence of `now_ns` give the same ticks.

The model, per asset: a "true" price follows a geometric random walk (annualised volatility
`sigma`, steps scaled to the simulated time elapsed). Venue `sim-<letters>` quotes
`true * (1 + bias + noise)`: `bias` is the venue's own small persistent offset, `noise` a fresh
draw per tick; bid and ask sit a few bps either side; `volume_24h` (base units) wanders slowly
around the venue's share of the asset's daily volume; `open_24h` is the venue's quote one day
before the run began, drawn from the same walk run back a day (kept fixed while the run lasts).
Each tick may, by chance, be an outlier (the venue sends a price 8-25 % off), and a venue may
go quiet for 20-60 s of simulated time (its quote goes stale).
Pairs are served round-robin (asset by asset, venue by venue); a quiet venue's turn yields None.
These are simulated numbers: the `sim-` venue names say so on every tick.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal

from pricewire_common import subjects
from pricewire_common.clock import NS_PER_MS, NS_PER_S
from pricewire_common.events import Tick

__all__ = [
    "KNOWN_ASSETS",
    "AssetSpec",
    "SimFeed",
    "asset_spec",
    "venue_name",
    "venue_quote",
]

NS_PER_YEAR = 365.25 * 86_400 * NS_PER_S
MAX_STEP_NS = 86_400 * NS_PER_S
"""A longer gap between two ticks of an asset counts as one day: the walk never takes a wild leap."""
MAX_LOG_MOVE = math.log(100.0)
"""The true price stays within 1/100x and 100x of where it started, so decimals stay sensible."""
OUTLIER_MIN = 0.08
OUTLIER_MAX = 0.25
QUIET_MIN_S = 20.0
QUIET_MAX_S = 60.0
VOLUME_REVERSION_PER_DAY = 24.0
"""Pull of log volume back to the venue's mean: about an hour's half-life."""
VOLUME_SIGMA_PER_DAY = 0.3
QUOTES = ("USDT", "USD", "USDC")
"""sim-a quotes USDT, sim-b USD, sim-c USDC; further venues USDT."""


@dataclass(frozen=True, slots=True)
class AssetSpec:
    """What the sim knows about an asset: where it starts, its tick size and how it moves."""

    asset: str
    price: float
    """Nominal starting price in USD."""
    price_places: int
    """Decimal places of a quoted price (the venue's tick size is 10**-price_places)."""
    sigma: float
    """Annualised volatility of the true price."""
    usd_volume_24h: float
    """Typical daily traded value per venue, in USD."""

    @property
    def volume_places(self) -> int:
        """Decimal places of a volume in base units: finer for dearer assets, like venue lot sizes."""
        return min(8, max(0, math.floor(math.log10(self.price)) + 1))


KNOWN_ASSETS: dict[str, AssetSpec] = {
    spec.asset: spec
    for spec in (
        AssetSpec("BTC", 67_000.0, 2, 0.55, 1.5e9),
        AssetSpec("ETH", 3_500.0, 2, 0.70, 8e8),
        AssetSpec("SOL", 150.0, 2, 0.90, 3e8),
        AssetSpec("ADA", 0.45, 4, 0.80, 6e7),
        AssetSpec("DOT", 7.0, 3, 0.80, 4e7),
        AssetSpec("XRP", 0.52, 4, 0.75, 1.5e8),
        AssetSpec("DOGE", 0.15, 5, 0.95, 1e8),
        AssetSpec("LTC", 80.0, 2, 0.70, 4e7),
        AssetSpec("LINK", 14.0, 3, 0.85, 4e7),
        AssetSpec("AVAX", 35.0, 2, 0.90, 4e7),
    )
}


def asset_spec(asset: str, rng: random.Random) -> AssetSpec:
    """The known spec of `asset`, else one drawn from `rng`: a price between 0.05 and 500 USD,
    quoted to six significant digits."""
    known = KNOWN_ASSETS.get(asset)
    if known is not None:
        return known
    price = float(f"{math.exp(rng.uniform(math.log(0.05), math.log(500.0))):.4g}")
    places = min(8, max(2, 5 - math.floor(math.log10(price))))
    return AssetSpec(asset, price, places, 0.80, 3e7)


def venue_name(index: int) -> str:
    """`sim-a`, `sim-b`, ... `sim-z`, `sim-aa`, ...: the name of the venue at 0-based `index`."""
    if index < 0:
        raise ValueError(f"venue index must not be negative: {index}")
    letters = ""
    n = index + 1
    while n:
        n, rest = divmod(n - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return f"sim-{letters}"


def venue_quote(index: int) -> str:
    """The quote currency of the venue at `index`: USDT, USD, USDC, then USDT for the rest."""
    return QUOTES[index] if index < len(QUOTES) else QUOTES[0]


def _places(places: int) -> Decimal:
    return Decimal(1).scaleb(-places)


@dataclass(slots=True)
class _Venue:
    name: str
    quote: str
    half_spread: float
    """Half the bid/ask spread, as a fraction of the mid price."""
    noise: float
    """Standard deviation of the per-tick noise, as a fraction."""
    latency_ns: int
    quiet_until_ns: int = 0
    last_seen_ns: int | None = None


@dataclass(slots=True)
class _Asset:
    spec: AssetSpec
    start_log: float
    log_price: float
    step: Decimal
    lot: Decimal
    last_ns: int | None = None


@dataclass(slots=True)
class _Book:
    """One venue's state for one asset."""

    bias: float
    open_24h: Decimal
    log_volume_mean: float
    log_volume: float
    last_ns: int | None = None


class SimFeed:
    """Ticks of `venues` simulated venues for every asset in `assets`; see the module docstring."""

    name = "sim"

    def __init__(
        self,
        assets: Sequence[str],
        *,
        venues: int = 3,
        seed: int | None = None,
        outlier_probability: float = 0.01,
        quiet_rate: float = 0.005,
        run_id: str = "sim",
    ) -> None:
        if not assets:
            raise ValueError("the sim needs at least one asset")
        if venues < 1:
            raise ValueError(f"the sim needs at least one venue, not {venues}")
        if not 0.0 <= outlier_probability <= 1.0:
            raise ValueError(f"outlier_probability must be between 0 and 1, not {outlier_probability}")
        if not 0.0 <= quiet_rate < math.inf:
            raise ValueError(f"quiet_rate must be a finite rate per second >= 0, not {quiet_rate}")
        if not 1 <= len(run_id) <= 32:
            raise ValueError("run_id must hold 1 to 32 characters")
        root = random.Random(seed)
        # Two streams, so that outliers and quiet spells never change the market's own path.
        self._market = random.Random(root.getrandbits(64))
        self._events = random.Random(root.getrandbits(64))
        self._outlier_probability = outlier_probability
        self._quiet_rate = quiet_rate
        self._run_id = run_id
        self._seq = 0
        self._next_pair = 0
        self._venues = [
            _Venue(
                name=venue_name(i),
                quote=venue_quote(i),
                half_spread=self._market.uniform(0.5e-4, 3e-4),
                noise=self._market.uniform(0.5e-4, 2e-4),
                latency_ns=int(self._market.uniform(5, 80) * NS_PER_MS),
            )
            for i in range(venues)
        ]
        self._assets: list[_Asset] = []
        self._books: list[list[_Book]] = []
        for code in assets:
            subjects.check_asset(code)
            spec = asset_spec(code, self._market)
            start = spec.price * math.exp(self._market.gauss(0.0, 0.01))
            asset = _Asset(
                spec=spec,
                start_log=math.log(start),
                log_price=math.log(start),
                step=_places(spec.price_places),
                lot=_places(spec.volume_places),
            )
            # The walk run back one day: where this market stood 24 h before the run began.
            day_ago = start * math.exp(self._market.gauss(0.0, spec.sigma * math.sqrt(1 / 365.25)))
            self._assets.append(asset)
            self._books.append([self._new_book(asset, start, day_ago) for _ in self._venues])

    def _new_book(self, asset: _Asset, start: float, day_ago: float) -> _Book:
        bias = max(-1e-3, min(1e-3, self._market.gauss(0.0, 3e-4)))
        mean = math.log(asset.spec.usd_volume_24h * self._market.uniform(0.4, 1.6) / start)
        return _Book(
            bias=bias,
            open_24h=max(asset.step, _quantize(day_ago * (1.0 + bias), asset.step, ROUND_HALF_EVEN)),
            log_volume_mean=mean,
            log_volume=mean + self._market.gauss(0.0, 0.1),
        )

    @property
    def venues(self) -> tuple[str, ...]:
        """The venue names, in order."""
        return tuple(v.name for v in self._venues)

    @property
    def pairs(self) -> int:
        """How many (asset, venue) pairs a round-robin round visits."""
        return len(self._assets) * len(self._venues)

    def next_tick(self, now_ns: int) -> Tick | None:
        """The next pair's tick at `now_ns`, or None when that pair's venue is quiet."""
        index = self._next_pair
        self._next_pair = (index + 1) % self.pairs
        asset_index, venue_index = divmod(index, len(self._venues))
        venue = self._venues[venue_index]
        if now_ns < venue.quiet_until_ns:
            return None
        asset = self._assets[asset_index]
        book = self._books[asset_index][venue_index]
        self._walk(asset, now_ns)
        self._wander_volume(book, now_ns)

        mid = math.exp(asset.log_price) * (1.0 + book.bias + self._market.gauss(0.0, venue.noise))
        if self._events.random() < self._outlier_probability:
            sign = 1.0 if self._events.random() < 0.5 else -1.0
            mid *= 1.0 + sign * self._events.uniform(OUTLIER_MIN, OUTLIER_MAX)
        step = asset.step
        bid = max(step, _quantize(mid * (1.0 - venue.half_spread), step, ROUND_FLOOR))
        ask = max(bid + step, _quantize(mid * (1.0 + venue.half_spread), step, ROUND_CEILING))
        price = min(ask, max(bid, _quantize(mid, step, ROUND_HALF_EVEN)))
        volume = _quantize(math.exp(book.log_volume), asset.lot, ROUND_HALF_EVEN)
        jitter_ns = int(self._market.expovariate(1.0 / 5.0) * NS_PER_MS)

        # Quiet spells start at `quiet_rate` per venue per second of simulated time (a Poisson process),
        # so how often a venue falls silent does not depend on the tick rate.
        elapsed_s = 0.0 if venue.last_seen_ns is None else max(0, now_ns - venue.last_seen_ns) / NS_PER_S
        venue.last_seen_ns = now_ns
        if self._events.random() < -math.expm1(-self._quiet_rate * elapsed_s):
            # This tick is the venue's last before its silence.
            venue.quiet_until_ns = now_ns + int(self._events.uniform(QUIET_MIN_S, QUIET_MAX_S) * NS_PER_S)

        self._seq += 1
        base = asset.spec.asset
        symbol = f"{base}-{venue.quote}"
        return Tick(
            id=f"{venue.name}:{symbol}:{self._run_id}:{self._seq}",
            source=venue.name,
            symbol=symbol,
            base=base,
            quote=venue.quote,
            price=price,
            bid=bid,
            ask=ask,
            volume_24h=volume,
            open_24h=book.open_24h,
            ts_exchange=max(1, now_ns - venue.latency_ns - jitter_ns),
            ts_received=now_ns,
        )

    def _walk(self, asset: _Asset, now_ns: int) -> None:
        """Move the true price by a geometric-Brownian step over the time since its last move."""
        dt_ns = _elapsed(asset.last_ns, now_ns)
        asset.last_ns = now_ns if asset.last_ns is None else max(asset.last_ns, now_ns)
        if dt_ns == 0:
            return
        dt = dt_ns / NS_PER_YEAR
        sigma = asset.spec.sigma
        moved = asset.log_price - 0.5 * sigma * sigma * dt + sigma * math.sqrt(dt) * self._market.gauss(0.0, 1.0)
        low, high = asset.start_log - MAX_LOG_MOVE, asset.start_log + MAX_LOG_MOVE
        asset.log_price = min(high, max(low, moved))

    def _wander_volume(self, book: _Book, now_ns: int) -> None:
        """Let the venue's log volume drift (mean-reverting) over the time since its last tick."""
        dt_ns = _elapsed(book.last_ns, now_ns)
        book.last_ns = now_ns if book.last_ns is None else max(book.last_ns, now_ns)
        if dt_ns == 0:
            return
        days = dt_ns / (86_400 * NS_PER_S)
        pull = min(1.0, VOLUME_REVERSION_PER_DAY * days)
        shock = VOLUME_SIGMA_PER_DAY * math.sqrt(days) * self._market.gauss(0.0, 1.0)
        book.log_volume += pull * (book.log_volume_mean - book.log_volume) + shock
        book.log_volume = min(book.log_volume_mean + 2.0, max(book.log_volume_mean - 2.0, book.log_volume))


def _elapsed(last_ns: int | None, now_ns: int) -> int:
    """ns since `last_ns`, capped at a day; 0 for the first call or when time runs backwards."""
    if last_ns is None or now_ns <= last_ns:
        return 0
    return min(MAX_STEP_NS, now_ns - last_ns)


def _quantize(value: float, step: Decimal, rounding: str) -> Decimal:
    return Decimal(value).quantize(step, rounding=rounding)
