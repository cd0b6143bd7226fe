"""Where entries are read, claimed, acknowledged and parked: the Redis Streams side.

Every redis-py error is translated here into RedisUnavailable, so the loop never
sees a library exception. Only this module (and the monitor's read-only probes)
talks to Redis, and only to the configured database: never DB 0's cache, never
an instance-wide command.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from dlq_worker.config import Config, RedisConfig
from dlq_worker.errors import RedisCommandError, RedisUnavailable, StartupError, StreamGone

log = logging.getLogger(__name__)

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
return lost
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
#: monitor.py): restarts with the group, like the count.
LEADER_KEY = "dlq-worker:trimmed-unread:leader"

#: Creates the group at 0 and forgets the trimmed-unread count of the group before it.
_CREATE_GROUP = """
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0')
redis.call('HDEL', KEYS[2], KEYS[1])
redis.call('HDEL', KEYS[3], KEYS[1])
return 1
"""

#: Creates a routed stream that does not exist yet, empty, with its group (KEDA's trigger on
#: a stream needs the stream and the group); an existing stream is left to discovery.
_CREATE_ROUTED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
redis.call('HDEL', KEYS[2], KEYS[1])
redis.call('HDEL', KEYS[3], KEYS[1])
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

_READ_BOUNDED = """
local group, consumer = ARGV[1], ARGV[2]
local left, budget, largest = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}
for k = 1, #KEYS do
  local id = ARGV[5 + k]
  local rows = {}
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

#: Redis errors that mean "not now" rather than "never": the server is loading, busy,
#: failing over or out of memory. Every other error reply is a RedisCommandError.
_TRANSIENT_REPLIES = frozenset({"LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN",
                                "CLUSTERDOWN", "OOM", "NOREPLICAS", "NOAUTH", "WRONGPASS",
                                "NOPERM"})

#: The largest entry a read step counts on: the contract's largest envelope (1 MiB) with
#: room for its field name. Reads and claims are sized by it, so the bytes they bring
#: never pass the budget for entries up to this size (larger ones are parked at once).
LARGEST_ENTRY = 1024 * 1024 + 1024

#: Fields of a parked entry kept one by one; beyond that the rest travel in one field, so
#: an entry with thousands of fields is parked whole (Lua's unpack has a limit).
MAX_PARKED_FIELDS = 200


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as read. ``fields`` is empty when it was deleted while pending."""

    stream: str
    id: str
    fields: Mapping[bytes, bytes]

    @property
    def deleted(self) -> bool:
        return not self.fields

    @property
    def size(self) -> int:
        """Bytes of its field names and values: what holding it in memory costs, roughly."""
        return sum(len(k) + len(v) for k, v in self.fields.items())

    @property
    def first_failed_at(self) -> str:
        """When it entered the DLQ (its ID's time, set by Redis): its first failure; empty
        for an ID no calendar holds (an explicit ID far in the future)."""
        try:
            stamp = dt.datetime.fromtimestamp(int(self.id.split("-", 1)[0]) / 1000, dt.UTC)
        except (ValueError, OverflowError, OSError):
            return ""
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_client(config: RedisConfig, *, block_seconds: float = 0.0) -> redis.Redis:
    """A client for the DLQ's database; no built-in retries: the loop owns backoff."""
    timeout = max(float(config.socket_timeout), block_seconds + 5.0)
    kwargs: dict[str, Any] = {}
    if config.use_tls:
        kwargs["ssl"] = True
        if config.tls_ca_file:
            kwargs["ssl_ca_certs"] = config.tls_ca_file
        if config.tls_cert_file:
            kwargs["ssl_certfile"] = config.tls_cert_file
            kwargs["ssl_keyfile"] = config.tls_key_file or None
    common: dict[str, Any] = dict(
        db=config.db,
        username=config.username or None,
        password=config.password or None,
        socket_timeout=timeout,
        socket_connect_timeout=float(config.socket_timeout),
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
        client_name="dlq-worker",
        **kwargs,
    )
    if config.sentinels:
        # redis-py asks the sentinels for the master at every new connection and drops its
        # connections when the master it knew turns read-only: a failover is followed by
        # the loop's own retries. The sentinels speak TLS too when the data nodes do.
        sentinel = Sentinel(config.sentinel_addrs, sentinel_kwargs={  # type: ignore[no-untyped-call]
            "socket_timeout": float(config.socket_timeout),
            "socket_connect_timeout": float(config.socket_timeout), **kwargs})
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            config.master_name, **common)
        return master
    return redis.Redis(host=config.host, port=config.port, **common)


#: Replies that mean "this stream or its group does not exist", not "Redis is down".
_GONE = ("NOGROUP", "no such key")


@contextmanager
def translated(what: str, stream: str | None = None) -> Iterator[None]:
    """Turn any redis-py error into the worker's terms, naming the operation: a vanished
    stream or group (when ``stream`` is given) into StreamGone; an error reply no retry
    cures (WRONGTYPE, a script error) into RedisCommandError; the rest (connection lost,
    loading, failing over) into RedisUnavailable."""
    try:
        yield
    except redis.ResponseError as exc:
        text = _first_line(exc)
        if stream is not None and any(marker in text for marker in _GONE):
            raise StreamGone([stream]) from exc
        # redis-py strips the error code of the replies it knows (READONLY, OOM, NOPERM,
        # TRYAGAIN...) into the exception's class and status_code: look there first.
        code = str(getattr(exc, "status_code", None) or "")
        if code in _TRANSIENT_REPLIES or _transient_reply(text):
            raise RedisUnavailable(f"{what}: {type(exc).__name__}: {text}") from exc
        raise RedisCommandError(f"{what}: {text}") from exc
    except redis.RedisError as exc:
        raise RedisUnavailable(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from exc


def _transient_reply(text: str) -> bool:
    # The error code may follow a script's own prefix: look at every upper-case word.
    return not _TRANSIENT_REPLIES.isdisjoint(re.findall(r"\b[A-Z]{2,}\b", text))


class Source:
    """The consumer-group side of the DLQ streams."""

    def __init__(self, config: Config, consumer: str, client: redis.Redis | None = None) -> None:
        self.config = config
        self.streams_config = config.streams
        self.group = config.streams.group
        self.consumer = consumer
        self.client = (
            client
            if client is not None
            else make_client(config.redis, block_seconds=float(config.worker.block))
        )
        self._park = self.client.register_script(_PARK)
        self._delete_consumer = self.client.register_script(_DELETE_IDLE_CONSUMER)
        self._claim_own = self.client.register_script(_CLAIM_OWN)
        self._claim_from = self.client.register_script(_CLAIM_FROM)
        self._touch = self.client.register_script(_TOUCH)
        self._autoclaim = self.client.register_script(_AUTOCLAIM)
        self._forget = self.client.register_script(_FORGET)
        self._adopt = self.client.register_script(_ADOPT)
        #: Dropped IDs counted whose removal from our list is not confirmed yet.
        self._counted: set[tuple[str, str]] = set()
        self._create_group = self.client.register_script(_CREATE_GROUP)
        self._create_routed = self.client.register_script(_CREATE_ROUTED)
        self._read_bounded = self.client.register_script(_READ_BOUNDED)
        self._correlations = self.client.register_script(_CORRELATIONS)
        #: entry ID -> correlation_id ("" when unknown), of entries other consumers hold
        self._correlation_of: dict[tuple[str, str], str] = {}

    def close(self) -> None:
        self.client.close()

    # -- streams and groups --

    def discover(self) -> tuple[list[str], list[str]]:
        """SCAN for streams under the prefix: (routed, unknown)."""
        prefix = self.streams_config.prefix
        routed: list[str] = []
        unknown: list[str] = []
        with translated("SCAN"):
            for raw in self.client.scan_iter(match=glob_escape(prefix) + "*", count=1000,
                                             _type="stream"):
                try:
                    name = raw.decode() if isinstance(raw, bytes) else str(raw)
                except UnicodeDecodeError:
                    unknown.append(repr(raw))  # not a name any route can hold
                    continue
                (routed if self.route(name) else unknown).append(name)
        return sorted(routed), sorted(unknown)

    def route(self, stream: str) -> str | None:
        """The table a stream drains into, or None if no route names it."""
        prefix = self.streams_config.prefix
        if not stream.startswith(prefix):
            return None
        return self.streams_config.routes.get(stream[len(prefix):])

    def dead_letter_stream(self, stream: str) -> str:
        """``audit:dlq:events`` parks into ``audit:dead-letter:events``."""
        return self.streams_config.dead_letter_prefix + stream[len(self.streams_config.prefix):]

    def _exists(self, stream: str) -> bool:
        with translated(f"EXISTS {stream}"):
            return bool(self.client.exists(stream))

    def create_routed(self) -> list[str]:
        """Create every routed stream that does not exist, empty, with the group; the
        streams created."""
        created = []
        for name in sorted(self.streams_config.routes):
            stream = self.streams_config.prefix + name
            with translated(f"XGROUP CREATE {stream} MKSTREAM", stream):
                if self._create_routed(keys=[stream, LOST_KEY, LEADER_KEY], args=[self.group]):
                    created.append(stream)
        if created:
            log.info("created the routed streams that did not exist, with their group",
                     extra={"event": "streams_created", "streams": created,
                            "group": self.group})
        return created

    def ensure_group(self, stream: str) -> bool:
        """Create the group at ID 0 (never ``$``: that would skip the backlog). True if created.

        The stream's trimmed-unread count restarts with the group, in the same atomic step:
        a deleted and recreated stream must not hide its new losses behind its old count."""
        try:
            self._create_group(keys=[stream, LOST_KEY, LEADER_KEY], args=[self.group])
        except redis.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            if "requires the key to exist" in str(exc):  # the stream vanished meanwhile
                return False
            raise RedisUnavailable(f"XGROUP CREATE {stream}: {_first_line(exc)}") from exc
        except redis.RedisError as exc:
            raise RedisUnavailable(f"XGROUP CREATE {stream}: {_first_line(exc)}") from exc
        log.info("created consumer group", extra={"event": "group_created", "stream": stream,
                                                   "group": self.group})
        return True

    # -- reading --

    def read(self, ids: Mapping[str, str], count: int, block_seconds: float | None,
             max_bytes: int | None = None) -> list[Entry]:
        """XREADGROUP over several streams: ``>`` for new entries, ``0`` for our own pending.

        With ``max_bytes``, at most ``count`` entries and ``max_bytes`` bytes in all (see
        _READ_BOUNDED); when nothing is there, it blocks for one new entry at most."""
        if not ids:
            return []
        if max_bytes is not None:
            entries = self._bounded(ids, count, max_bytes)
            if entries or block_seconds is None or any(v != ">" for v in ids.values()):
                return entries
            count = 1  # wait for the next entry: one entry is within any budget
        block = None if block_seconds is None else max(1, int(block_seconds * 1000))
        try:
            streams: dict[Any, Any] = dict(ids)
            reply = self.client.xreadgroup(
                self.group, self.consumer, streams, count=count, block=block
            )
        except redis.ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                # A DLQ key now holds something else: that stream is gone, as far as we go.
                with translated("TYPE"):
                    gone = [s for s in ids if self.client.type(s) not in (b"stream", "stream")]
                raise StreamGone(gone or list(ids)) from exc
            if "NOGROUP" in str(exc):
                # A stream was deleted (and maybe written again by a producer): recreate
                # the group where the stream exists, report the ones that are gone.
                gone = [s for s in ids if not self.ensure_group(s) and not self._exists(s)]
                if gone:
                    raise StreamGone(gone) from exc
                return []
            raise RedisUnavailable(f"XREADGROUP: {_first_line(exc)}") from exc
        except redis.RedisError as exc:
            raise RedisUnavailable(f"XREADGROUP: {type(exc).__name__}: {_first_line(exc)}") \
                from exc
        return list(_entries(reply))

    def _bounded(self, ids: Mapping[str, str], count: int, max_bytes: int) -> list[Entry]:
        streams = list(ids)
        try:
            reply: Any = self._read_bounded(
                keys=streams, args=[self.group, self.consumer, max(1, count),
                                    max(1, max_bytes), LARGEST_ENTRY,
                                    *(ids[s] for s in streams)])
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc) or "WRONGTYPE" in str(exc):
                # the plain read tells which stream, and recreates a group where it can
                return self.read(ids, 1, None)
            with translated("XREADGROUP"):
                raise
        except redis.RedisError as exc:
            raise RedisUnavailable(f"XREADGROUP: {type(exc).__name__}: {_first_line(exc)}") \
                from exc
        entries: list[Entry] = []
        for stream_name, rows in reply or []:
            stream = _text(stream_name)
            for raw_id, flat in rows:
                fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
                entries.append(Entry(stream, _text(raw_id), fields))
        return entries

    def autoclaim(
        self, stream: str, min_idle_seconds: float, count: int,
        on_lost: Callable[[list[str]], None], max_bytes: int | None = None,
    ) -> list[Entry]:
        """Claim entries idle on any consumer, following the cursor until ``0-0``.

        Since Redis 7, XAUTOCLAIM removes pending IDs whose entry was deleted from the PEL
        itself and reports them in a third reply element: ``on_lost`` hears of them page
        by page, since nothing else will ever see them again.
        """
        claimed: list[Entry] = []
        cursor = "0-0"
        idle_ms = int(min_idle_seconds * 1000)
        budget = max_bytes if max_bytes is not None else None
        dropped = deleted_key(self.group, self.consumer, stream)
        with translated(f"XAUTOCLAIM {stream}", stream):
            self.report_deleted(stream, on_lost)
            while len(claimed) < count and (budget is None or budget > 0):
                # Each page asks for no more than is left of the count, and of the bytes
                # at the largest valid entry size: the claims never pass either.
                step = count - len(claimed)
                if budget is not None:
                    step = min(step, max(1, budget // LARGEST_ENTRY))
                reply: Any = self._autoclaim(keys=[stream, dropped], args=[
                    self.group, self.consumer, idle_ms, cursor, step])
                cursor = _text(reply[0])
                for entry_id, flat in reply[1]:
                    if entry_id is not None:
                        fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
                        entry = Entry(stream, _text(entry_id), fields)
                        claimed.append(entry)
                        if budget is not None:
                            budget -= entry.size
                if len(reply) > 2 and reply[2]:
                    self.report_deleted(stream, on_lost)
                if cursor == "0-0":
                    break
        return claimed

    def claim_from(self, stream: str, consumers: Sequence[str], min_idle_seconds: float,
                   count: int, on_lost: Callable[[list[str]], None],
                   max_bytes: int | None = None) -> list[Entry]:
        """Claim up to ``count`` entries (and ``max_bytes``, sized as reads are: see
        _READ_BOUNDED) pending on these (dead) consumers and idle at least
        ``min_idle_seconds`` (see _CLAIM_FROM). ``on_lost`` hears of each one that was
        pending there and is deleted from the stream, as each call answers."""
        claimed: list[Entry] = []
        idle_ms = int(min_idle_seconds * 1000)
        budget = max_bytes
        dropped = deleted_key(self.group, self.consumer, stream)
        with translated(f"XCLAIM {stream}", stream):
            for consumer in consumers:  # a dead consumer's unreported drops become ours
                self._adopt(keys=[deleted_key(self.group, consumer, stream), dropped])
            self.report_deleted(stream, on_lost)
            for consumer in consumers:
                while len(claimed) < count and (budget is None or budget > 0):
                    step = count - len(claimed)
                    if budget is not None:
                        step = min(step, max(1, budget // LARGEST_ENTRY))
                    pending: Any = self.client.xpending_range(
                        stream, self.group, min="-", max="+", count=step,
                        consumername=consumer, idle=idle_ms)
                    ids = [_text(p["message_id"]) for p in pending]
                    if not ids:
                        break
                    reply: Any = self._claim_from(
                        keys=[stream, dropped], args=[self.group, self.consumer, idle_ms,
                                                      consumer, *ids])
                    got, lost = reply
                    if lost:
                        self.report_deleted(stream, on_lost)
                    for raw_id, flat in got:
                        fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
                        entry = Entry(stream, _text(raw_id), fields)
                        claimed.append(entry)
                        if budget is not None:
                            budget -= entry.size
                    if not got and not lost:
                        break  # the rest are no longer claimable from it
        return claimed

    def claim_own(self, stream: str, ids: Sequence[str],
                  on_lost: Callable[[list[str]], None], *, attempt: bool = True,
                  ) -> list[Entry]:
        """Re-deliver entries still pending on *us* (bumps their delivery count): how
        rejected entries retry. One another worker has claimed meanwhile is left to it.

        ``on_lost`` hears at once of each ID that was pending on us but is deleted from the
        stream (producer trimming takes the oldest first, and a waiting rejected entry is
        old): Redis drops it from the pending list as it answers, so a failure later in
        this call must not make us forget it.
        """
        entries: list[Entry] = []
        dropped = deleted_key(self.group, self.consumer, stream)
        with translated(f"XCLAIM {stream}", stream):
            self.report_deleted(stream, on_lost)
            for entry_id in ids:
                reply: Any = self._claim_own(keys=[stream, dropped],
                                             args=[self.group, self.consumer, entry_id,
                                                   "1" if attempt else "0"])
                if reply and reply[0] in (b"lost", "lost"):
                    self.report_deleted(stream, on_lost)
                    continue
                for raw_id, flat in reply or []:
                    fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
                    entries.append(Entry(stream, _text(raw_id), fields))
        return entries

    def split_deleted(self, stream: str, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Of pending IDs whose entry is gone: (lost: trimmed, or deleted with no other
        reader on the stream), (deleted, or perhaps trimmed, while another group reads the
        stream: the platform's retry worker deletes what it has copied or parked). An ID
        above the stream's max-deleted-entry-id was never deleted (XDEL sets that, trimming
        does not): it was trimmed, a loss. Unknown: all lost."""
        try:
            info: Any = self.client.xinfo_stream(stream)
            groups: Any = self.client.xinfo_groups(stream)
        except redis.RedisError:
            return list(ids), []
        others = [g for g in groups if _text(g.get("name", b"")) != self.group]
        deleted = info.get("max-deleted-entry-id")
        if not others or deleted is None:
            return list(ids), []
        top = id_pair(_text(deleted))
        return ([i for i in ids if id_pair(i) > top], [i for i in ids if id_pair(i) <= top])

    def touch(self, stream: str, ids: Sequence[str],
              on_lost: Callable[[list[str]], None]) -> None:
        """Reset the idle time of entries we hold (XCLAIM JUSTID: the count is not bumped),
        so that other workers do not claim them while we wait out an outage. ``on_lost``
        hears of the IDs that were pending on us but whose entry is gone."""
        if not ids:
            return
        with translated(f"XCLAIM JUSTID {stream}", stream):
            self.report_deleted(stream, on_lost)
            lost: Any = self._touch(keys=[stream, deleted_key(self.group, self.consumer,
                                                              stream)],
                                    args=[self.group, *ids])
            if lost:
                self.report_deleted(stream, on_lost)

    def held_elsewhere(self, stream: str, below: str, limit: int = 5000,
                       ) -> list[tuple[str, str]]:
        """(ID, correlation_id) of entries below ``below`` that other consumers of our
        group hold (read, not yet acknowledged), oldest first, at most ``limit``; the
        correlation_id is "" where it cannot be told. One XPENDING, and for IDs not seen
        before one script that reads only the correlation_id (see _CORRELATIONS)."""
        with translated(f"XPENDING {stream}", stream):
            summary: Any = self.client.xpending(stream, self.group)
            others = [c for c in summary.get("consumers") or []
                      if _text(c["name"]) != self.consumer]
            if not others:
                return []
            rows: Any = self.client.xpending_range(stream, self.group, min="-",
                                                   max="(" + below, count=limit)
            ids = [_text(r["message_id"]) for r in rows
                   if _text(r["consumer"]) != self.consumer]
            unknown = [i for i in ids if (stream, i) not in self._correlation_of]
            if unknown:
                if len(self._correlation_of) > 50_000:
                    self._correlation_of.clear()
                for start in range(0, len(unknown), 1000):
                    chunk = unknown[start:start + 1000]
                    found: Any = self._correlations(keys=[stream], args=chunk)
                    for entry_id, raw in zip(chunk, found, strict=True):
                        self._correlation_of[(stream, entry_id)] = _correlation(raw)
        return [(i, self._correlation_of[(stream, i)]) for i in ids]

    def report_deleted(self, stream: str, on_lost: Callable[[list[str]], None]) -> None:
        """Tell ``on_lost`` of the pending IDs our claims saw Redis drop (see DELETED_PREFIX)
        and not told yet, then take them off our list: each is told once, whatever reply
        was lost on the way (only a crash between the two steps can tell one twice)."""
        key = deleted_key(self.group, self.consumer, stream)
        ids = [_text(i) for i in self.client.lrange(key, 0, 999)]
        if not ids:
            return
        fresh = [i for i in ids if (stream, i) not in self._counted]
        if fresh:
            on_lost(fresh)
            self._counted.update((stream, i) for i in fresh)
        self._forget(keys=[key], args=ids)
        self._counted.difference_update((stream, i) for i in ids)

    def delivery_counts(self, stream: str, ids: Iterable[str]) -> dict[str, int]:
        """XPENDING's delivery counter for each ID still pending."""
        counts: dict[str, int] = {}
        with translated(f"XPENDING {stream}", stream):
            pipe = self.client.pipeline(transaction=False)
            id_list = list(ids)
            for entry_id in id_list:
                pipe.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1)
            for entry_id, rows in zip(id_list, pipe.execute(), strict=True):
                if rows:
                    counts[entry_id] = int(rows[0]["times_delivered"])
        return counts

    # -- acknowledging and parking --

    def ack_and_delete(self, ids_by_stream: Mapping[str, Sequence[str]]) -> None:
        """XACK and XDEL in one MULTI/EXEC round trip, so that XLEN is the true backlog."""
        if not any(ids_by_stream.values()):
            return
        with translated("XACK/XDEL"):
            pipe = self.client.pipeline(transaction=True)
            for stream, ids in ids_by_stream.items():
                if ids:
                    pipe.xack(stream, self.group, *ids)
                    pipe.xdel(stream, *ids)
            pipe.execute()

    def park(self, entry: Entry, *, reason: str, error_class: str, error: str,
             deliveries: int, details: Mapping[str, str] | None = None) -> int:
        """Atomically move one entry to its dead-letter stream: 1 when moved, 2 when it
        was gone from the stream and was parked from what we hold, 3 when we had parked
        it already (a lost reply), 4 when another consumer parked it, 0 when another
        worker has it."""
        fields: list[Any] = []
        message = entry.fields.get(b"message")
        fields += [b"message", message if message is not None else b""]
        others = [(name, value) for name, value in entry.fields.items() if name != b"message"]
        for name, value in others[:MAX_PARKED_FIELDS]:
            fields += [b"original." + name, value]
        if len(others) > MAX_PARKED_FIELDS:
            # Kept whole and exact: [[name, value], ...] as latin-1 text (a byte a char).
            rest = [[n.decode("latin-1"), v.decode("latin-1")]
                    for n, v in others[MAX_PARKED_FIELDS:]]
            fields += [b"original_overflow_fields", json.dumps(rest)]
        fields += [
            b"original_id", entry.id,
            b"original_stream", entry.stream,
            b"first_failed_at", entry.first_failed_at,
            b"moved_at", dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            b"final_retry_count", str(deliveries),
            b"reason", reason,
            b"error_class", error_class,
            b"error", error[:1000],
            b"consumer", self.consumer,
        ]
        for detail, text in (details or {}).items():
            fields += [f"detail.{detail}".encode(), text[:1000]]
        with translated(f"park {entry.stream} {entry.id}", entry.stream):
            done = self._park(
                keys=[entry.stream, self.dead_letter_stream(entry.stream),
                      park_mark(entry.stream, entry.id)],
                args=[self.group, entry.id, self.consumer, PARK_MARK_SECONDS, *fields],
            )
        return int(done)

    # -- housekeeping --

    def consumers(self, stream: str) -> list[dict[str, Any]]:
        with translated(f"XINFO CONSUMERS {stream}", stream):
            rows = self.client.xinfo_consumers(stream, self.group)
        return [{_text(k): (_text(v) if isinstance(v, bytes) else v) for k, v in row.items()}
                for row in rows]

    def delete_idle_consumers(self, stream: str, idle_seconds: float) -> list[str]:
        """Remove consumers idle that long and holding no pending entry (not ourselves)."""
        removed: list[str] = []
        for row in self.consumers(stream):
            name = str(row.get("name"))
            # Redis 7.2+/Valkey: "inactive" is -1 for a consumer that never read; then the
            # time since its last attempt ("idle") is all there is to go by.
            inactive = int(row.get("inactive", -1) or 0)
            idle_ms = inactive if inactive >= 0 else int(row.get("idle", 0) or 0)
            if name == self.consumer or int(row.get("pending", 0)) > 0:
                continue
            if idle_ms < idle_seconds * 1000:
                continue
            with translated(f"XGROUP DELCONSUMER {stream}", stream):
                result = self._delete_consumer(keys=[stream], args=[self.group, name])
                if int(result) >= 0:  # its unreported drops, if any, become ours
                    self._adopt(keys=[deleted_key(self.group, name, stream),
                                      deleted_key(self.group, self.consumer, stream)])
            if int(result) >= 0:
                removed.append(name)
        return removed

    def ping(self) -> None:
        with translated("PING"):
            self.client.ping()

    def group_exists(self, stream: str) -> bool:
        with translated(f"XINFO GROUPS {stream}"):
            try:
                groups = self.client.xinfo_groups(stream)
            except redis.ResponseError:
                return False
        return any(_text(g.get("name", b"")) == self.group for g in groups)


def check_connection(config: RedisConfig) -> None:
    """Fail fast with a StartupError if Redis cannot be reached."""
    client = make_client(config)
    try:
        with translated("PING"):
            client.ping()
    except RedisUnavailable as exc:
        raise StartupError(f"Redis at {config.host}:{config.port} db {config.db}: {exc}") from exc
    finally:
        client.close()


def _entries(reply: Any) -> Iterator[Entry]:
    if not reply:
        return
    for stream_name, rows in reply:
        stream = _text(stream_name)
        for entry_id, fields in rows:
            if entry_id is not None:
                yield Entry(stream, _text(entry_id), fields or {})


def id_pair(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:240] if text else type(exc).__name__


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def describe_entry(entry: Entry) -> dict[str, Any]:
    """Log-safe facts about an entry: IDs and correlation, never the payload."""
    facts: dict[str, Any] = {"stream": entry.stream, "entry_id": entry.id}
    raw = entry.fields.get(b"message")
    if raw:
        try:
            doc = json.loads(raw)
            payload = doc.get("payload") if isinstance(doc, dict) else None
            if isinstance(payload, str):
                payload = json.loads(payload)
            if isinstance(payload, dict) and isinstance(payload.get("correlation_id"), str):
                facts["correlation_id"] = payload["correlation_id"][:255]
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    return facts
