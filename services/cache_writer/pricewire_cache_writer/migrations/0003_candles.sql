-- Candles of the consensus price on plain PostgreSQL: tables the cache_writer keeps in the same
-- transaction as the `prices` rows they summarise (see db_projection.py). The TimescaleDB variant,
-- 0003_candles.timescaledb.sql, has continuous aggregates of the same names and columns instead.
--
-- A candle covers [bucket, bucket + width), buckets aligned on the Unix epoch (UTC). `open` is the
-- price of the smallest (ts, seq), `close` of the largest, so rows arriving in any order merge to
-- the same candle; `volume` is the consensus `volume_24h` at the close (the venues' rolling 24 h
-- volume: the feed carries no per-trade volume); `n` counts the consensus prices in the candle.
-- `stale` events repeat the last consensus and are left out.

CREATE TABLE IF NOT EXISTS candles_1m (
    asset        text        NOT NULL,
    bucket       timestamptz NOT NULL,
    open         numeric     NOT NULL,
    high         numeric     NOT NULL,
    low          numeric     NOT NULL,
    close        numeric     NOT NULL,
    volume       numeric,
    n            bigint      NOT NULL,
    open_ts_ns   bigint      NOT NULL,
    close_ts_ns  bigint      NOT NULL,
    open_seq     bigint      NOT NULL,
    close_seq    bigint      NOT NULL,
    PRIMARY KEY (asset, bucket)
);

CREATE TABLE IF NOT EXISTS candles_1h (LIKE candles_1m INCLUDING ALL);

-- The prices stored before this migration, summarised once (a later run finds the rows there).
INSERT INTO candles_1m (asset, bucket, open, high, low, close, volume, n,
                        open_ts_ns, close_ts_ns, open_seq, close_seq)
SELECT asset, date_bin('1 minute', ts, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
       (array_agg(price ORDER BY ts_ns, seq))[1], max(price), min(price),
       (array_agg(price ORDER BY ts_ns DESC, seq DESC))[1],
       (array_agg(volume_24h ORDER BY ts_ns DESC, seq DESC))[1], count(*),
       min(ts_ns), max(ts_ns),
       (array_agg(seq ORDER BY ts_ns, seq))[1], (array_agg(seq ORDER BY ts_ns DESC, seq DESC))[1]
FROM prices
WHERE status <> 'stale'
GROUP BY 1, 2
ON CONFLICT DO NOTHING;

INSERT INTO candles_1h (asset, bucket, open, high, low, close, volume, n,
                        open_ts_ns, close_ts_ns, open_seq, close_seq)
SELECT asset, date_bin('1 hour', ts, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
       (array_agg(price ORDER BY ts_ns, seq))[1], max(price), min(price),
       (array_agg(price ORDER BY ts_ns DESC, seq DESC))[1],
       (array_agg(volume_24h ORDER BY ts_ns DESC, seq DESC))[1], count(*),
       min(ts_ns), max(ts_ns),
       (array_agg(seq ORDER BY ts_ns, seq))[1], (array_agg(seq ORDER BY ts_ns DESC, seq DESC))[1]
FROM prices
WHERE status <> 'stale'
GROUP BY 1, 2
ON CONFLICT DO NOTHING;
