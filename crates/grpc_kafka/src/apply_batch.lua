-- Applies one batch of purchase events and advances the partition offsets, atomically.
--
-- ARGV[1] key prefix, ARGV[2] offsets hash key, ARGV[3] number of partitions P,
-- then P triples (partition, expected stored next offset, new next offset),
-- then triples (purchase_id, user_id, amount_cents) for each event.
--
-- Offsets are compare-and-set: if any stored offset differs from what the consumer expects
-- (another consumer moved on, or Redis lost data), nothing is written and the stored offset is
-- returned so the consumer can seek. A purchase_id already in the user's set is skipped, so an
-- event published twice by the outbox is counted once.
local prefix = ARGV[1]
local offsets_key = ARGV[2]
local partitions = tonumber(ARGV[3])
local i = 4
for _ = 1, partitions do
  local stored = redis.call('HGET', offsets_key, ARGV[i]) or '0'
  if stored ~= ARGV[i + 1] then
    return {-1, tonumber(ARGV[i]), tonumber(stored)}
  end
  i = i + 3
end
i = 4
for _ = 1, partitions do
  redis.call('HSET', offsets_key, ARGV[i], ARGV[i + 2])
  i = i + 3
end
local applied = 0
while i <= #ARGV do
  local purchase_id, user_id, cents = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('SADD', prefix .. 'seen:' .. user_id, purchase_id) == 1 then
    local total_key = prefix .. 'total:' .. user_id
    redis.call('HINCRBY', total_key, 'cents', cents)
    redis.call('HINCRBY', total_key, 'count', 1)
    applied = applied + 1
  end
  i = i + 3
end
return {applied}
