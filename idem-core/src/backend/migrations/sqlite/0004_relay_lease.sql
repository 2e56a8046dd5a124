CREATE TABLE IF NOT EXISTS idem_relay_lease (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    holder     TEXT    NOT NULL,
    expires_ms INTEGER NOT NULL
);
