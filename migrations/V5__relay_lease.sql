-- One relay publishes a stream at a time, for efficiency (correctness never depends on it: the
-- bookkeeping's compare-and-set keeps the numbers right when relays race). The replica holding
-- the lease relays and renews it; the others wait and take it over once it lapses (a replica
-- stopped, killed or frozen) or is given up (a graceful stop). Both columns are nullable without
-- a default: metadata only.
ALTER TABLE relay_streams ADD COLUMN IF NOT EXISTS leader uuid;
ALTER TABLE relay_streams ADD COLUMN IF NOT EXISTS lease_until timestamptz;
