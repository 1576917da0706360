"""The job store's atomic changes, as Lua run inside Redis.

Every change of status compares ranks (queued 0 < running 1 < terminal 2) inside Redis, so two
writers can never move a job backwards or end it twice. A job's keys come from `shared.keys.for_job`
in this order: KEYS[1] record, [2] waiting (submit order), [3] the tenant's waiting set, [4] the
waiting set of its compatibility key, [5] service counters, [6] its class's run order (`ready`),
[7] running jobs by lease, [8] its class's fair-queue state, [9] jobs whose ending is not yet concluded,
[10] its class's tenants by finish tag, [11] its scoring batch (batch rows only). A job that ends leaves the waiting sets, counts in the
service counters and, for a batch row, in its batch's `ended`/`failed` counts, and joins the jobs to
conclude (manifest, webhook, batch step: `shared.jobs.lifecycle.conclude`): all in the same step as
its status, so no count is lost or doubled and no ending is forgotten by a process that dies.

Every script is safe to run twice: Redis may run a command whose reply is then lost, and the client
sends it again. Each step that changes a job carries a token that it records with its change (`step`,
or the claim's owner); a second run that finds its own token answers what the first run did. (PROGRESS
run twice publishes one more progress event; MISSING_TURNS answers 0 and leaves the turns to its next
check: both harmless.)

The run order is start-time fair queuing per priority class: a job's start tag is the later of the
class's virtual time and the finish tag of its tenant's previous job, which finishes `rows / weight`
later. Jobs run in start-tag order, so a tenant that queues thousands of jobs gets its share while
another tenant's single job starts next; the virtual time moves to the start tag of each job claimed.
"""

# Shared by the scripts below. ARGV of a script of one job starts with its id and its events channel.
_LIB = """
local RANKS = {queued=0, running=1, succeeded=2, failed=2, canceled=2}
local function ready_member(seq, id)  -- shared.keys.ready_member
  return string.format('%016d', seq) .. ':' .. id
end
-- Seconds until a job with `ahead` jobs before it starts: (ahead + 1) × the recent median job time ÷
-- the ready workers; '' when unknown (no recent job, no ready worker). A string: Redis would truncate a number.
local function eta(ahead, durations, workers, now)
  if ahead < 0 then return '' end
  local ready = redis.call('ZCOUNT', workers, now, '+inf')
  local recent = redis.call('LRANGE', durations, 0, 99)
  if ready == 0 or #recent == 0 then return '' end
  local v = {}
  for i, x in ipairs(recent) do v[i] = tonumber(x) end
  table.sort(v)
  return string.format('%.2f', (ahead + 1) * v[math.floor(#v / 2) + 1] / ready)
end
local function unqueue(id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZREM', KEYS[6], ready_member(tonumber(redis.call('HGET', KEYS[1], 'seq') or '0'), id))
end
local function publish(channel, event)
  local n = redis.call('HINCRBY', KEYS[1], 'events', 1)
  event['id'] = n
  redis.call('PUBLISH', channel, cjson.encode(event))
end
local function ended(status, stat, ttl)
  redis.call('HINCRBY', KEYS[5], stat, 1)
  redis.call('ZREM', KEYS[7], ARGV[1])
  if KEYS[11] and redis.call('EXISTS', KEYS[11]) == 1 then  -- never revive an expired batch without a TTL
    redis.call('HINCRBY', KEYS[11], 'ended', 1)
    if status == 'failed' then redis.call('HINCRBY', KEYS[11], 'failed', 1) end
  end
  redis.call('ZADD', KEYS[9], redis.call('TIME')[1], ARGV[1])  -- to conclude: by its ender, else the sweeper
  redis.call('EXPIRE', KEYS[1], ttl)
end
"""

# KEYS: the job's keys (1-10), then [11] the tenant's job index, [12] the submit sequence, [13] the
# broker's list of the inference queue, [14] its Idempotency-Key (or the record again: none), [15] the
# interactive ready set, [16] recent job durations, [17] ready workers. ARGV: id, tenant index cap,
# tenant, share (rows / weight), the job's turn (a broker message), the Idempotency-Key's value and TTL,
# the reservation it replaces, the queue's cap and the tenant's (0: none), now, field/value pairs…
# Answers {seq, jobs ahead of it (-1: started), its ETA ('' unknown)}, or {0, the cap it hit}: what the
# submit's answer says, in the same round trip. A second run finds the record and answers as the first.
# The key names the job only while it is free or still our reservation.
CREATE = (
    _LIB
    + """
local function ahead(seq)  -- jobs that start before it: its rank, behind every interactive job if bulk
  local rank = redis.call('ZRANK', KEYS[6], ready_member(seq, ARGV[1]))
  if not rank then return -1 end
  if KEYS[15] ~= KEYS[6] then rank = rank + redis.call('ZCARD', KEYS[15]) end
  return rank
end
local function answer(seq)
  local n = ahead(seq)
  return {seq, n, eta(n, KEYS[16], KEYS[17], ARGV[11])}
end
if redis.call('EXISTS', KEYS[1]) == 1 then return answer(tonumber(redis.call('HGET', KEYS[1], 'seq'))) end
-- The caps are checked in the step that queues: concurrent submits cannot all pass a check made before.
if tonumber(ARGV[9]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[9]) then return {0, 'queue_full', ''} end
if tonumber(ARGV[10]) > 0 and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[10]) then
  return {0, 'tenant_queue_full', ''}
end
redis.call('HINCRBY', KEYS[5], 'submitted', 1)
local seq = redis.call('INCR', KEYS[12])
local v = tonumber(redis.call('HGET', KEYS[8], 'v') or '0')
local f = tonumber(redis.call('ZSCORE', KEYS[10], ARGV[3]) or '0')
local start = math.max(v, f)
redis.call('ZADD', KEYS[10], start + tonumber(ARGV[4]), ARGV[3])
redis.call('HDEL', KEYS[8], 't:' .. ARGV[3])  -- a finish tag kept by an earlier release: finish_tags has it now
redis.call('HSET', KEYS[1], 'seq', seq, 'tag', tostring(start), unpack(ARGV, 12))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('ZADD', KEYS[6], start, ready_member(seq, ARGV[1]))  -- ties: the older first
redis.call('ZADD', KEYS[11], 0, ARGV[1])
local n = redis.call('ZCARD', KEYS[11])
local cap = tonumber(ARGV[2])
if n > cap then redis.call('ZREMRANGEBYRANK', KEYS[11], 0, n - cap - 1) end
if ARGV[5] ~= '' then redis.call('LPUSH', KEYS[13], ARGV[5]) end  -- (no turn: a record for tests)
if ARGV[6] ~= '' then
  local held = redis.call('GET', KEYS[14])
  if not held or held == ARGV[8] then redis.call('SET', KEYS[14], ARGV[6], 'EX', tonumber(ARGV[7])) end
end
return answer(seq)
"""
)

# ARGV: id, channel, new status, owner ('' = anyone), ttl, stats field, step token, field/value pairs…
TRANSITION = (
    _LIB
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', ''} end
if redis.call('HGET', KEYS[1], 'step') == ARGV[7] then return {'ok', redis.call('HGET', KEYS[1], 'step_from')} end
if RANKS[ARGV[3]] <= RANKS[cur] then return {'refused', cur} end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[4] then return {'refused', cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'step', ARGV[7], 'step_from', cur, unpack(ARGV, 8))
unqueue(ARGV[1])
publish(ARGV[2], {type='status', status=ARGV[3]})
if RANKS[ARGV[3]] == 2 then ended(ARGV[3], ARGV[6], tonumber(ARGV[5])) end
return {'ok', cur}
"""
)

# ARGV: id, channel, owner (new for each claim: its step token), now, lease_until, max_attempts, ttl,
# error json (when attempts run out). Returns {outcome, value, fields…}: the whole record when claimed.
CLAIM = (
    _LIB
    + """
local function whole(outcome, value)
  local out = {outcome, value}
  for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = v end
  return out
end
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', '0'} end
if redis.call('HGET', KEYS[1], 'step') == ARGV[3] then  -- this claim ran already
  if st == 'running' then return whole('claimed', redis.call('HGET', KEYS[1], 'attempts')) end
  if st == 'failed' then return {'exhausted', redis.call('HGET', KEYS[1], 'attempts')} end
end
if st == 'running' then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if lease > tonumber(ARGV[4]) then return {'owned', tostring(lease - tonumber(ARGV[4]))} end
elseif st ~= 'queued' then
  return {'terminal', st}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
unqueue(ARGV[1])
if attempts > tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[8], 'finished_at', ARGV[4], 'owner', '', 'step', ARGV[3])
  publish(ARGV[2], {type='status', status='failed'})
  ended('failed', 'finished:failed:worker_lost', tonumber(ARGV[7]))
  return {'exhausted', tostring(attempts)}
end
if st == 'queued' then  -- the class's virtual time moves to the start tag of the job it runs
  local tag = tonumber(redis.call('HGET', KEYS[1], 'tag') or '0')
  if tag > tonumber(redis.call('HGET', KEYS[8], 'v') or '0') then
    redis.call('HSET', KEYS[8], 'v', tostring(tag))
    -- A tenant whose finish tag the virtual time has passed starts at the virtual time anyway: forgotten.
    redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', tag)
  end
  -- Nothing of the class waits: every tenant's next job starts at the virtual time, none is behind.
  if redis.call('ZCARD', KEYS[6]) == 0 then redis.call('DEL', KEYS[10]) end
end
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[3], 'lease_until', ARGV[5], 'step', ARGV[3])
redis.call('ZADD', KEYS[7], ARGV[5], ARGV[1])
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[4]) end
publish(ARGV[2], {type='status', status='running'})
return whole('claimed', tostring(attempts))
"""
)

# KEYS: running jobs, ready:interactive, ready:bulk. ARGV: now. (`ready` members are `<seq>:<id>`.)
# The job a free worker should claim next: one whose lease lapsed (its worker is gone), else the
# first of the interactive class, else the first of the bulk class; nothing when none waits.
NEXT = """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #lapsed > 0 then return lapsed[1] end
for i = 2, 3 do
  local top = redis.call('ZRANGE', KEYS[i], 0, 0)
  if #top > 0 then return string.match(top[1], ':(.*)$') end  -- shared.keys.ready_member: <seq>:<id>
end
return false
"""

# ARGV: id, channel, now, ttl, step token. Returns 'canceled' (it was queued), 'requested' (running),
# 'missing' or 'ended' (it had ended already: nothing changes).
CANCEL = (
    _LIB
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'canceled' and redis.call('HGET', KEYS[1], 'step') == ARGV[5] then return 'canceled' end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[3], 'step', ARGV[5])
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

# Every job of a micro-batch in one call. KEYS: running jobs, then each job's record. ARGV: lease_until
# ('' to leave the lease: a step between two reports only asks for cancels), step ('' to leave
# progress), total, then id, channel, owner of each job. Returns each job's cancel flag (1 asked, 0
# not), or -1 for a job that is no longer this owner's.
PROGRESS = """
local out = {}
for i = 2, #KEYS do
  local rec, id, channel, owner = KEYS[i], ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  if redis.call('HGET', rec, 'status') ~= 'running' or redis.call('HGET', rec, 'owner') ~= owner then
    out[i - 1] = -1
  else
    if ARGV[1] ~= '' then
      redis.call('HSET', rec, 'lease_until', ARGV[1])
      redis.call('ZADD', KEYS[1], 'XX', ARGV[1], id)
    end
    if ARGV[2] ~= '' then
      redis.call('HSET', rec, 'progress_step', ARGV[2], 'progress_total', ARGV[3])
      local n = redis.call('HINCRBY', rec, 'events', 1)
      redis.call('PUBLISH', channel, cjson.encode({id=n, type='progress', step=tonumber(ARGV[2]), total=tonumber(ARGV[3])}))
    end
    out[i - 1] = tonumber(redis.call('HGET', rec, 'cancel_requested') or '0')
  end
end
return out
"""

# KEYS: waiting jobs, the broker's list of turns, the last check. ARGV: how often to check. Every
# waiting job needs a turn in the broker's list; a turn that Celery dropped (a task that raised is
# rejected without requeue) or that a test deleted leaves a job without one. A shortfall seen at two
# checks in a row is real (a turn taken but not yet claimed lasts milliseconds): answered with the
# smaller of the two counts, and the turns it asks for make up for it.
MISSING_TURNS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6  -- Redis' clock: workers' clocks may differ
local at = tonumber(redis.call('HGET', KEYS[3], 'at') or '0')
if now - at < tonumber(ARGV[1]) then return 0 end
local short = redis.call('ZCARD', KEYS[1]) - redis.call('LLEN', KEYS[2])
if short < 0 then short = 0 end
local before = tonumber(redis.call('HGET', KEYS[3], 'short') or '0')
redis.call('HSET', KEYS[3], 'at', tostring(now), 'short', short)
return math.min(short, before)
"""

# KEYS: record, running jobs. ARGV: id, owner ('' = whoever holds it), 1 to run it alone from now on.
# Only while the job runs: its lease drops now (a read and a write in one step), so it may be claimed again.
DROP_LEASE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', '0')
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'solo', '1') end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
"""

# KEYS: record, jobs to conclude, its tombstone. ARGV: id, 1 to conclude whatever happened. A job
# deleted while its ending was concluded: 'erase' (the caller erases it, then concludes with 1); else
# it leaves the jobs to conclude.
CONCLUDED = """
if ARGV[2] ~= '1' and (redis.call('HGET', KEYS[1], 'erase') or redis.call('EXISTS', KEYS[3]) == 1) then
  return 'erase'
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 'done'
"""

# KEYS: jobs to conclude. ARGV: seconds since they ended, how many. Those due (by Redis' clock, the one
# their status change used), each pushed back to now.
DUE_TO_CONCLUDE = """
local now = tonumber(redis.call('TIME')[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], now, id) end
return due
"""

# KEYS: recent job durations, ready workers. ARGV: jobs ahead, now. The ETA of a queued job (see `eta`).
ETA = (
    _LIB
    + """
return eta(tonumber(ARGV[1]), KEYS[1], KEYS[2], ARGV[2])
"""
)
