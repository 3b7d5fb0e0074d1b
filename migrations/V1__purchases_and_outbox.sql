-- Purchases are the system of record: an ack is sent only after a row is committed here.
CREATE TABLE IF NOT EXISTS purchases (
    purchase_id  uuid        PRIMARY KEY,
    user_id      text        NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 64),
    amount_cents bigint      NOT NULL CHECK (amount_cents > 0 AND amount_cents <= 100000000),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS purchases_user_id_idx ON purchases (user_id);

-- Transactional outbox: one row per purchase not yet confirmed on Kafka, written in the same
-- transaction as the purchase and deleted only after Kafka acknowledged the event.
CREATE TABLE IF NOT EXISTS purchase_outbox (
    id          bigserial PRIMARY KEY,
    purchase_id uuid      NOT NULL REFERENCES purchases (purchase_id)
);
