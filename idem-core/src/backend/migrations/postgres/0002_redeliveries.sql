CREATE TABLE IF NOT EXISTS idem_redeliveries (
    consumer TEXT        NOT NULL,
    key      TEXT        NOT NULL,
    count    BIGINT      NOT NULL,
    first_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, key)
);
