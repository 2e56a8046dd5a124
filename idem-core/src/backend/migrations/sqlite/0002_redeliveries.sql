CREATE TABLE IF NOT EXISTS idem_redeliveries (
    consumer TEXT    NOT NULL,
    key      TEXT    NOT NULL,
    count    INTEGER NOT NULL,
    first_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer, key)
) WITHOUT ROWID;
