CREATE TABLE IF NOT EXISTS idem_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      TEXT    NOT NULL UNIQUE,
    exchange        TEXT    NOT NULL,
    routing_key     TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    headers         TEXT    NOT NULL DEFAULT '{}',
    correlation_id  TEXT,
    causation_id    TEXT,
    body            BLOB    NOT NULL,
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    published_ms    INTEGER
);
CREATE INDEX IF NOT EXISTS idem_outbox_due ON idem_outbox (id)
    WHERE published_ms IS NULL;
CREATE INDEX IF NOT EXISTS idem_outbox_published ON idem_outbox (published_ms)
    WHERE published_ms IS NOT NULL;
