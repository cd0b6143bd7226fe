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
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import redis
import tenacity

from dlq_worker.config import Config
from dlq_worker.drain.flush import Flusher, internal_error
from dlq_worker.drain.policy import BatchPolicy, transient_wait
from dlq_worker.drain.redis_io import Entry
from dlq_worker.drain.sink import Sink
from dlq_worker.drain.source import Source
from dlq_worker.errors import (
    DatabaseUnavailable,
    RedisCommandError,
    RedisUnavailable,
    StreamGone,
    SystemicRejection,
    TransientError,
)
from dlq_worker.watch import control
from dlq_worker.watch.health import Health
from dlq_worker.watch.heartbeat import Heartbeat
from dlq_worker.watch.metrics import Metrics

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
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.config = config
        self.heartbeat = heartbeat
        #: Told of each stream just before the loop first reads it (the monitor's count).
        self.before_first_read: Callable[[str], None] = lambda stream: None
        self.source = source
        self.sink = sink
        self.metrics = metrics
        self.health = health
        self.clock = clock
        w = config.worker
        self.policy = BatchPolicy(size=w.batch_size, linger=float(w.linger),
                                  max_bytes=w.batch_max_bytes)
        #: stream -> table, for every routed stream whose group exists.
        self.streams: dict[str, str] = {}
        #: stream -> cursor while re-reading our own pending entries (restart), else absent.
        self._replay: dict[str, str] = {}
        self._in_hand: dict[tuple[str, str], Entry] = {}
        self._bytes_in_hand = 0
        self._first_at: float | None = None
        #: (stream, id) -> when a rejected entry is due for its next delivery.
        self._retry_due: dict[tuple[str, str], float] = {}
        self._next_discover = 0.0
        self._next_claim = 0.0
        self._next_cleanup = 0.0
        self._next_takeover = 0.0
        self._next_redeliver = 0.0
        #: Periodic job -> its consecutive failures (absent: it last succeeded).
        self._job_failures: dict[str, int] = {}
        self.flusher = Flusher(config, source, sink, metrics, self._with_retry,
                               self._retry_due, lambda s: self.streams.get(s, ""), clock,
                               remaining=self._remaining, progress=health.progress,
                               keep_fresh=self._keep_in_hand)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._deadline: float | None = None
        self._touched_at = 0.0
        #: Servers whose failure the loop reported and has not yet seen recover.
        self._failing: set[str] = set()
        #: The group's pause, as last read from Redis, and when it was read (monotonic).
        self._pause: control.Pause | None = None
        self._pause_read_at = float("-inf")
        # Every routed stream's series exist at zero from the first scrape, before anything
        # can be counted: a loss counted before Prometheus first saw the series never pages.
        for name, table in config.streams.routes.items():
            metrics.init_stream(config.streams.prefix + name, table)
        # Whatever is held (in hand, being written, waiting out an outage), read at scrape.
        metrics.in_hand.set_function(self._held_count)

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

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self.clock())

    def run(self) -> None:
        """Run until request_stop(); returns after the final flush (or the deadline)."""
        log.info("worker started", extra={"event": "started", "consumer": self.source.consumer,
                                          "group": self.source.group})
        try:
            if self.config.streams.create_routed:
                self._with_retry(self.source.create_routed)
            self._with_retry(self.discover)
        except TransientError:
            if not self.stopping:
                raise
        self.health.started()
        failures = 0
        while not self.stopping:
            try:
                self.step()
                failures = 0
            except TransientError:
                if not self.stopping:
                    raise
                # a stop was requested and its deadline passed while a server was down
            except Exception as exc:
                failures += 1
                self._contain_loop_failure(exc, failures)
        self._drain_on_stop()

    def _contain_loop_failure(self, exc: Exception, failures: int) -> None:
        """Last resort: something escaped every stage's own containment. The process does
        not die for it (a crash loop would halt the drain while producers trim): the loop
        restarts in place, as a fresh process would: what it held is still pending in
        Redis and is read again from its pending list."""
        err = internal_error("loop", exc)
        self.metrics.internal_errors.labels("loop").inc()
        log.error("unexpected failure in the run loop: restarting the loop in place",
                  extra={"event": "internal_error", "stage": "loop", "error": str(err),
                         "exception": err.details["exception"], "trace": err.details["trace"],
                         "consecutive": failures})
        self._in_hand.clear()
        self._bytes_in_hand = 0
        self._first_at = None
        self.flusher.reset()
        self._retry_due.clear()
        for stream in self.streams:
            self._replay[stream] = "0"
        self._sleep(min(float(self.config.worker.backoff_max),
                        float(self.config.worker.backoff_initial) * 2 ** min(failures, 10)))

    #: How often the pause key is read: a pause takes effect within one poll.
    pause_poll = 0.25

    def step(self) -> None:
        """One turn of the loop."""
        self.health.beat()
        now = self.clock()
        self.metrics.heartbeat.set_to_current_time()
        self.health.holding(len(self._in_hand) + len(self.flusher.holding)
                            + len(self.flusher.resume_due) + len(self.flusher.order_wait))
        try:
            if self._paused(now):
                # Finish what is held (written and acknowledged, or left pending if a
                # server is down); take nothing new: no read, no claim, no retry.
                if self._in_hand or self.flusher.inflight is not None:
                    self.flush()
                self._sleep(self.pause_poll)
                return
            self._housekeeping(now)
            if self.stopping:
                return
            block = self.policy.block_for(len(self._in_hand), self._first_at, now,
                                          float(self.config.worker.block))
            if self._retry_due or self.flusher.resume_due or self.flusher.order_wait:
                block = max(0.001, min(block, min([  # wake for the next one due
                    *self._retry_due.values(), *self.flusher.resume_due.values(),
                    *(at for _, at in self.flusher.order_wait.values())]) - now))
            if self.flusher.inflight is not None:
                block = 0.001  # a batch is being written: read the next one, do not wait
            entries = self._with_retry(lambda: self._read(block))
            self._take(entries)
            self._take(self.flusher.take_order_due())  # their chain's older entry: again
            if self.policy.due(len(self._in_hand), self._first_at, self.clock(),
                               self._bytes_in_hand):
                self.flush(overlap=bool(self.config.worker.overlap))
            elif not entries and self.flusher.inflight is not None:
                self.flusher.finish()  # nothing new to overlap with: acknowledge it now
        except StreamGone as exc:
            self._forget(exc.streams)

    def _paused(self, now: float) -> bool:
        """Whether an operator has paused this group (read at most every pause_poll; if
        Redis does not answer, the last known state holds and the loop finds out why)."""
        if now - self._pause_read_at < self.pause_poll:
            return self._pause is not None
        self._pause_read_at = now
        try:
            found = control.read_pause(self.source.client, self.source.group)
        except redis.RedisError:
            return self._pause is not None
        if (found is None) != (self._pause is None):
            if found is not None:
                log.warning("paused by an operator: finishing what is held, taking nothing new",
                            extra={"event": "paused", "reason": found.reason, "by": found.by,
                                   "entries_in_hand": len(self.held())})
            else:
                log.warning("resumed by an operator", extra={"event": "resumed"})
        self._pause = found
        self.metrics.paused.set(0 if found is None else 1)
        self.metrics.paused_since.set(0 if found is None else found.since)
        self.health.set_paused("" if found is None else found.describe())
        return found is not None

    def _forget(self, streams: list[str]) -> None:
        """A stream or its group vanished: stop reading it until discovery finds it again
        (which recreates the group at 0). Entries in hand from it are still written."""
        for stream in streams:
            self.streams.pop(stream, None)
            self._replay.pop(stream, None)
            for due in (self._retry_due, self.flusher.resume_due):
                for key in [k for k in due if k[0] == stream]:
                    del due[key]
        self._next_discover = 0.0
        log.error("DLQ stream or its consumer group vanished",
                  extra={"event": "stream_gone", "streams": streams})

    def flush(self, *, overlap: bool = False) -> None:
        """Write what is in hand and acknowledge it (see flush.py)."""
        entries = list(self._in_hand.values())
        if entries:
            self._in_hand.clear()
            self._bytes_in_hand = 0
            self._first_at = None
            self.flusher.flush(entries, overlap=overlap)
        elif not overlap:
            self.flusher.finish()

    def held(self) -> set[tuple[str, str]]:
        """Entries read and not yet acknowledged (in hand, or being written): what a stop
        would leave pending. A copy, so the signal handler and the exit timer may read it."""
        return set(self._in_hand) | set(self.flusher.holding) | set(self.flusher.order_wait)

    def _held_count(self) -> float:
        try:
            return float(len(self.held()))
        except RuntimeError:  # changed size while the scrape read it: read again next time
            return float(len(self._in_hand))

    @property
    def failing(self) -> bool:
        """A server is down and the loop is backing off."""
        return bool(self._failing)

    def _drain_on_stop(self) -> None:
        error = ""
        try:
            if self._remaining() == 0.0:
                # No attempt after the deadline: one could last a connect or statement
                # timeout. What is held stays pending and is redelivered.
                raise DatabaseUnavailable("shutdown deadline reached")
            self.flusher.finish()
            self.flush()
        except TransientError as exc:
            error = str(exc)
        # The deadline may also have passed inside the loop's last flush: whatever was
        # taken and not acknowledged is still pending in Redis, redelivered later.
        left = self.held()
        if left:
            log.warning(
                "shutdown timeout reached with entries in hand: left pending for redelivery",
                extra={"event": "shutdown_incomplete", "entries": len(left), "error": error},
            )
        self.flusher.close()
        log.info("worker stopped", extra={"event": "stopped", "left_pending": len(left)})

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
                self.before_first_read(stream)
                self.streams[stream] = table
                self._replay[stream] = "0"
                self.metrics.init_stream(stream, table)
                log.info("draining stream", extra={"event": "stream_found", "stream": stream,
                                                   "table": table})
        self.metrics.streams_unknown.set(len(unknown))
        for stream in unknown:
            log.warning("stream under the prefix has no route: not touched",
                        extra={"event": "stream_unknown", "stream": stream})
        interval = float(self.config.streams.discover_interval)
        if not self.streams:  # nothing to drain yet: notice the first DLQ write quickly
            interval = min(interval, 0.2)
        self._next_discover = self.clock() + interval

    def _room(self) -> tuple[int, int]:
        """How many more entries, and how many more bytes, this batch may take."""
        count = self.policy.room(len(self._in_hand))
        return count, self.policy.byte_room(len(self._in_hand), self._bytes_in_hand)

    def _read(self, block: float) -> list[Entry]:
        count, budget = self._room()
        if count == 0 or budget == 0 or not self.streams:
            if not self.streams:
                self._wake.wait(min(block, 0.2))
            return []
        # Our own pending entries first (a restart): cursor past what we already took, one
        # stream at a time, each read within the count and bytes left.
        for stream, cursor in list(self._replay.items()):
            entries = self.source.read({stream: cursor}, count, None, budget)
            if not entries:
                del self._replay[stream]
                continue
            self._replay[stream] = entries[-1].id
            log.info("re-reading own pending entries",
                     extra={"event": "replay", "entries": len(entries)})
            return entries
        return self.source.read({s: ">" for s in self.streams}, count, block, budget)

    def _take(self, entries: list[Entry]) -> None:
        taken: Counter[str] = Counter()
        in_hand, holding = self._in_hand, self.flusher.holding
        for entry in entries:
            key = (entry.stream, entry.id)
            if key in in_hand or key in holding:
                continue
            if not in_hand:
                self._first_at = self.clock()
            in_hand[key] = entry
            self._bytes_in_hand += entry.size
            taken[entry.stream] += 1
        for stream, n in taken.items():  # counted once a read, not once an entry
            self.metrics.read.labels(stream).inc(n)

    # -- housekeeping: discovery, crashed consumers, rejected entries --

    def _housekeeping(self, now: float) -> None:
        """The periodic jobs. Each fails alone (see _job): none may stop the reading and
        writing of the others' entries."""
        w = self.config.worker
        if now >= self._next_discover and self._job("discover", self.discover, now):
            pass  # discover() sets its own next time (sooner while nothing is drained)
        if now >= self._next_claim and self._job("claim", self.claim_idle, now):
            self._next_claim = now + float(w.claim_interval)
        if (self.heartbeat is not None and now >= self._next_takeover
                and self._job("takeover", self.take_over_dead, now)):
            self._next_takeover = now + self.heartbeat.interval
        if now >= self._next_cleanup and self._job("cleanup", self.cleanup_consumers, now):
            self._next_cleanup = now + max(60.0, float(w.claim_interval) * 4)
        due = [key for key, at in self._retry_due.items() if at <= now]
        resume = [key for key, at in self.flusher.resume_due.items() if at <= now]
        if (due or resume) and now >= self._next_redeliver and self._job(
                "redeliver", lambda: self._redeliver(due, resume), now):
            self._next_redeliver = 0.0

    def _job(self, name: str, fn: Callable[[], object], now: float) -> bool:
        """Run one periodic job once; True when it succeeded.

        A failure of any kind (a server down, a stray value in a key the job reads, a
        script error, a bug) is the job's alone: counted in
        ``dlq_worker_housekeeping_failures_total{job}``, logged, and the job is tried again
        after its own growing wait, while the loop goes on reading and writing. A server
        that is really down is met by the read, which backs off for everyone. A job whose
        failure keeps entries from the drain (discovery, claims, redelivery) makes the
        worker unready once it has failed for ``unready_after``.
        """
        try:
            fn()
        except StreamGone:
            raise  # the loop's own news: forget the stream, discovery finds it again
        except Exception as exc:
            failures = self._job_failures.get(name, 0) + 1
            self._job_failures[name] = failures
            w = self.config.worker
            wait = min(float(w.backoff_max) * 6,
                       float(w.backoff_initial) * 2 ** min(failures, 16))
            setattr(self, f"_next_{name}", now + wait)
            transient = isinstance(exc, TransientError)
            err = str(exc) if transient else str(internal_error(name, exc))
            self.metrics.housekeeping_failures.labels(name).inc()
            if name in _DRAIN_JOBS:
                self.health.job_failed(name, err)
            if _logged_attempt(failures):
                log.log(logging.WARNING if transient else logging.ERROR,
                        f"housekeeping job {name} failed; the drain goes on without it",
                        extra={"event": "housekeeping_failed", "job": name, "error": err[:300],
                               "consecutive": failures, "retry_in_seconds": round(wait, 3)})
            return False
        if self._job_failures.pop(name, 0):
            self.health.job_ok(name)
            log.info(f"housekeeping job {name} works again",
                     extra={"event": "housekeeping_recovered", "job": name})
        return True

    def claim_idle(self) -> None:
        """Take over entries left pending by consumers that stopped (crashed workers), as
        many as the batch in hand has room for, learning their size as they come."""
        for stream in list(self.streams):
            count, budget = self._room()
            if count == 0 or budget == 0:
                return
            entries = self.source.autoclaim(
                stream, float(self.config.worker.claim_idle), count,
                self._gone(stream, "XAUTOCLAIM"), max_bytes=budget)
            self._take_claimed(stream, entries, "claimed entries from idle consumers")

    def take_over_dead(self) -> None:
        """Claim at once what consumers whose heartbeat stopped were holding (see
        watch/heartbeat.py); a consumer still beating is never claimed from."""
        assert self.heartbeat is not None
        dead = self.heartbeat.dead_consumers()
        if not dead:
            return
        # Each consumer's entries idle as long as its own takeover_after (see watch/heartbeat.py).
        by_after: dict[float, list[str]] = {}
        for consumer, after in dead.items():
            by_after.setdefault(after, []).append(consumer)
        for stream in list(self.streams):
            for after, consumers in sorted(by_after.items()):
                count, budget = self._room()
                if count == 0 or budget == 0:
                    return
                entries = self.source.claim_from(
                    stream, consumers, after, count, self._gone(stream, "XCLAIM"),
                    max_bytes=budget)
                self._take_claimed(stream, entries,
                                   "took over entries of consumers whose heartbeat stopped",
                                   consumers=consumers)

    def _take_claimed(self, stream: str, entries: list[Entry], message: str,
                      **facts: object) -> None:
        held = self.held()
        fresh = [e for e in entries if (e.stream, e.id) not in held]
        for entry in fresh:
            # One of ours waiting for its retry: the claim just delivered it again (its
            # count went up), so this is that retry, now.
            self._retry_due.pop((entry.stream, entry.id), None)
        if fresh:
            self.metrics.claimed.labels(stream).inc(len(fresh))
            log.info(message, extra={"event": "claimed", "stream": stream,
                                     "entries": len(fresh), **facts})
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

    def _redeliver(self, due: list[tuple[str, str]], resume: list[tuple[str, str]]) -> None:
        """Claim back, one at a time while there is room: rejected entries due for their
        retry (their delivery count goes up: a retry), then entries left for later
        (deferred: their count untouched, it was no attempt)."""
        for keys, schedule, attempt in ((due, self._retry_due, True),
                                        (resume, self.flusher.resume_due, False)):
            for stream, entry_id in keys:
                count, budget = self._room()
                if count == 0 or budget == 0:
                    return  # no room: the rest stay due, claimed once this batch is flushed
                entries = self.source.claim_own(stream, [entry_id],
                                                self._gone(stream, "XCLAIM"),
                                                attempt=attempt)
                schedule.pop((stream, entry_id), None)
                self._take(entries)

    # -- transient failures --

    def _with_retry(self, fn: Callable[[], T]) -> T:
        """Run fn until it succeeds, backing off while a server is unavailable.

        Gives up (re-raising) only once a stop was requested and its deadline passed.
        """
        w = self.config.worker
        outage = transient_wait(float(w.backoff_initial), float(w.backoff_max))
        systemic = transient_wait(float(w.backoff_initial), float(w.systemic_retry_max))

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return systemic(state) if isinstance(exc, SystemicRejection) else outage(state)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            wait=wait,
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
        """During a database outage or a long write, keep other workers from claiming
        what we hold (XCLAIM JUSTID every claim_idle/3 resets its idle time)."""
        now = self.clock()
        if now - self._touched_at < float(self.config.worker.claim_idle) / 3:
            return
        held = self.held()
        if not held:
            return
        self._touched_at = now
        ids: dict[str, list[str]] = {}
        for stream, entry_id in [*held, *self._retry_due, *self.flusher.resume_due]:
            ids.setdefault(stream, []).append(entry_id)
        for stream, stream_ids in ids.items():
            # Redis down too (then nobody can claim them), or the stream gone: nothing to do.
            with contextlib.suppress(TransientError, StreamGone, RedisCommandError):
                self.source.touch(stream, stream_ids, self._gone(stream, "XCLAIM"))

    def _gone(self, stream: str, how: str) -> Callable[[list[str]], None]:
        """What hears of pending IDs Redis dropped because their entry was deleted: a
        loss, unless the entry is in hand (it is written, or parked, from memory)."""
        def gone(ids: list[str]) -> None:
            held = self.held()
            kept = [i for i in ids if (stream, i) in held]
            self.flusher.lost(stream, [i for i in ids if (stream, i) not in held], how)
            if kept:
                log.warning("entries in hand were deleted from the stream; written from "
                            "memory", extra={"event": "trimmed_in_hand", "stream": stream,
                                             "ids": kept[:50]})
                try:  # the platform's copies of them: not lost records if trimmed unread
                    self.source.expect_copies(stream, kept)
                except Exception as exc:  # at worst such a copy is counted as lost
                    log.debug("copies in flight not recorded", extra={
                        "stream": stream, "error": str(exc)[:200]})
        return gone

    def _past_deadline(self, state: tenacity.RetryCallState) -> bool:
        """Give up once the shutdown deadline passed, or at once on a stop with nothing
        in hand: there is nothing to finish, so nothing to wait for."""
        if self._deadline is None:
            return False
        return self.clock() >= self._deadline or not self.held()

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
        if not _logged_attempt(n):
            return  # attempts 1-4, then powers of two, then every 64th: no log flood
        previous = next(m for m in range(n - 1, -1, -1) if m == 0 or _logged_attempt(m))
        log.warning(
            f"{server} unavailable; retrying ({n - previous} attempt"
            f"{'s' if n - previous > 1 else ''} since the last such line)",
            extra={"event": "transient", "server": server, "error": str(exc),
                   "attempt": n, "attempts_summarized": n - previous,
                   "retry_in_seconds": round(wait, 3), "entries_in_hand": len(self._in_hand)},
        )


#: The periodic jobs whose failure keeps entries from the drain: new streams unseen, a
#: crashed consumer's entries unclaimed, rejected entries never retried. (A takeover failing
#: leaves claim_idle to do it later; consumer cleanup is tidiness.)
_DRAIN_JOBS = frozenset({"discover", "claim", "redeliver"})


def _logged_attempt(n: int) -> bool:
    """Which retry attempts of one outage are logged: 1-4, powers of two, every 64th."""
    return n <= 4 or not n & (n - 1) or n % 64 == 0
