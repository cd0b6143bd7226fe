"""`dlq-worker doctor`: a checklist of what must hold for no audit loss, and what to do."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlq_worker import config as config_mod
from dlq_worker import exitcodes
from dlq_worker.config import Config
from dlq_worker.drain.redis_io import make_client, translated
from dlq_worker.drain.schema import add_months, partition_name
from dlq_worker.drain.scripts import LOST_KEY
from dlq_worker.drain.sink import Sink
from dlq_worker.errors import ConfigError, TransientError
from dlq_worker.ops.status import scan_streams
from dlq_worker.watch import elsewhere
from dlq_worker.watch.loss import stream_stats
from dlq_worker.watch.monitor import redis_durability

PASS, WARN, FAIL = "pass", "warn", "fail"
EXIT = {PASS: exitcodes.OK, WARN: exitcodes.DOCTOR_WARN, FAIL: exitcodes.DOCTOR_FAIL}


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def run_checks(config_path: str | None, overrides: dict[str, dict[str, Any]],
               platform_path: str | None = None) -> list[Check]:
    checks: list[Check] = []
    try:
        cfg = config_mod.load(config_path, overrides=overrides, platform_path=platform_path)
    except ConfigError as exc:
        return [Check("config valid", FAIL, str(exc), "fix the key named above "
                      "(`dlq-worker check-config` shows the effective configuration)")]
    checks.append(Check("config valid", PASS, str(Path(config_path)) if config_path
                        else "defaults + environment"))
    checks += _redis_checks(cfg)
    checks += _database_checks(cfg)
    return checks


def _guard(name: str, fix: str, fn: Callable[[], list[Check]]) -> list[Check]:
    try:
        return fn()
    except TransientError as exc:
        return [Check(name, FAIL, str(exc), fix)]


def _redis_checks(cfg: Config) -> list[Check]:
    client = make_client(cfg.redis)
    where = f"{cfg.redis.host}:{cfg.redis.port} db {cfg.redis.db}"

    def checks() -> list[Check]:
        out: list[Check] = []
        with translated("PING"):
            client.ping()
        if cfg.redis.db == 0:
            out.append(Check("redis reachable, right DB", WARN, f"{where}: DB 0 is the cache's",
                             "set REDIS_DB=1: the DLQ lives in DB 1 on the shared instance"))
        else:
            out.append(Check("redis reachable, right DB", PASS, where))
        d = redis_durability(client)
        evicts = [w for w in d.warnings if w.startswith("eviction_policy")]
        out.append(Check("eviction policy safe", WARN if evicts else PASS,
                         f"maxmemory-policy {d.maxmemory_policy}",
                         "use noeviction or a volatile-* policy: allkeys-* can evict DLQ streams"
                         if evicts else ""))
        persist = [w for w in d.warnings if w.startswith("persistence")]
        out.append(Check("persistence on", WARN if persist else PASS,
                         f"AOF {'on' if d.aof_enabled else 'off'}, RDB save {d.rdb_save!r}",
                         "enable appendonly yes: without persistence a restart loses the DLQ"
                         if persist else ""))
        if d.maxmemory:
            ratio = d.used_memory / d.maxmemory
            status = FAIL if ratio >= 0.95 else WARN if ratio >= 0.8 else PASS
            out.append(Check("memory headroom", status, f"{ratio:.0%} of maxmemory used",
                             "drain or raise maxmemory before writes fail" if status != PASS
                             else ""))
        else:
            out.append(Check("memory headroom", PASS, "no maxmemory limit set"))
        out += _stream_checks(cfg, client)
        out.append(_other_databases_check(cfg, client))
        return out

    try:
        return _guard("redis reachable, right DB", f"check REDIS_ADDR ({where}) and credentials",
                      checks)
    finally:
        client.close()


def _stream_checks(cfg: Config, client: Any) -> list[Check]:
    out: list[Check] = []
    streams = [s for s in scan_streams(client, cfg.streams.prefix)
               if s[len(cfg.streams.prefix):] in cfg.streams.routes]
    if not streams:
        return [Check("consumer group exists", PASS, "no DLQ streams (nothing ever parked)")]
    stats = [stream_stats(client, cfg, s) for s in streams]
    missing = [s.stream for s in stats if not s.group_exists]
    out.append(Check("consumer group exists", WARN if missing else PASS,
                     f"missing on {', '.join(missing)}" if missing else
                     f"{cfg.streams.group} on {len(stats)} stream(s)",
                     "start a worker: it creates the group at ID 0" if missing else ""))
    # What the workers counted as certain (entries trimmed before any group read them),
    # else what this look finds; next to the platform's retry worker, entries it read and
    # deleted after its copy are no loss: they are "uncertain" at worst (see watch/monitor.py).
    with translated(f"HGETALL {LOST_KEY}"):
        recorded = {_text(k): int(v) for k, v in client.hgetall(LOST_KEY).items()}
    lost = {s.stream: max(recorded.get(s.stream, 0),
                          s.leader_lost_unread if s.leader == cfg.streams.group
                          and s.leader_lost_unread else 0) for s in stats}
    lost = {k: v for k, v in lost.items() if v}
    out.append(Check("no entries trimmed unread", FAIL if lost else PASS,
                     ", ".join(f"{k}: {v} lost" for k, v in lost.items()) or "none",
                     "audit records were trimmed by MAXLEN before being read: raise the "
                     "producers' max_length, add workers, and report the loss" if lost else ""))
    unsure = {s.stream: s.uncertain_unread for s in stats if s.uncertain_unread}
    if unsure:
        out.append(Check("no entries gone unread by uncertain means", WARN,
                         ", ".join(f"{k}: up to {v}" for k, v in unsure.items()),
                         "deleted after another group (the platform's retry worker) read them: "
                         "after its copy (no loss), written by it, or trimmed while it held "
                         "them; compare rows with the producers' records"))
    ttl = float(cfg.streams.ttl)
    old = {s.stream: s.oldest_age_seconds for s in stats
           if s.oldest_age_seconds and s.oldest_age_seconds > ttl}
    out.append(Check("nothing older than retention", FAIL if old else PASS,
                     ", ".join(f"{k}: {v / 3600:.0f}h" for k, v in old.items())
                     or f"all younger than {ttl / 3600:.0f}h",
                     "entries are stuck: see `dlq-worker status` and the worker's logs" if old
                     else ""))
    parked = sum(s.dead_letter_depth for s in stats)
    out.append(Check("no parked entries", WARN if parked else PASS, f"{parked} parked",
                     "inspect with `dlq-worker dead-letter list`, fix, then `dead-letter replay`"
                     if parked else ""))
    return out


def _other_databases_check(cfg: Config, client: Any) -> Check:
    found, partly = elsewhere.find_once(cfg.redis, cfg.streams.prefix, client)
    walked = (f" (DB {', '.join(map(str, partly))}: only the first "
              f"{elsewhere.ONE_SHOT_SCAN_CALLS * elsewhere.SCAN_COUNT} keys looked at)"
              if partly else "")
    if found:
        return Check("no DLQ in another database", FAIL, elsewhere.describe(found) + walked,
                     f"this worker drains DB {cfg.redis.db}: point it at the database the "
                     "producers write (REDIS_DB; the platform writes DB 0)")
    return Check("no DLQ in another database", PASS, "none found" + walked)


def _database_checks(cfg: Config) -> list[Check]:
    sink = Sink(cfg.database)
    where = f"{cfg.database.host}:{cfg.database.port}/{cfg.database.name}"

    def checks() -> list[Check]:
        sink.ping()
        out = [Check("postgresql reachable", PASS, where)]
        missing = sink.missing_tables()
        out.append(Check("tables present", FAIL if missing else PASS,
                         f"missing: {', '.join(missing)}" if missing else
                         "audit_events, notification_audit",
                         "run `dlq-worker db init` or the Data Storage migrations"
                         if missing else ""))
        if "audit_events" not in missing:
            today = dt.datetime.now(dt.UTC).date().replace(day=1)
            wanted = [partition_name(today), partition_name(add_months(today, 1))]
            absent = [p for p in wanted if p not in sink.existing_tables(wanted)]
            status = PASS if not absent else WARN if cfg.database.create_missing_partitions \
                else FAIL
            out.append(Check("partitions for this and next month", status,
                             f"missing: {', '.join(absent)}" if absent else ", ".join(wanted),
                             "create them (`dlq-worker db init` does); the worker creates "
                             "missing ones itself when create_missing_partitions is on"
                             if absent else ""))
        return out

    try:
        return _guard("postgresql reachable", f"check DB_HOST/DB_PORT/DB_NAME ({where}), "
                      "credentials and sslmode", checks)
    finally:
        sink.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def format_checks(checks: list[Check]) -> str:
    marks = {PASS: "[pass]", WARN: "[warn]", FAIL: "[FAIL]"}
    lines = []
    for c in checks:
        lines.append(f"{marks[c.status]} {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"       -> {c.fix}")
    worst = overall(checks)
    lines.append(f"\n{worst.upper()}: {sum(c.status == PASS for c in checks)} pass, "
                 f"{sum(c.status == WARN for c in checks)} warn, "
                 f"{sum(c.status == FAIL for c in checks)} fail")
    return "\n".join(lines)


def overall(checks: list[Check]) -> str:
    statuses = {c.status for c in checks}
    return FAIL if FAIL in statuses else WARN if WARN in statuses else PASS
