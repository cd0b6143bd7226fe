"""Where an entry is declared lost to trimming: one stream's figures in one atomic step
(depth, lag, age, and for every group on the stream the entries deleted before it read
them), and the count of entries trimmed before any group read them, kept exact across
replicas, restarts and the platform's own retry worker. (A pending entry found deleted
is declared lost in drain/flush.py.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from dlq_worker.config import Config
from dlq_worker.drain.redis_io import translated
from dlq_worker.drain.scripts import BEFORE as _BEFORE
from dlq_worker.drain.scripts import BEFORE_READ_PREFIX
from dlq_worker.drain.scripts import GET as _GET

#: One stream's figures in one atomic step: depth, first ID, parked depth, and for the
#: group: pending, lag, consumers, and for it and every other group on the stream (the
#: platform's own retry workers read it too) how many entries were deleted before that
#: group read them, since it was created ("gone"): the entries added after its position,
#: from the stream's entries-added and the group's lag or entries-read, less the ones
#: still present (counted in the server: only numbers cross the network).
#:
#: The entries present after a group's position are the whole stream when the stream's
#: head has passed that position (trimming overtook the group): no walk. Otherwise they
#: are walked, the shorter way (after the position, or up to it), bounded: at most ARGV[2]
#: entries each way, in one replica per interval (a lock key, KEYS[3], set for ARGV[3]
#: ms), else "unknown" (false) for this poll. Losses are counted from totals since the
#: group was created, so a loss is still reported at the next poll that can afford it. Our
#: group's figure is at least what the read script found before one of its reads (KEYS[4],
#: see BEFORE_READ_PREFIX).
_SNAPSHOT = _BEFORE + _GET + """
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local first = get(info, 'first-entry')
local length, added = get(info, 'length'), get(info, 'entries-added')
local limit = tonumber(ARGV[2])
local parked = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local out = {length, first and first[1] or false, redis.call('XLEN', KEYS[2]), 0,
             parked[1] and parked[1][1] or false}
local walk = nil
local function may_walk()
  -- pcall: at maxmemory the SET is refused; then skip the walks, keep the figures
  if walk == nil then
    walk = ARGV[3] == '0'
    if not walk then
      local ok = redis.pcall('SET', KEYS[3], '1', 'NX', 'PX', ARGV[3])
      walk = type(ok) == 'table' and ok['ok'] ~= nil
    end
  end
  return walk
end
-- {gone, entries-read, entries present after the group's position}, each false if unknown.
-- From the group's read counter whenever Redis has one: its lag is that counter's only
-- while no deletion lies at or after the group's position, and an estimate otherwise that
-- counts every deleted entry as read (0 once the entry the group read last is deleted and
-- one before it is not), so a figure from the lag one poll and the counter the next would
-- rise by entries another group had read (and deleted) first: a false loss. Without a read
-- counter (a restart from the AOF, a promoted replica) the lag's estimate is all there is:
-- then the count goes on from the counter it last recorded, where the group has not moved
-- since (see RAISE_LOST).
local function gone(g)
  local last, lag, read = get(g, 'last-delivered-id'), get(g, 'lag'), get(g, 'entries-read')
  local after = false
  if length == 0 or (first and before(last, first[1])) then
    after = length
  elseif may_walk() then
    local n = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', limit)
    if n < limit then
      after = n
    else
      local m = #redis.call('XRANGE', KEYS[1], '-', last, 'COUNT', limit)
      if m < limit then after = length - m end
    end
  end
  local unread = lag
  if read and added then unread = added - read end
  if not after or not unread then return {false, read, after} end
  local figure = math.max(0, unread - after)
  if get(g, 'name') == ARGV[1] then
    -- at least what it was before one of our reads (Valkey forgets trims there: see
    -- BEFORE_READ_PREFIX)
    local was = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '')
    if was and was > figure then figure = was end
  end
  return {figure, read, after}
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
for _, g in ipairs(groups) do
  if get(g, 'name') == ARGV[1] then
    out[4] = 1
    out[6] = get(g, 'pending')
    out[7] = get(g, 'lag')
    out[8] = get(g, 'consumers')
    out[9] = gone(g)
    out[10] = get(g, 'last-delivered-id')
    local others = {}
    for _, o in ipairs(groups) do
      if get(o, 'name') ~= ARGV[1] then
        others[#others + 1] = {get(o, 'name'), get(o, 'last-delivered-id'), gone(o)}
      end
    end
    out[11] = others
    out[12] = added
  end
end
return out
"""


#: Entries the trim check walks at most per stream and poll.
SNAPSHOT_WALK_LIMIT = 1000


#: The key that lets one replica per interval run a stream's trim check.
LOCK_PREFIX = "dlq-worker:trim-check:"


#: Counts the entries trimmed before any group read them, from the figures of the group
#: that has read furthest (the leader, ARGV[2]; its gone-unread figure ARGV[3], its position
#: ARGV[6]; the furthest any other group has read, ARGV[7]), and returns by how much the
#: count rose, atomically: with several replicas polling, each loss is counted by exactly
#: one, and a loss that happened while no worker ran is counted by the first one to start.
#:
#: Why the leader: the platform's retry worker deletes entries it has read (copy-and-XDEL),
#: and we delete what we wrote. A group's gone-unread figure counts every entry deleted
#: before that group read it, trimmed or deleted. Only entries some group has read are ever
#: deleted, so a rise of the leader's figure is certain loss as long as no other group has
#: read past where the leader was at the last count (then no deletion can lie in what the
#: leader read since). Otherwise, or when the lead changed hands, the figure is a new
#: baseline (-2): what happened in between is reported apart, as uncertain. A new Redis
#: server (ARGV[4], its run_id: a failover, a restart) is a new baseline too (-1). KEYS: the
#: count, the run_id and the leader's last figure ("name|figure|position"), hashes by stream.
#: With KEYS[4] (the stream's copies in flight), KEYS[5] (the uncertain totals) and
#: ARGV[11] (the stream's first ID), the rise left once the platform's copies of records we
#: hold are taken out, and {rise, taken now, uncertain in all} is returned; a rise of the
#: same leader while another group read past it is added to the uncertain total. With
#: KEYS[6] (every group's figure at the last count) and ARGV[12..] (each group's name and
#: figure now, '' unknown; ours first), a change of leader adds to it what was trimmed in
#: between, which raised every group's figure: our group's rise since the last count when
#: the lead passes to it (everything gone before we read it: uncertain by definition), the
#: smaller of ours and the new leader's when it passes to another group (each also counts
#: what the other read and deleted first: uncertain, never certain).
RAISE_LOST = _BEFORE + "local fresh = true local function count()" + """
local rec = redis.call('HGET', KEYS[3], ARGV[1])
local rl, rg, rpos, rread, radded, rflag
if rec then
  rl, rg, rpos, rread, radded, rflag = string.match(
    rec, '^(.*)|(%-?%d+)|([%d-]+)|(%-?%d*)|(%-?%d*)|(%a*)$')
end
local same = rl ~= nil and rl == ARGV[2] and rpos == ARGV[6]
local new, read, added = tonumber(ARGV[3]), tonumber(ARGV[8]), tonumber(ARGV[9])
local recovered = false
if not read and same and tonumber(rread) and added and tonumber(ARGV[10]) then
  -- The counter is gone (a restart from the AOF, a promoted replica), the position is not:
  -- no group read since, so the counter is still what it was at the last count.
  read = tonumber(rread)
  new = math.max(0, added - read - tonumber(ARGV[10]))
  recovered = true
end
if not new then fresh = false return -3 end
-- flags: 'r' the counter was recovered (see above); 'c' the figure is the read counter's
-- (every record since figures stopped coming from the lag's estimate, see _SNAPSHOT)
local function keep(figure, flag)
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. '|' .. figure .. '|' .. ARGV[6] .. '|' ..
             (read or '') .. '|' .. (added or '') .. '|' .. (string.gsub(flag, 'c', '')) .. 'c')
end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[4] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
  for i = 6, math.min(#KEYS, 7) do redis.call('DEL', KEYS[i]) end  -- its read counters'
  if rl and not same then keep(new, '') return -1 end
end
if not rl then
  keep(new, '')
  if ARGV[5] ~= '1' then return -2 end
  if new > 0 then redis.call('HINCRBY', KEYS[1], ARGV[1], new) end
  return new
end
if not string.find(rflag or '', 'c', 1, true) then
  -- a figure recorded by a version that took it from the lag's estimate: not comparable
  -- with the counter's (it could rise by what the platform copied first), a new baseline
  keep(new, '')
  return -2
end
if rl == ARGV[2] and tonumber(radded) and added and added < tonumber(radded) then
  fresh = false
  return 0  -- a snapshot older than the last count (another replica's): nothing new
end
if rl ~= ARGV[2] or before(rpos, ARGV[7]) then
  -- the same leader's rise while another group read past it, or what was trimmed before
  -- a change of leader: uncertain, never silent
  local rise = 0
  if rl == ARGV[2] then
    rise = new - tonumber(rg)
  elseif #KEYS >= 6 then
    local function rise_of(name)  -- a group's rise since the last count, false if unknown
      local was, now = tonumber(redis.call('HGET', KEYS[6], name) or ''), nil
      for i = 12, #ARGV - 1, 2 do
        if ARGV[i] == name then now = tonumber(ARGV[i + 1]) end
      end
      if was and now then return now - was end
      return false
    end
    local ours = rise_of(ARGV[12] or '')
    if ours and ARGV[5] == '1' then
      rise = ours
    elseif ours then
      local theirs = rise_of(ARGV[2])
      if theirs then rise = math.min(ours, theirs) end
    end
  end
  if #KEYS >= 5 and rise > 0 then redis.call('HINCRBY', KEYS[5], ARGV[1], rise) end
  keep(new, '')
  return -2
end
if string.find(rflag, 'r', 1, true) and not recovered then  -- counter estimated again
  keep(new, '')
  return -2
end
local old = tonumber(rg)
if new <= old then keep(old, rflag) return 0 end
keep(new, recovered and 'r' or '')
redis.call('HINCRBY', KEYS[1], ARGV[1], new - old)
return new - old
end
local rise = count()
if fresh and #KEYS >= 6 then
  for i = 12, #ARGV - 1, 2 do
    if ARGV[i + 1] ~= '' then
      redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1])
    else  -- unknown now: a later rise must not be measured from an older figure
      redis.call('HDEL', KEYS[6], ARGV[i])
    end
  end
  redis.call('PEXPIRE', KEYS[6], 604800000)
end
if #KEYS < 5 then return rise end
-- The platform's copies of records we hold in memory (KEYS[4], see _EXPECT_COPIES): a copy
-- can be among the entries trimmed unread once the stream's head (ARGV[11], '' when the
-- stream is empty) has passed the earliest it can be. That many of the rise are taken for
-- such copies (never more than there are), moved from the certain count to KEYS[5]:
-- reported as uncertain. A copy no later than the head that was not taken is settled
-- (read by the leader, or gone before it was recorded): forgotten.
local limit = '+inf'
if ARGV[11] ~= '' then limit = '(' .. string.match(ARGV[11], '^(%d+)') end
local taken = 0
if rise > 0 then
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', limit, 'LIMIT', 0, rise)) do
    redis.call('ZREM', KEYS[4], m)
    taken = taken + 1
  end
  if taken > 0 then
    redis.call('HINCRBY', KEYS[1], ARGV[1], -taken)
    rise = rise - taken
  end
end
if taken > 0 then redis.call('HINCRBY', KEYS[5], ARGV[1], taken) end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', limit, 'LIMIT', 0, 1000)) do
  local last = string.match(m, '|(.+)$')
  if ARGV[11] == '' or (last and before(last, ARGV[11])) then redis.call('ZREM', KEYS[4], m) end
end
return {rise, taken, tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0')}
"""


#: The Redis server (run_id) each stream's trimmed-unread count was last taken on. A new
#: one is a failover or a restart: a promoted replica's group read counter (entries-read)
#: is not the old master's, so the first count there is a new baseline, never a loss.
RUN_ID_KEY = "dlq-worker:trimmed-unread:run-id"


@dataclass
class StreamStats:
    stream: str
    depth: int
    pending: int | None
    lag: int | None
    oldest_age_seconds: float | None
    consumers: int
    group_exists: bool
    dead_letter_depth: int
    #: Entries added that the group never read and that are gone (trimmed), since the
    #: group was created; None where Redis cannot tell (older than 7.0, tombstones).
    lost_unread: int | None = None
    #: Since the oldest parked entry was parked (its dead-letter ID is that time).
    dead_letter_oldest_age_seconds: float | None = None
    #: The group that has read furthest (ours, or the platform's own), and how many entries
    #: it finds gone unread: trimmed before any group read them (see RAISE_LOST).
    leader: str = ""
    leader_lost_unread: int | None = None
    #: The leader's last-delivered ID, and the furthest any other group has read.
    leader_position: str = "0-0"
    others_position: str = "0-0"
    #: The leader's read counter and the entries present after it (None: unknown), and the
    #: stream's entries-added: with them the count goes on where a counter was lost.
    leader_read: int | None = None
    leader_after: int | None = None
    entries_added: int | None = None
    #: Gone before our group read them, but read by another group first: deleted by the
    #: platform's retry worker after its copy (no loss), written by it, or trimmed while it
    #: held them unwritten (a loss). Redis cannot tell which: an upper bound, reported apart.
    uncertain_unread: int | None = None
    #: The stream's first entry ID ("" when it is empty).
    first_id: str = ""
    #: Every group's gone-unread figure (None: unknown), by name.
    figures: dict[str, int | None] = field(default_factory=dict)


def stream_stats(client: redis.Redis, config: Config, stream: str, *,
                 check_interval_ms: int = 0) -> StreamStats:
    """Figures for one DLQ stream as the group sees them, read in one atomic step.

    A script, not three calls: between separate XINFO STREAM, XINFO GROUPS and XRANGE
    calls a producer's writes would look like entries lost to trimming. The trim check
    runs in at most one caller per ``check_interval_ms`` when that is given (the worker's
    monitor; an operator's ``status`` always runs it); ``lost_unread`` is None for the
    others, and when the walk would be too long.
    """
    dead_letter = config.streams.dead_letter_prefix + stream[len(config.streams.prefix):]
    lock = f"{LOCK_PREFIX}{stream}"
    with translated(f"XINFO {stream}", stream):
        reply: Any = client.eval(_SNAPSHOT, 4, stream, dead_letter, lock,
                                 BEFORE_READ_PREFIX + stream, config.streams.group,
                                 SNAPSHOT_WALK_LIMIT, max(0, check_interval_ms))
    depth, first_id, dead_depth, has_group = (int(reply[0]), reply[1], int(reply[2]),
                                              bool(reply[3]))
    stats = StreamStats(stream=stream, depth=depth, pending=None, lag=None,
                        oldest_age_seconds=_age_of(first_id), consumers=0,
                        group_exists=has_group, dead_letter_depth=dead_depth,
                        dead_letter_oldest_age_seconds=_age_of(reply[4]),
                        first_id=_text(first_id) if first_id else "")
    if has_group:
        pending, lag, consumers, gone = reply[5], reply[6], reply[7], reply[8]
        stats.pending = int(pending)
        stats.lag = _int_or_none(lag)
        stats.consumers = int(consumers)
        stats.lost_unread = _int_or_none(gone[0])
        stats.entries_added = _int_or_none(reply[11]) if len(reply) > 11 else None
        positions = [(_id(reply[9]), config.streams.group, gone)] + [
            (_id(last), _text(name), other) for name, last, other in reply[10] or []]
        ahead, stats.leader, figures = max(
            positions, key=lambda p: (p[0], p[1] == config.streams.group))
        stats.figures = {name: _int_or_none(g[0]) for _, name, g in positions}
        stats.leader_lost_unread = _int_or_none(figures[0])
        stats.leader_read = _int_or_none(figures[1])
        stats.leader_after = _int_or_none(figures[2])
        stats.leader_position = _id_text(ahead)
        stats.others_position = _id_text(max(
            (p[0] for p in positions if p[1] != stats.leader), default=(0, 0)))
        if stats.leader == config.streams.group:
            stats.uncertain_unread = 0 if stats.lost_unread is not None else None
        elif stats.lost_unread is not None and stats.leader_lost_unread is not None:
            stats.uncertain_unread = max(0, stats.lost_unread - stats.leader_lost_unread)
    return stats


def script_arg(value: int | None) -> str:
    return "" if value is None else str(value)


def _id_text(pair: tuple[int, int]) -> str:
    return f"{pair[0]}-{pair[1]}"


def _id(value: Any) -> tuple[int, int]:
    """A stream ID as a number pair, for comparisons."""
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


def _age_of(entry_id: Any) -> float | None:
    """Seconds since a stream entry ID's time."""
    if not entry_id:
        return None
    ms = int(_text(entry_id).split("-", 1)[0])
    return max(0.0, time.time() - ms / 1000.0)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
