"""Valid events to start a test from: change only the fields the test is about."""

from __future__ import annotations

from decimal import Decimal

from pricewire_common.events import Price, SourceQuote, Tick

TS = 1_700_000_000_123_456_789
"""A fixed event time, ns (2023-11-14T22:13:20.123456789Z)."""


def make_tick(**changes: object) -> Tick:
    """A BTC-USDT tick from sim-a at 47000.50, with `changes` applied."""
    fields: dict[str, object] = {
        "id": "sim-a:BTC-USDT:1",
        "source": "sim-a",
        "symbol": "BTC-USDT",
        "base": "BTC",
        "quote": "USDT",
        "price": Decimal("47000.50"),
        "bid": Decimal("47000.40"),
        "ask": Decimal("47000.60"),
        "volume_24h": Decimal("1234.5"),
        "ts_exchange": TS,
        "ts_received": TS + 1_000_000,
    }
    fields.update(changes)
    return Tick(**fields)  # type: ignore[arg-type]


def make_price(**changes: object) -> Price:
    """An `ok` BTC consensus at 47000.50, seq 7, with `changes` applied."""
    fields: dict[str, object] = {
        "asset": "BTC",
        "price": Decimal("47000.50"),
        "confidence": Decimal("0.10"),
        "status": "ok",
        "n_sources": 2,
        "n_used": 2,
        "sources": (
            SourceQuote(
                source="sim-a",
                symbol="BTC-USDT",
                price=Decimal("47000.40"),
                deviation_pct=Decimal("-0.0002"),
                age_ms=12,
                outlier=False,
            ),
        ),
        "ts": TS,
        "ts_tick": TS - 5_000_000,
        "seq": 7,
    }
    fields.update(changes)
    return Price(**fields)  # type: ignore[arg-type]
