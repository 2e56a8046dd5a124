-- Forensics: which message a key was applied from. Retention: purged oldest first, per
-- consumer, through an index on (consumer, processed_at) rather than a scan of the ledger.
ALTER TABLE idem_ledger ADD COLUMN message_id TEXT;
ALTER TABLE idem_ledger ADD COLUMN correlation_id TEXT;
CREATE INDEX IF NOT EXISTS idem_ledger_age ON idem_ledger (consumer, processed_at);
-- One purging instance per consumer at a time: a lease, taken when free or expired.
CREATE TABLE IF NOT EXISTS idem_purge_lease (
    consumer   TEXT    PRIMARY KEY,
    holder     TEXT    NOT NULL,
    expires_ms INTEGER NOT NULL
);
