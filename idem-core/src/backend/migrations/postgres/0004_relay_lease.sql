-- PostgreSQL shares the outbox through row locks and needs no lease; the table exists on both
-- backends so that the schema versions mean the same everywhere.
CREATE TABLE IF NOT EXISTS idem_relay_lease (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    holder     TEXT    NOT NULL,
    expires_ms BIGINT  NOT NULL
);
