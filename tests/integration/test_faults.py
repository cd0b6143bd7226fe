"""No audit loss under faults that really happen: servers stopped, killed and restarted,
workers SIGKILLed, producers trimming. Every test ends with an entry-by-entry account:
each valid record is exactly one row, each poison entry is parked with its reason, and
the streams and pending lists are empty.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from sqlalchemy import text

from dlq_worker import producer
from dlq_worker.throwaway import samples
from tests.conftest import EVENTS, NOTIFICATIONS, Bed, OwnedBed, fast_env, wait_until

pytestmark = pytest.mark.fault

DEAD_EVENTS = "audit:dead-letter:events"


def assert_no_loss(bed: Bed, valid_ids: set[str], poison_ids: set[str] | None = None) -> None:
    """Every valid record is one row; every poison entry is parked once, with its reason."""
    rows = bed.event_ids()
    assert len(rows) == len(set(rows)), "duplicate rows"
    missing = valid_ids - set(rows)
    assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:3]}"
    assert set(rows) == valid_ids, "rows that nobody produced"
    parked = bed.client.xrange(DEAD_EVENTS)
    parked_ids = [fields[b"original_id"].decode() for _, fields in parked]
    assert len(parked_ids) == len(set(parked_ids)), "an entry parked twice"
    assert set(parked_ids) == (poison_ids or set())
    for _, fields in parked:
        assert fields[b"reason"] and fields[b"error_class"] and fields[b"error"]
        assert fields[b"original_stream"] == EVENTS.encode()
    assert bed.depth(EVENTS) == 0 and bed.pending(EVENTS) == 0


def produce(bed: Bed, n: int) -> set[str]:
    return {r["event_id"] for r in bed.produce_events(n)}


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def test_postgres_outage_during_drain_loses_and_parks_nothing(owned: OwnedBed,
                                                               start_worker: Any) -> None:
    # Given a worker draining a backlog
    valid = produce(owned, 4000)
    worker = start_worker(owned.config(worker={"batch_size": 200}))
    wait_until(lambda: owned.count("audit_events") > 400, 60, "draining")

    # When PostgreSQL stops mid-drain, stays down while producers keep writing, and returns
    owned.pg_server.stop()
    wait_until(lambda: _status(worker.url + "/readyz") == 503, 20, "not ready during outage")
    assert _status(worker.url + "/healthz") == 200  # alive: the loop keeps turning
    valid |= produce(owned, 1000)
    wait_until(lambda: worker.metric("dlq_worker_transient_errors_total",
                                     server="postgres") >= 5, 30, "several failed attempts")
    owned.pg_server.start()
    back = time.monotonic()
    wait_until(lambda: owned.drained(EVENTS), 60, "drained after recovery")
    print(f"\n[outage] drained {time.monotonic() - back:.2f}s after PostgreSQL returned")

    # Then every record is a row exactly once, nothing parked, readiness recovered
    assert_no_loss(owned, valid)
    assert worker.metric("dlq_worker_transient_errors_total", server="postgres") > 0
    wait_until(lambda: _status(worker.url + "/readyz") == 200, 20, "ready again")


def test_postgres_killed_mid_transaction(owned: OwnedBed, start_worker: Any) -> None:
    valid = produce(owned, 8000)
    worker = start_worker(owned.config(worker={"batch_size": 500}))
    wait_until(lambda: owned.count("audit_events") > 1000, 60, "draining")
    # SIGKILL of the postmaster and every backend: in-flight transactions die with them
    owned.pg_server.kill()
    wait_until(lambda: worker.metric("dlq_worker_transient_errors_total",
                                     server="postgres") > 0, 30, "the worker noticed")
    owned.pg_server.start()  # crash recovery
    back = time.monotonic()
    wait_until(lambda: owned.drained(EVENTS), 90, "drained after crash recovery")
    print(f"\n[pg-kill] 8000 entries, drained {time.monotonic() - back:.2f}s after restart")
    assert_no_loss(owned, valid)


def test_redis_killed_and_restarted_with_aof(owned: OwnedBed, start_worker: Any) -> None:
    valid = produce(owned, 6000)
    worker = start_worker(owned.config(worker={"batch_size": 200}))
    wait_until(lambda: owned.count("audit_events") > 500, 60, "draining")
    owned.redis_server.kill()  # appendfsync always: what Redis acknowledged is on disk
    wait_until(lambda: worker.metric("dlq_worker_transient_errors_total", server="redis") > 0,
               30, "the worker noticed")
    owned.redis_server.start()
    back = time.monotonic()
    wait_until(lambda: owned.drained(EVENTS), 90, "drained after Redis restart")
    print(f"\n[redis-kill] 6000 entries, drained {time.monotonic() - back:.2f}s after restart")
    assert_no_loss(owned, valid)
    assert worker.metric("dlq_worker_transient_errors_total", server="redis") > 0


def test_redis_killed_with_appendfsync_everysec(owned_everysec: OwnedBed,
                                                 start_worker: Any) -> None:
    # Given Redis syncing its AOF once a second (the usual production setting), a worker
    # draining, and producers writing
    owned = owned_everysec
    produced_at = dict.fromkeys(produce(owned, 3000), time.monotonic())
    worker = start_worker(owned.config(worker={"batch_size": 200}))
    wait_until(lambda: owned.count("audit_events") > 500, 60, "draining")
    for _ in range(20):
        for record in owned.produce_events(50):
            produced_at[record["event_id"]] = time.monotonic()

    # When Redis is SIGKILLed (up to a second of its writes never reached the disk) and
    # restarted
    owned.redis_server.kill()
    killed = time.monotonic()
    owned.redis_server.start()
    wait_until(lambda: owned.drained(EVENTS), 90, "drained after Redis restart")

    # Then nothing is parked or written twice, and a record without a row is only one whose
    # XADD Redis itself lost: acknowledged in the last moments before the kill
    rows = owned.event_ids()
    assert len(rows) == len(set(rows)) and owned.parked() == []
    missing = set(produced_at) - set(rows)
    assert all(killed - produced_at[m] < 2.0 for m in missing), "lost by the worker"
    print(f"\n[redis-kill everysec] {len(produced_at)} records, "
          f"{len(missing)} lost by Redis itself (unsynced writes), "
          f"{worker.metric('dlq_worker_pending_deleted_total', stream=EVENTS):.0f} pending "
          "entries found gone")


def test_entries_trimmed_unread_are_detected_and_counted(owned: OwnedBed,
                                                         start_worker: Any) -> None:
    # Given a worker stuck holding its first 10 entries because PostgreSQL is down (and no
    # more: without overlap it reads no second batch while the first waits)
    first = produce(owned, 10)
    owned.pg_server.stop()
    worker = start_worker(owned.config(worker={"batch_size": 10, "overlap": False}))
    wait_until(lambda: owned.pending(EVENTS) == 10, 30, "batch in hand")

    # When producers keep writing with an exact MAXLEN 100, trimming 190 unread entries
    rng = random.Random(5)
    written: list[str] = []
    for _ in range(290):
        record = samples.audit_event(rng)
        owned.client.xadd(EVENTS, {"message": producer.build_message("audit_event", record)},
                          maxlen=100, approximate=False)
        written.append(record["event_id"])

    # Then the loss is counted (once) and logged, and everything still present is written
    wait_until(lambda: worker.metric("dlq_worker_entries_trimmed_unread_total",
                                     stream=EVENTS) == 190, 20, "trim detected")
    owned.pg_server.start()
    wait_until(lambda: owned.drained(EVENTS), 60, "drained")
    assert set(owned.event_ids()) == first | set(written[-100:])
    assert owned.client.hget("dlq-worker:trimmed-unread", EVENTS) == b"190"


def test_two_workers_sigkilled_repeatedly_while_producing(owned: OwnedBed,
                                                          spawn_worker: Any) -> None:
    """The acceptance run: 20,000+ entries, producers writing throughout, repeated SIGKILLs
    of two workers, a PostgreSQL crash-restart, poison entries parked with their reasons."""
    env = {**owned.env(), **fast_env(), "DLQ_WORKER_HTTP_ENABLED": "false",
           "DLQ_WORKER_WORKER_BATCH_SIZE": "200"}
    valid: set[str] = set()
    poison: set[str] = set()
    db_poison: set[str] = set()
    done = threading.Event()

    def produce_throughout() -> None:
        rng = random.Random(11)
        for round_ in range(44):
            records = [samples.audit_event(rng) for _ in range(500)]
            pipe = owned.client.pipeline(transaction=False)
            for record in records:
                pipe.xadd(EVENTS, {"message": producer.build_message("audit_event", record)})
            pipe.execute()
            valid.update(r["event_id"] for r in records)
            poison.add(owned.xadd_raw(EVENTS, samples.POISON_MESSAGES[round_ % 5]))
            # and a row only PostgreSQL refuses: its delivery count must survive the kills
            bad = samples.audit_event(rng)
            bad.update([("actor_id", "a" * 300), ("retention_days", 0),
                        ("duration_ms", 2**40)][round_ % 3:round_ % 3 + 1])
            db_poison.add(owned.xadd_raw(EVENTS, producer.build_message("audit_event", bad)))
            time.sleep(0.1)
        done.set()

    producer_thread = threading.Thread(target=produce_throughout)
    workers = [spawn_worker(env), spawn_worker(env)]
    producer_thread.start()
    kills = 0
    rng = random.Random(3)
    crashed_pg = False
    started = time.monotonic()
    while not done.is_set() or (owned.count("audit_events") < len(valid) and kills < 40):
        time.sleep(rng.uniform(0.3, 1.2))
        victim = rng.randrange(2)
        workers[victim].proc.kill()  # SIGKILL, at whatever instant it is
        workers[victim].proc.wait(10)
        kills += 1
        workers[victim] = spawn_worker(env)  # new pid: a new consumer name
        if not crashed_pg and time.monotonic() - started > 4:
            owned.pg_server.kill()
            time.sleep(0.5)
            owned.pg_server.start()
            crashed_pg = True
    producer_thread.join()
    settle = time.monotonic()
    wait_until(lambda: owned.drained(EVENTS), 120, "drained after the last kill")
    print(f"\n[sigkill] {len(valid)} valid + {len(poison)} undecodable + {len(db_poison)} "
          f"refused by PostgreSQL, {kills} SIGKILLs, PostgreSQL crash-restart: {crashed_pg}, "
          f"drained {time.monotonic() - settle:.1f}s after the last kill")
    assert len(valid) == 22000 and kills >= 5 and crashed_pg
    assert_no_loss(owned, valid, poison | db_poison)
    reasons = {f[b"original_id"].decode(): f[b"reason"] for f in owned.parked()}
    assert {reasons[i] for i in db_poison} == {b"value_too_long", b"check_violation",
                                               b"numeric_out_of_range"}


def test_poison_scattered_through_batches(bed: Bed, start_worker: Any) -> None:
    # Given valid records with malformed entries and rows PostgreSQL rejects scattered in
    rng = random.Random(21)
    valid: set[str] = set()
    decode_poison: set[str] = set()
    db_poison: set[str] = set()
    for i in range(600):
        record = samples.audit_event(rng)
        if i % 97 == 13:
            decode_poison.add(bed.xadd_raw(EVENTS, samples.POISON_MESSAGES[i % 5]))
        elif i % 89 == 7:
            record["event_type"] = "x" * 150  # varchar(100): value too long
            db_poison.add(bed.xadd_raw(EVENTS, producer.build_message("audit_event", record)))
        elif i % 83 == 5:
            record["retention_days"] = 9999  # CHECK retention_days BETWEEN 1 AND 2555
            db_poison.add(bed.xadd_raw(EVENTS, producer.build_message("audit_event", record)))
        else:
            bed.xadd_raw(EVENTS, producer.build_message("audit_event", record))
            valid.add(record["event_id"])
    worker = start_worker(bed.config(worker={"batch_size": 100, "max_deliveries": 3}))

    # Then valid rows are written at once; the bad ones are isolated and parked
    wait_until(lambda: len(bed.event_ids()) == len(valid), 30, "valid rows written")
    wait_until(lambda: bed.drained(EVENTS), 60, "poison parked")
    assert_no_loss(bed, valid, decode_poison | db_poison)
    by_id = {f[b"original_id"].decode(): f for _, f in bed.client.xrange(DEAD_EVENTS)}
    for entry_id in decode_poison:
        assert by_id[entry_id][b"error_class"] == b"DecodeError"
        assert by_id[entry_id][b"final_retry_count"] == b"1"  # certain: parked at once
    reasons = {by_id[i][b"reason"] for i in db_poison}
    assert reasons == {b"value_too_long", b"check_violation"}
    for entry_id in db_poison:
        assert by_id[entry_id][b"error_class"] == b"RejectedError"
        assert by_id[entry_id][b"final_retry_count"] == b"3"  # max_deliveries
        message = json.loads(by_id[entry_id][b"message"])  # the original, unchanged
        assert message["type"] == "audit_event"
    assert worker.metric("dlq_worker_entries_parked_total", stream=EVENTS,
                         reason="value_too_long") > 0


def test_redelivered_entries_already_written_are_acked_not_parked(bed: Bed,
                                                                   start_worker: Any) -> None:
    # Given a consumer that committed its rows and died before acknowledging them
    records = bed.produce_events(300)
    valid = {r["event_id"] for r in records}
    first = start_worker(bed.config(streams={"consumer": "first"}))
    wait_until(lambda: bed.drained(EVENTS), 30)
    first.stop()
    bed.client.xtrim(EVENTS, maxlen=0)
    for record in records:  # the same records again, as a redelivery brings them
        bed.client.xadd(EVENTS, {"message": producer.build_message("audit_event", record)})
    bed.client.xreadgroup("dlq-worker", "crashed", {EVENTS: ">"}, count=1000)
    assert bed.pending(EVENTS) == 300

    # When another worker claims them after claim_idle
    worker = start_worker(bed.config(streams={"consumer": "second"}))
    wait_until(lambda: bed.drained(EVENTS), 30, "claimed and acknowledged")

    # Then they count as written (duplicates), none is parked
    assert_no_loss(bed, valid)
    assert worker.metric("dlq_worker_entries_claimed_total", stream=EVENTS) == 300
    assert worker.metric("dlq_worker_entries_duplicate_total", stream=EVENTS) == 300


#: Inside the partition window (12 months back) but before the template's partitions (2).
_SIX_MONTHS_AGO = dt.datetime.now(dt.UTC) - dt.timedelta(days=183)


def test_missing_partition_is_created(bed: Bed, start_worker: Any) -> None:
    record = samples.audit_event(random.Random(1), when=_SIX_MONTHS_AGO)
    bed.xadd_raw(EVENTS, producer.build_message("audit_event", record))
    valid = produce(bed, 20) | {record["event_id"]}
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    assert_no_loss(bed, valid)
    assert worker.metric("dlq_worker_partitions_created_total") == 1


def test_missing_partition_parked_when_creation_is_off(bed: Bed, start_worker: Any) -> None:
    record = samples.audit_event(random.Random(2), when=_SIX_MONTHS_AGO)
    poison = {bed.xadd_raw(EVENTS, producer.build_message("audit_event", record))}
    valid = produce(bed, 20)
    start_worker(bed.config(database={"create_missing_partitions": False},
                            worker={"max_deliveries": 2}))
    wait_until(lambda: bed.drained(EVENTS), 30)
    assert_no_loss(bed, valid, poison)
    assert bed.parked()[0][b"reason"] == b"missing_partition"


def test_partition_outside_the_window_is_never_created(bed: Bed, start_worker: Any) -> None:
    # Given events far outside the window: a far-future placeholder and a year-0001 stamp
    poison = set()
    for stamp in ("9999-12-31T23:59:59.999999Z", "0001-01-01T00:00:00Z",
                  "2019-03-14T15:09:26Z"):
        record = samples.audit_event(random.Random(3))
        record["event_timestamp"] = stamp
        poison.add(bed.xadd_raw(EVENTS, producer.build_message("audit_event", record)))
    valid = produce(bed, 20)

    # When a worker drains the stream
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)

    # Then they are parked with their own reason, no DDL ran, and the rest is written
    assert_no_loss(bed, valid, poison)
    assert {f[b"reason"] for f in bed.parked()} == {b"outside_partition_window"}
    assert worker.metric("dlq_worker_partitions_created_total") == 0
    with bed.engine.connect() as conn:
        names = conn.execute(text("SELECT relname FROM pg_class WHERE relname LIKE "
                                  "'audit_events_%'")).scalars().all()
    assert not {"audit_events_9999_12", "audit_events_0001_01", "audit_events_2019_03"} & set(
        names)


def test_pending_entries_deleted_before_ack_are_counted(bed: Bed, start_worker: Any) -> None:
    # Given a crashed consumer's pending entries, some deleted from the stream meanwhile
    produce(bed, 10)
    bed.client.xgroup_create(EVENTS, "dlq-worker", id="0")
    delivered = bed.client.xreadgroup("dlq-worker", "crashed", {EVENTS: ">"}, count=10)
    ids = [entry_id for entry_id, _ in delivered[0][1]]
    bed.client.xdel(EVENTS, *ids[:4])
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    assert bed.count("audit_events") == 6
    assert worker.metric("dlq_worker_pending_deleted_total", stream=EVENTS) == 4


def test_idle_consumers_holding_nothing_are_removed(bed: Bed, start_worker: Any) -> None:
    produce(bed, 3)
    bed.client.xgroup_create(EVENTS, "dlq-worker", id="0")
    bed.client.xgroup_createconsumer(EVENTS, "dlq-worker", "gone-empty")
    start_worker(worker={"consumer_idle_delete": "500ms", "claim_interval": "200ms"})
    wait_until(lambda: bed.drained(EVENTS), 30)
    wait_until(lambda: b"gone-empty" not in {c["name"] for c in
                                              bed.client.xinfo_consumers(EVENTS, "dlq-worker")},
               90, "idle consumer removed")


def test_eviction_policy_and_old_entries_are_reported(owned: OwnedBed, start_worker: Any) -> None:
    # Given a Redis that may evict any key, and an entry 8 days old that cannot be written yet
    owned.client.config_set("maxmemory-policy", "allkeys-lru")
    old_ms = int((time.time() - 8 * 86400) * 1000)
    record = samples.audit_event(random.Random(4))
    owned.client.xadd(EVENTS, {"message": producer.build_message("audit_event", record)},
                      id=f"{old_ms}-0")
    owned.pg_server.stop()
    worker = start_worker(owned.config())

    # Then both are visible: a warning metric, /readyz detail, the age past the retention
    wait_until(lambda: worker.metric("dlq_worker_redis_durability_warning",
                                     check="eviction_policy") == 1, 20, "eviction warning")
    wait_until(lambda: worker.metric("dlq_worker_stream_oldest_entry_age_seconds",
                                     stream=EVENTS) > 7 * 86400, 20, "age exposed")
    assert worker.metric("dlq_worker_stream_retention_seconds") == 168 * 3600
    owned.pg_server.start()
    wait_until(lambda: owned.drained(EVENTS), 30, "old entry written, never dropped")
    assert owned.event_ids() == [record["event_id"]]


def test_notifications_survive_outage_too(owned: OwnedBed, start_worker: Any) -> None:
    notes = owned.produce_notifications(500)
    owned.pg_server.stop()
    worker = start_worker(owned.config())
    wait_until(lambda: worker.metric("dlq_worker_transient_errors_total",
                                     server="postgres") >= 3, 30, "several failed attempts")
    owned.pg_server.start()
    wait_until(lambda: owned.drained(NOTIFICATIONS), 60)
    assert owned.count("notification_audit") == len(notes)


def test_entries_held_through_an_outage_are_not_stolen(owned: OwnedBed,
                                                       start_worker: Any) -> None:
    # Given two workers holding batches while PostgreSQL is down for longer than claim_idle
    valid = produce(owned, 400)
    owned.pg_server.stop()
    workers = [start_worker(owned.config(worker={"batch_size": 100},
                                         streams={"consumer": name})) for name in ("a", "b")]
    wait_until(lambda: owned.pending(EVENTS) >= 200, 20, "both hold a batch")
    # The scenario is time passing: more than twice claim_idle (2 s here), during which each
    # worker tried to claim idle entries several times (claim_interval 500 ms).
    time.sleep(5)

    # When it returns
    owned.pg_server.start()
    wait_until(lambda: owned.drained(EVENTS), 60)

    # Then nothing was claimed from the other (they kept their entries fresh) and none lost
    assert_no_loss(owned, valid)
    for worker in workers:
        assert worker.metric("dlq_worker_entries_claimed_total", stream=EVENTS) == 0


def test_deleted_stream_is_forgotten_and_recreated_stream_drained(bed: Bed,
                                                                 start_worker: Any) -> None:
    # Given a worker draining events, notifications and the (singular) notification stream
    bed.produce_notifications(3)
    bed.client.xadd("audit:dlq:notification",
                    {"message": producer.build_message("notification_audit",
                                                       samples.notification(bed.rng))})
    worker = start_worker()
    wait_until(lambda: bed.drained(NOTIFICATIONS, "audit:dlq:notification"), 30)

    # When streams vanish (deleted, evicted, a Redis restart without persistence)
    bed.client.delete("audit:dlq:notification", NOTIFICATIONS)
    wait_until(lambda: NOTIFICATIONS not in worker.app.worker.streams, 20, "stream forgotten")

    # Then the others keep draining, and a stream written again is found and drained from 0
    valid = produce(bed, 50)
    notes = bed.produce_notifications(4)
    wait_until(lambda: bed.drained(EVENTS, NOTIFICATIONS), 30, "recreated stream drained")
    assert set(bed.event_ids()) == valid
    assert bed.count("notification_audit") == 3 + 1 + len(notes)


def test_a_crashing_input_among_valid_ones_does_not_stop_the_loop(bed: Bed,
                                                                  start_worker: Any) -> None:
    deep = b'{"payload":' + b"[" * 100000 + b"]" * 100000 + b"}"
    poison = {bed.xadd_raw(EVENTS, deep)}
    record = samples.audit_event(random.Random(3))
    record["actor_id"] = "\ud800"
    poison.add(bed.xadd_raw(EVENTS, producer.build_message("audit_event", record)))
    valid = produce(bed, 30)
    start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    assert_no_loss(bed, valid, poison)


def test_missing_table_keeps_the_worker_unready_and_parks_nothing(bed: Bed,
                                                                  start_worker: Any) -> None:
    # Given the table was dropped (the server still answers every ping)
    with bed.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE notification_audit RENAME TO notification_audit_old")
    bed.produce_notifications(5)
    worker = start_worker()

    # Then the worker is not ready, names the database, and parks nothing
    def unready_for_postgres() -> bool:
        try:
            urllib.request.urlopen(worker.url + "/readyz", timeout=2)
        except urllib.error.HTTPError as exc:
            return any(r.startswith("postgres: SQLSTATE 42P01")
                       for r in json.loads(exc.read())["reasons"])
        return False

    wait_until(unready_for_postgres, 20, "not ready, naming the missing table")
    assert bed.pending(NOTIFICATIONS) == 5
    tried = worker.metric("dlq_worker_transient_errors_total", server="postgres")
    wait_until(lambda: worker.metric("dlq_worker_transient_errors_total",
                                     server="postgres") >= tried + 3, 20, "more attempts")
    assert bed.parked("audit:dead-letter:notifications") == []

    # And once the table is back it drains by itself
    with bed.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE notification_audit_old RENAME TO notification_audit")
    wait_until(lambda: bed.drained(NOTIFICATIONS), 30)
    wait_until(lambda: _status(worker.url + "/readyz") == 200, 20, "ready again")


def test_concurrent_writes_are_never_mistaken_for_trimming(bed: Bed) -> None:
    # Given producers writing while the stats are read over and over (no MAXLEN at all)
    from dlq_worker.watch.loss import stream_stats

    bed.client.xgroup_create(EVENTS, "dlq-worker", id="0", mkstream=True)
    cfg = bed.config()
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            bed.produce_events(20)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        seen = [stream_stats(bed.client, cfg, EVENTS).lost_unread for _ in range(300)]
    finally:
        stop.set()
        writer.join()
    assert set(seen) == {0}


@pytest.mark.fault
def test_a_frozen_worker_loses_and_parks_nothing(owned: OwnedBed, spawn_worker: Any) -> None:
    """A node freeze or a long pause (SIGSTOP) of one replica in the middle of its writes,
    another replica taking over its entries: once the frozen one thaws, every record is one
    row and nothing is parked. (Rows of the chains it holds locked wait until the server
    ends its idle transaction; see test_edges.py for the rows of other chains going
    through meanwhile, a backlog led by the frozen chains included.)"""
    env = {**owned.env(), **fast_env(), "DLQ_WORKER_HTTP_ENABLED": "false",
           "DLQ_WORKER_WORKER_BATCH_SIZE": "500", "DLQ_WORKER_DATABASE_LOCK_TIMEOUT": "500ms",
           "DLQ_WORKER_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT": "3s"}
    # Given worker A draining a backlog of few, long chains (each batch locks all of them)
    rng = random.Random(5)
    valid: set[str] = set()
    pipe = owned.client.pipeline(transaction=False)
    for i in range(6000):
        record = samples.audit_event(rng)
        record["correlation_id"] = f"rr-long-{i % 40}"
        valid.add(record["event_id"])
        pipe.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, record)})
    pipe.execute()
    a = spawn_worker({**env, "DLQ_WORKER_STREAMS_CONSUMER": "worker-a"})
    wait_until(lambda: owned.count("audit_events") > 500, 60, "A draining")

    # When A freezes in the middle of its writes, B starts and takes over while producers
    # write on, and A thaws after a while
    a.proc.send_signal(signal.SIGSTOP)
    try:
        spawn_worker({**env, "DLQ_WORKER_STREAMS_CONSUMER": "worker-b"})
        more = produce(owned, 3000)
        time.sleep(8)
    finally:
        a.proc.send_signal(signal.SIGCONT)

    # Then every record is one row, nothing parked, nothing pending
    wait_until(lambda: owned.drained(EVENTS), 120, "drained")
    assert_no_loss(owned, valid | more)
