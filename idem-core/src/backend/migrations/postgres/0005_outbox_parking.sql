-- A row the broker refuses again and again is parked: never taken again, never purged, counted
-- by idem::outbox::parked, sent again by idem::outbox::unpark.
ALTER TABLE idem_outbox ADD COLUMN IF NOT EXISTS parked_at TIMESTAMPTZ;
-- The relay's scan: what waits to be published, parked rows left out.
DROP INDEX IF EXISTS idem_outbox_due;
CREATE INDEX IF NOT EXISTS idem_outbox_due ON idem_outbox (id)
    WHERE published_at IS NULL AND parked_at IS NULL;
-- Rows backing off after a failed publish, per destination: what holds back the later rows of
-- the same destination (per-destination order). Nearly empty while the broker takes everything.
CREATE INDEX IF NOT EXISTS idem_outbox_failing ON idem_outbox (exchange, routing_key, id)
    WHERE published_at IS NULL AND parked_at IS NULL AND attempts > 0;
CREATE INDEX IF NOT EXISTS idem_outbox_parked ON idem_outbox (id)
    WHERE parked_at IS NOT NULL;
