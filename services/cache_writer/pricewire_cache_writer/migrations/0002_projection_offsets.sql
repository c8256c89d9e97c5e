-- Where each PostgreSQL projection stands in its stream. Upserted with GREATEST in the same
-- transaction as the batch's rows, so the offset and the rows it covers commit together.

CREATE TABLE IF NOT EXISTS projection_offsets (
    projection  text PRIMARY KEY,
    stream_seq  bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
