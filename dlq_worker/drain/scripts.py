"""The Lua scripts the Redis side runs (each an atomic step), the keys they keep, and
the parsing of what they answer. Their callers are in source.py."""

from __future__ import annotations

import json
import re
from typing import Any

#: Moves one entry to its dead-letter stream and out of the DLQ, in one atomic step.
#: It acts only while the entry is still pending on this consumer, so an entry
#: another worker claimed (and will decide about itself) is never parked twice; an entry
#: deleted from the stream while we held it is parked from what we hold (returns 2).
#: Each park leaves a mark (KEYS[3], kept PARK_MARK_SECONDS) naming who parked it: an
#: entry already parked is never parked again from memory, whether our own reply was
#: lost (returns 3: ours) or another consumer claimed and parked it first (returns 4).
_PARK = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then
  -- Not pending on us. Still in the stream: another worker has it.
  if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) > 0 then return 0 end
  -- Gone from it: parked already (by us, a reply lost; or by whoever claimed it), or
  -- trimmed while we held it, and then what we hold is the only copy left.
  local by = redis.call('GET', KEYS[3])
  if by then
    if by == ARGV[3] then return 3 end
    return 4
  end
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
  redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
  return 2
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

#: How long a park's mark is kept (see _PARK): far past any retry of a lost reply and
#: any consumer still working on an entry claimed from it.
PARK_MARK_SECONDS = 7 * 24 * 3600
PARK_MARK_PREFIX = "dlq-worker:parked:"


def park_mark(stream: str, entry_id: str) -> str:
    return f"{PARK_MARK_PREFIX}{stream}:{entry_id}"


#: Removes a consumer only if it holds nothing, checked atomically: XGROUP
#: DELCONSUMER drops the consumer's pending entries, which would strand them.
_DELETE_IDLE_CONSUMER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


#: XCLAIM one entry to ourselves only while it is still pending on us. XCLAIM silently
#: drops from the PEL an ID whose entry was deleted (trimmed) from the stream; the script
#: tells that case apart: ``{'lost'}`` means it was pending on us and is now gone.
_CLAIM_OWN = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return {} end
local r
if ARGV[4] == '1' then
  r = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3])
else  -- not an attempt: the delivery count stays as it is
  r = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'RETRYCOUNT', p[1][4])
end
if #r == 0 then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  return {'lost'}
end
return r
"""

#: Takes over entries from a dead consumer (ARGV[4]), each only while it is still pending
#: on that consumer and idle at least ARGV[3] ms, in one atomic step per call: two replicas
#: taking over at once, or the owner acknowledging meanwhile, never see an entry twice.
#: XCLAIM drops from the PEL an ID whose entry was deleted: those come back as lost, once.
_CLAIM_FROM = """
local claimed, lost = {}, {}
for i = 5, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], ARGV[i], ARGV[i], 1,
                       ARGV[4])
  if #p > 0 then
    local r = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[i])
    if #r == 0 then
      lost[#lost + 1] = ARGV[i]
      redis.call('RPUSH', KEYS[2], ARGV[i])
    else
      claimed[#claimed + 1] = r[1]
    end
  end
end
return {claimed, lost}
"""

#: Resets the idle time of entries we hold (XCLAIM JUSTID), returning the IDs that were
#: pending on us but whose entry is gone: XCLAIM drops those from the PEL without a word.
_TOUCH = """
local lost = {}
for i = 2, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 then
    local r = redis.call('XCLAIM', KEYS[1], ARGV[1], p[1][2], 0, ARGV[i], 'JUSTID')
    if #r == 0 then
      lost[#lost + 1] = ARGV[i]
      redis.call('RPUSH', KEYS[2], ARGV[i])
    end
  end
end
-- and the stream's last ID now: entries seen present here were present up to it
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then return {lost, info[i + 1]} end
end
return {lost, false}
"""

#: XAUTOCLAIM, recording in KEYS[2] the IDs it drops from the PEL (their entries deleted).
_AUTOCLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT',
                     ARGV[5])
local gone = r[3] or {}
for i = 1, #gone do redis.call('RPUSH', KEYS[2], gone[i]) end
return r
"""

#: Every pending ID Redis drops in one of our claims (its entry deleted: see each script
#: above) is also pushed, in the same step, onto a list of ours: if the reply is lost on
#: the wire, the next claim still hears of it. Counted IDs are then removed (idempotent).
DELETED_PREFIX = "dlq-worker:deleted-pending:"

_FORGET = """
for i = 1, #ARGV do redis.call('LREM', KEYS[1], 1, ARGV[i]) end
return 1
"""

#: A dead or removed consumer's list becomes ours, in one step.
_ADOPT = """
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
for i = 1, #ids do redis.call('RPUSH', KEYS[2], ids[i]) end
redis.call('DEL', KEYS[1])
return #ids
"""


_PLAIN_STRING = re.compile(r'((?:[^"\\]|\\.)*)"')
_ESCAPED_STRING = re.compile(r'((?:[^\\]|\\\\)*)\\"')


def _correlation(raw: Any) -> str:
    """The correlation_id that _CORRELATIONS found the start of, "" if none or unsure."""
    if not raw:
        return ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    kind, rest = text[:1], text[1:]
    if kind == "1":
        m = _PLAIN_STRING.match(rest)
        body = m.group(1) if m else None
    else:  # inside a JSON string: one level of escaping more
        m = _ESCAPED_STRING.match(rest)
        body = m.group(1).replace("\\\\", "\\") if m else None
    if body is None:
        return ""
    try:
        return str(json.loads('"' + body + '"'))
    except ValueError:
        return ""


def deleted_key(group: str, consumer: str, stream: str) -> str:
    return f"{DELETED_PREFIX}{group}:{consumer}:{stream}"

#: Where each stream's count of entries trimmed unread (since its group was created) lives,
#: in the DLQ's database: a hash, outside the stream prefixes.
LOST_KEY = "dlq-worker:trimmed-unread"
#: The group that had read furthest, and its gone-unread figure, at the last count (see
#: watch/monitor.py): restarts with the group, like the count.
LEADER_KEY = "dlq-worker:trimmed-unread:leader"
#: Per stream, a sorted set of the copies the platform's retry worker made of records a
#: replica of ours holds in memory (it copies an entry it failed to write to the tail, then
#: deletes the original): "original ID|stream's last ID when seen deleted", scored by the
#: time before which the copy cannot be (see _EXPECT_COPIES). Such a copy, trimmed before
#: any group read it, is no lost record: its record is written (or parked) from memory.
COPIES_PREFIX = "dlq-worker:copies-in-flight:"
#: Per stream, how many entries gone unread the count did not take as certain losses:
#: taken for such copies, or gone while another group read past the leader between two
#: counts (then a deletion cannot be told from trimming). Reported as uncertain.
UNCERTAIN_KEY = "dlq-worker:trimmed-unread:uncertain"
#: Per stream, a hash of every group's gone-unread figure at the last count: at a change
#: of leader, what was trimmed since raised both the old and the new leader's figures.
FIGURES_PREFIX = "dlq-worker:trimmed-unread:figures:"
#: Per stream, by group, the highest gone-unread figure our group had just before one of
#: its reads, taken where trimming had passed its position (see _READ_BOUNDED): Valkey 8.1
#: re-estimates a group's entries-read at that read as if the trimmed entries had been read,
#: so after it the figure no longer shows them. The count takes the higher of the two.
BEFORE_READ_PREFIX = "dlq-worker:trimmed-unread:before-read:"

#: Lua: whether stream ID a comes before b (the loss scripts compare positions).
BEFORE = """
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then return false end
  if tonumber(am) ~= tonumber(bm) then return tonumber(am) < tonumber(bm) end
  return tonumber(as) < tonumber(bs)
end
"""

#: Lua: a field of an XINFO reply (a flat name/value list), false when absent.
GET = """
local function get(t, name)
  for i = 1, #t, 2 do if t[i] == name then return t[i + 1] end end
  return false
end
"""


#: Lua: record(ids, i, floor, marks) records as copies in flight (KEYS[2], the stream's
#: COPIES_PREFIX set) the IDs ids[i..] of entries of ours Redis says are deleted from the
#: stream (KEYS[1]) while another group (not ARGV[1], our group: another_group()) reads it:
#: the platform's retry worker copies an entry it failed to write to the tail, then deletes
#: the original. ``marks``: the stream's max-deleted-entry-id and last ID (stream_marks()).
#: Only IDs at or below max-deleted-entry-id: one above it was trimmed (XDEL sets it,
#: trimming does not), and trimming makes no copy. Each is scored by its lower bound, the
#: later of its own ID and ``floor`` (the stream's last ID when it was last seen present,
#: '' unknown: its copy came after both), and carries the stream's last ID now (its copy is
#: no later). The number recorded.
_RECORD_COPIES = BEFORE + GET + """
local function another_group()
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    if get(g, 'name') ~= ARGV[1] then return true end
  end
  return false
end
local function stream_marks()  -- {max-deleted-entry-id, last-generated-id}
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  return {get(info, 'max-deleted-entry-id'), get(info, 'last-generated-id')}
end
local function record(ids, from, floor, marks)
  local deleted, top = marks[1], marks[2]
  if not deleted or not top then return 0 end
  local n = 0
  for i = from, #ids do
    if not before(deleted, ids[i]) then
      local low = floor
      if low == '' or before(low, ids[i]) then low = ids[i] end
      redis.call('ZADD', KEYS[2], tonumber(string.match(low, '^(%d+)')), ids[i] .. '|' .. top)
      n = n + 1
    end
  end
  if redis.call('ZCARD', KEYS[2]) > 100000 then
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -100001)
  end
  if n > 0 then redis.call('PEXPIRE', KEYS[2], 604800000) end
  return n
end
"""

#: Records the copies in flight of entries we hold in memory that Redis says are deleted
#: (see _RECORD_COPIES; ARGV[2] the stream's last ID when they were last seen present,
#: ARGV[3..] their IDs). The number recorded.
_EXPECT_COPIES = _RECORD_COPIES + """
if not another_group() then return 0 end
return record(ARGV, 3, ARGV[2], stream_marks())
"""

#: XACK and XDEL of entries written or parked (KEYS[1] the stream, KEYS[2] its
#: COPIES_PREFIX set; ARGV[1] our group, ARGV[2] '1' to look for copies, ARGV[3..] the
#: IDs), one atomic step, so that XLEN is the true backlog. While another group reads the
#: stream, one of them may be deleted already, after its last touch: the platform's copy
#: of a record we have just written. Each ID is deleted on its own then, and those already
#: gone are recorded as copies in flight (see _RECORD_COPIES), so that such a copy trimmed
#: before any group reads it is not counted as a lost record. Not on a retry (ARGV[2] '0':
#: our first try may have deleted them). The number recorded.
_ACK_DELETE = _RECORD_COPIES + """
for i = 3, #ARGV, 1000 do
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local gone, marks = {}, nil
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1]) == 1 and another_group() then
  marks = stream_marks()  -- before our own XDELs raise max-deleted-entry-id
  for i = 3, #ARGV do
    if redis.call('XDEL', KEYS[1], ARGV[i]) == 0 then gone[#gone + 1] = ARGV[i] end
  end
else
  for i = 3, #ARGV, 1000 do
    redis.call('XDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end
if #gone == 0 then return 0 end
return record(gone, 1, '', marks)
"""


#: Creates the group at 0 and forgets the trimmed-unread count of the group before it.
_CREATE_GROUP = """
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0')
redis.call('HDEL', KEYS[2], KEYS[1])
redis.call('HDEL', KEYS[3], KEYS[1])
redis.call('HDEL', KEYS[4], KEYS[1])
redis.call('DEL', KEYS[5], KEYS[6], KEYS[7])
return 1
"""

#: Creates a routed stream that does not exist yet, empty, with its group (KEDA's trigger on
#: a stream needs the stream and the group); an existing stream is left to discovery.
_CREATE_ROUTED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
redis.call('HDEL', KEYS[2], KEYS[1])
redis.call('HDEL', KEYS[3], KEYS[1])
redis.call('HDEL', KEYS[4], KEYS[1])
redis.call('DEL', KEYS[5], KEYS[6], KEYS[7])
return 1
"""

#: Reads entries for our group from each stream (KEYS) in steps, stopping before the
#: count (ARGV[3]) or the byte budget (ARGV[4]) could be passed: a step takes no more
#: entries than the budget left holds entries of the largest valid size (ARGV[5]), so for
#: entries up to that size the bytes read never exceed the budget, whatever the mix and
#: order of sizes. ARGV[6 + k]: ``>`` for new entries, or a cursor into our pending ones
#: (deleted ones come back with no fields). XREADGROUP's COUNT is per stream: here the
#: count and the budget are for the whole read.
#: For each entry ID in ARGV, the text that follows its message's first
#: ``"correlation_id":"`` (plain JSON: '1' then the text; the payload held as a JSON string,
#: the key escaped: '2' then the text), at most 600 bytes of it; false when the entry is
#: gone or has none. Read in place: the entries themselves never leave Redis.
_CORRELATIONS = """
local out = {}
for i = 1, #ARGV do
  local found = false
  local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #e > 0 then
    local f = e[1][2]
    for j = 1, #f, 2 do
      if f[j] == 'message' then
        local v = f[j + 1]
        local _, t = string.find(v, '"correlation_id"%s*:%s*"')
        if t then
          found = '1' .. string.sub(v, t + 1, t + 600)
        else
          _, t = string.find(v, '\\\\"correlation_id\\\\"%s*:%s*\\\\"')
          if t then found = '2' .. string.sub(v, t + 1, t + 600) end
        end
      end
    end
  end
  out[#out + 1] = found
end
return out
"""

_READ_BOUNDED = GET + """
local group, consumer = ARGV[1], ARGV[2]
local left, budget, largest = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = #KEYS / 2  -- the streams, then each one's BEFORE_READ_PREFIX hash
-- Our group's gone-unread figure before a read, where trimming has passed its position (no
-- entry left at or before it): then every entry present is after it, and the figure is the
-- read counter's. Kept at its highest (see BEFORE_READ_PREFIX).
local function before_read(k)
  if redis.call('EXISTS', KEYS[k]) == 0 then return end
  local last, read = false, false
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[k])) do
    if get(g, 'name') == group then
      last, read = get(g, 'last-delivered-id'), get(g, 'entries-read')
    end
  end
  if not read then return end
  local length = redis.call('XLEN', KEYS[k])
  if length > 0 and #redis.call('XRANGE', KEYS[k], '-', last, 'COUNT', 1) > 0 then return end
  local added = get(redis.call('XINFO', 'STREAM', KEYS[k]), 'entries-added')
  if not added then return end
  local figure = added - read - length
  local was = tonumber(redis.call('HGET', KEYS[n + k], group) or '')
  if figure > 0 and (not was or figure > was) then
    redis.call('HSET', KEYS[n + k], group, figure)
    redis.call('PEXPIRE', KEYS[n + k], 604800000)
  end
end
local out = {}
for k = 1, n do
  local id = ARGV[5 + k]
  local rows = {}
  if id == '>' then before_read(k) end
  while left > 0 and budget > 0 do
    local step = math.min(left, math.max(1, math.floor(budget / largest)))
    local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', step,
                         'STREAMS', KEYS[k], id)
    local got = (r and r[1] and r[1][2]) or {}
    for _, e in ipairs(got) do
      rows[#rows + 1] = e
      if e[2] then
        for i = 1, #e[2] do budget = budget - #e[2][i] end
      end
      if id ~= '>' then id = e[1] end
    end
    left = left - #got
    if #got < step then break end
  end
  if #rows > 0 then out[#out + 1] = {KEYS[k], rows} end
end
return out
"""
