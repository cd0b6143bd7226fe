"""The run loop: claim/read -> decode -> batch -> write -> ack. Ack only after commit.

One thread does all of it, so there is one obvious order of events. While a server
is unavailable the batch stays in hand and the loop retries with backoff instead of
reading more; nothing is acknowledged that PostgreSQL has not committed, and nothing
is counted against an entry because a server was down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import tenacity

from dlq_worker.config import Config
from dlq_worker.decode import Record, decode_entry
from dlq_worker.errors import (
    DatabaseUnavailable,
    DecodeError,
    PermanentError,
    RedisUnavailable,
    StreamGone,
    TransientError,
)
from dlq_worker.health import Health
from dlq_worker.metrics import Metrics
from dlq_worker.policy import BatchPolicy, reject_delay, transient_wait
from dlq_worker.sink import Outcome, Sink
from dlq_worker.source import Entry, Source, describe_entry

log = logging.getLogger(__name__)

T = TypeVar("T")


class Worker:
    def __init__(
        self,
        config: Config,
        source: Source,
        sink: Sink,
        metrics: Metrics,
        health: Health,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.source = source
        self.sink = sink
        self.metrics = metrics
        self.health = health
        self.clock = clock
        w = config.worker
        self.policy = BatchPolicy(size=w.batch_size, linger=float(w.linger))
        #: stream -> table, for every routed stream whose group exists.
        self.streams: dict[str, str] = {}
        #: stream -> cursor while re-reading our own pending entries (restart), else absent.
        self._replay: dict[str, str] = {}
        self._in_hand: dict[tuple[str, str], Entry] = {}
        self._first_at: float | None = None
        #: (stream, id) -> when a rejected entry is due for its next delivery.
        self._retry_due: dict[tuple[str, str], float] = {}
        self._next_discover = 0.0
        self._next_claim = 0.0
        self._next_cleanup = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._deadline: float | None = None
        self._touched_at = 0.0
        #: Servers whose failure the loop reported and has not yet seen recover.
        self._failing: set[str] = set()

    # -- lifecycle --

    def request_stop(self) -> None:
        """Stop reading; flush and ack what is in hand within the shutdown timeout."""
        if not self._stop.is_set():
            self._deadline = self.clock() + float(self.config.worker.shutdown_timeout)
            self._stop.set()
            self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Run until request_stop(); returns after the final flush (or the deadline)."""
        log.info("worker started", extra={"event": "started", "consumer": self.source.consumer,
                                          "group": self.source.group})
        self._with_retry(self.discover)
        self.health.started()
        while not self.stopping:
            try:
                self.step()
            except TransientError:
                if not self.stopping:
                    raise
                # a stop was requested and its deadline passed while a server was down
        self._drain_on_stop()

    def step(self) -> None:
        """One turn of the loop."""
        self.health.beat()
        now = self.clock()
        self.metrics.heartbeat.set_to_current_time()
        try:
            self._housekeeping(now)
            if self.stopping:
                return
            block = self.policy.block_for(len(self._in_hand), self._first_at, now,
                                          float(self.config.worker.block))
            entries = self._with_retry(lambda: self._read(block))
            self._take(entries)
            if self.policy.due(len(self._in_hand), self._first_at, self.clock()):
                self.flush()
        except StreamGone as exc:
            self._forget(exc.streams)

    def _forget(self, streams: list[str]) -> None:
        """A stream or its group vanished: stop reading it until discovery finds it again
        (which recreates the group at 0). Entries in hand from it are still written."""
        for stream in streams:
            self.streams.pop(stream, None)
            self._replay.pop(stream, None)
            for key in [k for k in self._retry_due if k[0] == stream]:
                del self._retry_due[key]
        self._next_discover = 0.0
        log.error("DLQ stream or its consumer group vanished",
                  extra={"event": "stream_gone", "streams": streams})

    def _drain_on_stop(self) -> None:
        try:
            self.flush()
        except TransientError as exc:
            log.warning(
                "shutdown timeout reached with entries in hand: left pending for redelivery",
                extra={"event": "shutdown_incomplete", "entries": len(self._in_hand),
                       "error": str(exc)},
            )
        log.info("worker stopped", extra={"event": "stopped"})

    # -- discovering and reading --

    def discover(self) -> None:
        routed, unknown = self.source.discover()
        vanished = [s for s in self.streams if s not in routed]
        if vanished:
            self._forget(vanished)
        for stream in routed:
            if stream not in self.streams:
                table = self.source.route(stream)
                assert table is not None
                self.source.ensure_group(stream)
                self.streams[stream] = table
                self._replay[stream] = "0"
                self.metrics.init_stream(stream, table)
                log.info("draining stream", extra={"event": "stream_found", "stream": stream,
                                                   "table": table})
        self.metrics.streams_unknown.set(len(unknown))
        for stream in unknown:
            log.warning("stream under the prefix has no route: not touched",
                        extra={"event": "stream_unknown", "stream": stream})
        self._next_discover = self.clock() + float(self.config.streams.discover_interval)

    def _read(self, block: float) -> list[Entry]:
        room = self.policy.room(len(self._in_hand))
        if room == 0 or not self.streams:
            if not self.streams:
                self._wake.wait(min(block, 1.0))
            return []
        if self._replay:
            # Our own pending entries first (a restart): cursor past what we already took.
            entries = self.source.read(self._replay, room, None)
            seen = {e.stream for e in entries}
            for stream in list(self._replay):
                if stream not in seen:
                    del self._replay[stream]
            for entry in entries:
                self._replay[entry.stream] = entry.id
            if entries:
                log.info("re-reading own pending entries",
                         extra={"event": "replay", "entries": len(entries)})
                return entries
        return self.source.read({s: ">" for s in self.streams}, room, block)

    def _take(self, entries: list[Entry]) -> None:
        for entry in entries:
            key = (entry.stream, entry.id)
            if key in self._in_hand:
                continue
            if not self._in_hand:
                self._first_at = self.clock()
            self._in_hand[key] = entry
            self.metrics.read.labels(entry.stream).inc()
        self.metrics.in_hand.set(len(self._in_hand))

    # -- housekeeping: discovery, crashed consumers, rejected entries --

    def _housekeeping(self, now: float) -> None:
        w = self.config.worker
        if now >= self._next_discover:
            self._with_retry(self.discover)
        if now >= self._next_claim:
            self._with_retry(self.claim_idle)
            self._next_claim = now + float(w.claim_interval)
        if now >= self._next_cleanup:
            self._with_retry(self.cleanup_consumers)
            self._next_cleanup = now + max(60.0, float(w.claim_interval) * 4)
        due = [key for key, at in self._retry_due.items() if at <= now]
        if due:
            self._with_retry(lambda: self._redeliver(due))

    def claim_idle(self) -> None:
        """Take over entries left pending by consumers that stopped (crashed workers)."""
        for stream in list(self.streams):
            room = self.policy.room(len(self._in_hand))
            if room == 0:
                return
            entries, deleted = self.source.autoclaim(
                stream, float(self.config.worker.claim_idle), room
            )
            fresh = [e for e in entries if (e.stream, e.id) not in self._in_hand
                     and (e.stream, e.id) not in self._retry_due]
            if deleted:
                self.metrics.pending_deleted.labels(stream).inc(deleted)
                log.warning("pending entries were deleted before being acknowledged",
                            extra={"event": "pending_deleted", "stream": stream,
                                   "entries": deleted})
            if fresh:
                self.metrics.claimed.labels(stream).inc(len(fresh))
                log.info("claimed entries from idle consumers",
                         extra={"event": "claimed", "stream": stream, "entries": len(fresh)})
                self._take(fresh)

    def cleanup_consumers(self) -> None:
        for stream in list(self.streams):
            removed = self.source.delete_idle_consumers(
                stream, float(self.config.worker.consumer_idle_delete)
            )
            if removed:
                self.metrics.consumers_removed.labels(stream).inc(len(removed))
                log.info("removed idle consumers", extra={"event": "consumers_removed",
                                                          "stream": stream, "consumers": removed})

    def _redeliver(self, due: list[tuple[str, str]]) -> None:
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in due:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            for entry_id in ids:
                self._retry_due.pop((stream, entry_id), None)
            self._take(self.source.claim_own(stream, ids))

    # -- flushing --

    def flush(self) -> None:
        """Write what is in hand, then ack it; park what can never be written."""
        if not self._in_hand:
            return
        started = self.clock()
        entries = list(self._in_hand.values())
        records: list[Record] = []
        record_entries: list[Entry] = []
        ack: list[Entry] = []
        for entry in entries:
            if entry.deleted:
                # Pending, but its entry is gone from the stream: nothing left to write.
                self.metrics.pending_deleted.labels(entry.stream).inc()
                ack.append(entry)
                continue
            try:
                records.append(decode_entry(self.streams.get(entry.stream, ""), entry.fields))
                record_entries.append(entry)
            except DecodeError as exc:
                self._park_now(entry, exc)
            except Exception as exc:
                log.exception("decoder failed unexpectedly", extra=describe_entry(entry))
                self._park_now(entry, DecodeError(f"decoder failed: {type(exc).__name__}",
                                                  reason="decoder_failure"))

        if records:
            result = self._with_retry(lambda: self.sink.write(records))
            for index, (entry, outcome) in enumerate(
                zip(record_entries, result.outcomes, strict=True)
            ):
                if outcome is Outcome.WRITTEN:
                    self.metrics.written.labels(entry.stream, records[index].table).inc()
                    ack.append(entry)
                elif outcome is Outcome.DUPLICATE:
                    self.metrics.duplicates.labels(entry.stream).inc()
                    ack.append(entry)
            if result.partitions_created:
                self.metrics.partitions_created.inc(len(result.partitions_created))
            if result.errors:
                rejected = [(record_entries[i], err) for i, err in result.errors.items()]
                self._with_retry(lambda: self._handle_rejected(rejected))

        ids: dict[str, list[str]] = {}
        for entry in ack:
            ids.setdefault(entry.stream, []).append(entry.id)
        self._with_retry(lambda: self.source.ack_and_delete(ids))

        self._in_hand.clear()
        self._first_at = None
        self.metrics.in_hand.set(0)
        self.metrics.batch_size.observe(len(entries))
        self.metrics.flush_seconds.observe(self.clock() - started)
        self.metrics.last_flush.set_to_current_time()

    def _park_now(self, entry: Entry, err: PermanentError) -> None:
        self._with_retry(lambda: self._park(entry, err))

    def _handle_rejected(self, rejected: Sequence[tuple[Entry, PermanentError]]) -> None:
        w = self.config.worker
        by_stream: dict[str, list[str]] = {}
        for entry, _ in rejected:
            by_stream.setdefault(entry.stream, []).append(entry.id)
        counts: dict[tuple[str, str], int] = {}
        for stream, ids in by_stream.items():
            try:
                for entry_id, n in self.source.delivery_counts(stream, ids).items():
                    counts[(stream, entry_id)] = n
            except StreamGone:
                continue  # its group is gone: they will be read again once it is recreated
        for entry, err in rejected:
            key = (entry.stream, entry.id)
            if key not in counts:
                continue  # no longer pending on the group: another worker has it
            deliveries = counts[key]
            self.metrics.rejected.labels(entry.stream, err.reason).inc()
            if deliveries >= w.max_deliveries:
                self._park(entry, err, deliveries)
                continue
            delay = reject_delay(deliveries, float(w.reject_retry_initial),
                                 float(w.reject_retry_max))
            self._retry_due[key] = self.clock() + delay
            log.warning(
                "row rejected by PostgreSQL; will retry",
                extra={"event": "rejected", **describe_entry(entry), "reason": err.reason,
                       "error": str(err), "deliveries": deliveries, "retry_in_seconds": delay},
            )

    def _park(self, entry: Entry, err: PermanentError, deliveries: int | None = None) -> None:
        self._retry_due.pop((entry.stream, entry.id), None)
        try:
            if deliveries is None:
                deliveries = self.source.delivery_counts(entry.stream, [entry.id]).get(
                    entry.id, 1)
            done = self.source.park(entry, reason=err.reason, error_class=type(err).__name__,
                                    error=str(err), deliveries=deliveries)
        except StreamGone:
            log.error("cannot park: its stream or group vanished; it is read again when the "
                      "stream reappears", extra={"event": "park_skipped",
                                                 **describe_entry(entry)})
            return
        if done:
            self.metrics.parked.labels(entry.stream, err.reason).inc()
            log.error(
                "entry parked in dead-letter stream",
                extra={"event": "parked", **describe_entry(entry),
                       "dead_letter": self.source.dead_letter_stream(entry.stream),
                       "reason": err.reason, "error_class": type(err).__name__,
                       "error": str(err), "deliveries": deliveries},
            )

    # -- transient failures --

    def _with_retry(self, fn: Callable[[], T]) -> T:
        """Run fn until it succeeds, backing off while a server is unavailable.

        Gives up (re-raising) only once a stop was requested and its deadline passed.
        """
        w = self.config.worker
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            wait=transient_wait(float(w.backoff_initial), float(w.backoff_max)),
            stop=self._past_deadline,
            sleep=self._sleep,
            before_sleep=self._on_transient,
            reraise=True,
        )
        result = retrying(fn)
        for server in self._failing:
            self.health.ok(server, source="loop")
        self._failing.clear()
        return result

    def _keep_in_hand(self) -> None:
        """During a database outage, keep other workers from claiming what we hold."""
        now = self.clock()
        if not self._in_hand or now - self._touched_at < float(self.config.worker.claim_idle) / 3:
            return
        self._touched_at = now
        ids: dict[str, list[str]] = {}
        for stream, entry_id in [*self._in_hand, *self._retry_due]:
            ids.setdefault(stream, []).append(entry_id)
        for stream, stream_ids in ids.items():
            # Redis down too (then nobody can claim them), or the stream gone: nothing to do.
            with contextlib.suppress(TransientError, StreamGone):
                self.source.touch(stream, stream_ids)

    def _past_deadline(self, state: tenacity.RetryCallState) -> bool:
        return self._deadline is not None and self.clock() >= self._deadline

    def _sleep(self, seconds: float) -> None:
        if self._deadline is None:
            self._wake.wait(seconds)  # a stop request cuts the wait short
            self._wake.clear()
        else:
            time.sleep(min(seconds, max(0.0, self._deadline - self.clock())))
        self.health.beat()

    def _on_transient(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        server = "postgres" if isinstance(exc, DatabaseUnavailable) else "redis"
        if isinstance(exc, RedisUnavailable | DatabaseUnavailable):
            self.health.failed(server, str(exc), source="loop")
            self._failing.add(server)
        self.metrics.transient_errors.labels(server).inc()
        self.metrics.up.labels(server).set(0)
        if server == "postgres":
            self._keep_in_hand()
        wait = state.upcoming_sleep
        n = state.attempt_number
        if n > 4 and n & (n - 1) and n % 64:
            return  # attempts 1, 2, 4, 8... then every 64th: an outage is not a log flood
        log.warning(
            f"{server} unavailable; retrying",
            extra={"event": "transient", "server": server, "error": str(exc),
                   "attempt": state.attempt_number, "retry_in_seconds": round(wait, 3),
                   "entries_in_hand": len(self._in_hand)},
        )
