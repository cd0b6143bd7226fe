"""Parked entries: list them, show one, replay them into their DLQ stream, purge them.

Replay moves each entry with one Lua script (XADD to the DLQ stream, XDEL from the
dead-letter stream), so an interrupted replay leaves every entry in exactly one place.
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from dlq_worker.config import Config
from dlq_worker.drain.redis_io import translated
from dlq_worker.errors import NoRoom, NotFound
from dlq_worker.ops.status import check_id, scan_streams

#: Puts the original entry (ARGV[3..], rebuilt by ``original_fields``) back in its stream
#: and deletes the dead letter ARGV[1], only while that stream holds fewer than ARGV[2]
#: entries ('full' otherwise: the check and the move are one step, so two replays at once
#: cannot overfill it) and only while the dead letter is still there (false otherwise).
_REPLAY = """
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[2]) then return 'full' end
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""


#: Arguments a Lua script can hand to one redis.call through unpack (its C stack holds
#: about 8,000): entries with more fields are moved without a script.
_LUA_ARGS = 7000


def original_fields(fields: dict[bytes, bytes]) -> list[bytes]:
    """The entry as the producer wrote it: ``message``, every ``original.<field>``, and the
    fields past the park's limit kept whole in ``original_overflow_fields`` (latin-1 text,
    a byte a char), in their order."""
    out: list[bytes] = []
    others = 0
    for name, value in fields.items():
        if name.startswith(b"original."):
            out += [name[len(b"original."):], value]
            others += 1
        elif name == b"original_overflow_fields":
            for n, v in json.loads(value):
                out += [n.encode("latin-1"), v.encode("latin-1")]
                others += 1
    message = fields.get(b"message")
    if message is not None and (message != b"" or others == 0):
        out = [b"message", message, *out]
    return out


@dataclass(frozen=True)
class Parked:
    dead_letter_stream: str
    id: str
    fields: dict[bytes, bytes]

    def get(self, name: str) -> str:
        return self.fields.get(name.encode(), b"").decode(errors="replace")

    @property
    def original_stream(self) -> str:
        return self.get("original_stream")

    @property
    def by_platform(self) -> bool:
        """Parked by the platform's own retry worker (its dead letters carry no reason and
        no consumer: it moves an entry there when its retry_count reaches 6)."""
        return not self.get("reason") and not self.get("consumer")

    def summary(self) -> dict[str, Any]:
        platform = self.by_platform
        return {
            "id": self.id,
            "dead_letter_stream": self.dead_letter_stream,
            "original_stream": self.original_stream,
            "original_id": self.get("original_id"),
            "parked_at": _id_time(self.id),
            "parked_by": "platform retry worker" if platform else
                         f"dlq-worker {self.get('consumer')}",
            "first_failed_at": self.get("first_failed_at"),
            "moved_at": self.get("moved_at"),
            "reason": "retries_exhausted" if platform else self.get("reason"),
            "error_class": "PlatformRetriesExhausted" if platform else self.get("error_class"),
            "error": self._platform_error() if platform else self.get("error"),
            "final_retry_count": self.get("final_retry_count"),
        }

    def _platform_error(self) -> str:
        """The platform's dead letter keeps the envelope's last_error: why it last failed."""
        try:
            envelope = json.loads(self.fields.get(b"message", b""))
            return str(envelope.get("last_error", ""))[:1000] if isinstance(
                envelope, dict) else ""
        except ValueError:
            return ""


@dataclass(frozen=True)
class Selection:
    """Which parked entries an operation acts on. Empty filters select nothing."""

    ids: tuple[str, ...] = ()
    stream: str | None = None
    reason: str | None = None
    error_class: str | None = None
    everything: bool = False
    #: Parked at or after / before this time (Unix ms; a parked entry's ID is that time).
    since_ms: int | None = None
    until_ms: int | None = None
    #: Paging: only entries after this dead-letter ID.
    after: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.ids or self.stream or self.reason or self.error_class or self.everything
                    or self.since_ms is not None or self.until_ms is not None)

    def matches(self, entry: Parked) -> bool:
        if self.ids and entry.id not in self.ids:
            return False
        facts = entry.summary()  # the platform's dead letters by their reason too
        if self.reason and facts["reason"] != self.reason:
            return False
        return not (self.error_class and facts["error_class"] != self.error_class)


class DeadLetters:
    def __init__(self, client: redis.Redis, config: Config) -> None:
        self.client = client
        self.config = config
        self._replay = client.register_script(_REPLAY)

    def streams(self, name: str | None = None) -> list[str]:
        prefix = self.config.streams.dead_letter_prefix
        found = scan_streams(self.client, prefix)
        if name is None:
            return found
        short = name.split(":")[-1]
        wanted = prefix + short
        if wanted not in found:
            raise NotFound(f"no dead-letter stream {wanted!r}")
        return [wanted]

    def iterate(self, selection: Selection, limit: int | None = None) -> Iterator[Parked]:
        """The selected entries of every dead-letter stream, oldest first (merged across
        streams by ID, which is when each was parked), up to ``limit``."""
        for ids in selection.ids:
            check_id(ids)
        if selection.after:
            check_id(selection.after)
        merged = heapq.merge(*(self._range(stream, selection)
                               for stream in self.streams(selection.stream)),
                             key=lambda e: _id_key(e.id))
        count = 0
        for entry in merged:
            if selection.matches(entry):
                yield entry
                count += 1
                if limit is not None and count >= limit:
                    return

    def _range(self, stream: str, selection: Selection) -> Iterator[Parked]:
        start = "-" if selection.since_ms is None else str(selection.since_ms)
        if selection.after and (selection.since_ms is None
                                or _id_key(selection.after) >= (selection.since_ms, 0)):
            start = "(" + selection.after
        end = "+" if selection.until_ms is None else str(selection.until_ms - 1)
        while True:
            with translated(f"XRANGE {stream}"):
                rows: Any = self.client.xrange(stream, min=start, max=end, count=500)
            for raw_id, fields in rows:
                yield Parked(stream, raw_id.decode(), fields)
            if len(rows) < 500:
                return
            start = "(" + rows[-1][0].decode()

    def show(self, entry_id: str) -> Parked:
        check_id(entry_id)
        for stream in self.streams():
            with translated(f"XRANGE {stream}"):
                rows: Any = self.client.xrange(stream, min=entry_id, max=entry_id)
            if rows:
                return Parked(stream, entry_id, rows[0][1])
        raise NotFound(f"no parked entry {entry_id}")

    def select(self, selection: Selection) -> list[Parked]:
        """The entries a replay or purge would touch; every named ID must be parked."""
        if selection.empty:
            raise NotFound("select entries with --id, --stream, --reason, --error-class or --all")
        entries = list(self.iterate(selection))
        missing = set(selection.ids) - {e.id for e in entries}
        if missing:
            raise NotFound(f"not parked entries: {', '.join(sorted(missing))}")
        return entries

    def target_stream(self, entry: Parked) -> str:
        prefix = self.config.streams.prefix
        target = entry.original_stream or (
            prefix + entry.dead_letter_stream[len(self.config.streams.dead_letter_prefix):])
        if not target.startswith(prefix):
            raise NotFound(f"{entry.id}: original stream {target!r} is outside {prefix!r}")
        return target

    def room(self, max_fill: float) -> int:
        """How long a DLQ stream may grow by a replay: ``max_fill`` of the producers' cap
        (``streams.max_length``), the rest left to the producers while the worker drains."""
        return max(1, int(self.config.streams.max_length * max_fill))

    def replay(self, entries: list[Parked], progress: Callable[[int], None] | None = None, *,
               max_fill: float = 0.5, wait: float = 600.0,
               sleep: Callable[[float], None] = time.sleep) -> dict[str, int]:
        """Move each entry back to its DLQ stream (atomically, one at a time), never past
        ``room(max_fill)`` entries in that stream: the producers' ``MAXLEN ~`` trimming would
        delete the oldest, read or not. While it is full the replay waits for the worker to
        drain it, for ``wait`` seconds without progress at most, then raises NoRoom."""
        moved: dict[str, int] = {}
        limit = self.room(max_fill)
        for entry in entries:
            target = self.target_stream(entry)
            waited = 0.0
            while True:
                with translated(f"replay {entry.id}"):
                    new_id = self._move_back(entry, target, limit)
                if new_id not in (b"full", "full"):
                    break
                if waited >= wait:
                    done = sum(moved.values())
                    raise NoRoom(
                        f"{target} holds {limit} entries or more ({max_fill:.0%} of the "
                        f"producers' cap of {self.config.streams.max_length}) and did not "
                        f"drain for {wait:.0f}s: replayed {done} of {len(entries)}, the rest "
                        "are still parked; run it again once the worker drains (is one "
                        "running?)")
                sleep(0.5)
                waited += 0.5
            if new_id:
                moved[target] = moved.get(target, 0) + 1
            if progress:
                progress(1)
        return moved

    def _move_back(self, entry: Parked, target: str, limit: int) -> Any:
        """One entry back in ``target``, atomically (see _REPLAY): the new ID, 'full', or
        None when it was no longer parked. An entry of more fields than a Lua call can
        unpack goes through WATCH/MULTI instead, checked the same way."""
        fields = original_fields(entry.fields)
        if len(fields) <= _LUA_ARGS:
            return self._replay(keys=[entry.dead_letter_stream, target],
                                args=[entry.id, limit, *fields])
        pairs = dict(zip(fields[::2], fields[1::2], strict=True))
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(entry.dead_letter_stream, target)  # type: ignore[no-untyped-call]
                    if int(pipe.xlen(target)) >= limit:
                        return "full"
                    if not pipe.xrange(entry.dead_letter_stream, entry.id, entry.id):
                        return None
                    pipe.multi()
                    pipe.xadd(target, pairs)  # type: ignore[arg-type]
                    pipe.xdel(entry.dead_letter_stream, entry.id)
                    return pipe.execute()[0]
                except redis.WatchError:
                    continue

    def purge(self, entries: list[Parked],
              progress: Callable[[int], None] | None = None) -> dict[str, int]:
        removed: dict[str, int] = {}
        for entry in entries:
            with translated(f"XDEL {entry.dead_letter_stream}"):
                n = int(self.client.xdel(entry.dead_letter_stream, entry.id))
            if n:
                removed[entry.dead_letter_stream] = removed.get(entry.dead_letter_stream, 0) + n
            if progress:
                progress(1)
        return removed


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _id_time(entry_id: str) -> str:
    """An entry ID's time (when it was added: for a parked entry, when it was parked)."""
    ms = _id_key(entry_id)[0]
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")
