"""The cache writer's pure core: rows from events, what may be stored, the migration set."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from pricewire_cache_writer.db_projection import PRICES, TICKS, columns
from pricewire_cache_writer.errors import MigrationError
from pricewire_cache_writer.migrate import packaged_migrations, parse_migrations
from pricewire_cache_writer.records import (
    MAX_BIGINT,
    PriceRecord,
    TickRecord,
    check_price,
    price_record,
    tick_record,
)
from pricewire_common import subjects
from pricewire_common.config import DEFAULT_ASSETS
from pricewire_common.errors import InvalidEvent
from pricewire_common.events import Price, SourceQuote
from pricewire_common.rules import check_tick
from tests.factories import TS, make_price, make_tick

ASSETS = frozenset(DEFAULT_ASSETS)


def test_tick_record_keeps_the_event_values_in_column_order() -> None:
    record = tick_record(make_tick(), stream_seq=42)
    assert record.price == Decimal("47000.50")
    assert record.open_24h is None
    assert (record.ts_exchange_ns, record.ts_received_ns, record.stream_seq) == (TS, TS + 1_000_000, 42)
    assert record._fields[0] == "id" and record._fields[-1] == "stream_seq"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"id": "a\x00b"}, "unstorable"),
        ({"price": Decimal("1e131072")}, "invalid_price"),
        ({"bid": Decimal("1e-16384")}, "invalid_price"),
        ({"ts_exchange": MAX_BIGINT + 1}, "bad_timestamp"),
        ({"volume_24h": Decimal("NaN")}, "invalid_volume"),
    ],
)
def test_a_tick_postgresql_would_refuse_is_rejected_before_the_batch(changes: dict[str, object], reason: str) -> None:
    # The path of the ticks projection: the contract's rule, then the row.
    with pytest.raises(InvalidEvent) as err:
        tick_record(check_tick(make_tick(**changes), assets=ASSETS), stream_seq=1)
    assert err.value.reason == reason


def test_the_largest_and_finest_numbers_the_rule_admits_become_rows_unchanged() -> None:
    price = Decimal("999999999999.999999999999999999")  # under 1e12, 18 decimals, 30 digits
    volume = Decimal("99999999999999999999") - Decimal("1e-18")
    tick = check_tick(make_tick(price=price, bid=Decimal("1e-12"), volume_24h=volume), assets=ASSETS)
    record = tick_record(tick, stream_seq=1)
    assert (record.price, record.bid, record.volume_24h) == (price, Decimal("1e-12"), volume)


def test_a_valid_price_passes_and_its_sources_become_json_text() -> None:
    price = make_price()
    assert check_price(price, subject=subjects.price("BTC"), assets=ASSETS) is price
    record = price_record(price, stream_seq=3)
    assert (record.asset, record.seq, record.ts_ns, record.ts_tick_ns) == ("BTC", 7, TS, TS - 5_000_000)
    sources = msgspec.json.decode(record.sources)
    assert sources[0]["price"] == "47000.40"  # exact digits, as a string
    assert sources[0]["reason"] is None


@pytest.mark.parametrize(
    ("price", "subject", "reason"),
    [
        (make_price(asset="ETH"), "md.price.BTC", "asset_mismatch"),
        (make_price(asset="btc"), "md.price.btc", "bad_symbol"),
        (make_price(), "md.tick.BTC", "bad_subject"),
        (make_price(price=Decimal("NaN")), "md.price.BTC", "invalid_price"),
        (make_price(price=Decimal("0")), "md.price.BTC", "invalid_price"),
        (make_price(confidence=Decimal("-1")), "md.price.BTC", "invalid_number"),
        (make_price(seq=-1), "md.price.BTC", "bad_seq"),
        (make_price(seq=2**63), "md.price.BTC", "unstorable"),
        (make_price(ts=0), "md.price.BTC", "bad_timestamp"),
        (make_price(asset="XRP"), "md.price.XRP", "unknown_asset"),  # a valid code, but not configured
    ],
)
def test_a_price_that_must_not_reach_the_projections_is_rejected(price: Price, subject: str, reason: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        check_price(price, subject=subject, assets=ASSETS)
    assert err.value.reason == reason


def test_a_nul_in_a_source_name_is_unstorable_in_jsonb() -> None:
    quote = SourceQuote(
        source="a\x00", symbol="BTC-USDT", price=Decimal(1), deviation_pct=Decimal(0), age_ms=0, outlier=False
    )
    with pytest.raises(InvalidEvent) as err:
        price_record(make_price(sources=(quote,)), stream_seq=1)
    assert err.value.reason == "unstorable"


def test_columns_send_numerics_as_their_exact_text_and_keep_nulls() -> None:
    records = [tick_record(make_tick(id=f"t-{i}", price=Decimal(f"1.{i}0")), stream_seq=i) for i in range(3)]
    cols = columns(records, TICKS.numeric)
    by_name = dict(zip(TickRecord._fields, cols, strict=True))
    assert by_name["price"] == ["1.00", "1.10", "1.20"]
    assert by_name["open_24h"] == [None, None, None]
    assert by_name["stream_seq"] == [0, 1, 2]


def test_the_numeric_field_sets_name_record_fields() -> None:
    assert TICKS.numeric <= set(TickRecord._fields)
    assert PRICES.numeric <= set(PriceRecord._fields)


def test_packaged_migrations_start_at_one() -> None:
    migrations = packaged_migrations()
    assert [m.version for m in migrations][:1] == [1]
    assert "CREATE TABLE ticks" in migrations[0].sql


def test_migrations_are_ordered_by_version() -> None:
    parsed = parse_migrations({"0002_more.sql": "B", "0001_init.sql": "A"})
    assert [(m.version, m.name, m.sql) for m in parsed] == [(1, "init", "A"), (2, "more", "B")]


@pytest.mark.parametrize(
    "files",
    [
        {"0001_init.sql": "", "0003_gap.sql": ""},
        {"0002_no_first.sql": ""},
        {"0001_a.sql": "", "001_b.sql": ""},
        {"0001_init.sql": "", "0001_again.sql": ""},
        {"0001_Init.sql": ""},
    ],
)
def test_a_malformed_migration_set_fails(files: dict[str, str]) -> None:
    with pytest.raises(MigrationError):
        parse_migrations(files)
