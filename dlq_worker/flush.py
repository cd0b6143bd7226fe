"""Where a batch is flushed: decode, write, acknowledge; park what can never be written.

A batch moves through three steps: ``prepare`` (decode; park the undecodable at once),
``write`` (PostgreSQL, in a background thread so the loop reads and decodes the next
batch meanwhile), ``complete`` (ack what was committed, schedule or park what was
rejected). Only ``complete`` acknowledges, and only entries whose rows are committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dlq_worker.config import Config
from dlq_worker.decode import Record, decode_entry
from dlq_worker.errors import DecodeError, PermanentError, StreamGone, TransientError
from dlq_worker.metrics import Metrics
from dlq_worker.policy import reject_delay
from dlq_worker.sink import Outcome, Sink, WriteResult
from dlq_worker.source import Entry, Source, describe_entry

log = logging.getLogger(__name__)

Retry = Callable[[Callable[[], Any]], Any]


@dataclass
class Batch:
    entries: list[Entry]
    started: float
    records: list[Record] = field(default_factory=list)
    record_entries: list[Entry] = field(default_factory=list)
    #: Entries to acknowledge whatever the write does (deleted while pending).
    ack: list[Entry] = field(default_factory=list)
    future: Future[WriteResult] | None = None
    #: (stream, id) of every entry, to tell what this worker still holds.
    held: frozenset[tuple[str, str]] = frozenset()

    def __post_init__(self) -> None:
        self.held = frozenset((e.stream, e.id) for e in self.entries)


class Flusher:
    def __init__(self, config: Config, source: Source, sink: Sink, metrics: Metrics,
                 retry: Retry, retry_due: MutableMapping[tuple[str, str], float],
                 route: Callable[[str], str], clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        self.config = config
        self.source = source
        self.sink = sink
        self.metrics = metrics
        self.retry = retry
        self.retry_due = retry_due
        self.route = route
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        #: The batch being written in the background, if any.
        self.inflight: Batch | None = None
        #: Every entry taken from the loop and not yet completed (acknowledged or handed to
        #: the rejection schedule): still ours, kept fresh during outages.
        self.holding: set[tuple[str, str]] = set()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def flush(self, entries: list[Entry], *, overlap: bool) -> None:
        """Flush entries; with ``overlap`` the write runs in the background and this
        returns at once (after completing the previous background batch)."""
        batch = self.prepare(entries)
        self.holding |= batch.held
        self.finish()
        if overlap and batch.records:
            batch.future = self._pool.submit(self.sink.write, batch.records)
            self.inflight = batch
        else:
            self.complete(batch, self.retry(lambda: self.sink.write(batch.records))
                          if batch.records else None)

    def finish(self) -> None:
        """Wait for the background batch, then acknowledge it (retrying while servers are
        down: its entries stay unacknowledged until their rows are committed)."""
        batch, self.inflight = self.inflight, None
        if batch is None:
            return
        assert batch.future is not None
        try:
            result = batch.future.result()
        except TransientError:
            result = self.retry(lambda: self.sink.write(batch.records))
        self.complete(batch, result)

    def prepare(self, entries: list[Entry]) -> Batch:
        batch = Batch(entries, self.clock())
        for entry in entries:
            if entry.deleted:
                # Pending, but its entry is gone from the stream: nothing left to write.
                self.metrics.pending_deleted.labels(entry.stream).inc()
                batch.ack.append(entry)
                continue
            try:
                batch.records.append(decode_entry(self.route(entry.stream), entry.fields))
                batch.record_entries.append(entry)
            except DecodeError as exc:
                self.park_now(entry, exc)
            except Exception as exc:  # a decoder bug must not stop the loop
                log.exception("decoder failed unexpectedly", extra=describe_entry(entry))
                self.park_now(entry, DecodeError(f"decoder failed: {type(exc).__name__}",
                                                 reason="decoder_failure"))
        return batch

    def park_now(self, entry: Entry, err: PermanentError) -> None:
        self.retry(lambda: self.park(entry, err))

    def complete(self, batch: Batch, result: WriteResult | None) -> None:
        ack = list(batch.ack)
        if result is not None:
            for index, (entry, outcome) in enumerate(
                zip(batch.record_entries, result.outcomes, strict=True)
            ):
                if outcome is Outcome.WRITTEN:
                    self.metrics.written.labels(entry.stream, batch.records[index].table).inc()
                    ack.append(entry)
                elif outcome is Outcome.DUPLICATE:
                    self.metrics.duplicates.labels(entry.stream).inc()
                    ack.append(entry)
            if result.partitions_created:
                self.metrics.partitions_created.inc(len(result.partitions_created))
            if result.errors:
                rejected = [(batch.record_entries[i], err) for i, err in result.errors.items()]
                self.retry(lambda: self.handle_rejected(rejected))
        ids: dict[str, list[str]] = {}
        for entry in ack:
            ids.setdefault(entry.stream, []).append(entry.id)
        self.retry(lambda: self.source.ack_and_delete(ids))
        self.holding -= batch.held
        self.metrics.batch_size.observe(len(batch.entries))
        self.metrics.flush_seconds.observe(self.clock() - batch.started)
        self.metrics.last_flush.set_to_current_time()

    def handle_rejected(self, rejected: Sequence[tuple[Entry, PermanentError]]) -> None:
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
                self.park(entry, err, deliveries)
                continue
            delay = reject_delay(deliveries, float(w.reject_retry_initial),
                                 float(w.reject_retry_max))
            self.retry_due[key] = self.clock() + delay
            log.warning(
                "row rejected by PostgreSQL; will retry",
                extra={"event": "rejected", **describe_entry(entry), "reason": err.reason,
                       "error": str(err), "deliveries": deliveries, "retry_in_seconds": delay},
            )

    def park(self, entry: Entry, err: PermanentError, deliveries: int | None = None) -> None:
        self.retry_due.pop((entry.stream, entry.id), None)
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
