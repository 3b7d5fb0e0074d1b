-- pgbench script: the write path's shape, 100 purchases and their outbox rows in one transaction
-- (what the group committer does), against the project's own schema.
BEGIN;
WITH inserted AS (
  INSERT INTO purchases (purchase_id, user_id, amount_cents)
  SELECT gen_random_uuid(), 'u' || (random() * 1000)::int, 1 + (random() * 99999)::int
  FROM generate_series(1, 100)
  RETURNING purchase_id
)
INSERT INTO purchase_outbox (purchase_id) SELECT purchase_id FROM inserted;
COMMIT;
