-- What the consensus events carry beyond the price since the consensus engine (issue 4): the method
-- that made the price, the venues' coefficient of variation, and the anomaly verdict with its z-score.
-- Nullable, so rows from before read as unknown (the gateway reads them as the event's defaults), and
-- so that the columns can be added to a compressed TimescaleDB hypertable as well.

ALTER TABLE prices
    ADD COLUMN IF NOT EXISTS method  text,
    ADD COLUMN IF NOT EXISTS cv_pct  numeric,
    ADD COLUMN IF NOT EXISTS anomaly boolean,
    ADD COLUMN IF NOT EXISTS z_score numeric;
