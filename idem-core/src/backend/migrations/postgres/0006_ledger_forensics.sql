-- Forensics: which message a key was applied from. Retention: purged oldest first, per
-- consumer, through an index on (consumer, processed_at) rather than a scan of the ledger.
-- (Built in the migration's transaction, which blocks claims meanwhile: on a ledger of many
-- millions of rows, create the index CONCURRENTLY by hand before upgrading; IF NOT EXISTS then
-- skips it here.)
ALTER TABLE idem_ledger ADD COLUMN IF NOT EXISTS message_id TEXT;
ALTER TABLE idem_ledger ADD COLUMN IF NOT EXISTS correlation_id TEXT;
CREATE INDEX IF NOT EXISTS idem_ledger_age ON idem_ledger (consumer, processed_at);
-- SQLite's purge lease; PostgreSQL uses an advisory lock. The table exists on both backends so
-- that the schema versions mean the same everywhere.
CREATE TABLE IF NOT EXISTS idem_purge_lease (
    consumer   TEXT   PRIMARY KEY,
    holder     TEXT   NOT NULL,
    expires_ms BIGINT NOT NULL
);
