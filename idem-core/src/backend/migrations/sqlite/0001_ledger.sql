CREATE TABLE IF NOT EXISTS idem_ledger (
    consumer     TEXT NOT NULL,
    key          TEXT NOT NULL,
    payload_hash BLOB NOT NULL,
    processed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer, key)
) WITHOUT ROWID;
