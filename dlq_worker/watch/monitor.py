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
from dlq_worker.drain.scripts import (
    BEFORE_READ_PREFIX,
    COPIES_PREFIX,
    FIGURES_PREFIX,
    LEADER_KEY,
    LOST_KEY,
    UNCERTAIN_KEY,
)
from dlq_worker.drain.sink import Sink
from dlq_worker.watch import elsewhere
from dlq_worker.watch.elsewhere import OtherDatabases
from dlq_worker.watch.health import Health
from dlq_worker.watch.loss import RAISE_LOST, RUN_ID_KEY, StreamStats, script_arg, stream_stats
from dlq_worker.watch.metrics import Metrics

log = logging.getLogger(__name__)


MEMORY_WARN_RATIO = 0.9


@dataclass
class RedisDurability:
    maxmemory_policy: str
    maxmemory: int
    used_memory: int
    aof_enabled: bool
    rdb_save: str | None
    warnings: list[str]


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
        self._raise_lost = self.client.register_script(RAISE_LOST)
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
        # before the next worker, the count goes on from it (see RAISE_LOST).
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
        only while the group stands where it stood (see RAISE_LOST)."""
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
                new, copies, uncertain = (int(v) for v in self._raise_lost(
                    keys=[LOST_KEY, RUN_ID_KEY, LEADER_KEY, COPIES_PREFIX + s.stream,
                          UNCERTAIN_KEY, FIGURES_PREFIX + s.stream,
                          BEFORE_READ_PREFIX + s.stream],
                    args=[s.stream, s.leader, script_arg(s.leader_lost_unread), self._run_id,
                          "1" if ours else "0", s.leader_position, s.others_position,
                          script_arg(s.leader_read), script_arg(s.entries_added),
                          script_arg(s.leader_after), s.first_id,
                          *(v for name, figure in s.figures.items()
                            for v in (name, script_arg(figure)))]))
            if s.uncertain_unread is not None:
                m.uncertain_unread.labels(s.stream).set(s.uncertain_unread + uncertain)
            if copies:
                m.trimmed_copies.labels(s.stream).inc(copies)
                log.warning("entries trimmed before any group read them may be the platform "
                            "retry worker's copies of records held in memory here (written "
                            "or parked from memory): reported as uncertain, not as lost",
                            extra={"event": "trimmed_unread_copies", "stream": s.stream,
                                   "entries": copies, "counted_by": s.leader})
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


