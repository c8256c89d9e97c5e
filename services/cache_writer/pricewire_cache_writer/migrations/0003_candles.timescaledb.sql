-- Candles of the consensus price on TimescaleDB (needs 2.13 or later: create_hypertable with by_range).
-- The plain variant, 0003_candles.sql, keeps tables of the same names and columns instead.
--
-- `ticks` and `prices` become hypertables. A hypertable's unique indexes must hold its time column,
-- so the primary keys grow one: ticks (id, ts_exchange), prices (asset, seq, ts). A redelivered event
-- carries the same times, so it still meets its own row and is skipped; the exchange time (not the
-- receipt time) is taken for ticks because a frame seen twice by the collector keeps its venue time.
-- Compression and retention policies are (re)set at every start from the settings (timescale.py).

CREATE EXTENSION IF NOT EXISTS timescaledb;

ALTER TABLE ticks DROP CONSTRAINT IF EXISTS ticks_pkey;
ALTER TABLE ticks ADD PRIMARY KEY (id, ts_exchange);
SELECT create_hypertable('ticks', by_range('ts_exchange', INTERVAL '1 day'),
                         if_not_exists => true, migrate_data => true);
ALTER TABLE ticks SET (timescaledb.compress,
                       timescaledb.compress_segmentby = 'base',
                       timescaledb.compress_orderby = 'ts_exchange DESC');

ALTER TABLE prices DROP CONSTRAINT IF EXISTS prices_pkey;
ALTER TABLE prices ADD PRIMARY KEY (asset, seq, ts);
SELECT create_hypertable('prices', by_range('ts', INTERVAL '7 days'),
                         if_not_exists => true, migrate_data => true);
ALTER TABLE prices SET (timescaledb.compress,
                        timescaledb.compress_segmentby = 'asset',
                        timescaledb.compress_orderby = 'ts DESC, seq DESC');

-- Real-time aggregates (materialized_only = false): the buckets not materialized yet are computed
-- from `prices` at query time, so a candle is current the moment its price is stored.
-- Same columns as the plain tables, so candles.py reads either.
-- Open and close are ordered as on the plain tables, by (ts_ns, seq): first()/last() take any type with
-- a < operator, so the pair goes in as one exact numeric, ts_ns * 10^19 + seq (seq is a non-negative
-- bigint, below 10^19, so the numbers order exactly as the pairs do). Ordered by `ts` alone, prices of
-- the same microsecond would open and close a candle in whatever order the scan met them.
CREATE MATERIALIZED VIEW IF NOT EXISTS candles_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT asset,
       time_bucket(INTERVAL '1 minute', ts) AS bucket,
       first(price, ts_ns::numeric * 10000000000000000000 + seq) AS open,
       max(price) AS high,
       min(price) AS low,
       last(price, ts_ns::numeric * 10000000000000000000 + seq) AS close,
       last(volume_24h, ts_ns::numeric * 10000000000000000000 + seq) AS volume,
       count(*) AS n,
       min(ts_ns) AS open_ts_ns,
       max(ts_ns) AS close_ts_ns
FROM prices
WHERE status <> 'stale'
GROUP BY asset, time_bucket(INTERVAL '1 minute', ts)
WITH NO DATA;

CREATE MATERIALIZED VIEW IF NOT EXISTS candles_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT asset,
       time_bucket(INTERVAL '1 hour', ts) AS bucket,
       first(price, ts_ns::numeric * 10000000000000000000 + seq) AS open,
       max(price) AS high,
       min(price) AS low,
       last(price, ts_ns::numeric * 10000000000000000000 + seq) AS close,
       last(volume_24h, ts_ns::numeric * 10000000000000000000 + seq) AS volume,
       count(*) AS n,
       min(ts_ns) AS open_ts_ns,
       max(ts_ns) AS close_ts_ns
FROM prices
WHERE status <> 'stale'
GROUP BY asset, time_bucket(INTERVAL '1 hour', ts)
WITH NO DATA;

-- Refresh: the recent past on a short schedule. Older buckets (a replay of old events) are
-- materialized by timescale.refresh_candles, which the rebuild calls.
SELECT add_continuous_aggregate_policy('candles_1m', start_offset => INTERVAL '3 hours',
       end_offset => INTERVAL '1 minute', schedule_interval => INTERVAL '1 minute', if_not_exists => true);
SELECT add_continuous_aggregate_policy('candles_1h', start_offset => INTERVAL '3 days',
       end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '30 minutes', if_not_exists => true);
