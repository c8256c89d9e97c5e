"""`pricewire monitor` reads the gateway's own frames and shows their exact digits."""

from __future__ import annotations

from decimal import Decimal

from rich.console import Console

from pricewire_cli.monitor import decode_frame, table
from pricewire_gateway.messages import PriceUpdate, encode, price_data
from tests.factories import make_price


def test_a_price_update_from_the_gateway_becomes_a_row_with_exact_digits() -> None:
    update = PriceUpdate(data=price_data(make_price(price=Decimal("47000.50"))), timestamp="2026-11-22T10:00:00Z")
    frame = encode(update)
    decoded = decode_frame(frame)
    assert decoded.type == "price_update" and decoded.data is not None
    assert decoded.data.price == Decimal("47000.50")
    console = Console(width=120, record=True, color_system=None)
    console.print(table({decoded.data.symbol: decoded.data}))
    text = console.export_text()
    assert "BTC" in text
    assert "47,000.50" in text
    assert "2/2" in text  # sources used / known
    assert "ok" in text


def test_frames_that_are_not_prices_decode_without_data() -> None:
    assert decode_frame(b'{"type":"pong"}').data is None
    assert decode_frame(b'{"type":"room_joined","room":"prices"}').type == "room_joined"
