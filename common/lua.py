"""Server-side scripts that make a job's state changes atomic and fenced by attempt.

A job can have two attempts alive at once: a worker cut off from Redis for longer than its lease
goes on generating while another worker runs the job again. Every write of an attempt therefore
checks, in the same script, that the record still names that attempt; the loser's writes are
refused and it learns it lost. So a job gets one result and one closing event, whatever races.

Each script returns a status string (or a list of losers) for the caller to act on.
"""

from __future__ import annotations

from common.events import EventType

_FINISHED = "s == 'succeeded' or s == 'failed' or s == 'cancelled'"

# KEYS: job, running set, starts set. ARGV: job id, attempt, worker id, model, now (epoch s),
# drain window (s).
START = f"""
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 'missing' end
if {_FINISHED} then return 'finished' end
if tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') > tonumber(ARGV[2]) then
  return 'superseded'
end
redis.call('HSET', KEYS[1], 'status', 'running', 'attempt', ARGV[2], 'worker', ARGV[3],
  'model', ARGV[4], 'started_at', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[5] - ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[6])
return 'ok'
"""

# One decode step's tokens for several jobs. KEYS: job 1, events 1, job 2, events 2, ...
# ARGV: maxlen, ttl, then per job: attempt, token count, then that many (index, payload) pairs.
# The record's `tokens` counts the token events in the stream: a token whose index is below it
# is already there (a retried write that had gone through after all) and is skipped, so a
# retry never repeats a token. Returns the 1-based numbers of the jobs whose attempt lost (their
# tokens were dropped).
APPEND = f"""
local at, lost = 3, {{}}
for i = 1, #KEYS, 2 do
  local attempt, n = ARGV[at], tonumber(ARGV[at + 1])
  at = at + 2
  local rec = redis.call('HMGET', KEYS[i], 'status', 'attempt', 'tokens')
  if rec[1] == 'running' and rec[2] == attempt then
    local have = tonumber(rec[3] or '0')
    for j = 0, n - 1 do
      local index = tonumber(ARGV[at + 2 * j])
      if index >= have then
        redis.call('XADD', KEYS[i + 1], 'MAXLEN', '~', ARGV[1], '*',
          'type', '{EventType.token.value}', 'data', ARGV[at + 2 * j + 1])
        have = index + 1
      end
    end
    redis.call('HSET', KEYS[i], 'tokens', have)
    -- A job whose worker vanished must not leave its stream behind forever.
    redis.call('EXPIRE', KEYS[i + 1], ARGV[2])
  else
    table.insert(lost, (i + 1) / 2)
  end
  at = at + 2 * n
end
return lost
"""

# The final record and the closing event, once. KEYS: job, events, running set, lease, queue,
# arq payload, arq try count. ARGV: job id, attempt, ttl, event type, event data, orphan
# ("1": only if no lease is held, and take the job off its queue), finished_at, then the
# record's fields and values. Replaying the same write (a retry of one that had gone through
# after all) answers 'ok' again: its `finished_at` is already the record's. The job leaves its
# API key's in-flight set, which the record names (`in_flight`): the caller does not know whose
# job it is, and genq's Redis is never a cluster, so a key read from the record is fine here.
FINISH = f"""
local rec = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'finished_at')
local s = rec[1]
if not s then return 'missing' end
if {_FINISHED} then
  if rec[2] == ARGV[2] and rec[3] == ARGV[7] then return 'ok' end
  return 'finished'
end
if (rec[2] or '0') ~= ARGV[2] then return 'superseded' end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[4]) == 1 then return 'held' end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
redis.call('XADD', KEYS[2], '*', 'type', ARGV[4], 'data', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[6] == '1' then
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('DEL', KEYS[6], KEYS[7])
end
local in_flight = redis.call('HGET', KEYS[1], 'in_flight')
if in_flight then redis.call('SREM', in_flight, ARGV[1]) end
return 'ok'
"""

# An attempt hands its job back to the queue (its worker is shutting down). KEYS: job, running
# set. ARGV: job id, attempt.
HAND_BACK = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if rec[1] ~= 'running' or rec[2] ~= ARGV[2] then return 'superseded' end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('ZREM', KEYS[2], ARGV[1])
return 'ok'
"""

# The reaper's look at one started job. KEYS: job, lease, running set, queue. ARGV: job id,
# GENQ_MAX_TRIES. 'held': a live worker has it; 'requeued': its worker is gone and it waits on
# the queue for another; 'fail': it must fail (out of tries, or its queue entry is gone);
# 'settled'/'gone': it had already ended or expired, and left the running set.
REAP = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'held' end
local rec = redis.call('HMGET', KEYS[1], 'status', 'attempt')
local s = rec[1]
if not s then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 'gone'
end
if s ~= 'running' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 'settled'
end
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) or tonumber(rec[2] or '0') >= tonumber(ARGV[2]) then
  return 'fail'
end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('ZREM', KEYS[3], ARGV[1])
return 'requeued'
"""

# A worker's heartbeat renews the leases of the jobs it holds. KEYS: n leases, then the n jobs'
# records. ARGV: lease (ms), then each job's attempt ('' where the worker has not started it).
# A lease that lapsed (Redis was away longer than the lease) is taken again if the record still
# names this attempt; otherwise the job is lost to this worker. Returns the 1-based numbers of
# the lost jobs.
RENEW = """
local n, lost = #KEYS / 2, {}
for i = 1, n do
  if redis.call('PEXPIRE', KEYS[i], ARGV[1]) == 0 then
    local rec = redis.call('HMGET', KEYS[n + i], 'status', 'attempt')
    local ours = ARGV[i + 1] ~= '' and rec[1] == 'running' and rec[2] == ARGV[i + 1]
    if not (ours and redis.call('SET', KEYS[i], '1', 'PX', ARGV[1], 'NX')) then
      table.insert(lost, i)
    end
  end
end
return lost
"""

# A client lets go of a job it shares with others (dedup). `owner:<principal>` counts the holds
# of each API key, so that a key lets go only of its own. KEYS: job. ARGV: owner field. Returns
# the holders left (-1: no record).
RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') <= 0 then
  return tonumber(redis.call('HGET', KEYS[1], 'holders') or '0')
end
redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
return redis.call('HINCRBY', KEYS[1], 'holders', -1)
"""

# An identical request attaches to a job (dedup, the result cache): its API key may now see it,
# and, while the job runs, holds it. KEYS: job. ARGV: owner field, "1" to hold. Returns 0 when
# the record is gone (never recreated without its TTL).
SHARE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[1], 'holders', 1)
  redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
else
  redis.call('HSETNX', KEYS[1], ARGV[1], 0)
end
return 1
"""

# An API key's concurrency limit: add new jobs to its in-flight set unless that would pass the
# limit. Jobs whose record is gone or ended leave the set first (FINISH takes them out too; this
# heals a set after a record expired unseen). A job being submitted right now has no record yet
# and is dropped by a concurrent admission of the same key: the set may undercount for that
# instant, never overcount. KEYS: in-flight set. ARGV: limit, job key prefix, then the new ids.
# Returns {1, jobs in flight after} when admitted, {0, jobs in flight} when refused.
ADMIT = f"""
local n = #ARGV - 2
local limit = tonumber(ARGV[1])
if redis.call('SCARD', KEYS[1]) + n > limit then
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local s = redis.call('HGET', ARGV[2] .. id, 'status')
    if not s or {_FINISHED} then redis.call('SREM', KEYS[1], id) end
  end
  local have = redis.call('SCARD', KEYS[1])
  if have + n > limit then return {{0, have}} end
end
redis.call('SADD', KEYS[1], unpack(ARGV, 3))
return {{1, redis.call('SCARD', KEYS[1])}}
"""
