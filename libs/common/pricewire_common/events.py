"""The versioned event schemas of the bus, and one codec per schema, built once.

Evolution rule (msgspec's): a new field gets a default, a type never changes in place,
and a breaking change is a new `v`. Decimals travel as JSON strings so every consumer
sees the venue's digits exactly (no `47000.499999`).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

from pricewire_common.errors import DecodeError

TICK_VERSION = 1
PRICE_VERSION = 1
DEAD_LETTER_VERSION = 1
SOURCE_STATUS_VERSION = 1

Status = Literal["ok", "degraded", "stale"]
TickKind = Literal["stream", "poll"]
SourceState = Literal["connecting", "connected", "reconnecting", "breaker_open", "fallback", "stopped"]


class Tick(msgspec.Struct, frozen=True, kw_only=True):
    """One normalized quote from one venue, on `md.tick.<source>.<BASE>-<QUOTE>`."""

    v: int = TICK_VERSION
    id: str
    """Unique and stable across retries; also the `Nats-Msg-Id` header."""
    source: str
    symbol: str
    base: str
    quote: str
    price: Decimal
    bid: Decimal | None = None
    ask: Decimal | None = None
    volume_24h: Decimal | None = None
    """24h traded volume in units of `base`, as the venue reports it."""
    open_24h: Decimal | None = None
    """The venue's price 24h ago, when it reports one."""
    ts_exchange: int
    """Venue's event time, ns since the epoch, UTC."""
    ts_received: int
    """Collector's receive time, ns since the epoch, UTC."""
    kind: TickKind = "stream"
    """`stream` when pushed by the venue (WebSocket), `poll` when fetched (REST): each has its own max age."""


class SourceQuote(msgspec.Struct, frozen=True, kw_only=True):
    """How one venue's latest quote entered (or did not enter) a consensus."""

    source: str
    symbol: str
    price: Decimal
    deviation_pct: Decimal
    """Signed deviation from the median of the fresh USD quotes, in %, 4 decimals."""
    age_ms: int
    outlier: bool
    reason: str | None = None
    """Why the quote was excluded (`not_usd`, `invalid`, `crossed`, `stale`, `jump`, `outlier`,
    `outlier_mad`); None when it was used."""
    weight: Decimal = Decimal(0)
    """The quote's share of the consensus weight, 4 decimals (0 when excluded; shares sum to about 1)."""
    kind: TickKind = "stream"


DEFAULT_METHOD = "median"
"""The aggregation method a consensus event names when it names none (events from before the field)."""


class Price(msgspec.Struct, frozen=True, kw_only=True):
    """The consensus price of one asset in USD, on `md.price.<ASSET>`."""

    v: int = PRICE_VERSION
    asset: str
    price: Decimal
    currency: str = "USD"
    confidence: Decimal
    """Half-width of the interval around `price`, in `currency` (see README)."""
    status: Status
    n_sources: int
    n_used: int
    sources: tuple[SourceQuote, ...]
    volume_24h: Decimal | None = None
    change_24h: Decimal | None = None
    change_pct_24h: Decimal | None = None
    ts: int
    """When the consensus was computed, ns since the epoch, UTC."""
    ts_tick: int
    """`ts_received` of the newest tick behind this consensus: end-to-end latency starts here."""
    seq: int
    """Per asset, strictly increasing, across validator restarts."""
    anomaly: bool = False
    """`price` is unusual against the asset's recent consensus history (|z| over the threshold); published anyway."""
    z_score: Decimal | None = None
    """Rolling z-score of `price` against the asset's recent consensus prices, 2 decimals; None if unknown."""
    method: str = DEFAULT_METHOD
    """How the admitted quotes were aggregated: `weighted_median`, `median`, `mean` or `vwap` (events
    from before this field were all decided by the median: that is what it reads as)."""
    cv_pct: Decimal | None = None
    """Coefficient of variation of the admitted prices (sample stdev / mean), in %, 4 decimals; None under 2."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """Input a service rejected, on `md.dlq.<service>`: nothing is dropped silently."""

    v: int = DEAD_LETTER_VERSION
    service: str
    subject: str
    """Subject the rejected input arrived on (or would have been published to)."""
    reason: str
    """Machine-readable code: `decode_error`, `invalid_price`, `unknown_asset`..."""
    detail: str
    payload: bytes
    """The raw input, base64 in JSON."""
    ts: int
    stream_seq: int | None = None


class SourceStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A venue connection's state, on `md.source.<source>` whenever it changes."""

    v: int = SOURCE_STATUS_VERSION
    source: str
    state: SourceState
    transport: str
    """What carries the data now: `websocket`, `rest`, `replay`..."""
    detail: str | None = None
    """Why the state changed (the error, the close code, the breaker's count)."""
    frames: int = 0
    ticks: int = 0
    rejected: int = 0
    reconnects: int = 0
    ts: int


ENCODER = msgspec.json.Encoder()
_TICK_DECODER = msgspec.json.Decoder(Tick)
_PRICE_DECODER = msgspec.json.Decoder(Price)
_DEAD_LETTER_DECODER = msgspec.json.Decoder(DeadLetter)
_SOURCE_STATUS_DECODER = msgspec.json.Decoder(SourceStatus)


def encode(event: Tick | Price | DeadLetter | SourceStatus) -> bytes:
    """JSON bytes of an event."""
    return ENCODER.encode(event)


def decode_tick(payload: bytes) -> Tick:
    """Decode a tick or raise DecodeError carrying msgspec's path to the bad field."""
    try:
        tick = _TICK_DECODER.decode(payload)
    # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"tick: {exc}") from exc
    if tick.v != TICK_VERSION:
        raise DecodeError(f"tick: unsupported version {tick.v}", reason="unsupported_version")
    return tick


def decode_price(payload: bytes) -> Price:
    """Decode a consensus price or raise DecodeError."""
    try:
        price = _PRICE_DECODER.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"price: {exc}") from exc
    if price.v != PRICE_VERSION:
        raise DecodeError(f"price: unsupported version {price.v}", reason="unsupported_version")
    return price


def decode_dead_letter(payload: bytes) -> DeadLetter:
    """Decode a dead letter or raise DecodeError."""
    try:
        return _DEAD_LETTER_DECODER.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"dead letter: {exc}") from exc


def decode_source_status(payload: bytes) -> SourceStatus:
    """Decode a source status or raise DecodeError."""
    try:
        status = _SOURCE_STATUS_DECODER.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"source status: {exc}") from exc
    if status.v != SOURCE_STATUS_VERSION:
        raise DecodeError(f"source status: unsupported version {status.v}", reason="unsupported_version")
    return status
