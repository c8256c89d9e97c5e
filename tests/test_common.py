"""The shared contract: schemas, rules, subjects and settings."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricewire_common import subjects
from pricewire_common.clock import NS_PER_S
from pricewire_common.config import Settings
from pricewire_common.errors import ConfigError, DecodeError, InvalidEvent
from pricewire_common.events import decode_tick, encode
from pricewire_common.rules import MAX_PLACES, MAX_PRICE, MAX_VOLUME, MIN_PRICE, check_tick, decimal_places
from tests.factories import make_tick


def test_tick_round_trip_keeps_decimal_digits() -> None:
    tick = make_tick()
    payload = encode(tick)
    assert b'"price":"47000.50"' in payload
    assert decode_tick(payload) == tick


@given(st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("1e9"), places=8))
def test_any_positive_decimal_survives_the_wire_exactly(price: Decimal) -> None:
    decoded = decode_tick(encode(make_tick(price=price)))
    assert decoded.price == price
    assert str(decoded.price) == str(price)


def _places_by_exponent(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _accepts(**fields: object) -> bool:
    try:
        check_tick(make_tick(**fields))
    except InvalidEvent:
        return False
    return True


# Decimals of every shape: tiny and huge exponents, trailing zeros, signed zeros, exactly the bounds.
any_decimal = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False),
    st.builds(
        Decimal,
        st.tuples(
            st.integers(0, 1), st.lists(st.integers(0, 9), min_size=1, max_size=34).map(tuple), st.integers(-40, 30)
        ),
    ),
    st.sampled_from(
        [
            MIN_PRICE,
            MAX_PRICE,
            MAX_VOLUME,
            Decimal("-0"),
            Decimal("0E-19"),
            Decimal("1E-18"),
            Decimal("1.000000000000000000"),
        ]
    ),
)


@given(any_decimal)
def test_the_price_and_volume_checks_are_the_bounds_they_state(value: Decimal) -> None:
    # The checks read exponents and str() for speed; the oracle is the rule as written in README.
    assert decimal_places(value) == _places_by_exponent(value)
    places_ok = _places_by_exponent(value) <= MAX_PLACES
    assert _accepts(price=value) == (MIN_PRICE <= value < MAX_PRICE and places_ok)
    assert _accepts(volume_24h=value) == (0 <= value < MAX_VOLUME and places_ok)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "0", "-1", "-0.0"])
def test_non_positive_or_non_finite_price_is_rejected(bad: str) -> None:
    tick = decode_tick(encode(make_tick()).replace(b'"47000.50"', f'"{bad}"'.encode()))
    with pytest.raises(InvalidEvent) as err:
        check_tick(tick)
    assert err.value.reason == "invalid_price"


@pytest.mark.parametrize(
    "changes",
    [
        {"price": Decimal("1e60")},
        {"price": Decimal("1e12")},
        {"price": Decimal("9.9e-13")},
        {"price": Decimal("1.0000000000000000001")},  # 19 decimals
        {"bid": Decimal("1e60")},
        {"ask": Decimal("1e-60")},
        {"open_24h": Decimal("1e-60")},
        {"open_24h": Decimal("Infinity")},
    ],
)
def test_prices_beyond_the_exact_arithmetic_bounds_are_rejected(changes: dict[str, Decimal]) -> None:
    with pytest.raises(InvalidEvent) as err:
        check_tick(make_tick(**changes))
    assert err.value.reason == "invalid_price"


def test_prices_at_the_bounds_are_accepted() -> None:
    smallest, largest = Decimal("1e-12"), Decimal("999999999999.999999999999999999")  # 30 digits, 18 decimals
    assert check_tick(make_tick(price=smallest, bid=smallest, ask=largest, open_24h=largest)).price == smallest


@pytest.mark.parametrize("bad", ["1e20", "-0.1", "NaN", "1.0000000000000000001"])
def test_volume_out_of_bounds_is_rejected(bad: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        check_tick(make_tick(volume_24h=Decimal(bad)))
    assert err.value.reason == "invalid_volume"
    assert check_tick(make_tick(volume_24h=Decimal("99999999999999999999.999999999999999999"))) is not None


@pytest.mark.parametrize("field", ["ts_exchange", "ts_received"])
@pytest.mark.parametrize("bad", [0, -1, 2**63])
def test_timestamps_must_be_positive_signed_64_bit(field: str, bad: int) -> None:
    with pytest.raises(InvalidEvent) as err:
        check_tick(make_tick(**{field: bad}))
    assert err.value.reason == "bad_timestamp"
    assert check_tick(make_tick(**{field: 2**63 - 1})) is not None


def test_a_tick_received_in_the_future_is_rejected_when_the_clock_is_given() -> None:
    tick = make_tick()
    now = tick.ts_received - 5 * NS_PER_S
    assert check_tick(tick, now_ns=now) is tick  # at the tolerance: a collector clock slightly ahead
    assert check_tick(tick) is tick  # no clock, no judgement
    with pytest.raises(InvalidEvent) as err:
        check_tick(tick, now_ns=now - 1)
    assert err.value.reason == "bad_timestamp"
    with pytest.raises(InvalidEvent):
        check_tick(tick, now_ns=tick.ts_received - 2, max_future_ns=1)


def test_unknown_asset_is_rejected_with_its_reason() -> None:
    with pytest.raises(InvalidEvent) as err:
        check_tick(make_tick(), assets={"ETH"})
    assert err.value.reason == "unknown_asset"


def test_symbol_must_match_base_and_quote() -> None:
    with pytest.raises(InvalidEvent) as err:
        check_tick(make_tick(symbol="ETH-USDT"))
    assert err.value.reason == "bad_symbol"


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"[]", b'{"id":"x"}', b'{"v":2}', b"\xff\xfe", b'{"price": {"a": 1}}'],
)
def test_malformed_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_tick(payload)


def test_future_version_is_refused() -> None:
    payload = msgspec.json.encode({**msgspec.to_builtins(make_tick()), "v": 2})
    with pytest.raises(DecodeError) as err:
        decode_tick(payload)
    assert err.value.reason == "unsupported_version"


def test_subjects_refuse_wildcards_and_dots() -> None:
    assert subjects.tick("sim-a", "BTC", "USDT") == "md.tick.sim-a.BTC-USDT"
    assert subjects.price("ETH") == "md.price.ETH"
    for source in ("a.b", "*", ">", "a b", "UPPER"):
        with pytest.raises(InvalidEvent):
            subjects.tick(source, "BTC", "USDT")
    with pytest.raises(InvalidEvent):
        subjects.price("BT.C")


def test_settings_read_from_environment_once() -> None:
    settings = Settings.from_env(
        {
            "NATS_URL": "nats://n:4222",
            "DATABASE_URL": "postgresql://u:secret@db/pw",
            "PRICEWIRE_ASSETS": "btc, eth,BTC",
            "PRICEWIRE_GATEWAY_PORT": "8123",
        }
    )
    assert settings.nats_url == "nats://n:4222"
    assert settings.assets == ("BTC", "ETH")
    assert settings.gateway.port == 8123
    assert "secret" not in repr(settings)
    assert settings.database_url_redacted == "postgresql://u:***@db/pw"
    assert Settings.from_env({}).assets == ("BTC", "ETH", "SOL", "ADA", "DOT")


def test_the_timescaledb_settings_and_their_defaults() -> None:
    cache = Settings.from_env(
        {"PRICEWIRE_TIMESCALEDB": "off", "PRICEWIRE_COMPRESS_AFTER_S": "3600", "PRICEWIRE_RETENTION_S": "0"}
    ).cache
    assert (cache.timescaledb, cache.compress_after_s, cache.retention_s) == (False, 3600, None)
    default = Settings.from_env({}).cache
    assert (default.timescaledb, default.compress_after_s, default.retention_s) == (True, 604_800, 7_776_000)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PRICEWIRE_SIM_RATE", "-1"),
        ("PRICEWIRE_GATEWAY_PORT", "http"),
        ("PRICEWIRE_ASSETS", ","),
        ("PRICEWIRE_TIMESCALEDB", "yes"),
        ("PRICEWIRE_RETENTION_S", "-5"),
        ("PRICEWIRE_COMPRESS_AFTER_S", "0"),
    ],
)
def test_malformed_setting_fails_at_start(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    assert err.value.name == name


def test_iso_time_never_rounds_up_into_the_next_second() -> None:
    from pricewire_common.clock import iso_from_ns  # noqa: PLC0415

    assert iso_from_ns(1_700_000_000_999_999_999) == "2023-11-14T22:13:20.999Z"
    assert iso_from_ns(1_700_000_000_000_000_000) == "2023-11-14T22:13:20.000Z"


def test_a_ccxt_exchange_may_not_shadow_a_native_connector() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"PRICEWIRE_CCXT_EXCHANGES": "bitstamp,kraken"})
    assert err.value.name == "PRICEWIRE_CCXT_EXCHANGES"
    assert Settings.from_env({"PRICEWIRE_CCXT_EXCHANGES": "Bitstamp, okx"}).live.ccxt_exchanges == ("bitstamp", "okx")


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_iso_text_of_any_ns_timestamp_is_its_datetime_to_the_millisecond(ts_ns: int) -> None:
    from datetime import UTC, datetime  # noqa: PLC0415

    from pricewire_common.clock import iso_from_ns  # noqa: PLC0415

    whole = datetime.fromtimestamp(ts_ns // 10**9, tz=UTC)
    assert iso_from_ns(ts_ns) == f"{whole:%Y-%m-%dT%H:%M:%S}.{ts_ns // 10**6 % 1000:03d}Z"
