-- Crash-loop counts are purged by the consumer's keeper, oldest first, per consumer, through
-- an index on (consumer, last_at) in bounded batches, rather than by an unbounded scan on every
-- redelivery.
CREATE INDEX IF NOT EXISTS idem_redeliveries_age ON idem_redeliveries (consumer, last_at);
