CREATE TABLE IF NOT EXISTS idem_ledger (
    consumer     TEXT        NOT NULL,
    key          TEXT        NOT NULL,
    payload_hash BYTEA       NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, key)
);
