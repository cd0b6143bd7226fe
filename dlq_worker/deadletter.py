"""Parked entries: list them, show one, replay them into their DLQ stream, purge them.

Replay moves each entry with one Lua script (XADD to the DLQ stream, XDEL from the
dead-letter stream), so an interrupted replay leaves every entry in exactly one place.
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from dlq_worker.config import Config
from dlq_worker.errors import NotFound
from dlq_worker.source import translated
from dlq_worker.status import check_id, scan_streams

#: Rebuilds the original entry (``message`` plus any ``original.<field>``) in its stream.
_REPLAY = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
local f = e[1][2]
local out = {}
local message = nil
local others = 0
for i = 1, #f, 2 do
  if f[i] == 'message' then message = f[i + 1]
  elseif string.sub(f[i], 1, 9) == 'original.' then
    out[#out + 1] = string.sub(f[i], 10)
    out[#out + 1] = f[i + 1]
    others = others + 1
  end
end
if message ~= nil and (message ~= '' or others == 0) then
  table.insert(out, 1, message)
  table.insert(out, 1, 'message')
end
local id = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""


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

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dead_letter_stream": self.dead_letter_stream,
            "original_stream": self.original_stream,
            "original_id": self.get("original_id"),
            "parked_at": _id_time(self.id),
            "first_failed_at": self.get("first_failed_at"),
            "moved_at": self.get("moved_at"),
            "reason": self.get("reason"),
            "error_class": self.get("error_class"),
            "error": self.get("error"),
            "final_retry_count": self.get("final_retry_count"),
        }


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
        if self.reason and entry.get("reason") != self.reason:
            return False
        return not (self.error_class and entry.get("error_class") != self.error_class)


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

    def replay(self, entries: list[Parked],
               progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Move each entry back to its DLQ stream (atomically, one at a time)."""
        moved: dict[str, int] = {}
        for entry in entries:
            target = self.target_stream(entry)
            with translated(f"replay {entry.id}"):
                new_id = self._replay(keys=[entry.dead_letter_stream, target], args=[entry.id])
            if new_id:
                moved[target] = moved.get(target, 0) + 1
            if progress:
                progress(1)
        return moved

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
