"""What the operator commands read: the state of every DLQ stream, and entries for humans."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import asdict
from typing import Any

import redis

from dlq_worker.config import Config
from dlq_worker.drain.decode import AUDIT_EVENTS, decode_entry, decode_envelope
from dlq_worker.drain.redis_io import translated
from dlq_worker.drain.scripts import LOST_KEY
from dlq_worker.errors import DecodeError, NotFound
from dlq_worker.watch import control, elsewhere
from dlq_worker.watch.loss import stream_stats
from dlq_worker.watch.monitor import redis_durability

_ID = re.compile(r"^(\d+)(-\d+)?$")


def scan_streams(client: redis.Redis, prefix: str) -> list[str]:
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    with translated("SCAN"):
        keys = client.scan_iter(match=pattern, count=1000, _type="stream")
        return sorted(k.decode() if isinstance(k, bytes) else str(k) for k in keys)


def resolve_stream(config: Config, client: redis.Redis, name: str) -> str:
    """``events``, ``audit:dlq:events`` or ``audit:dead-letter:events`` -> an existing key."""
    candidates = [name] if ":" in name else [config.streams.prefix + name,
                                              config.streams.dead_letter_prefix + name]
    with translated("TYPE"):
        for key in candidates:
            if client.type(key) in (b"stream", "stream"):
                return key
    raise NotFound(f"no stream {name!r} in Redis db {config.redis.db}")


def check_id(entry_id: str) -> str:
    if not _ID.match(entry_id):
        raise NotFound(f"{entry_id!r} is not a stream entry ID (like 1732700000000-0)")
    return entry_id


def gather_status(client: redis.Redis, config: Config,
                  metrics_url: str | None = None) -> dict[str, Any]:
    """Per stream: depth, cap fraction, pending, lag, oldest age, consumers, parked, lost."""
    streams: list[dict[str, Any]] = []
    unknown: list[str] = []
    with translated("HGETALL"):
        raw: Any = client.hgetall(LOST_KEY)
        lost_recorded = {_text(k): int(v) for k, v in raw.items()}
    for stream in scan_streams(client, config.streams.prefix):
        name = stream[len(config.streams.prefix):]
        if name not in config.streams.routes:
            unknown.append(stream)
            continue
        stats = stream_stats(client, config, stream)
        consumers: list[dict[str, Any]] = []
        if stats.group_exists:
            with translated(f"XINFO CONSUMERS {stream}"):
                rows = client.xinfo_consumers(stream, config.streams.group)
            consumers = [{"name": _text(r["name"]), "pending": int(r["pending"]),
                          "idle_seconds": round(int(r.get("idle", 0)) / 1000, 1)} for r in rows]
        row = asdict(stats)
        row["consumer_count"] = stats.consumers
        row.update({
            "table": config.streams.routes[name],
            "depth_ratio": round(stats.depth / config.streams.max_length, 4),
            "consumers": consumers,
            "dead_letter_stream": config.streams.dead_letter_prefix + name,
            "lost_unread_recorded": lost_recorded.get(stream, 0),
        })
        streams.append(row)
    durability = redis_durability(client)
    other, partly = elsewhere.find_once(config.redis, config.streams.prefix, client)
    with translated("HGETALL"):
        paused = control.read_pause(client, config.streams.group)
    result: dict[str, Any] = {
        "redis_db": config.redis.db,
        "group": config.streams.group,
        "paused": None if paused is None else paused.as_dict(),
        "streams": streams,
        "unknown_streams": unknown,
        "other_databases": {str(db): streams for db, streams in other.items()},
        "other_databases_partly_walked": partly,
        "redis": asdict(durability),
        "time": time.time(),
    }
    if metrics_url:
        result["worker"] = worker_counters(metrics_url)
    return result


def _pause_line(paused: dict[str, Any]) -> str:
    pause = control.Pause(paused["reason"], paused["by"], paused["since"])
    return (f"PAUSED for {_age(paused['seconds'])}: {pause.describe()} "
            "(every replica finishes what it holds and takes nothing new; "
            "`dlq-worker resume` to go on)")


def worker_counters(url: str) -> dict[str, float] | dict[str, str]:
    """Sum the worker's counters from its /metrics (one replica's view)."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - operator's URL
            body = resp.read().decode()
    except OSError as exc:
        return {"error": f"{url}: {exc}"}
    wanted = ("dlq_worker_entries_written_total", "dlq_worker_entries_parked_total",
              "dlq_worker_entries_duplicate_total", "dlq_worker_entries_trimmed_unread_total")
    totals = dict.fromkeys(wanted, 0.0)
    for line in body.splitlines():
        for name in wanted:
            if line.startswith(name + "{") or line.startswith(name + " "):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return {k.removeprefix("dlq_worker_"): v for k, v in totals.items()}


def format_status(status: dict[str, Any]) -> str:
    lines = [f"Redis db {status['redis_db']}, group {status['group']}", ""]
    paused = status.get("paused")
    if paused:
        lines[-1:] = [_pause_line(paused), ""]
    header = (f"{'STREAM':<28} {'TABLE':<19} {'DEPTH':>7} {'CAP%':>6} {'PENDING':>8} "
              f"{'LAG':>7} {'OLDEST':>9} {'PARKED':>7} {'LOST':>6}")
    lines.append(header)
    for s in status["streams"]:
        lag = "-" if s["lag"] is None else str(s["lag"])
        lines.append(
            f"{s['stream']:<28} {s['table']:<19} {s['depth']:>7} {s['depth_ratio'] * 100:>5.1f}% "
            f"{s['pending'] if s['pending'] is not None else '-':>8} {lag:>7} "
            f"{_age(s['oldest_age_seconds']):>9} {s['dead_letter_depth']:>7} "
            f"{s['lost_unread_recorded']:>6}")
        for c in s["consumers"]:
            lines.append(f"    consumer {c['name']:<30} pending {c['pending']:>6}  "
                         f"idle {_age(c['idle_seconds'])}")
        if not s["group_exists"]:
            lines.append("    (no consumer group yet: no worker has seen this stream)")
    if not status["streams"]:
        lines.append("(no DLQ streams)")
    for stream in status["unknown_streams"]:
        lines.append(f"unknown stream (no route, not drained): {stream}")
    for db, streams in sorted(status["other_databases"].items()):
        for stream, length in sorted(streams.items()):
            lines.append(f"OTHER DATABASE: DB {db} holds {stream} ({length} entries), "
                         f"not drained by a worker on DB {status['redis_db']}")
    r = status["redis"]
    lines += ["", f"Redis: maxmemory-policy {r['maxmemory_policy']}, used {r['used_memory']} B "
              f"of {r['maxmemory'] or 'unlimited'}, AOF {'on' if r['aof_enabled'] else 'off'}, "
              f"RDB save {r['rdb_save']!r}"]
    lines += [f"WARNING {w}" for w in r["warnings"]]
    if "worker" in status:
        lines.append("worker counters: " + json.dumps(status["worker"]))
    return "\n".join(lines)


def describe_for_humans(config: Config, stream: str, entry_id: str, fields: dict[bytes, bytes],
                        *, payload: bool, show_sensitive: bool) -> dict[str, Any]:
    """An entry as an operator wants to see it: IDs, type, retry info, and why it fails."""
    out: dict[str, Any] = {"id": entry_id, "stream": stream}
    for name, value in fields.items():
        key = name.decode(errors="replace")
        if key != "message":
            out[key] = value.decode(errors="replace")
    table = config.streams.routes.get(stream.rsplit(":", maxsplit=1)[-1], AUDIT_EVENTS)
    try:
        envelope = decode_envelope(fields)
    except DecodeError as exc:
        out["decode"] = f"error: {exc.reason}: {exc}"
        return out
    p = envelope.payload
    out.update({
        "type": envelope.type,
        "timestamp": envelope.timestamp.isoformat() if envelope.timestamp else None,
        "retry_count": envelope.retry_count,
        "last_error": envelope.last_error,
        "record_id": p.get("event_id") or p.get("notification_id"),
        "correlation_id": p.get("correlation_id") or p.get("remediation_id"),
        "is_sensitive": bool(p.get("is_sensitive")),
    })
    try:
        decode_entry(table, fields)
        out["decode"] = "ok"
    except DecodeError as exc:
        out["decode"] = f"error: {exc.reason}: {exc}"
    if payload:
        out["payload"] = p if (show_sensitive or not out["is_sensitive"]) else \
            "<redacted: is_sensitive; use --show-sensitive>"
    return out


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
