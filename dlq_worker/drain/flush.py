"""Where a batch is flushed: decode, write, acknowledge; park what can never be written.

A batch moves through three steps: ``prepare`` (decode; park the undecodable at once),
``write`` (PostgreSQL, in a background thread so the loop reads and decodes the next
batch meanwhile), ``complete`` (ack what was committed, schedule or park what was
rejected). Only ``complete`` acknowledges, and only entries whose rows are committed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dlq_worker import chain
from dlq_worker.config import Config
from dlq_worker.drain.decode import AUDIT_EVENTS, Record, decode_entry
from dlq_worker.drain.policy import reject_delay
from dlq_worker.drain.redis_io import Entry, describe_entry
from dlq_worker.drain.redis_io import id_pair as _id_key
from dlq_worker.drain.sink import Outcome, Sink, WriteResult
from dlq_worker.drain.source import Source
from dlq_worker.drain.systemic import SystemicDetector
from dlq_worker.errors import (
    DatabaseUnavailable,
    DecodeError,
    InternalError,
    PermanentError,
    RedisCommandError,
    RejectedError,
    StreamGone,
    SystemicRejection,
    TransientError,
)
from dlq_worker.watch.metrics import Metrics

log = logging.getLogger(__name__)

#: How long an audit event waits at most for an older entry of its hash chain that another
#: replica holds (see Flusher._in_chain_order).
ORDER_WAIT = 30.0
#: How soon an entry waiting for an older one of its chain is tried again (kept in hand).
ORDER_RETRY = 0.02
#: How soon an entry left for later is claimed back (see Flusher._defer).
RESUME_AFTER = 0.5

Retry = Callable[[Callable[[], Any]], Any]


def internal_error(stage: str, exc: BaseException) -> InternalError:
    """An unexpected exception as a containable, parkable error: its type and a short
    trace (file and line only: no locals, no values)."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    trace = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                        for f in reversed(frames))
    return InternalError(f"{stage}: {type(exc).__name__}: {str(exc)[:200]}",
                         details={"exception": type(exc).__name__, "trace": trace[:600],
                                  "stage": stage})


@dataclass
class Batch:
    entries: list[Entry]
    started: float
    records: list[Record] = field(default_factory=list)
    record_entries: list[Entry] = field(default_factory=list)
    #: Entries to acknowledge whatever the write does (deleted while pending).
    ack: list[Entry] = field(default_factory=list)
    #: Entries that failed before the write (an unexpected decoder failure).
    failed: list[tuple[Entry, PermanentError]] = field(default_factory=list)
    future: Future[WriteResult] | None = None
    #: (stream, id) of every entry, to tell what this worker still holds.
    held: frozenset[tuple[str, str]] = frozenset()

    def __post_init__(self) -> None:
        self.held = frozenset((e.stream, e.id) for e in self.entries)


class Flusher:
    def __init__(self, config: Config, source: Source, sink: Sink, metrics: Metrics,
                 retry: Retry, retry_due: MutableMapping[tuple[str, str], float],
                 route: Callable[[str], str], clock: Callable[[], float] = time.monotonic,
                 remaining: Callable[[], float | None] = lambda: None,
                 progress: Callable[[], None] = lambda: None,
                 keep_fresh: Callable[[], None] = lambda: None,
                 ) -> None:
        self.config = config
        self.source = source
        self.sink = sink
        self.metrics = metrics
        self.retry = retry
        self.retry_due = retry_due
        self.route = route
        self.clock = clock
        #: Seconds left before the shutdown deadline (None: no stop requested).
        self.remaining = remaining
        #: Told whenever an entry completes (written, parked, acknowledged, rescheduled).
        self.progress = progress
        #: Called while a write is waited for: keeps what we hold from looking idle to
        #: other workers' claims however long the write takes.
        self.keep_fresh = keep_fresh
        self.systemic = SystemicDetector(config.worker.systemic_after)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        #: The batch being written in the background, if any.
        self.inflight: Batch | None = None
        #: Every entry taken from the loop and not yet completed (acknowledged or handed to
        #: the rejection schedule): still ours, kept fresh during outages.
        self.holding: set[tuple[str, str]] = set()
        #: Entries a write left for later (their hash chain busy, or an older entry of it
        #: held by another replica): let go of, left pending on us in Redis, and claimed
        #: back at this time with their delivery count untouched (the worker does it).
        self.resume_due: dict[tuple[str, str], float] = {}
        #: Entries kept in hand while another replica writes an older entry of their
        #: chain (a short wait): (stream, id) -> (entry, when to try it again).
        self.order_wait: dict[tuple[str, str], tuple[Entry, float]] = {}
        #: (stream, id) -> since when it waits for an older entry of its chain elsewhere.
        self._order_since: dict[tuple[str, str], float] = {}
        #: (stream, id) -> correlation_id of audit events in order_wait or resume_due: an
        #: older entry of a chain that we hold back holds back the newer ones we read.
        self._chain_of: dict[tuple[str, str], str] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def reset(self) -> None:
        """Forget what is held (the loop restarts in place; Redis still has it pending).
        A write still running is waited for a little (it holds the chain and partition
        locks of its rows); its result is not used: those entries are read again."""
        if self.inflight is not None and self.inflight.future is not None:
            with contextlib.suppress(Exception):
                self.inflight.future.result(timeout=float(
                    self.config.database.statement_timeout))
        self.inflight = None
        self.holding.clear()
        self.resume_due.clear()
        self.order_wait.clear()
        self._chain_of.clear()

    def take_order_due(self) -> list[Entry]:
        """The entries whose wait for an older entry of their chain is up for a new look."""
        now = self.clock()
        # (not before the batch it left is completed: until then it counts as held there)
        due = [key for key, (_, at) in self.order_wait.items()
               if at <= now and key not in self.holding]
        return [self.order_wait.pop(key)[0] for key in due]

    def _defer(self, entry: Entry, record: Record) -> None:
        """Not now: let go of the entry (its bytes leave memory, it stays pending on us)
        and claim it back in RESUME_AFTER: a backlog led by a frozen writer's chains never
        fills our room while the rows behind them wait."""
        self.metrics.deferred.labels(entry.stream).inc()
        self.resume_due[(entry.stream, entry.id)] = self.clock() + RESUME_AFTER
        self._chain_of[(entry.stream, entry.id)] = str(record.correlation_id)

    def lost(self, stream: str, ids: Sequence[str], how: str) -> None:
        """Entries that were pending and are gone from the stream, never written nor
        parked: audit records lost to trimming (or deletion) outside the worker."""
        if not ids:
            return
        ids, by_reader = self.source.split_deleted(stream, ids)
        if by_reader:
            self.metrics.pending_deleted_uncertain.labels(stream).inc(len(by_reader))
            log.warning("pending entries were deleted from the stream while another group "
                        "reads it (the platform's retry worker deletes an entry after copying "
                        "or parking it): not counted as lost", extra={
                            "event": "pending_deleted_by_reader", "stream": stream,
                            "entries": len(by_reader), "ids": by_reader[:50], "seen_by": how})
        if not ids:
            return
        self.metrics.pending_deleted.labels(stream).inc(len(ids))
        log.error("AUDIT LOSS: pending entries were deleted from the stream before being "
                  "written", extra={"event": "pending_deleted", "stream": stream,
                                    "entries": len(ids), "ids": list(ids)[:50], "seen_by": how})

    def flush(self, entries: list[Entry], *, overlap: bool) -> None:
        """Flush entries; with ``overlap`` the write runs in the background and this
        returns at once (after completing the previous background batch)."""
        self.holding |= {(e.stream, e.id) for e in entries}  # ours from now on
        batch = self.prepare(entries)
        self.finish()
        self._in_chain_order(batch)
        if not batch.records:
            self.complete(batch, None)
            return
        # Written in the writer thread either way: the loop waits in _wait, which keeps
        # what we hold fresh however long the write takes.
        batch.future = self._pool.submit(self.write, batch)
        self.inflight = batch
        if not overlap:
            self.finish()

    def finish(self) -> None:
        """Wait for the background batch, then acknowledge it (retrying while servers are
        down: its entries stay unacknowledged until their rows are committed)."""
        batch, self.inflight = self.inflight, None
        if batch is None:
            return
        assert batch.future is not None
        try:
            try:
                result = self._wait(batch.future)
            except TransientError:
                result = self.retry(lambda: self._wait(self._pool.submit(self.write, batch)))
        except concurrent.futures.TimeoutError:
            self.inflight = batch  # still ours: left pending in Redis, redelivered later
            raise DatabaseUnavailable("shutdown deadline reached with a write in flight") \
                from None
        self.complete(batch, result)

    def _wait(self, future: Future[WriteResult]) -> WriteResult:
        """The write's result; in short slices, so a stop requested meanwhile still bounds
        the wait by its deadline, and what we hold is kept fresh however long it takes."""
        while True:
            self.keep_fresh()
            remaining = self.remaining()
            if remaining is not None and remaining <= 0:
                raise concurrent.futures.TimeoutError
            try:
                return future.result(timeout=0.5 if remaining is None else min(0.5, remaining))
            except concurrent.futures.TimeoutError:
                continue

    # -- writing, with every surprise contained to the entry that causes it --

    def write(self, batch: Batch) -> WriteResult:
        """Write the batch's records. Anything unexpected is isolated by bisection, like a
        rejected row: it ends as that entry's InternalError, the others are written. A
        refusal that looks systemic raises SystemicRejection instead (hold, never park)."""
        result = self._write_contained(batch.records, batch.record_entries)
        self._observe(batch, result)
        return result

    def _write_contained(self, records: list[Record], entries: list[Entry]) -> WriteResult:
        try:
            return self.sink.write(records)
        except TransientError:
            raise
        except Exception as exc:
            if len(records) == 1:
                err = internal_error("write", exc)
                self._count_internal("write", err, entries[0])
                return WriteResult([Outcome.REJECTED], {0: err})
        middle = len(records) // 2
        left = self._write_contained(records[:middle], entries[:middle])
        right = self._write_contained(records[middle:], entries[middle:])
        return WriteResult(
            outcomes=left.outcomes + right.outcomes,
            errors={**left.errors, **{middle + i: e for i, e in right.errors.items()}},
            partitions_created=left.partitions_created + right.partitions_created,
        )

    def _observe(self, batch: Batch, result: WriteResult) -> None:
        by_table: dict[str, tuple[list[int], list[tuple[tuple[str, str], str]]]] = {}
        for i, (record, outcome) in enumerate(zip(batch.records, result.outcomes, strict=True)):
            accepted, refused = by_table.setdefault(record.table, ([], []))
            err = result.errors.get(i)
            if outcome in (Outcome.WRITTEN, Outcome.DUPLICATE):
                accepted.append(i)
            elif isinstance(err, RejectedError) and err.reason != "outside_partition_window":
                entry = batch.record_entries[i]
                refused.append(((entry.stream, entry.id), err.signature))
        before = self.systemic.systemic()
        for table, (accepted, refused) in by_table.items():
            self.systemic.observe(table, len(accepted), refused)
        now = self.systemic.systemic()
        for table in before.keys() - now.keys():
            self.metrics.systemic.labels(table).set(0)
            log.warning("rows accepted again: systemic rejection is over",
                        extra={"event": "systemic_rejection_over", "table": table})
        for table, cause in now.items():
            if table not in before:
                self.metrics.systemic.labels(table).set(1)
                self.metrics.systemic_episodes.labels(table).inc()
                log.error("every row refused for one cause: holding, parking nothing",
                          extra={"event": "systemic_rejection", "table": table,
                                 "cause": cause})
        # Hold this batch only for a table of its own that is refused systemically (and had
        # no row accepted here): a batch of other tables goes through.
        held = {t: c for t, c in now.items() if t in by_table and not by_table[t][0]}
        if held:
            causes = "; ".join(f"{t}: {c}" for t, c in sorted(held.items()))
            raise SystemicRejection(f"systemic rejection, nothing parked ({causes})")

    def _count_internal(self, stage: str, err: InternalError, entry: Entry | None) -> None:
        self.metrics.internal_errors.labels(stage).inc()
        facts = describe_entry(entry) if entry is not None else {}
        log.error("unexpected failure contained", extra={
            "event": "internal_error", "stage": stage, **facts, "error": str(err),
            "exception": err.details.get("exception"), "trace": err.details.get("trace")})

    def _in_chain_order(self, batch: Batch) -> None:
        """Leave for later the events of a hash chain of which an older entry (lower ID,
        same stream) is held and not written yet, by another replica or by ourselves (left
        for later, or waiting here): written first, ours would make it late, and it would
        be written unhashed though it is on time. The lowest entry of a chain is never held
        back, so the replicas never wait on each other in a cycle; and none waits more than
        ORDER_WAIT (a frozen replica's entries are taken over by then, or ours go on and
        that one is written as late). The wait is short (the older entry is being written):
        the entries stay in hand and are looked at again every ORDER_RETRY. Run after the
        previous batch completed, so what it left for later counts."""
        chained = [i for i, r in enumerate(batch.records) if r.table == AUDIT_EVENTS]
        if not chained or not self.sink.chaining:
            return
        self._forget_chains()
        # stream -> (ID, correlation_id, left for later by us) of the older entries held
        older: dict[str, list[tuple[tuple[int, int], str, bool]]] = {}
        for keys, ours in ((self.order_wait, False), (self.resume_due, True)):
            for key in keys:
                cid = self._chain_of.get(key)
                if cid is not None:
                    older.setdefault(key[0], []).append((_id_key(key[1]), cid, ours))
        top: dict[str, tuple[tuple[int, int], str]] = {}  # stream -> its highest ID
        for i in chained:
            entry = batch.record_entries[i]
            position = _id_key(entry.id)
            if entry.stream not in top or position > top[entry.stream][0]:
                top[entry.stream] = (position, entry.id)
        for stream, (_, below) in top.items():
            try:
                held = self.source.held_elsewhere(stream, below)
            except TransientError:
                continue  # cannot tell: write as before (a late event at worst)
            older.setdefault(stream, []).extend((_id_key(i), c, False) for i, c in held if c)
        if not any(older.values()):
            return
        now = self.clock()
        wait: dict[int, bool] = {}  # index -> whether to let go of it (see below)
        for i in chained:
            entry = batch.record_entries[i]
            cid = str(batch.records[i].correlation_id)
            mine = _id_key(entry.id)
            before = [ours for k, c, ours in older.get(entry.stream, ()) if k < mine and c == cid]
            if before:
                since = self._order_since.setdefault((entry.stream, entry.id), now)
                if now - since < ORDER_WAIT:
                    wait[i] = any(before)
        if not wait:
            return
        for i in sorted(wait, reverse=True):
            entry = batch.record_entries.pop(i)
            record = batch.records.pop(i)
            if wait[i]:
                # behind one we left for later (its chain busy): let go of it as well, so
                # a frozen writer's chain never keeps a backlog of it in hand
                self._defer(entry, record)
                continue
            self.metrics.deferred.labels(entry.stream).inc()
            self.order_wait[(entry.stream, entry.id)] = (entry, now + ORDER_RETRY)
            self._chain_of[(entry.stream, entry.id)] = str(record.correlation_id)
        if len(self._order_since) > 100_000:
            self._order_since.clear()

    def _forget_chains(self) -> None:
        """Keep _chain_of to the entries still left for later or waiting (bounded)."""
        live = len(self.order_wait) + len(self.resume_due)
        if len(self._chain_of) > 2 * live + 1000:
            self._chain_of = {k: c for k, c in self._chain_of.items()
                              if k in self.order_wait or k in self.resume_due}

    def prepare(self, entries: list[Entry]) -> Batch:
        batch = Batch(entries, self.clock())
        # A linked event's hash input is made here, while the batch before is written: the
        # writer, which holds its chains' locks meanwhile, is left the links themselves.
        chaining = self.sink.chaining
        for entry in [e for e in entries if e.deleted]:
            # Pending, but its entry is gone from the stream: nothing left to write.
            batch.ack.append(entry)
            self.lost(entry.stream, [entry.id], "XREADGROUP")
        for entry in entries:
            if entry.deleted:
                continue
            try:
                record = decode_entry(self.route(entry.stream), entry.fields)
                if chaining and record.table == AUDIT_EVENTS:
                    with contextlib.suppress(Exception):  # else the writer makes it, and
                        record = chain.with_hashed(record)  # contains what goes wrong
                batch.records.append(record)
                batch.record_entries.append(entry)
            except DecodeError as exc:
                self.retry(lambda e=entry, x=exc: self.park(e, x))  # type: ignore[misc]
            except Exception as exc:  # a decoder bug must not stop the loop
                err = internal_error("decode", exc)
                self._count_internal("decode", err, entry)
                batch.failed.append((entry, err))
        return batch

    def complete(self, batch: Batch, result: WriteResult | None) -> None:
        ack = list(batch.ack)
        failed = list(batch.failed)
        if result is not None:
            written: Counter[tuple[str, str]] = Counter()
            duplicates: Counter[str] = Counter()
            for index, (entry, outcome) in enumerate(
                zip(batch.record_entries, result.outcomes, strict=True)
            ):
                if outcome is Outcome.WRITTEN:
                    written[(entry.stream, batch.records[index].table)] += 1
                    ack.append(entry)
                elif outcome is Outcome.DUPLICATE:
                    duplicates[entry.stream] += 1
                    ack.append(entry)
                elif outcome is Outcome.DEFERRED:
                    self._defer(entry, batch.records[index])
            for (stream, table), n in written.items():
                self.metrics.written.labels(stream, table).inc(n)
            for stream, n in duplicates.items():
                self.metrics.duplicates.labels(stream).inc(n)
            if result.partitions_created:
                self.metrics.partitions_created.inc(len(result.partitions_created))
            self._count_chain(batch, result)
            failed += [(batch.record_entries[i], err) for i, err in result.errors.items()]
        for entry, err in [f for f in failed if f[1].certain]:
            self.retry(lambda e=entry, x=err: self.park(e, x))  # type: ignore[misc]
        rejected = [f for f in failed if not f[1].certain]
        if rejected:
            self.retry(lambda: self.handle_rejected(rejected))
        ids: dict[str, list[str]] = {}
        gone: dict[str, list[str]] = {}  # deleted already, and told as such (see prepare)
        for entry in ack:
            (gone if entry.deleted else ids).setdefault(entry.stream, []).append(entry.id)
        tries = itertools.count()

        def ack_and_delete() -> int:
            first = next(tries) == 0
            self.source.ack_and_delete(gone, first_try=False)
            return self.source.ack_and_delete(ids, first_try=first)

        try:
            copies = self.retry(ack_and_delete)
            if copies:
                log.info("entries written were deleted from the stream before their "
                         "acknowledgement, while another group reads it (the platform's retry "
                         "worker copies an entry it failed to write, then deletes it): their "
                         "copies are recorded in flight", extra={
                             "event": "deleted_before_ack", "entries": copies})
        except RedisCommandError as exc:
            # Committed but not acknowledged: still pending, so claimed again later and
            # acknowledged then as duplicates. Nothing is lost; the loop goes on.
            err = internal_error("ack", exc)
            self._count_internal("ack", err, ack[0] if ack else None)
        self.holding -= batch.held
        for entry in ack:
            self._order_since.pop((entry.stream, entry.id), None)
        if ack or failed:
            self.progress()
        self.metrics.batch_size.observe(len(batch.entries))
        self.metrics.flush_seconds.observe(self.clock() - batch.started)
        self.metrics.last_flush.set_to_current_time()

    def _count_chain(self, batch: Batch, result: WriteResult) -> None:
        late: dict[str, set[str]] = {}
        linked_in: Counter[str] = Counter()
        for i, linked in result.chained.items():
            if result.outcomes[i] is not Outcome.WRITTEN:
                continue
            entry = batch.record_entries[i]
            if linked:
                linked_in[entry.stream] += 1
            else:
                late.setdefault(entry.stream, set()).add(
                    str(batch.records[i].correlation_id))
                self.metrics.chain_late.labels(entry.stream).inc()
        for stream, n in linked_in.items():
            self.metrics.chain_linked.labels(stream).inc(n)
        for stream, correlations in late.items():
            log.warning("events older than the head of their hash chain written unhashed",
                        extra={"event": "chain_late", "stream": stream,
                               "correlation_ids": sorted(correlations)[:50]})

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
                # No longer pending on us: another worker has it (the park script then does
                # nothing), or it was deleted while we held it, and what we hold is the only
                # copy left: parked from memory, with its reason, never dropped.
                self.park(entry, err, deliveries=0)
                continue
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
                                    error=str(err), deliveries=deliveries,
                                    details=err.details)
        except (StreamGone, TransientError):
            if not isinstance(sys.exc_info()[1], StreamGone):
                raise
            log.error("cannot park: its stream or group vanished; it is read again when the "
                      "stream reappears", extra={"event": "park_skipped",
                                                 **describe_entry(entry)})
            return
        except Exception as exc:
            # Redis refuses the move itself (a dead-letter key of the wrong type...), or
            # something unforeseen: the entry stays pending and is tried again slowly.
            internal = internal_error("park", exc)
            self._count_internal("park", internal, entry)
            self.retry_due[(entry.stream, entry.id)] = (
                self.clock() + float(self.config.worker.reject_retry_max))
            return
        if done == 2:
            log.error("entry deleted from the stream while held: parked from memory",
                      extra={"event": "parked_from_memory", **describe_entry(entry)})
        if done == 4:
            self.progress()
            log.info("entry already parked by the consumer that claimed it",
                     extra={"event": "parked_by_other", **describe_entry(entry)})
            return
        if done:
            self.progress()
            self.metrics.parked.labels(entry.stream, err.reason).inc()
            log.error(
                "entry parked in dead-letter stream",
                extra={"event": "parked", **describe_entry(entry),
                       "dead_letter": self.source.dead_letter_stream(entry.stream),
                       "reason": err.reason, "error_class": type(err).__name__,
                       "error": str(err), "deliveries": deliveries},
            )
