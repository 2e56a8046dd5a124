-- What the relay has published leaves the outbox for a narrow table of its own: message id,
-- destination, when. Marking a published row meant a new version of the whole row and entries
-- in three indexes; moving it is a delete (no index entries) and a short insert, about half the
-- database's work per row. The outbox keeps only what waits to be published (and what is
-- parked); `enqueue` looks here too, so a message id published within the retention is not
-- enqueued again. Rows an older relay marked in place (`published_at`) stay where they are and
-- are purged from there: no rows are moved, so this migration is instant on any outbox.
-- The message id is indexed, not unique: a record is never refused (a refused insert would
-- fail the settle, and the batch would be published again and again). The one way to two
-- records of an id is a repeat enqueued in the milliseconds between a move and its commit.
CREATE TABLE IF NOT EXISTS idem_outbox_sent (
    message_id   TEXT        NOT NULL,
    exchange     TEXT        NOT NULL,
    routing_key  TEXT        NOT NULL,
    published_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS idem_outbox_sent_message ON idem_outbox_sent (message_id);
CREATE INDEX IF NOT EXISTS idem_outbox_sent_at ON idem_outbox_sent (published_at);
