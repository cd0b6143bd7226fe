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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import redis

from dlq_worker.config import Config
from dlq_worker.drain.redis_io import (
    LARGEST_ENTRY,
    MAX_PARKED_FIELDS,
    Entry,
    _entries,
    _first_line,
    _text,
    glob_escape,
    id_pair,
    make_client,
    translated,
)
from dlq_worker.drain.scripts import (
    _ACK_DELETE,
    _ADOPT,
    _AUTOCLAIM,
    _CLAIM_FROM,
    _CLAIM_OWN,
    _CORRELATIONS,
    _CREATE_GROUP,
    _CREATE_ROUTED,
    _DELETE_IDLE_CONSUMER,
    _EXPECT_COPIES,
    _FORGET,
    _PARK,
    _READ_BOUNDED,
    _TOUCH,
    BEFORE_READ_PREFIX,
    COPIES_PREFIX,
    FIGURES_PREFIX,
    LEADER_KEY,
    LOST_KEY,
    PARK_MARK_SECONDS,
    UNCERTAIN_KEY,
    _correlation,
    deleted_key,
    park_mark,
)
from dlq_worker.errors import RedisUnavailable, StreamGone

log = logging.getLogger(__name__)


def _count_keys(stream: str) -> list[str]:
    """The stream first, then the keys of its loss count, which restarts with its group."""
    return [stream, LOST_KEY, LEADER_KEY, UNCERTAIN_KEY, COPIES_PREFIX + stream,
            FIGURES_PREFIX + stream, BEFORE_READ_PREFIX + stream]


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
        self._expect_copies = self.client.register_script(_EXPECT_COPIES)
        self._ack_delete = self.client.register_script(_ACK_DELETE)
        #: Per stream, its last ID at our last touch, and at the touch before it.
        self._touched_top: dict[str, str] = {}
        self._present_up_to: dict[str, str] = {}
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
                if self._create_routed(keys=_count_keys(stream), args=[self.group]):
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
            self._create_group(keys=_count_keys(stream), args=[self.group])
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
                keys=[*streams, *(BEFORE_READ_PREFIX + s for s in streams)],
                args=[self.group, self.consumer, max(1, count),
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
                if not flat:
                    fields = {}
                elif len(flat) == 2:  # one field: what producers write
                    fields = {flat[0]: flat[1]}
                else:
                    fields = dict(zip(flat[::2], flat[1::2], strict=True))
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
            lost, top = self._touch(keys=[stream, deleted_key(self.group, self.consumer,
                                                              stream)],
                                    args=[self.group, *ids])
            # what was present at the last touch was present up to its last ID
            self._present_up_to[stream] = self._touched_top.get(stream, "")
            if top:
                self._touched_top[stream] = _text(top)
            if lost:
                self.report_deleted(stream, on_lost)

    def expect_copies(self, stream: str, ids: Sequence[str]) -> int:
        """Entries we hold in memory that Redis says are deleted while another group reads
        the stream: the platform's retry worker copies an entry it failed to write to the
        tail, then deletes it. Recorded (see _EXPECT_COPIES) so that such a copy, trimmed
        before any group reads it, is not counted as a lost record: ours is written from
        memory. The number recorded."""
        if not ids:
            return 0
        with translated(f"copies in flight {stream}", stream):
            return int(self._expect_copies(
                keys=[stream, COPIES_PREFIX + stream],
                args=[self.group, self._present_up_to.get(stream, ""), *ids]))

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

    def ack_and_delete(self, ids_by_stream: Mapping[str, Sequence[str]], *,
                       first_try: bool = True) -> int:
        """XACK and XDEL, one atomic step per stream, so that XLEN is the true backlog.
        On a first try, entries found deleted already while another group reads the stream
        are recorded as the platform's copies in flight (see _ACK_DELETE). The number
        recorded."""
        recorded = 0
        with translated("XACK/XDEL"):
            for stream, ids in ids_by_stream.items():
                if ids:
                    recorded += int(self._ack_delete(
                        keys=[stream, COPIES_PREFIX + stream],
                        args=[self.group, "1" if first_try else "0", *ids]))
        return recorded

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
