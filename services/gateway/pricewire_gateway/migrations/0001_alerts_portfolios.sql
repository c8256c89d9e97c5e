-- Per-user data of the gateway: alerts with their armed/fired state, the history of firings, holdings.

CREATE TABLE IF NOT EXISTS alerts (
    id            bigserial PRIMARY KEY,
    user_id       text        NOT NULL,
    asset         text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('above', 'below', 'change_pct')),
    target_price  numeric     CHECK (target_price > 0),
    pct           numeric     CHECK (pct <> 0),
    window_s      integer     CHECK (window_s > 0),
    webhook_url   text,
    note          text,
    -- State, changed only by the alert worker, in the transaction that decides on a price event.
    armed         boolean     NOT NULL DEFAULT true,
    fired_count   integer     NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_fired_at timestamptz,
    CHECK ((kind = 'change_pct') = (pct IS NOT NULL AND window_s IS NOT NULL)),
    CHECK ((kind = 'change_pct') <> (target_price IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS alerts_by_asset ON alerts (asset);
CREATE INDEX IF NOT EXISTS alerts_by_user ON alerts (user_id, id);

-- The newest price event (per-asset seq) the alerts were decided on. Its row is locked by the transaction
-- deciding a price, which serializes replicas per asset and turns away an older or redelivered event.
CREATE TABLE IF NOT EXISTS alert_cursors (
    asset    text PRIMARY KEY,
    last_seq bigint NOT NULL
);

-- One row per firing; no foreign key: the history outlives a deleted alert.
CREATE TABLE IF NOT EXISTS alert_events (
    id              bigserial PRIMARY KEY,
    alert_id        bigint      NOT NULL,
    user_id         text        NOT NULL,
    asset           text        NOT NULL,
    kind            text        NOT NULL,
    target_price    numeric,
    pct             numeric,
    window_s        integer,
    note            text,
    price           numeric     NOT NULL,
    reference_price numeric,
    change_pct      numeric,
    price_seq       bigint      NOT NULL,
    price_ts        timestamptz NOT NULL,
    fired_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (alert_id, price_seq)
);
CREATE INDEX IF NOT EXISTS alert_events_by_user ON alert_events (user_id, id DESC);
CREATE INDEX IF NOT EXISTS alert_events_undelivered ON alert_events (asset, price_seq) WHERE delivered_at IS NULL;

CREATE TABLE IF NOT EXISTS portfolio_holdings (
    user_id  text    NOT NULL,
    asset    text    NOT NULL,
    amount   numeric NOT NULL CHECK (amount >= 0),
    position integer NOT NULL,
    PRIMARY KEY (user_id, asset)
);
