-- pgbench script: 100 purchases in one transaction without outbox rows (what a design that
-- relays from the purchases table itself writes: the stream relay of today).
BEGIN;
INSERT INTO purchases (purchase_id, user_id, amount_cents)
SELECT gen_random_uuid(), 'u' || (random() * 1000)::int, 1 + (random() * 99999)::int
FROM generate_series(1, 100);
COMMIT;
