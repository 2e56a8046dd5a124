CREATE TABLE IF NOT EXISTS idem_outbox (
    id              BIGSERIAL   PRIMARY KEY,
    message_id      TEXT        NOT NULL UNIQUE,
    exchange        TEXT        NOT NULL,
    routing_key     TEXT        NOT NULL,
    kind            TEXT        NOT NULL,
    headers         TEXT        NOT NULL DEFAULT '{}',
    correlation_id  TEXT,
    causation_id    TEXT,
    body            BYTEA       NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at    TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS idem_outbox_due ON idem_outbox (id)
    WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS idem_outbox_published ON idem_outbox (published_at)
    WHERE published_at IS NOT NULL;
CREATE OR REPLACE FUNCTION idem_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('idem_outbox', '');
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS idem_outbox_notify ON idem_outbox;
CREATE TRIGGER idem_outbox_notify AFTER INSERT ON idem_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION idem_outbox_notify();
