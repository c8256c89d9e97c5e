-- The PostgreSQL projections of the log: every tick and every consensus price.
-- numeric keeps the venue's digits exactly; *_ns keep the events' nanoseconds that
-- timestamptz (microseconds) cannot; stream_seq points back into the JetStream log.

CREATE TABLE ticks (
    id              text PRIMARY KEY,
    source          text,
    symbol          text,
    base            text,
    quote           text,
    price           numeric NOT NULL,
    bid             numeric,
    ask             numeric,
    volume_24h      numeric,
    open_24h        numeric,
    ts_exchange     timestamptz NOT NULL,
    ts_received     timestamptz NOT NULL,
    ts_exchange_ns  bigint,
    ts_received_ns  bigint,
    stream_seq      bigint NOT NULL
);

CREATE INDEX ticks_base_ts_exchange_idx ON ticks (base, ts_exchange);

CREATE TABLE prices (
    asset           text,
    seq             bigint,
    price           numeric NOT NULL,
    currency        text,
    confidence      numeric,
    status          text,
    n_sources       int,
    n_used          int,
    sources         jsonb,
    volume_24h      numeric,
    change_24h      numeric,
    change_pct_24h  numeric,
    ts              timestamptz NOT NULL,
    ts_ns           bigint,
    ts_tick_ns      bigint,
    stream_seq      bigint NOT NULL,
    PRIMARY KEY (asset, seq)
);

CREATE INDEX prices_asset_ts_idx ON prices (asset, ts);
