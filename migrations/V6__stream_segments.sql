-- Stream segments (a repartition, ARCHITECTURE.md "Stream segments"): a stream may continue
-- another. Opening it seals the other in the same statement: the sealing transaction's own id
-- `s` becomes the old segment's `ends_before` and the new one's `starts_at`, so every purchase
-- belongs to exactly one segment by its transaction id (below `s`: the old one; above: the new
-- one). A round whose snapshot predates the seal publishes only rows below its xmin, which is at
-- most `s`; a round that sees the seal stops at `s`. `topic` is where a stream publishes, recorded
-- at its opening, so that any replica can finish a sealed segment or relay its successor.
-- All nullable without defaults: metadata only.
ALTER TABLE relay_streams ADD COLUMN IF NOT EXISTS topic text;
ALTER TABLE relay_streams ADD COLUMN IF NOT EXISTS follows uuid REFERENCES relay_streams (stream_id);
ALTER TABLE relay_streams ADD COLUMN IF NOT EXISTS starts_at xid8;
ALTER TABLE relay_streams ADD COLUMN IF NOT EXISTS ends_before xid8;
-- A segment has at most one successor.
CREATE UNIQUE INDEX IF NOT EXISTS relay_streams_one_successor ON relay_streams (follows);
