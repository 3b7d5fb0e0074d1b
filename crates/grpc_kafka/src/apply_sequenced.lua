#!lua
-- Counts one partition's records by sequence number, atomically (COUNT_BY=sequence).
--
-- KEYS[1] the partition's marks hash (fields 'next' and 'hint'), then KEYS[1 + i] the total of
-- record i's user. Every key carries the hash tag of the (stream, partition): one slot.
-- ARGV: triples (seq, offset, amount_cents), one per record, in the partition's order.
--
-- A record counts only when its number is exactly the next one expected: lower is a copy
-- (dropped), higher is premature (not counted; the consumer reads on and, at the partition's
-- end, again from its start). The next number and the resume offset ('hint': after the last
-- record counted) are written with the totals, so they never disagree.
--
-- Returns {counted, copies, premature, next, highest premature seq or -1}.
local marks = KEYS[1]
local next = tonumber(redis.call('HGET', marks, 'next') or '0')
local hint = nil
local counted, copies, premature, highest = 0, 0, 0, -1
local records = #ARGV / 3
for i = 1, records do
  local seq = tonumber(ARGV[3 * i - 2])
  if seq < next then
    copies = copies + 1
  elseif seq == next then
    local total = KEYS[1 + i]
    redis.call('HINCRBY', total, 'cents', ARGV[3 * i])
    redis.call('HINCRBY', total, 'count', 1)
    next = next + 1
    hint = ARGV[3 * i - 1] + 1
    counted = counted + 1
  else
    premature = premature + 1
    if seq > highest then
      highest = seq
    end
  end
end
if counted > 0 then
  redis.call('HSET', marks, 'next', string.format('%d', next), 'hint', string.format('%d', hint))
end
return {counted, copies, premature, next, highest}
