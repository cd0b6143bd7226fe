"""`dlq-worker move`: carry every DLQ and dead-letter stream to another Redis (the design's
V2: a dedicated instance for the DLQ), without loss or duplicates, safe to re-run.

Per stream: copy entries with their *own IDs* (so a copied entry can never be copied
twice: XADD refuses an ID not above the target's last one), verify every source ID is in
the target, create the consumer group at ID 0 there, then XDEL from the source only what
was verified. An interruption at any point leaves each entry in the source, the target,
or both, never in neither; the next run picks up where the target ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from dlq_worker.config import Config
from dlq_worker.source import translated
from dlq_worker.status import scan_streams

CHUNK = 500


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


def move(source: redis.Redis, target: redis.Redis, config: Config, *,
         progress: Callable[[int], None] | None = None) -> MoveReport:
    report = MoveReport()
    for key in stream_keys(source, config):
        report.streams[key] = _move_stream(source, target, config, key, report, progress)
    return report


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
                 report: MoveReport, progress: Callable[[int], None] | None) -> int:
    moved = 0
    target_top = _last_id(target, key)
    start = "-"
    verified: list[str] = []
    while True:
        with translated(f"XRANGE {key}"):
            rows: Any = source.xrange(key, min=start, count=CHUNK)
        if not rows:
            break
        pipe = target.pipeline(transaction=False)
        fresh = []
        for raw_id, fields in rows:
            if _parse(raw_id) > target_top:
                pipe.xadd(key, fields, id=raw_id)
                fresh.append(raw_id)
        with translated(f"XADD {key} (target)"):
            if fresh:
                pipe.execute()
        report.copied += len(fresh)
        report.already_there += len(rows) - len(fresh)
        if fresh:
            target_top = _parse(fresh[-1])
        ids = [raw_id for raw_id, _ in rows]
        present = _present(target, key, ids)
        if len(present) != len(ids):
            missing = [i for i in ids if i not in present]
            raise RuntimeError(f"{key}: {len(missing)} entries not found on the target after "
                               "copying; nothing was deleted from the source for them")
        verified += [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        moved += len(rows)
        if progress:
            progress(len(rows))
        start = "(" + (rows[-1][0].decode() if isinstance(rows[-1][0], bytes) else rows[-1][0])
    if key.startswith(config.streams.prefix):
        try:
            target.xgroup_create(key, config.streams.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    for i in range(0, len(verified), CHUNK):
        with translated(f"XDEL {key} (source)"):
            report.deleted += int(source.xdel(key, *verified[i:i + CHUNK]))
    return moved


def _present(client: redis.Redis, key: str, ids: list[Any]) -> set[Any]:
    """IDs of ``ids`` present in the target (one XRANGE over their span)."""
    with translated(f"XRANGE {key} (target)"):
        rows: Any = client.xrange(key, min=ids[0], max=ids[-1])
    wanted = set(ids)
    return {raw_id for raw_id, _ in rows if raw_id in wanted}
