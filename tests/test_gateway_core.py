"""The gateway's pure cores: wire schemas, symbol mapping, the conflating mailbox, the price check."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricewire_common import subjects
from pricewire_common.config import Settings
from pricewire_common.errors import InvalidEvent
from pricewire_common.events import Price, SourceQuote
from pricewire_common.rules import check_price
from pricewire_gateway import messages
from pricewire_gateway.__main__ import parse_settings
from pricewire_gateway.errors import RequestError
from pricewire_gateway.mailbox import Mailbox
from pricewire_gateway.symbols import MAX_SYMBOLS, SymbolResolver

ASSETS = ("BTC", "ETH", "SOL", "ADA", "DOT")
RESOLVER = SymbolResolver(ASSETS, ("USD", "USDT", "USDC"))


def make_price(asset: str = "BTC", seq: int = 1, **changes: Any) -> Price:
    fields: dict[str, object] = {
        "asset": asset,
        "price": Decimal("47000.50"),
        "confidence": Decimal("12.25"),
        "status": "ok",
        "n_sources": 3,
        "n_used": 2,
        "sources": (
            SourceQuote(
                source="sim-a",
                symbol=f"{asset}-USDT",
                price=Decimal("47000.40"),
                deviation_pct=Decimal("-0.0002"),
                age_ms=120,
                outlier=False,
            ),
        ),
        "volume_24h": Decimal("1234.5"),
        "change_24h": Decimal("-100.10"),
        "change_pct_24h": Decimal("-0.2125"),
        "ts": 1_700_000_000_123_000_000,
        "ts_tick": 1_700_000_000_100_000_000,
        "seq": seq,
    }
    fields.update(changes)
    return Price(**fields)  # type: ignore[arg-type]


# --- messages ---------------------------------------------------------------------------------


def test_price_update_writes_decimals_as_numbers_with_their_exact_digits() -> None:
    update = messages.PriceUpdate(data=messages.price_data(make_price()), timestamp="2023-11-14T22:13:20.000Z")
    text = messages.encode(update).decode()
    assert text.startswith('{"type":"price_update","data":{"symbol":"BTC","price":47000.50,')
    assert '"change_24h":-100.10' in text
    assert '"change_percent_24h":-0.2125' in text
    assert '"volume_24h":1234.5' in text
    assert '"confidence":12.25' in text
    assert '"deviation_pct":-0.0002' in text
    assert '"timestamp":"2023-11-14T22:13:20.123Z"' in text
    data = json.loads(text, parse_float=Decimal)["data"]
    assert list(data) == [
        "symbol", "price", "change_24h", "change_percent_24h", "volume_24h", "timestamp", "currency",
        "confidence", "status", "method", "cv_pct", "anomaly", "z_score", "n_sources", "n_used", "sources", "seq",
        "ts_tick", "stale", "age_s",
    ]  # fmt: skip
    assert data["ts_tick"] == 1_700_000_000_100_000_000
    assert data["sources"][0] == {
        "source": "sim-a",
        "symbol": "BTC-USDT",
        "price": Decimal("47000.40"),
        "deviation_pct": Decimal("-0.0002"),
        "age_ms": 120,
        "outlier": False,
        "reason": None,
        "weight": Decimal("0"),
        "kind": "stream",
    }


@given(st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("1e12"), places=8))
def test_any_price_reaches_clients_with_the_same_digits(value: Decimal) -> None:
    text = messages.encode(messages.price_data(make_price(price=value)))
    assert f'"price":{value}'.encode() in text
    assert json.loads(text, parse_float=Decimal)["price"] == value


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{", "bad_message"),
        ("[]", "bad_message"),
        ('{"symbol":"BTC"}', "bad_message"),
        ('{"type":1}', "bad_message"),
        ('{"type":"subscribe","symbols":"BTC"}', "bad_message"),
        ('{"type":"get_price"}', "bad_message"),
        ('{"type":"launch_rockets"}', "unknown_type"),
    ],
)
def test_bad_client_frames_are_typed_errors(frame: str, code: str) -> None:
    with pytest.raises(RequestError) as err:
        messages.decode_request(frame)
    assert err.value.code == code


def test_client_frames_decode_to_their_request() -> None:
    assert messages.decode_request('{"type":"subscribe","symbols":["BTC","eth"]}') == messages.Subscribe(
        symbols=["BTC", "eth"]
    )
    assert messages.decode_request('{"type":"join_room","room":"prices"}') == messages.JoinRoom(room="prices")
    assert messages.decode_request('{"type":"ping"}') == messages.Ping()


# --- symbols ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("symbol", "asset"),
    [
        ("BTC", "BTC"),
        ("btc", "BTC"),
        (" eth ", "ETH"),
        ("btcusdt", "BTC"),
        ("BTCUSD", "BTC"),
        ("BTC-USDT", "BTC"),
        ("sol/usdc", "SOL"),
        ("ada_usd", "ADA"),
        ("BTC-EUR", None),
        ("BTCEUR", None),
        ("XRP", None),
        ("XRP-USDT", None),
        ("USDT", None),
        ("", None),
        ("-", None),
    ],
)
def test_symbols_map_to_configured_assets(symbol: str, asset: str | None) -> None:
    assert RESOLVER.asset(symbol) == asset


def test_subscribe_names_all_known_assets_or_fails() -> None:
    assert RESOLVER.require_all("btc", ["ETHUSDT", "BTC-USD"]) == ["BTC", "ETH"]
    with pytest.raises(RequestError) as err:
        RESOLVER.require_all(None, ["BTC", "XRP"])
    assert err.value.code == "unknown_asset"
    assert "XRP" in err.value.message
    for symbol, symbols in ((None, None), (None, [])):
        with pytest.raises(RequestError) as err:
            RESOLVER.require_all(symbol, symbols)
        assert err.value.code == "bad_message"
    with pytest.raises(RequestError) as err:
        RESOLVER.require_all(None, ["BTC"] * (MAX_SYMBOLS + 1))
    assert err.value.code == "bad_message"


# --- mailbox ----------------------------------------------------------------------------------


def test_mailbox_keeps_only_the_newest_frame_per_asset() -> None:
    box = Mailbox()
    for seq in range(1, 1001):
        for asset in ASSETS:
            box.offer(asset, seq, f"{asset}:{seq}".encode())
    assert len(box) == len(ASSETS)
    assert box.take() == [f"{asset}:1000".encode() for asset in ASSETS]
    assert box.conflated == 999 * len(ASSETS)
    assert len(box) == 0


def test_mailbox_never_sends_an_older_frame_than_it_sent_or_holds() -> None:
    box = Mailbox()
    assert box.offer("BTC", 5, b"live-5")
    assert not box.offer("BTC", 4, b"snapshot-4")  # an older snapshot does not replace a newer update
    assert box.take() == [b"live-5"]
    assert not box.offer("BTC", 5, b"snapshot-5")  # already sent
    assert not box.offer("BTC", 3, b"late-3")
    assert box.offer("BTC", 6, b"live-6")
    assert box.take() == [b"live-6"]


def test_mailbox_forgets_an_asset_the_client_stops_following() -> None:
    box = Mailbox()
    box.offer("BTC", 1, b"btc-1")
    box.offer("ETH", 1, b"eth-1")
    box.take()
    box.offer("ETH", 2, b"eth-2")
    box.forget("ETH")
    assert box.take() == []
    assert box.offer("ETH", 1, b"eth-1 again")  # following it again starts afresh
    assert not box.offer("BTC", 1, b"btc-1 again")


@given(st.lists(st.tuples(st.sampled_from(ASSETS), st.integers(0, 50)), max_size=200))
def test_mailbox_yields_each_assets_seq_in_increasing_order(offers: list[tuple[str, int]]) -> None:
    box = Mailbox()
    sent: dict[str, list[int]] = {}
    for i, (asset, seq) in enumerate(offers):
        box.offer(asset, seq, f"{asset}:{seq}".encode())
        assert len(box) <= len(ASSETS)
        if i % 7 == 0:
            for frame in box.take():
                name, _, number = frame.decode().partition(":")
                sent.setdefault(name, []).append(int(number))
    for seqs in sent.values():
        assert seqs == sorted(set(seqs))


# --- check_price ------------------------------------------------------------------------------


def test_a_good_price_passes() -> None:
    price = make_price()
    assert check_price(price, subject=subjects.price("BTC"), assets=ASSETS) is price


@pytest.mark.parametrize(
    ("changes", "subject", "reason"),
    [
        ({}, "md.price.ETH", "asset_mismatch"),
        ({"asset": "XRP"}, "md.price.XRP", "unknown_asset"),
        ({"price": Decimal("NaN")}, "md.price.BTC", "invalid_price"),
        ({"price": Decimal(0)}, "md.price.BTC", "invalid_price"),
        ({"confidence": Decimal("Infinity")}, "md.price.BTC", "invalid_number"),
        ({"change_pct_24h": Decimal("-Infinity")}, "md.price.BTC", "invalid_number"),
    ],
)
def test_a_price_clients_could_not_be_sent_is_rejected(changes: dict[str, Any], subject: str, reason: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        check_price(make_price(**changes), subject=subject, assets=ASSETS)
    assert err.value.reason == reason


def test_a_non_finite_source_quote_is_rejected() -> None:
    price = make_price()
    source = msgspec.structs.replace(price.sources[0], price=Decimal("NaN"))
    with pytest.raises(InvalidEvent) as err:
        check_price(msgspec.structs.replace(price, sources=(source,)), subject="md.price.BTC", assets=ASSETS)
    assert err.value.reason == "invalid_number"


# --- command line -----------------------------------------------------------------------------


def test_port_and_host_override_the_environment() -> None:
    base = replace(Settings(), gateway=replace(Settings().gateway, port=8123))
    assert parse_settings([], base=base).gateway.port == 8123
    settings = parse_settings(["--port", "0", "--host", "127.0.0.1"], base=base)
    assert (settings.gateway.host, settings.gateway.port) == ("127.0.0.1", 0)
    with pytest.raises(SystemExit):
        parse_settings(["--port", "70000"], base=base)
