"""`dlq-worker move`: carry every DLQ and dead-letter stream to another Redis (the design's
V2: a dedicated instance for the DLQ), without loss or duplicates, safe to re-run.

Per stream: copy entries with their *own IDs* (so a copied entry can never be copied
twice: XADD refuses an ID not above the target's last one), and record in the same MULTI,
on the target, the last source ID copied (``dlq-worker:moved``): an entry that is gone
from the target since (a worker there drained it) is known to have been copied. Verify
every source ID is on the target or recorded, create the consumer group at ID 0 there,
then XDEL from the source only what was verified. An interruption at any point leaves
each entry in the source, the target, or both, never in neither; the next run picks up
where the record ends. An entry whose ID the target has passed without it (producers
wrote there first) is copied under a new ID, recorded by its source ID.

A DLQ stream on the target never grows past ``max_fill`` of the producers' cap
(``streams.max_length``): their ``MAXLEN ~`` would trim the oldest entries, read or not.
While it is that full the move waits for a worker there to drain it, ``wait`` seconds
without room at most, then raises NoRoom with the rest still in the source.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from dlq_worker.config import Config
from dlq_worker.drain.redis_io import translated
from dlq_worker.errors import NoRoom
from dlq_worker.ops.status import scan_streams

CHUNK = 500
#: On the target: stream -> the last source ID copied there.
PROGRESS_KEY = "dlq-worker:moved"
#: On the target, per stream: source IDs copied under a new ID (see above).
RENAMED_PREFIX = "dlq-worker:moved-renamed:"


@dataclass
class MoveReport:
    streams: dict[str, int] = field(default_factory=dict)
    copied: int = 0
    already_there: int = 0
    deleted: int = 0


def stream_keys(client: redis.Redis, config: Config) -> list[str]:
    return scan_streams(client, config.streams.prefix) + \
        scan_streams(client, config.streams.dead_letter_prefix)


def count_entries(client: redis.Redis, keys: list[str]) -> int:
    with translated("XLEN"):
        return sum(int(client.xlen(k)) for k in keys)


@dataclass(frozen=True)
class Pace:
    """How full a DLQ stream on the target may get, and how long to wait for room."""

    max_fill: float = 0.5
    wait: float = 600.0
    sleep: Callable[[float], None] = time.sleep


def move(source: redis.Redis, target: redis.Redis, config: Config, *,
         progress: Callable[[int], None] | None = None, pace: Pace | None = None,
         ) -> MoveReport:
    report = MoveReport()
    for key in stream_keys(source, config):
        report.streams[key] = _move_stream(source, target, config, key, report, progress,
                                           pace or Pace())
    return report


def _room(target: redis.Redis, config: Config, key: str, pace: Pace, report: MoveReport,
          ) -> int:
    """How many entries the target's stream may take now, waiting for room (see above)."""
    if not key.startswith(config.streams.prefix):
        return CHUNK  # a dead-letter stream: nobody trims it
    limit = max(1, int(config.streams.max_length * pace.max_fill))
    waited = 0.0
    while True:
        with translated(f"XLEN {key} (target)"):
            room = limit - int(target.xlen(key))
        if room > 0:
            return min(CHUNK, room)
        if waited >= pace.wait:
            raise NoRoom(
                f"{key} on the target holds {limit} entries or more ({pace.max_fill:.0%} of "
                f"the producers' cap of {config.streams.max_length}) and did not drain for "
                f"{pace.wait:.0f}s: copied {report.copied}, the rest are still in the "
                "source; run it again once a worker drains the target (is one running?)")
        pace.sleep(0.5)
        waited += 0.5


def _last_id(client: redis.Redis, key: str) -> tuple[int, int]:
    with translated(f"XINFO STREAM {key}"):
        try:
            info: Any = client.xinfo_stream(key)
        except redis.ResponseError:
            return (0, 0)
    return _parse(info["last-generated-id"])


def _parse(entry_id: Any) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _move_stream(source: redis.Redis, target: redis.Redis, config: Config, key: str,
                 report: MoveReport, progress: Callable[[int], None] | None,
                 pace: Pace) -> int:
    moved = 0
    target_top = _last_id(target, key)
    with translated(f"HGET {PROGRESS_KEY} (target)"):
        recorded: Any = target.hget(PROGRESS_KEY, key)
        renamed = {_text(i) for i in target.smembers(RENAMED_PREFIX + key)}
    copied_through = _parse(recorded) if recorded else (0, 0)
    if key.startswith(config.streams.prefix):
        # The group first, at 0: whatever is copied is read there, whenever a worker starts
        try:
            target.xgroup_create(key, config.streams.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    start = "-"
    while True:
        count = _room(target, config, key, pace, report)
        with translated(f"XRANGE {key}"):
            rows: Any = source.xrange(key, min=start, count=count)
        if not rows:
            break
        # IDs the target has passed, not recorded as copied: there already (copied by a
        # run that kept no record), or never copied
        passed = [raw_id for raw_id, _ in rows if _parse(raw_id) <= target_top
                  and _parse(raw_id) > copied_through and _text(raw_id) not in renamed]
        there = {_text(i) for i in _present(target, key, passed)} if passed else set()
        pipe = target.pipeline(transaction=True)
        fresh: list[str] = []
        known: set[str] = set()
        for raw_id, fields in rows:
            entry_id = _text(raw_id)
            if _parse(raw_id) <= copied_through or entry_id in renamed or entry_id in there:
                known.add(entry_id)  # copied by an earlier run (maybe drained since)
            elif _parse(raw_id) > target_top:
                pipe.xadd(key, fields, id=raw_id)
                fresh.append(entry_id)
                target_top = _parse(raw_id)
            else:
                pipe.xadd(key, fields)  # the target has passed its ID: a new one
                pipe.sadd(RENAMED_PREFIX + key, entry_id)
                fresh.append(entry_id)
                known.add(entry_id)
        copied_through = max(copied_through, _parse(rows[-1][0]))
        pipe.hset(PROGRESS_KEY, key, _text(rows[-1][0]))
        with translated(f"XADD {key} (target)"):
            pipe.execute()
        report.copied += len(fresh)
        report.already_there += len(rows) - len(fresh)
        ids = [raw_id for raw_id, _ in rows if _text(raw_id) not in known]
        present = _present(target, key, ids) if ids else set()
        if len(present) != len(ids):
            missing = [i for i in ids if i not in present]
            raise RuntimeError(f"{key}: {len(missing)} entries not found on the target after "
                               "copying; nothing was deleted from the source for them")
        with translated(f"XDEL {key} (source)"):  # verified: on the target, or recorded
            report.deleted += int(source.xdel(key, *[_text(i) for i, _ in rows]))
        moved += len(rows)
        if progress:
            progress(len(rows))
        start = "(" + _text(rows[-1][0])
    return moved


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _present(client: redis.Redis, key: str, ids: list[Any]) -> set[Any]:
    """IDs of ``ids`` present in the target (one XRANGE over their span)."""
    with translated(f"XRANGE {key} (target)"):
        rows: Any = client.xrange(key, min=ids[0], max=ids[-1])
    wanted = set(ids)
    return {raw_id for raw_id, _ in rows if raw_id in wanted}
