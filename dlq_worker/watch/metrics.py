"""Prometheus metrics: one prefix, base units, counters ending in ``_total``.

Built against an injectable registry, so tests read them with ``get_sample_value``
and several workers can live in one test process.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from dlq_worker import __version__
from dlq_worker.errors import REASONS

PREFIX = "dlq_worker"


#: Where an unexpected failure can be contained (dlq_worker_internal_errors_total{stage}).
STAGES = ("decode", "write", "park", "ack", "loop")

#: The run loop's periodic jobs (dlq_worker_housekeeping_failures_total{job}).
JOBS = ("discover", "claim", "takeover", "cleanup", "redeliver")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # The process's own series (process_*: RSS, CPU, start time -> restarts; python_gc_*;
        # python_info), as the default registry would have them.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        p = PREFIX
        self.build_info = Info(f"{p}_build", "Version of dlq-worker.", registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})

        self.read = Counter(f"{p}_entries_read_total", "Entries read from a DLQ stream.",
                            ["stream"], registry=r)
        self.written = Counter(f"{p}_entries_written_total",
                               "Entries committed as new rows and removed from the DLQ.",
                               ["stream", "table"], registry=r)
        self.duplicates = Counter(f"{p}_entries_duplicate_total",
                                  "Entries whose row already existed (counted as written).",
                                  ["stream"], registry=r)
        self.parked = Counter(f"{p}_entries_parked_total",
                              "Entries moved to a dead-letter stream, by reason.",
                              ["stream", "reason"], registry=r)
        self.rejected = Counter(f"{p}_entries_rejected_total",
                                "Rows PostgreSQL refused; retried until parked.",
                                ["stream", "reason"], registry=r)
        self.deferred = Counter(
            f"{p}_entries_deferred_total",
            "Entries left for a later batch: another writer held their hash chain's lock past "
            "lock_timeout (a frozen replica), or an older entry of their chain is held and "
            "not written yet (by another replica or this one). Let go of and claimed back "
            "soon, never counted against the entry.", ["stream"], registry=r)
        self.claimed = Counter(f"{p}_entries_claimed_total",
                               "Entries claimed from idle consumers (XAUTOCLAIM).",
                               ["stream"], registry=r)
        self.pending_deleted = Counter(
            f"{p}_pending_deleted_total",
            "Pending IDs whose entry was already deleted from the stream.",
            ["stream"], registry=r)
        self.pending_deleted_uncertain = Counter(
            f"{p}_pending_deleted_by_reader_total",
            "Pending IDs whose entry was deleted while another group reads the stream (at or "
            "below its max-deleted-entry-id: deleted, or perhaps trimmed): the platform's retry "
            "worker deletes an entry after copying or parking it. Not counted as lost.",
            ["stream"], registry=r)
        self.trimmed_unread = Counter(
            f"{p}_entries_trimmed_unread_total",
            "Entries deleted from a DLQ stream (producer MAXLEN trimming) before the group "
            "read them: audit records lost outside the worker.",
            ["stream"], registry=r)
        self.trimmed_copies = Counter(
            f"{p}_entries_trimmed_unread_copies_total",
            "Entries trimmed from a DLQ stream before any group read them that may be the "
            "platform retry worker's copies of records this group held in memory (written or "
            "parked from memory) or had just written (deleted before its XACK): not counted as "
            "lost; in the uncertain figure.",
            ["stream"], registry=r)
        self.uncertain_unread = Gauge(
            f"{p}_entries_gone_unread_uncertain",
            "Entries deleted from a DLQ stream before this group read them but after another "
            "group (the platform's own retry worker) did: deleted after its copy (no loss), "
            "written by it, or trimmed while it held them (a loss). Redis cannot tell which: "
            "an upper bound, never counted as a certain loss; with the entries of "
            "entries_trimmed_unread_copies_total.", ["stream"], registry=r)
        self.internal_errors = Counter(
            f"{p}_internal_errors_total",
            "Unexpected failures contained to their entry or batch, by stage (decode, write, "
            "park, ack, loop): a bug or input no one foresaw; the drain went on.",
            ["stage"], registry=r)
        self.housekeeping_failures = Counter(
            f"{p}_housekeeping_failures_total",
            "Failures of a periodic job (discover, claim, takeover, cleanup, redeliver), each "
            "contained to its job and retried on its own schedule: the drain went on.",
            ["job"], registry=r)
        self.systemic = Gauge(
            f"{p}_systemic_rejection",
            "1 while PostgreSQL refuses every row of a table for one cause (a schema change): "
            "the worker holds its batch, parks nothing and is not ready.",
            ["table"], registry=r)
        self.systemic_episodes = Counter(
            f"{p}_systemic_rejections_total",
            "Times a table's rows started being refused systemically.", ["table"], registry=r)
        self.chain_linked = Counter(
            f"{p}_chain_linked_total",
            "audit_events rows written linked into the platform's hash chain.",
            ["stream"], registry=r)
        self.chain_late = Counter(
            f"{p}_chain_late_events_total",
            "audit_events rows written unhashed because they are older than the head of "
            "their chain (linking them would break the platform's verification).",
            ["stream"], registry=r)
        self.transient_errors = Counter(f"{p}_transient_errors_total",
                                        "Failures because a server was unavailable.",
                                        ["server"], registry=r)
        self.partitions_created = Counter(f"{p}_partitions_created_total",
                                          "Monthly partitions created for audit_events.",
                                          registry=r)
        self.consumers_removed = Counter(f"{p}_consumers_removed_total",
                                         "Idle consumers with nothing pending removed.",
                                         ["stream"], registry=r)
        self.batch_size = Histogram(
            f"{p}_batch_size", "Entries per flushed batch.", registry=r,
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
        self.flush_seconds = Histogram(
            f"{p}_flush_duration_seconds", "Time to write and acknowledge one batch.",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.last_flush = Gauge(f"{p}_last_flush_timestamp_seconds",
                                "Unix time of the last successful flush.", registry=r)
        self.heartbeat = Gauge(f"{p}_loop_heartbeat_timestamp_seconds",
                               "Unix time the run loop last turned.", registry=r)
        self.ready = Gauge(f"{p}_ready", "1 when Redis and PostgreSQL answer and groups exist.",
                           registry=r)
        self.up = Gauge(f"{p}_dependency_up", "1 when the server answered its last call.",
                        ["server"], registry=r)
        self.streams_unknown = Gauge(f"{p}_streams_unknown",
                                     "Streams under the prefix that no route names.",
                                     registry=r)
        self.paused = Gauge(f"{p}_paused",
                            "1 while an operator has paused this consumer group "
                            "(dlq-worker pause), else 0.", registry=r)
        self.paused_since = Gauge(f"{p}_paused_since_seconds",
                                  "Unix time the current pause began (kept in Redis across "
                                  "restarts), 0 when not paused.", registry=r)
        self.in_hand = Gauge(f"{p}_entries_in_hand",
                             "Entries read and not yet acknowledged by this worker.", registry=r)

        self.depth = Gauge(f"{p}_stream_depth", "Entries in the DLQ stream (XLEN).",
                           ["stream"], registry=r)
        self.depth_ratio = Gauge(f"{p}_stream_depth_ratio",
                                 "Depth as a fraction of the producers' MAXLEN cap.",
                                 ["stream"], registry=r)
        self.pending = Gauge(f"{p}_stream_pending", "Entries delivered and not acknowledged.",
                             ["stream"], registry=r)
        self.lag = Gauge(f"{p}_stream_lag", "Entries not yet delivered to the group.",
                         ["stream"], registry=r)
        self.oldest_age = Gauge(f"{p}_stream_oldest_entry_age_seconds",
                                "Age of the oldest entry still in the stream.",
                                ["stream"], registry=r)
        self.consumers = Gauge(f"{p}_stream_consumers", "Consumers in the group.",
                               ["stream"], registry=r)
        self.dead_letter_oldest_age = Gauge(
            f"{p}_dead_letter_oldest_age_seconds",
            "Age of the oldest parked entry of a DLQ stream's dead-letter stream (since it was "
            "parked), 0 when none.", ["stream"], registry=r)
        self.dead_letter_depth = Gauge(f"{p}_dead_letter_depth",
                                       "Entries parked in the dead-letter stream.",
                                       ["stream"], registry=r)
        self.retention = Gauge(f"{p}_stream_retention_seconds",
                               "The configured DLQ retention (ttl) to compare ages against.",
                               registry=r)
        self.redis_memory_used = Gauge(f"{p}_redis_memory_used_bytes",
                                       "used_memory of the Redis instance.", registry=r)
        self.redis_maxmemory = Gauge(f"{p}_redis_maxmemory_bytes",
                                     "maxmemory of the Redis instance (0: no limit).",
                                     registry=r)
        self.other_db_streams = Gauge(
            f"{p}_other_db_streams",
            "DLQ streams (under the prefix) found in another database of the Redis instance, "
            "which this worker does not drain.", ["db"], registry=r)
        self.other_db_entries = Gauge(
            f"{p}_other_db_entries",
            "Entries in the DLQ streams found in another database of the Redis instance: "
            "audit records no worker of this configuration drains.", ["db"], registry=r)
        self.redis_warning = Gauge(
            f"{p}_redis_durability_warning",
            "1 when a Redis setting can lose DLQ entries (eviction, persistence, memory).",
            ["check"], registry=r)
        for server in ("redis", "postgres"):
            self.transient_errors.labels(server)
            self.up.labels(server)
        for check in ("eviction_policy", "persistence", "memory"):
            self.redis_warning.labels(check)
        for stage in STAGES:
            self.internal_errors.labels(stage)
        for job in JOBS:
            self.housekeeping_failures.labels(job)

    def init_stream(self, stream: str, table: str) -> None:
        """Create a stream's series at zero so dashboards and alerts see them."""
        self.read.labels(stream)
        self.written.labels(stream, table)
        self.duplicates.labels(stream)
        self.claimed.labels(stream)
        self.deferred.labels(stream)
        self.pending_deleted.labels(stream)
        self.trimmed_unread.labels(stream)
        self.pending_deleted_uncertain.labels(stream)
        self.uncertain_unread.labels(stream)
        self.trimmed_copies.labels(stream)
        self.consumers_removed.labels(stream)
        for reason in sorted(REASONS):
            self.parked.labels(stream, reason)
            self.rejected.labels(stream, reason)
        self.systemic.labels(table)
        self.systemic_episodes.labels(table)
        self.chain_linked.labels(stream)
        self.chain_late.labels(stream)
