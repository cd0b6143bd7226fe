"""The edges of "no audit loss": what the database skips, what housekeeping meets, what
the alerts see first. Each test here failed on the release before its fix.

What leaves the DLQ is a row with the record's own key and content, a dead letter with its
reason, or a counted and logged loss: never anything else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from dlq_worker import producer
from dlq_worker.app import App
from dlq_worker.drain.redis_io import LARGEST_ENTRY
from dlq_worker.drain.worker import Worker
from dlq_worker.throwaway import samples
from dlq_worker.watch import heartbeat, metrics
from tests.conftest import EVENTS, NOTIFICATIONS, Bed, OwnedBed, wait_until
from tests.integration.test_ops import cli

DEAD_NOTIFICATIONS = "audit:dead-letter:notifications"


def _stored_notification_ids(bed: Bed) -> set[str]:
    with bed.engine.connect() as conn:
        return set(conn.execute(text("SELECT notification_id FROM notification_audit"))
                   .scalars())


def test_a_row_skipped_by_another_unique_constraint_is_never_acked_as_a_duplicate(
        bed: Bed, start_worker: Any) -> None:
    # Given notification_audit whose id sequence lags the ids already in the table (a
    # data-only restore, a failover to a logical replica: sequences are not carried)
    with bed.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO notification_audit (id, remediation_id, notification_id, recipient, "
            "channel, message_summary, status, sent_at) SELECT n, 'rr', 'restored-' || n, "
            "'r', 'slack', 's', 'sent', now() FROM generate_series(1, 600) AS n"))
        conn.execute(text("SELECT setval('notification_audit_id_seq', 1, false)"))
    # and 50 new notification records in the DLQ
    produced = {r["notification_id"] for r in bed.produce_notifications(50)}

    # When a worker drains the stream
    worker = start_worker()
    wait_until(lambda: bed.drained(NOTIFICATIONS), 60, "drained")

    # Then each record is a row under its own key or a dead letter with its reason; none was
    # called a duplicate (no row with its key existed)
    stored = _stored_notification_ids(bed) & produced
    parked = {json.loads(f[b"message"])["payload"]["notification_id"]: f
              for f in bed.parked(DEAD_NOTIFICATIONS)}
    assert stored | set(parked) == produced, "records vanished"
    assert not stored & set(parked)
    for fields in parked.values():
        assert fields[b"reason"] != b"duplicate"
        assert b"23505" in fields[b"error"] or b"unique" in fields[b"error"].lower()
    assert worker.metric("dlq_worker_entries_duplicate_total", stream=NOTIFICATIONS) == 0


def test_a_stray_value_in_the_heartbeat_hash_does_not_stop_the_drain(
        bed: Bed, start_worker: Any) -> None:
    # Given a heartbeat hash holding a value that is not a number (a stray write, another
    # format) and entries to drain
    bed.client.hset(heartbeat.key("dlq-worker"), "someone-else", "not-a-number")

    # When a worker runs with takeover by heartbeat on, past the time it starts judging
    # other consumers' beats, and entries arrive
    worker = start_worker()
    time.sleep(2 * float(worker.app.config.worker.takeover_after))
    produced = {r["event_id"] for r in bed.produce_events(300)}

    # Then every entry is drained, the stray value is neither judged nor removed, and no
    # housekeeping job failed for it
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")
    assert set(bed.event_ids()) == produced
    assert bed.client.hget(heartbeat.key("dlq-worker"), "someone-else") == b"not-a-number"
    assert worker.metric("dlq_worker_housekeeping_failures_total", job="takeover") == 0


def test_a_heartbeat_key_of_the_wrong_type_does_not_stop_the_drain(
        bed: Bed, start_worker: Any) -> None:
    # Given the heartbeat key holding a string (WRONGTYPE for every script on it)
    bed.client.set(heartbeat.key("dlq-worker"), "stray")

    # When a worker runs, and entries arrive once it would judge other consumers' beats
    worker = start_worker()
    time.sleep(2 * float(worker.app.config.worker.takeover_after))
    produced = {r["event_id"] for r in bed.produce_events(300)}

    # Then the drain goes on: every entry written, the loop live, and readiness untouched
    # (claim_idle still covers takeovers)
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")
    assert set(bed.event_ids()) == produced
    assert worker.metric("dlq_worker_internal_errors_total", stage="loop") == 0
    with urllib.request.urlopen(worker.url + "/healthz", timeout=5) as reply:
        assert reply.status == 200
    with urllib.request.urlopen(worker.url + "/readyz", timeout=5) as reply:
        assert reply.status == 200


@pytest.mark.parametrize("job", metrics.JOBS)
def test_any_housekeeping_job_failing_leaves_the_drain_running(
        bed: Bed, start_worker: Any, monkeypatch: Any, job: str) -> None:
    # Given a periodic job that raises something unforeseen every time it runs
    method = {"discover": "discover", "claim": "claim_idle", "takeover": "take_over_dead",
              "cleanup": "cleanup_consumers", "redeliver": "_redeliver"}[job]
    real = getattr(Worker, method)
    calls = {"n": 0}

    def broken(self: Worker, *args: Any) -> Any:
        calls["n"] += 1
        if job == "discover" and calls["n"] == 1:
            return real(self, *args)  # the startup discovery, which finds the stream
        raise KeyError(f"{job} broke")

    monkeypatch.setattr(Worker, method, broken)
    produced = {r["event_id"] for r in bed.produce_events(200)}
    bad = samples.audit_event(bed.rng)
    bad["actor_ip"] = "10.0.0.999"  # refused by PostgreSQL: redelivered, then parked
    bed.client.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, bad)})

    # When a worker runs
    worker = start_worker(worker={"consumer_idle_delete": "0s"})

    # Then the valid entries are written, the job's failures counted under its name
    wait_until(lambda: set(bed.event_ids()) >= produced, 30, "written")
    wait_until(lambda: worker.metric("dlq_worker_housekeeping_failures_total", job=job) >= 1,
               10, "failure counted")
    assert worker.thread.is_alive()
    assert worker.metric("dlq_worker_internal_errors_total", stage="loop") == 0


def test_entries_in_hand_counts_what_is_held_during_an_outage(
        owned: OwnedBed, start_worker: Any) -> None:
    # Given a worker whose PostgreSQL is down
    owned.produce_events(1)
    worker = start_worker(owned.config(worker={"batch_size": 50}))
    wait_until(lambda: owned.drained(EVENTS), 30, "first entry drained")
    owned.pg_server.stop()

    # When entries arrive and the worker takes a batch it cannot write
    owned.produce_events(200)
    wait_until(lambda: worker.metric("dlq_worker_transient_errors_total",
                                     server="postgres") >= 2, 30, "failing writes")

    # Then the gauge says what it holds, not 0
    held = len(worker.app.worker.held())
    assert held > 0
    assert worker.metric("dlq_worker_entries_in_hand") == held
    owned.pg_server.start()
    wait_until(lambda: owned.drained(EVENTS), 60, "drained")
    assert worker.metric("dlq_worker_entries_in_hand") == 0


def test_every_loss_series_exists_at_zero_before_anything_can_be_counted(bed: Bed) -> None:
    # Given a worker process assembled but not yet running (nothing discovered, nothing read)
    registry = CollectorRegistry()
    app = App(bed.config(http={"enabled": False}), registry=registry)
    try:
        # Then every routed stream's loss and park series already exist at 0, so the first
        # loss the worker counts is an increase Prometheus sees
        for name in app.config.streams.routes:
            stream = app.config.streams.prefix + name
            for metric in ("dlq_worker_entries_trimmed_unread_total",
                           "dlq_worker_pending_deleted_total"):
                assert registry.get_sample_value(metric, {"stream": stream}) == 0.0
            assert registry.get_sample_value("dlq_worker_entries_parked_total",
                                             {"stream": stream, "reason": "bad_uuid"}) == 0.0
    finally:
        app.source.close()
        app.sink.close()
        if app.heartbeat:
            app.heartbeat.client.close()


def _readyz(worker: Any) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(worker.url + "/readyz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextlib.contextmanager
def _frozen_writer(bed: Bed, correlation_id: str) -> Iterator[None]:
    """Another writer frozen in the middle of its write: its transaction holds the chain's
    advisory lock until the block ends."""
    frozen = bed.engine.connect()
    tx = frozen.begin()
    frozen.execute(text("SELECT pg_advisory_xact_lock(audit_event_lock_id(:c))"),
                   {"c": correlation_id})
    try:
        yield
    finally:
        tx.rollback()
        frozen.close()


def _events_in_chain(bed: Bed, n: int, correlation_id: str,
                     start: dt.datetime | None = None) -> set[str]:
    """n events of one chain, produced in that order (a second apart from ``start``)."""
    records = [samples.audit_event(
        bed.rng, when=None if start is None else start + dt.timedelta(seconds=i))
        for i in range(n)]
    for record in records:
        record["correlation_id"] = correlation_id
    pipe = bed.client.pipeline(transaction=False)
    for record in records:
        pipe.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, record)})
    pipe.execute()
    return {r["event_id"] for r in records}


def test_a_chain_locked_by_a_frozen_writer_stalls_only_its_own_rows(
        bed: Bed, start_worker: Any) -> None:
    # Given another writer frozen in the middle of its write: its transaction holds the
    # advisory lock of chain rr-frozen and will not end until it is thawed
    with _frozen_writer(bed, "rr-frozen"):
        stuck = _events_in_chain(bed, 30, "rr-frozen")
        others = {r["event_id"] for r in bed.produce_events(2000)}

        # When a worker drains a backlog that mixes that chain with others
        worker = start_worker(database={"lock_timeout": "300ms"},
                              worker={"stalled_after": "2s"})

        # Then every other chain's rows are written while the lock is held, the frozen
        # chain's rows wait (neither rejected nor parked), the worker says so
        wait_until(lambda: set(bed.event_ids()) >= others, 30, "other chains written")
        assert not set(bed.event_ids()) & stuck
        assert worker.metric("dlq_worker_entries_deferred_total", stream=EVENTS) >= 30
        assert not bed.parked("audit:dead-letter:events")
        assert worker.metric("dlq_worker_entries_rejected_total", stream=EVENTS,
                             reason="rejected") == 0
        # and once nothing but the frozen chain is left, readiness says the drain stalled
        wait_until(lambda: "drain stalled" in _readyz(worker)[1], 10, "stall reported")
        with urllib.request.urlopen(worker.url + "/healthz", timeout=5) as reply:
            assert reply.status == 200  # alive: the loop turns, it is the locks that hold
    # When the frozen writer's transaction ends (the block above)
    # Then its chain's rows follow, linked, and nothing is left
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")
    assert set(bed.event_ids()) == others | stuck
    with bed.engine.connect() as conn:
        unhashed = conn.execute(text("SELECT count(*) FROM audit_events WHERE "
                                     "correlation_id = 'rr-frozen' AND event_hash IS NULL"))
        assert unhashed.scalar_one() == 0


def test_events_left_for_later_are_not_overtaken_by_newer_ones_of_their_chain(
        bed: Bed, start_worker: Any) -> None:
    # Given a worker whose first events of chain rr-thaw were left for later: another
    # writer held the chain's lock past lock_timeout
    worker = start_worker(database={"lock_timeout": "300ms"})
    start = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)
    with _frozen_writer(bed, "rr-thaw"):
        first = _events_in_chain(bed, 5, "rr-thaw", start)
        wait_until(lambda: worker.metric("dlq_worker_entries_deferred_total",
                                         stream=EVENTS) >= 5, 10, "left for later")
    # When the lock is free again and newer events of that chain arrive at once, before
    # the first ones are claimed back
    newer = _events_in_chain(bed, 5, "rr-thaw", start + dt.timedelta(minutes=1))

    # Then all ten are written hashed, in the chain's order: the newer ones waited for the
    # older ones we held, none of which was made late by our own replica
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")
    assert set(bed.event_ids()) == first | newer
    with bed.engine.connect() as conn:
        unhashed = conn.execute(text("SELECT count(*) FROM audit_events WHERE "
                                     "correlation_id = 'rr-thaw' AND event_hash IS NULL"))
        assert unhashed.scalar_one() == 0
    assert worker.metric("dlq_worker_chain_late_events_total", stream=EVENTS) == 0


def _park_directly(bed: Bed, n: int) -> set[str]:
    """n valid records parked in our dead-letter format (as after a long outage of a table)."""
    ids: set[str] = set()
    pipe = bed.client.pipeline(transaction=False)
    for i in range(n):
        record = samples.audit_event(bed.rng)
        ids.add(record["event_id"])
        pipe.xadd("audit:dead-letter:events", {
            "message": producer.build_message(producer.AUDIT_EVENT, record),
            "original_id": f"1-{i}", "original_stream": EVENTS, "reason": "missing_partition",
            "error_class": "MissingPartition", "error": "no partition", "consumer": "w-1",
            "final_retry_count": "5"})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    return ids


def test_replay_never_pushes_a_stream_past_the_producers_cap(bed: Bed) -> None:
    # Given 12,000 parked records and no worker draining
    _park_directly(bed, 12000)

    # When they are replayed: the replay fills the stream to half the cap, waits for room,
    # and stops with its own exit code, the rest still parked
    result = cli(bed, "dead-letter", "replay", "--all", "--wait", "1")
    assert result.returncode == 9, result.stdout + result.stderr
    assert "no room" in result.stderr or "did not drain" in result.stderr
    assert bed.depth(EVENTS) == 5000 and len(bed.parked()) == 7000

    # Then a producer's capped write deletes none of the replayed records
    bed.client.xadd(EVENTS, {"message": producer.build_message(
        producer.AUDIT_EVENT, samples.audit_event(bed.rng))}, maxlen=10000, approximate=True)
    assert bed.depth(EVENTS) == 5001


def test_replay_paces_itself_against_the_drain(bed: Bed, start_worker: Any) -> None:
    # Given 12,000 parked records and a worker draining
    parked = _park_directly(bed, 12000)
    start_worker(worker={"batch_size": 500})

    # When they are all replayed with room for 2,000 at a time
    deepest = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            deepest[0] = max(deepest[0], bed.depth(EVENTS))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = cli(bed, "dead-letter", "replay", "--all", "--max-fill", "0.2")
    finally:
        done.set()
        sampler.join()

    # Then every record is written, the stream never held more than the room allowed
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: set(bed.event_ids()) >= parked, 120, "every replayed record written")
    assert not bed.parked()
    assert 0 < deepest[0] <= 2000


def test_bytes_in_hand_stay_bounded_when_entry_sizes_change(
        bed: Bed, start_worker: Any, monkeypatch: Any) -> None:
    # Given 300 small entries, then 40 of ~800 KB, then small ones again, and a worker
    # that records the bytes it holds after every read, claim and redelivery
    from bench.workloads import big_messages

    peak = [0]
    real = Worker._take

    def take(self: Worker, entries: Any) -> None:
        real(self, entries)
        peak[0] = max(peak[0], self._bytes_in_hand)

    monkeypatch.setattr(Worker, "_take", take)
    small = {r["event_id"] for r in bed.produce_events(300)}
    for message in big_messages(40, size=800_000):
        bed.xadd_raw(EVENTS, message)
    small |= {r["event_id"] for r in bed.produce_events(300)}

    # When it drains them
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS), 90, "drained")

    # Then every record is written, and the bytes held never passed the budget by more
    # than one entry of the largest valid size
    assert small <= set(bed.event_ids()) and bed.count("audit_events") == 640
    budget = int(worker.app.config.worker.batch_max_bytes)
    print(f"\n[bytes in hand] peak {peak[0]:,} B, budget {budget:,} B")
    assert peak[0] <= budget + LARGEST_ENTRY


@pytest.mark.fault
def test_trimming_while_no_worker_runs_counts_across_a_redis_restart(
        owned: OwnedBed, start_worker: Any) -> None:
    # Given a worker that drained a first backlog and stopped
    first = {r["event_id"] for r in owned.produce_events(50)}
    worker = start_worker(owned.config())
    wait_until(lambda: owned.drained(EVENTS) and owned.client.hget(
        "dlq-worker:trimmed-unread:leader", EVENTS), 30, "drained, count taken")
    worker.stop()

    # When producers write 6,000 entries with an exact MAXLEN of 1,000 (5,000 trimmed unread)
    # and Redis restarts from its AOF before any worker runs again
    kept = [r["event_id"] for r in owned.produce_events(6000, maxlen=1000, exact=True)]
    owned.redis_server.stop()
    owned.redis_server.start()

    # Then the next worker counts the 5,000 as lost, and writes the 1,000 still there
    again = start_worker(owned.config())
    wait_until(lambda: again.metric("dlq_worker_entries_trimmed_unread_total",
                                    stream=EVENTS) == 5000, 30, "loss counted")
    wait_until(lambda: owned.drained(EVENTS), 60, "drained")
    assert set(owned.event_ids()) == first | set(kept[-1000:])


def test_a_beat_is_judged_by_the_beaters_own_takeover_after(bed: Bed) -> None:
    # Given a live replica beating for takeover_after 3 s (a pod before a rollout that
    # lowers it: it beats every 0.6 s), and a new replica judging with 0.3 s
    old = heartbeat.Heartbeat(bed.client, "dlq-worker", "old-pod", 3.0, 600.0)
    new = heartbeat.Heartbeat(bed.client, "dlq-worker", "new-pod", 0.3, 600.0)
    old.beat()
    new.beat()
    time.sleep(1.0)
    new.beat()
    new._flowing_since = time.monotonic() - 10  # its own beats have flowed long enough

    # When the new replica looks for dead consumers 1 s after the old one's last beat
    # Then the old one is alive by its own promise
    assert "old-pod" not in new.dead_consumers()

    # and once it stops beating for longer than its own takeover_after, it is dead, and
    # its entries are claimed after that idle time, not the judge's
    time.sleep(2.5)
    assert new.dead_consumers() == {"old-pod": 3.0}


def _held_by(bed: Bed, consumer: str) -> Any:
    """One valid entry read by ``consumer`` of the worker's group, as the worker holds it."""
    from dlq_worker.drain.redis_io import Entry
    bed.produce_events(1)
    bed.client.xgroup_create(EVENTS, "dlq-worker", id="0")
    [[_, [(raw_id, fields)]]] = bed.client.xreadgroup("dlq-worker", consumer, {EVENTS: ">"})
    return Entry(EVENTS, raw_id.decode(), fields)


def test_an_entry_parked_once_is_never_parked_again_when_the_reply_was_lost(
        bed: Bed) -> None:
    from dlq_worker.drain.source import Source
    entry = _held_by(bed, "w-1")
    source = Source(bed.config(), "w-1")
    try:
        # Given a park that was done, its reply lost (the retry sees the state it left)
        first = source.park(entry, reason="bad_payload", error_class="Malformed",
                            error="x", deliveries=1)
        # When the worker parks the entry again, as its retry does
        again = source.park(entry, reason="bad_payload", error_class="Malformed",
                            error="x", deliveries=1)
    finally:
        source.close()
    # Then the second park knows it was done (ours), and one dead letter exists
    assert (first, again) == (1, 3)
    assert len(bed.parked()) == 1


def test_an_entry_claimed_and_parked_by_another_is_not_parked_again_by_the_slow_one(
        bed: Bed) -> None:
    from dlq_worker.drain.source import Source
    # Given a slow but live consumer holding an entry, which another one claims and parks
    entry = _held_by(bed, "slow")
    bed.client.xclaim(EVENTS, "dlq-worker", "fast", 0, [entry.id])
    slow, fast = Source(bed.config(), "slow"), Source(bed.config(), "fast")
    try:
        assert fast.park(entry, reason="bad_payload", error_class="Malformed", error="x",
                         deliveries=2) == 1
        # When the slow consumer, done at last, parks the entry from what it holds
        late = slow.park(entry, reason="bad_payload", error_class="Malformed", error="x",
                         deliveries=1)
    finally:
        slow.close()
        fast.close()
    # Then it learns the other parked it, and one dead letter exists
    assert late == 4
    assert len(bed.parked()) == 1


@pytest.mark.parametrize("how", ["autoclaim", "takeover"])
def test_ids_redis_drops_in_a_claim_whose_reply_is_lost_are_still_counted_once(
        bed: Bed, how: str) -> None:
    from dlq_worker.drain.source import Source
    from dlq_worker.errors import TransientError
    from tests import netcut
    # Given five entries pending on a dead consumer, two of them deleted from the stream
    ids = [bed.xadd_raw(EVENTS, b"{}") for _ in range(5)]
    bed.client.xgroup_create(EVENTS, "dlq-worker", id="0")
    bed.client.xreadgroup("dlq-worker", "dead", {EVENTS: ">"})
    with netcut.proxy(bed.redis_port) as cut:
        source = Source(bed.config(redis={"addr": f"127.0.0.1:{cut.port}"}), "alive")
        lost: list[str] = []

        def claim() -> Any:
            if how == "autoclaim":
                return source.autoclaim(EVENTS, 0.1, 10, lost.extend)
            return source.claim_from(EVENTS, ["dead"], 0.1, 10, lost.extend)
        try:
            claim()  # nothing idle long enough yet: nothing moves
            bed.client.xdel(EVENTS, ids[1], ids[3])
            time.sleep(0.3)
            # When the claim that drops them runs, and its reply is lost on the wire
            script = getattr(source, "_autoclaim", None) if how == "autoclaim" else \
                source._claim_from
            if script:
                bed.client.script_load(script.script)  # its reply is the one lost
            cut.lose_reply_to(script.sha.encode() if script else b"XAUTOCLAIM")
            with contextlib.suppress(TransientError):
                claim()
            assert cut.lost.is_set()
            # and the claim job runs again
            time.sleep(0.3)
            claim()
            claim()
        finally:
            source.close()
    # Then the two deleted entries are counted lost, each once
    assert sorted(lost) == sorted([ids[1], ids[3]])


def test_a_backlog_led_by_a_frozen_writers_chain_does_not_hold_the_rows_behind_it(
        bed: Bed, start_worker: Any) -> None:
    # Given another writer frozen with chain rr-frozen locked, and a backlog that starts
    # with more of that chain's entries than a batch holds
    with _frozen_writer(bed, "rr-frozen"):
        stuck = _events_in_chain(bed, 400, "rr-frozen")
        others = {r["event_id"] for r in bed.produce_events(600)}

        # When a worker with batches of 100 drains it
        worker = start_worker(database={"lock_timeout": "300ms"},
                              worker={"batch_size": 100})

        # Then the rows behind the frozen chain are all written while the lock is held:
        # the deferred entries were let go of, not kept filling the batch
        wait_until(lambda: set(bed.event_ids()) >= others, 30, "other chains written")
        assert not set(bed.event_ids()) & stuck
        assert worker.metric("dlq_worker_entries_in_hand") < 400

    # and once it thaws, the chain's rows follow, linked, with no delivery counted for the
    # waits (nothing parked)
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")
    assert set(bed.event_ids()) == others | stuck
    assert not bed.parked("audit:dead-letter:events")
