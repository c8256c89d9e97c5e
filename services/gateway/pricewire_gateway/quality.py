"""The data-quality view of an asset: what each venue quoted, whether the consensus took it and why
not, how far it was from the others, and how fresh it is *now*.

Pure: the asset's latest Price event, the time, the validator's max ages and the collectors' connection
states come in; the view goes out. The evidence is the validator's own, as it stood when it decided
(`Price.ts`), so the view never disagrees with the price it explains. Only the ages move with the clock: a
quote's age now is its age at the decision plus the time since, and it is fresh while that stays within
the validator's max age for its kind (`stream` or `poll`), the same test the validator's `stale` applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

import msgspec

from pricewire_common.clock import NS_PER_MS, iso_from_ns
from pricewire_common.config import ValidatorSettings
from pricewire_common.events import Price, SourceQuote, SourceState, Status, TickKind

__all__ = [
    "AssetQuality",
    "Freshness",
    "FreshnessLimits",
    "QualityList",
    "SourceQuality",
    "asset_quality",
    "freshness",
    "source_quality",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class FreshnessLimits:
    """The validator's max quote age per kind, in ms: a quote older than its kind's limit is stale."""

    stream_ms: int
    poll_ms: int

    @classmethod
    def from_settings(cls, validator: ValidatorSettings) -> FreshnessLimits:
        """The limits the validator runs with (`PRICEWIRE_MAX_AGE_S`, `PRICEWIRE_MAX_AGE_POLL_S`)."""
        return cls(stream_ms=round(validator.max_age_s * 1000), poll_ms=round(validator.max_age_poll_s * 1000))

    def max_age_ms(self, kind: TickKind) -> int:
        return self.poll_ms if kind == "poll" else self.stream_ms


class SourceQuality(msgspec.Struct, frozen=True, kw_only=True):
    """One venue's quote in an asset's consensus, with its age now."""

    source: str
    symbol: str
    """The venue's pair, e.g. `BTC-USDT`."""
    kind: TickKind
    price: Decimal
    deviation_pct: Decimal
    """Signed % from the median of the eligible quotes, as the validator computed it."""
    admitted: bool
    """The quote made the price (`reason` is null)."""
    reason: str | None
    weight: Decimal
    age_ms: int
    """Age now: `age_ms_at_decision` + the time since the decision."""
    age_ms_at_decision: int
    max_age_ms: int
    """The validator's max age for this quote's kind."""
    fresh: bool
    """`age_ms` <= `max_age_ms`: the validator would not call it stale now."""
    connection: SourceState | None
    """The collector's latest connection state for this source; null when the gateway has heard none."""


class Freshness(msgspec.Struct, frozen=True, kw_only=True):
    """How many of an asset's quotes are fresh now, and the oldest one."""

    fresh: int
    total: int
    oldest_source: str | None
    oldest_age_ms: int | None


class AssetQuality(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /api/v1/quality/{asset}`: an asset's latest consensus and the evidence behind it."""

    symbol: str
    price: Decimal
    currency: str
    status: Status
    method: str
    confidence: Decimal
    cv_pct: Decimal | None
    anomaly: bool
    z_score: Decimal | None
    n_used: int
    n_sources: int
    seq: int
    evaluated_at: str
    """ISO 8601 UTC of the decision (`Price.ts`)."""
    as_of: str
    """ISO 8601 UTC of the time the ages are measured at (the gateway's now)."""
    freshness: Freshness
    sources: list[SourceQuality]


class QualityList(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /api/v1/quality`: every configured asset with a price, in configured order."""

    assets: list[AssetQuality]
    no_price: list[str]
    """Configured assets the store holds no readable price for (none yet, expired, or unreadable)."""
    timestamp: str


def source_quality(
    quote: SourceQuote, *, elapsed_ms: int, limits: FreshnessLimits, connection: SourceState | None
) -> SourceQuality:
    """The view of one quote `elapsed_ms` after the decision that weighed it."""
    age_ms = quote.age_ms + elapsed_ms
    max_age_ms = limits.max_age_ms(quote.kind)
    return SourceQuality(
        source=quote.source,
        symbol=quote.symbol,
        kind=quote.kind,
        price=quote.price,
        deviation_pct=quote.deviation_pct,
        admitted=quote.reason is None,
        reason=quote.reason,
        weight=quote.weight,
        age_ms=age_ms,
        age_ms_at_decision=quote.age_ms,
        max_age_ms=max_age_ms,
        # Ages are whole milliseconds: at exactly the limit, the validator's own verdict breaks the tie.
        fresh=age_ms < max_age_ms or (age_ms == max_age_ms and quote.reason != "stale"),
        connection=connection,
    )


def asset_quality(
    price: Price, *, now_ns: int, limits: FreshnessLimits, connections: Mapping[str, SourceState]
) -> AssetQuality:
    """The quality view of `price` at `now_ns`; `connections` maps a source to its collector state."""
    # A gateway clock behind the validator's must not make quotes younger than they were when weighed.
    elapsed_ms = max(0, now_ns - price.ts) // NS_PER_MS
    sources = [
        source_quality(quote, elapsed_ms=elapsed_ms, limits=limits, connection=connections.get(quote.source))
        for quote in price.sources
    ]
    return AssetQuality(
        symbol=price.asset,
        price=price.price,
        currency=price.currency,
        status=price.status,
        method=price.method,
        confidence=price.confidence,
        cv_pct=price.cv_pct,
        anomaly=price.anomaly,
        z_score=price.z_score,
        n_used=price.n_used,
        n_sources=price.n_sources,
        seq=price.seq,
        evaluated_at=iso_from_ns(price.ts),
        as_of=iso_from_ns(now_ns),
        freshness=freshness(sources),
        sources=sources,
    )


def freshness(sources: list[SourceQuality]) -> Freshness:
    """Fresh out of total, and the oldest quote (the first listed, on a tie)."""
    oldest = max(sources, key=lambda s: s.age_ms, default=None)
    return Freshness(
        fresh=sum(1 for s in sources if s.fresh),
        total=len(sources),
        oldest_source=None if oldest is None else oldest.source,
        oldest_age_ms=None if oldest is None else oldest.age_ms,
    )
