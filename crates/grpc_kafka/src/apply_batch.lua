-- Applies one batch of purchase events and advances the partition offsets, atomically.
--
-- ARGV[1] key prefix, ARGV[2] offsets hash key, ARGV[3] fingerprints hash key, ARGV[4] dedupe
-- horizon in seconds, ARGV[5] number of partitions P, then P quadruples (partition, expected
-- stored next offset, new next offset, fingerprint of the partition's last record or '' for
-- none), then quadruples (purchase_id, user_id, bucket, amount_cents), one per event.
--
-- The offsets hash maps each partition to the next offset to apply; the fingerprints hash maps it
-- to the purchase id (hex) of the record just before that offset, so the consumer can tell a log
-- rewritten under the stored offset from the one it counted.
--
-- Offsets are compare-and-set: if any stored offset differs from what the consumer expects
-- (another consumer moved on, or Redis lost or rolled back data), nothing is written and the
-- stored offsets of EVERY partition of the batch are returned, {-1, p1, s1, p2, s2, ...}: the
-- consumer reads all of them again from there.
--
-- Dedupe: a purchase id already in its user's set for its hour (`bucket`, from the event's
-- created_at, which a republished event repeats) is skipped. Each set expires `horizon` seconds
-- after its last write, which bounds memory; ARCHITECTURE.md states the guarantee.
local prefix = ARGV[1]
local offsets_key = ARGV[2]
local fingerprints_key = ARGV[3]
local horizon = tonumber(ARGV[4])
local partitions = tonumber(ARGV[5])
local first = 6
local i = first
local refused = false
for _ = 1, partitions do
  local stored = redis.call('HGET', offsets_key, ARGV[i]) or '0'
  if stored ~= ARGV[i + 1] then
    refused = true
  end
  i = i + 4
end
if refused then
  local reply = {-1}
  i = first
  for _ = 1, partitions do
    reply[#reply + 1] = tonumber(ARGV[i])
    reply[#reply + 1] = tonumber(redis.call('HGET', offsets_key, ARGV[i]) or '0')
    i = i + 4
  end
  return reply
end
i = first
for _ = 1, partitions do
  redis.call('HSET', offsets_key, ARGV[i], ARGV[i + 2])
  if ARGV[i + 3] == '' then
    redis.call('HDEL', fingerprints_key, ARGV[i])
  else
    redis.call('HSET', fingerprints_key, ARGV[i], ARGV[i + 3])
  end
  i = i + 4
end
local applied = 0
local touched = {}
while i <= #ARGV do
  local purchase_id, user_id, bucket, cents = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local seen_key = prefix .. 'seen:' .. user_id .. ':' .. bucket
  if redis.call('SADD', seen_key, purchase_id) == 1 then
    local total_key = prefix .. 'total:' .. user_id
    redis.call('HINCRBY', total_key, 'cents', cents)
    redis.call('HINCRBY', total_key, 'count', 1)
    applied = applied + 1
  end
  touched[seen_key] = true
  i = i + 4
end
for seen_key in pairs(touched) do
  redis.call('EXPIRE', seen_key, horizon)
end
return {applied}
