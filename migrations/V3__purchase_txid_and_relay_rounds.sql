-- Groundwork of the sequence-numbered relay (ARCHITECTURE.md, "Exactly once with no horizon"):
-- purchases in one total order that every relay round and every replay repeats,
-- (txid, purchase_id), and the relay's bookkeeping. The outbox still carries the events.

-- Two steps, each metadata only: a column added without a default rewrites nothing (rows written
-- before it read NULL and are published first, in purchase_id order, by the migration's
-- backfill); a default set afterwards applies to new rows only. A volatile default in ADD COLUMN
-- would rewrite the whole table under an exclusive lock.
ALTER TABLE purchases ADD COLUMN IF NOT EXISTS txid xid8;
ALTER TABLE purchases ALTER COLUMN txid SET DEFAULT pg_current_xact_id();

-- A stream fixes, for good, how its purchases are spread over Kafka partitions: a relay
-- configured with another partition count is refused, never silently used.
CREATE TABLE IF NOT EXISTS relay_streams (
    stream_id   uuid        PRIMARY KEY,
    partitions  integer     NOT NULL CHECK (partitions > 0),
    partitioner text        NOT NULL CHECK (partitioner = 'murmur2'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per round Kafka acknowledged: the cursor after it, each partition's next sequence
-- number and where its last acknowledged record landed (-1: none yet). Round n + 1 is written
-- only by a relay that started from round n: the primary key makes that a compare-and-set, so of
-- two racing relays one round wins.
CREATE TABLE IF NOT EXISTS relay_rounds (
    stream_id      uuid        NOT NULL REFERENCES relay_streams (stream_id),
    round          bigint      NOT NULL CHECK (round > 0),
    after_txid     xid8        NOT NULL,
    after_purchase uuid        NOT NULL,
    next_seq       bigint[]    NOT NULL,
    last_offset    bigint[]    NOT NULL,
    last_seq       bigint[]    NOT NULL,
    written_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, round),
    CHECK (cardinality(next_seq) = cardinality(last_offset)
           AND cardinality(next_seq) = cardinality(last_seq))
);
