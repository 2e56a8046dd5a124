-- What the relay has published leaves the outbox for a narrow table of its own: message id,
-- destination, when (milliseconds since the epoch). The outbox keeps only what waits (and
-- what is parked). Rows an older relay marked in place (`published_ms`) are purged from there.
-- The message id is indexed, not unique: a record is never refused (see the PostgreSQL file).
CREATE TABLE IF NOT EXISTS idem_outbox_sent (
    message_id   TEXT    NOT NULL,
    exchange     TEXT    NOT NULL,
    routing_key  TEXT    NOT NULL,
    published_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idem_outbox_sent_message ON idem_outbox_sent (message_id);
CREATE INDEX IF NOT EXISTS idem_outbox_sent_at ON idem_outbox_sent (published_ms);
