-- The cursor also keeps the consensus time of the last event decided: an event with a lower seq but a later
-- time (the validator's seq started over, as after the PRICES stream was recreated) is decided, not turned away.
ALTER TABLE alert_cursors ADD COLUMN IF NOT EXISTS last_ts_ns bigint NOT NULL DEFAULT 0;
