"""What the worker watches but cannot prevent: depth, lag, age, trimming, Redis durability.

A background thread polls read-only commands (XINFO, XLEN, INFO, CONFIG GET) on its own
connection, so the metrics stay fresh even while the loop is backing off, and feeds
readiness with pings of both servers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from dlq_worker.config import Config
from dlq_worker.drain.redis_io import make_client, translated
from dlq_worker.drain.scripts import LEADER_KEY, LOST_KEY
from dlq_worker.drain.sink import Sink
from dlq_worker.watch import elsewhere
from dlq_worker.watch.elsewhere import OtherDatabases
from dlq_worker.watch.health import Health
from dlq_worker.watch.metrics import Metrics

log = logging.getLogger(__name__)

#: Lua: whether stream ID a comes before b (both scripts compare positions).
_BEFORE = """
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then return false end
  if tonumber(am) ~= tonumber(bm) then return tonumber(am) < tonumber(bm) end
  return tonumber(as) < tonumber(bs)
end
"""

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
#: group was created, so a loss is still reported at the next poll that can afford it.
_SNAPSHOT = _BEFORE + """
local function get(t, name)
  for i = 1, #t, 2 do if t[i] == name then return t[i + 1] end end
  return false
end
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
-- Without a read counter (a restart from the AOF, a promoted replica) Redis's lag is an
-- estimate that counts every entry before the stream's head as read, trimmed or not: then
-- the count goes on from the counter it last recorded, where the group has not moved since
-- (see _RAISE_LOST).
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
  if not unread and read and added then unread = added - read end
  if not after or not unread then return {false, read, after} end
  return {math.max(0, unread - after), read, after}
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
_RAISE_LOST = _BEFORE + """
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
if not new then return -3 end
local function keep(figure, flag)
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. '|' .. figure .. '|' .. ARGV[6] .. '|' ..
             (read or '') .. '|' .. (added or '') .. '|' .. flag)
end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[4] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
  if rl and not same then keep(new, '') return -1 end
end
if not rl then
  keep(new, '')
  if ARGV[5] ~= '1' then return -2 end
  if new > 0 then redis.call('HINCRBY', KEYS[1], ARGV[1], new) end
  return new
end
if rl == ARGV[2] and tonumber(radded) and added and added < tonumber(radded) then
  return 0  -- a snapshot older than the last count (another replica's): nothing new
end
if rl ~= ARGV[2] or before(rpos, ARGV[7]) then keep(new, '') return -2 end
if rflag == 'r' and not recovered then keep(new, '') return -2 end  -- counter estimated again
local old = tonumber(rg)
if new <= old then keep(old, rflag) return 0 end
keep(new, recovered and 'r' or '')
redis.call('HINCRBY', KEYS[1], ARGV[1], new - old)
return new - old
"""
#: The Redis server (run_id) each stream's trimmed-unread count was last taken on. A new
#: one is a failover or a restart: a promoted replica's group read counter (entries-read)
#: is not the old master's, so the first count there is a new baseline, never a loss.
RUN_ID_KEY = "dlq-worker:trimmed-unread:run-id"


MEMORY_WARN_RATIO = 0.9


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
    #: it finds gone unread: trimmed before any group read them (see _RAISE_LOST).
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


@dataclass
class RedisDurability:
    maxmemory_policy: str
    maxmemory: int
    used_memory: int
    aof_enabled: bool
    rdb_save: str | None
    warnings: list[str]


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
        reply: Any = client.eval(_SNAPSHOT, 3, stream, dead_letter, lock, config.streams.group,
                                 SNAPSHOT_WALK_LIMIT, max(0, check_interval_ms))
    depth, first_id, dead_depth, has_group = (int(reply[0]), reply[1], int(reply[2]),
                                              bool(reply[3]))
    stats = StreamStats(stream=stream, depth=depth, pending=None, lag=None,
                        oldest_age_seconds=_age_of(first_id), consumers=0,
                        group_exists=has_group, dead_letter_depth=dead_depth,
                        dead_letter_oldest_age_seconds=_age_of(reply[4]))
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


def _arg(value: int | None) -> str:
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


def redis_durability(client: redis.Redis, memory_limit_bytes: int | None = None) -> RedisDurability:
    """Settings of the shared instance that can lose DLQ entries."""
    with translated("INFO"):
        memory = client.info("memory")
        persistence = client.info("persistence")
    policy = str(memory.get("maxmemory_policy", "unknown"))
    maxmemory = int(memory.get("maxmemory", 0) or 0)
    used = int(memory.get("used_memory", 0) or 0)
    aof = bool(int(persistence.get("aof_enabled", 0) or 0))
    save: str | None
    try:
        save = str(client.config_get("save").get("save", ""))
    except redis.RedisError:  # CONFIG is often disabled on managed Redis
        save = None
    warnings: list[str] = []
    if policy.startswith("allkeys-"):
        warnings.append(f"eviction_policy: maxmemory-policy {policy} can evict DLQ streams")
    if not aof and save == "":
        warnings.append("persistence: neither AOF nor RDB snapshots: a restart loses the DLQ")
    limit = maxmemory or memory_limit_bytes or 0
    if limit and used / limit >= MEMORY_WARN_RATIO:
        warnings.append(f"memory: used {used} of {limit} bytes")
    return RedisDurability(policy, maxmemory, used, aof, save, warnings)


class Monitor:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        health: Health,
        sink: Sink,
        streams: Callable[[], list[str]],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.health = health
        self.sink = sink
        self.streams = streams
        self.client = make_client(config.redis)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._raise_lost = self.client.register_script(_RAISE_LOST)
        #: The Redis server this poll talks to (its run_id): see RUN_ID_KEY.
        self._run_id = ""
        self._durability_logged: set[str] = set()
        metrics.retention.set(float(config.streams.ttl))
        interval = float(config.streams.other_databases_interval)
        self.elsewhere = OtherDatabases(config.redis, config.streams.prefix) if interval else None
        self._next_elsewhere = 0.0
        #: What was last reported found elsewhere, and when it was last logged.
        self._elsewhere_reported: dict[int, set[str]] = {}
        self._elsewhere_logged_at = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        # A last count where the group now stands (after the final flush): if Redis restarts
        # before the next worker, the count goes on from it (see _RAISE_LOST).
        with contextlib.suppress(Exception):
            self.poll()
        self.client.close()
        if self.elsewhere is not None:
            self.elsewhere.close()

    def _run(self) -> None:
        interval = min(5.0, float(self.config.worker.stats_interval))
        next_stats = 0.0
        was_ready: bool | None = None
        while not self._stop.is_set():
            self.check_servers()
            ready, reasons, _ = self.health.ready()
            self.metrics.ready.set(1 if ready else 0)
            if ready != was_ready and "starting" not in reasons:
                # The transitions an operator needs to see in the log, with the reasons.
                if not ready:
                    log.warning("not ready", extra={"event": "unready", "reasons": reasons})
                elif was_ready is not None:
                    log.info("ready again", extra={"event": "ready"})
                was_ready = ready
            if time.monotonic() >= next_stats:
                self.poll()
                next_stats = time.monotonic() + float(self.config.worker.stats_interval)
            if self.elsewhere is not None and time.monotonic() >= self._next_elsewhere:
                self.look_elsewhere()
                self._next_elsewhere = time.monotonic() + float(
                    self.config.streams.other_databases_interval)
            self._stop.wait(interval)

    def check_servers(self) -> None:
        for server, ping in (("redis", self._ping_redis), ("postgres", self.sink.ping)):
            try:
                ping()
            except Exception as exc:
                self.health.failed(server, str(exc))
                self.metrics.up.labels(server).set(0)
            else:
                self.health.ok(server)
                self.metrics.up.labels(server).set(1)

    def _ping_redis(self) -> None:
        with translated("PING"):
            self.client.ping()

    def poll(self) -> None:
        """Refresh every stream's gauges and the durability warnings."""
        missing: list[str] = []
        try:
            info: Any = self.client.info("server")
            self._run_id = str(info.get("run_id", ""))
        except Exception as exc:
            log.debug("INFO server failed", extra={"error": str(exc)})
        for stream in self.streams():
            try:  # a failed poll must not end the thread
                stats = stream_stats(self.client, self.config, stream, check_interval_ms=max(
                    1, int(float(self.config.worker.stats_interval) * 1000 * 0.9)))
                self.record(stats)
            except Exception as exc:
                log.debug("stream stats failed", extra={"stream": stream, "error": str(exc)})
                continue
            if not stats.group_exists:
                missing.append(stream)
        self.health.set_groups_missing(missing)
        try:
            durability = redis_durability(self.client)
        except Exception as exc:
            log.debug("redis durability check failed", extra={"error": str(exc)})
            return
        self.record_durability(durability)

    def look_elsewhere(self) -> None:
        """DLQ streams in the instance's other databases (see elsewhere.py): an error line
        when first found (and every 10 minutes while they stay), a metric per database, a
        warning in /readyz."""
        assert self.elsewhere is not None
        try:
            found = self.elsewhere.look(self.client)
        except Exception as exc:  # a failed look must not end the thread
            log.debug("look at other databases failed", extra={"error": str(exc)[:200]})
            return
        m = self.metrics
        for db in set(self._elsewhere_reported) | set(found):
            streams = found.get(db, {})
            m.other_db_streams.labels(str(db)).set(len(streams))
            m.other_db_entries.labels(str(db)).set(sum(streams.values()))
        now = time.monotonic()
        names = {db: set(streams) for db, streams in found.items()}
        text = elsewhere.describe(found)
        own = self.config.redis.db
        if found and (names != self._elsewhere_reported or now - self._elsewhere_logged_at
                      >= 600):
            log.error(f"DLQ streams found in another Redis database; this worker drains DB "
                      f"{own} only: {text}", extra={
                          "event": "dlq_in_other_database", "db": own,
                          "other_databases": sorted(found), "streams": text})
            self._elsewhere_logged_at = now
        elif not found and self._elsewhere_reported:
            log.info("no DLQ stream in another Redis database any more",
                     extra={"event": "dlq_in_other_database_gone", "db": own})
        self._elsewhere_reported = names
        self.health.set_other_databases(
            f"DLQ streams in other Redis databases (this worker drains DB {own}): {text}"
            if found else "")

    def count_before_reading(self, stream: str) -> None:
        """The loss count of a stream the loop is about to read for the first time: where
        Redis lost the group's read counter (a restart, a failover), the count can go on
        only while the group stands where it stood (see _RAISE_LOST)."""
        try:
            self.record(stream_stats(self.client, self.config, stream))
        except Exception as exc:  # the regular poll tries again
            log.debug("first count failed", extra={"stream": stream, "error": str(exc)[:200]})

    def record(self, s: StreamStats) -> None:
        m = self.metrics
        m.depth.labels(s.stream).set(s.depth)
        m.depth_ratio.labels(s.stream).set(s.depth / self.config.streams.max_length)
        m.pending.labels(s.stream).set(s.pending or 0)
        if s.lag is not None:
            m.lag.labels(s.stream).set(s.lag)
        m.oldest_age.labels(s.stream).set(s.oldest_age_seconds or 0.0)
        m.consumers.labels(s.stream).set(s.consumers)
        m.dead_letter_depth.labels(s.stream).set(s.dead_letter_depth)
        m.dead_letter_oldest_age.labels(s.stream).set(s.dead_letter_oldest_age_seconds or 0.0)
        if s.uncertain_unread is not None:
            m.uncertain_unread.labels(s.stream).set(s.uncertain_unread)
        if s.leader_lost_unread is not None or s.leader_after is not None:
            ours = s.leader == self.config.streams.group
            with translated(f"HSET {LOST_KEY}"):
                new = int(self._raise_lost(
                    keys=[LOST_KEY, RUN_ID_KEY, LEADER_KEY],
                    args=[s.stream, s.leader, _arg(s.leader_lost_unread), self._run_id,
                          "1" if ours else "0", s.leader_position, s.others_position,
                          _arg(s.leader_read), _arg(s.entries_added), _arg(s.leader_after)]))
            if new == -2:
                log.info("another group has read furthest (or has stopped doing so): the "
                         "trimmed-unread count goes on from its figure",
                         extra={"event": "trim_leader", "stream": s.stream,
                                "leader": s.leader, "uncertain": s.uncertain_unread})
            elif new == -1:
                # Not reported as a loss, not silent either: the figure is in the log.
                log.warning("Redis is a different server than at the last count (a failover "
                            "or a restart): its group read counter is not the old one's, so "
                            "the trimmed-unread count starts again from here",
                            extra={"event": "trim_baseline_reset", "stream": s.stream,
                                   "run_id": self._run_id,
                                   "count_here": s.leader_lost_unread})
            elif new > 0:
                m.trimmed_unread.labels(s.stream).inc(new)
                log.error("AUDIT LOSS: entries trimmed from the DLQ before any group read "
                          "them", extra={"event": "trimmed_unread", "stream": s.stream,
                                         "entries": new, "counted_by": s.leader})
        if s.oldest_age_seconds and s.oldest_age_seconds > float(self.config.streams.ttl):
            log.warning("DLQ entry older than the retention: still kept, never deleted",
                        extra={"event": "entry_past_retention", "stream": s.stream,
                               "age_seconds": round(s.oldest_age_seconds)})

    def record_durability(self, d: RedisDurability) -> None:
        self.metrics.redis_memory_used.set(d.used_memory)
        self.metrics.redis_maxmemory.set(d.maxmemory)
        flagged = {w.split(":", 1)[0] for w in d.warnings}
        for check in ("eviction_policy", "persistence", "memory"):
            self.metrics.redis_warning.labels(check).set(1 if check in flagged else 0)
        self.health.set_warnings(d.warnings)
        for warning in d.warnings:
            check = warning.split(":", 1)[0]
            if check not in self._durability_logged:
                self._durability_logged.add(check)
                log.warning("redis setting can lose DLQ entries",
                            extra={"event": "redis_durability", "warning": warning})


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
