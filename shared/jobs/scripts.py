"""The job store's atomic changes, as Lua run inside Redis.

Every change of status compares ranks (queued 0 < running 1 < terminal 2) inside Redis, so two
writers can never move a job backwards or end it twice. A job's keys come from `shared.keys.for_job`
in this order: KEYS[1] record, [2] waiting (queue order), [3] the tenant's waiting set, [4] the
waiting set of its compatibility key, [5] service counters, [6] its scoring batch (batch rows only).
A job that ends leaves the waiting sets, counts in the service counters and, for a batch row, in its
batch's `ended`/`failed` counts: all in the same step as its status, so no count is lost or doubled.
"""

# Shared by the scripts below. ARGV of each script starts with the job id and its events channel.
_LIB = """
local RANKS = {queued=0, running=1, succeeded=2, failed=2, canceled=2}
local function unqueue(id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
end
local function publish(channel, event)
  local n = redis.call('HINCRBY', KEYS[1], 'events', 1)
  event['id'] = n
  redis.call('PUBLISH', channel, cjson.encode(event))
end
local function ended(status, stat, ttl)
  redis.call('HINCRBY', KEYS[5], stat, 1)
  if KEYS[6] and redis.call('EXISTS', KEYS[6]) == 1 then  -- never revive an expired batch without a TTL
    redis.call('HINCRBY', KEYS[6], 'ended', 1)
    if status == 'failed' then redis.call('HINCRBY', KEYS[6], 'failed', 1) end
  end
  redis.call('EXPIRE', KEYS[1], ttl)
end
"""

# KEYS: record, waiting, tenant's job index, sequence, tenant waiting, compatible waiting, counters.
# ARGV: id, tenant index cap, field/value pairs…
CREATE = """
redis.call('HINCRBY', KEYS[7], 'submitted', 1)
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[5], seq, ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[6], seq, ARGV[1])
local n = redis.call('ZCARD', KEYS[3])
local cap = tonumber(ARGV[2])
if n > cap then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, n - cap - 1) end
return seq
"""

# ARGV: id, channel, new status, owner ('' = anyone), ttl, stats field, field/value pairs…
TRANSITION = (
    _LIB
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', ''} end
if RANKS[ARGV[3]] <= RANKS[cur] then return {'refused', cur} end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[4] then return {'refused', cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[3], unpack(ARGV, 7))
unqueue(ARGV[1])
publish(ARGV[2], {type='status', status=ARGV[3]})
if RANKS[ARGV[3]] == 2 then ended(ARGV[3], ARGV[6], tonumber(ARGV[5])) end
return {'ok', cur}
"""
)

# ARGV: id, channel, owner, now, lease_until, max_attempts, ttl, error json (when attempts run out)
# Returns {outcome, value, fields…}: the whole record when claimed.
CLAIM = (
    _LIB
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', '0'} end
if st == 'running' then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if lease > tonumber(ARGV[4]) then return {'owned', tostring(lease - tonumber(ARGV[4]))} end
elseif st ~= 'queued' then
  return {'terminal', st}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
unqueue(ARGV[1])
if attempts > tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[8], 'finished_at', ARGV[4], 'owner', '')
  publish(ARGV[2], {type='status', status='failed'})
  ended('failed', 'finished:failed:worker_lost', tonumber(ARGV[7]))
  return {'exhausted', tostring(attempts)}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[3], 'lease_until', ARGV[5])
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[4]) end
publish(ARGV[2], {type='status', status='running'})
local out = {'claimed', tostring(attempts)}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = v end
return out
"""
)

# ARGV: id, channel, now, ttl. Returns 'canceled' (it was queued), 'requested' (running), 'missing' or
# 'ended' (it had ended already: nothing changes).
CANCEL = (
    _LIB
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[3])
  unqueue(ARGV[1])
  publish(ARGV[2], {type='status', status='canceled'})
  ended('canceled', 'finished:canceled:', tonumber(ARGV[4]))
  return 'canceled'
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'requested'
end
return 'ended'
"""
)

# KEYS: record. ARGV: id, channel, owner, lease_until, step ('' to leave progress), total.
# Returns the cancel flag (1 asked, 0 not), or -1 when the job is no longer this owner's.
PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[3] then return -1 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'progress_step', ARGV[5], 'progress_total', ARGV[6])
  local n = redis.call('HINCRBY', KEYS[1], 'events', 1)
  redis.call('PUBLISH', ARGV[2], cjson.encode({id=n, type='progress', step=tonumber(ARGV[5]), total=tonumber(ARGV[6])}))
end
return tonumber(redis.call('HGET', KEYS[1], 'cancel_requested') or '0')
"""

# KEYS: record. ARGV: owner ('' = whoever holds it), fields to set…  Only while the job runs.
# (A lease dropped, or a job marked to run alone: read and write in one step.)
IF_RUNNING = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# KEYS: the job's waiter slot. ARGV: this message's waiter token ('' = none), the next token, ttl ms.
WAIT_TURN = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
