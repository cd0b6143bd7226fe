"""The worker against real Redis and PostgreSQL: draining, idempotency, restart, scale-out."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from sqlalchemy import text

from dlq_worker import producer
from dlq_worker.drain.sink import Sink
from dlq_worker.throwaway import samples
from tests.conftest import EVENTS, GROUP, NOTIFICATIONS, Bed, wait_until


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_mixed_backlog_lands_with_every_field(bed: Bed, start_worker: Any) -> None:
    # Given a backlog of both streams in the producers' exact wire format, some records
    # carrying every optional field and one notification written to the singular stream
    events = bed.produce_events(300) + bed.produce_events(100, full=True)
    notes = bed.produce_notifications(120)
    singular = samples.notification(bed.rng)
    bed.client.xadd("audit:dlq:notification",
                    {"message": producer.build_message(producer.NOTIFICATION, singular)})

    # When a worker drains it
    start_worker()
    wait_until(lambda: bed.drained(EVENTS, NOTIFICATIONS, "audit:dlq:notification"), 60,
               "streams drained")

    # Then every record is one row, field for field, and nothing is left in Redis
    assert bed.count("audit_events") == 400
    assert bed.count("notification_audit") == 121
    full = events[-1]
    with bed.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM audit_events WHERE event_id = :id"),
                           {"id": full["event_id"]}).mappings().one()
        note = conn.execute(text("SELECT * FROM notification_audit WHERE notification_id = :n"),
                            {"n": notes[0]["notification_id"]}).mappings().one()
    stamp = dt.datetime.fromisoformat(full["event_timestamp"].replace("Z", "+00:00"))
    assert row["event_timestamp"] == stamp
    assert row["event_date"] == stamp.astimezone(dt.UTC).date()
    assert row["event_version"] == "1.0"
    assert row["event_data"] == full["event_data"]  # base64 on the wire, JSON in the table
    assert row["event_metadata"] == full["event_metadata"]
    for name in ("event_type", "event_category", "event_action", "event_outcome", "actor_type",
                 "actor_id", "resource_type", "resource_id", "resource_name", "correlation_id",
                 "trace_id", "span_id", "namespace", "cluster_id", "severity", "duration_ms",
                 "error_code", "error_message", "retention_days", "is_sensitive"):
        assert row[name] == full[name], name
    assert str(row["actor_ip"]) == full["actor_ip"]
    assert row["hash_algorithm"] == "sha256-unkeyed"  # left to the database default
    for name in ("remediation_id", "recipient", "channel", "message_summary", "status",
                 "delivery_status", "error_message", "escalation_level"):
        assert note[name] == notes[0][name], name
    assert note["id"] != 0  # the producer's zero id is ignored
    with bed.engine.connect() as conn:
        low, high = conn.execute(text("SELECT min(id), max(id) FROM notification_audit")).one()
    assert high - low + 1 == 121  # one sequence value per row, none drawn twice
    assert note["sent_at"] == dt.datetime.fromisoformat(
        notes[0]["sent_at"][:26] + "+00:00")  # nanoseconds truncated to microseconds
    assert bed.pending(EVENTS) == 0 and bed.pending(NOTIFICATIONS) == 0


def test_contract_example_message_is_written_verbatim(bed: Bed, start_worker: Any) -> None:
    # Given the exact message from the contract, byte for byte
    now = dt.datetime.now(dt.UTC)  # (this month: the test schema has partitions around now)
    message = samples.contract_example(now.strftime("%Y-%m-%dT%H:%M:%S.412345Z"))
    bed.xadd_raw(EVENTS, message)
    start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    with bed.engine.connect() as conn:
        row = conn.execute(text("SELECT event_data, duration_ms FROM audit_events")).one()
    assert row.event_data == {"namespace": "default", "signal_name": "HighCPU"}
    assert row.duration_ms == 12


def test_duplicate_delivery_writes_one_row_and_acks(bed: Bed, start_worker: Any) -> None:
    # Given the same record parked twice (a producer retry) and once more later
    record = samples.audit_event(bed.rng)
    message = producer.build_message(producer.AUDIT_EVENT, record)
    bed.xadd_raw(EVENTS, message)
    bed.xadd_raw(EVENTS, message)
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    bed.xadd_raw(EVENTS, producer.build_message(producer.AUDIT_EVENT, record, retry_count=3))
    wait_until(lambda: bed.drained(EVENTS), 30)

    # Then one row, all three acknowledged and deleted, none parked
    assert bed.count("audit_events") == 1
    assert worker.metric("dlq_worker_entries_written_total", stream=EVENTS,
                         table="audit_events") == 1
    assert worker.metric("dlq_worker_entries_duplicate_total", stream=EVENTS) == 2
    assert bed.parked() == []


def test_restart_rereads_own_pending_entries_first(bed: Bed, start_worker: Any) -> None:
    # Given entries delivered to consumer "w1" that crashed before writing them
    bed.produce_events(25)
    bed.client.xgroup_create(EVENTS, GROUP, id="0")
    bed.client.xreadgroup(GROUP, "w1", {EVENTS: ">"}, count=25)
    assert bed.pending() == 25 and bed.depth() == 25

    # When w1 comes back (same consumer name) with claiming of others' entries far away
    worker = start_worker(streams={"consumer": "w1"}, worker={"claim_idle": "1h"})

    # Then it writes its own pending entries without waiting for any claim timeout
    wait_until(lambda: bed.drained(EVENTS), 30, "own pending entries re-read")
    assert bed.count("audit_events") == 25
    assert worker.metric("dlq_worker_entries_claimed_total", stream=EVENTS) == 0


def test_two_workers_share_a_backlog_without_gap_or_duplicate(bed: Bed,
                                                               start_worker: Any) -> None:
    records = bed.produce_events(3000)
    # (two workers in one test process share a pid: name them as two pods would be)
    first = start_worker(bed.config(worker={"batch_size": 100}, streams={"consumer": "pod-a-1"}))
    second = start_worker(bed.config(worker={"batch_size": 100}, streams={"consumer": "pod-b-1"}))
    wait_until(lambda: bed.drained(EVENTS), 90, "backlog drained by two workers")

    ids = bed.event_ids()
    assert sorted(ids) == sorted(r["event_id"] for r in records)  # no gap, no duplicate
    done = [w.metric("dlq_worker_entries_written_total", stream=EVENTS, table="audit_events")
            for w in (first, second)]
    assert sum(done) == 3000
    assert min(done) > 0, f"one worker did all the work: {done}"
    consumers = {c["name"] for c in bed.client.xinfo_consumers(EVENTS, GROUP)}
    assert consumers == {b"pod-a-1", b"pod-b-1"}


def test_endpoints(bed: Bed, start_worker: Any) -> None:
    bed.produce_events(10)
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    wait_until(lambda: _get(worker.url + "/readyz")[0] == 200, 10, "ready")

    status, body = _get(worker.url + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = _get(worker.url + "/readyz")
    assert json.loads(body)["status"] == "ready"
    # this test Redis keeps nothing on disk: a warning, shown without failing readiness
    assert any(w.startswith("persistence") for w in json.loads(body)["warnings"])
    wait_until(lambda: b'dlq_worker_stream_depth{stream="audit:dlq:events"} 0.0'
               in _get(worker.url + "/metrics")[1], 10, "depth gauge")
    status, body = _get(worker.url + "/metrics")
    assert status == 200
    for series in (b'dlq_worker_entries_written_total{stream="audit:dlq:events",'
                   b'table="audit_events"} 10.0',
                   b"dlq_worker_build_info{",
                   b"dlq_worker_flush_duration_seconds_bucket",
                   b"dlq_worker_batch_size_bucket",
                   b'dlq_worker_stream_pending{stream="audit:dlq:events"} 0.0',
                   b'dlq_worker_stream_lag{stream="audit:dlq:events"} 0.0',
                   b'dlq_worker_stream_oldest_entry_age_seconds{stream="audit:dlq:events"}',
                   b'dlq_worker_entries_parked_total{reason="decode_error",'
                   b'stream="audit:dlq:events"} 0.0',
                   b"dlq_worker_last_flush_timestamp_seconds"):
        assert series in body, series
    assert _get(worker.url + "/nope")[0] == 404


def test_readyz_fails_while_postgres_is_unreachable(bed: Bed, start_worker: Any) -> None:
    # Given a worker pointed at a port where no PostgreSQL listens
    from dlq_worker.throwaway.embedded import free_port

    worker = start_worker(database={"port": free_port()})
    # Then it is alive but not ready, and says why
    def postgres_reason() -> bool:
        status, body = _get(worker.url + "/readyz")
        reasons = json.loads(body)["reasons"]
        return status == 503 and any(
            r.startswith("postgres:") and "not checked" not in r for r in reasons)

    wait_until(postgres_reason, 15, "not ready, naming PostgreSQL")
    assert _get(worker.url + "/healthz")[0] == 200


def test_unknown_stream_is_reported_not_touched(bed: Bed, start_worker: Any) -> None:
    bed.client.xadd("audit:dlq:mystery", {"message": b"{}"})
    bed.produce_events(1)
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    wait_until(lambda: worker.metric("dlq_worker_streams_unknown") == 1, 10)
    assert bed.client.xlen("audit:dlq:mystery") == 1
    assert bed.client.xinfo_groups("audit:dlq:mystery") == []


def test_custom_routes(bed: Bed, start_worker: Any) -> None:
    record = samples.audit_event(bed.rng)
    bed.client.xadd("audit:dlq:gateway-events",
                    {"message": producer.build_message(producer.AUDIT_EVENT, record)})
    start_worker(streams={"routes": {"gateway-events": "audit_events"}})
    wait_until(lambda: bed.drained("audit:dlq:gateway-events"), 30)
    assert bed.event_ids() == [record["event_id"]]


def test_payload_as_json_string_and_plain_event_data(bed: Bed, start_worker: Any) -> None:
    record = samples.audit_event(bed.rng)
    envelope = {"type": "audit_event", "payload": json.dumps(record),  # event_data: an object
                "timestamp": producer.go_timestamp(), "retry_count": 1, "last_error": "x"}
    bed.xadd_raw(EVENTS, json.dumps(envelope).encode())
    start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    with bed.engine.connect() as conn:
        data = conn.execute(text("SELECT event_data FROM audit_events")).scalar_one()
    assert data == record["event_data"]


def test_base64_event_metadata_roundtrip(bed: Bed, start_worker: Any) -> None:
    record = samples.audit_event(bed.rng, full=True)
    record["event_metadata"] = {"nested": {"list": [1, 2, 3], "unicode": "é✓"}}
    message = producer.build_message(producer.AUDIT_EVENT, record)
    assert base64.b64decode(json.loads(message)["payload"]["event_metadata"])
    bed.xadd_raw(EVENTS, message)
    start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    with bed.engine.connect() as conn:
        meta = conn.execute(text("SELECT event_metadata FROM audit_events")).scalar_one()
    assert meta == record["event_metadata"]


def test_group_created_at_zero_keeps_existing_backlog(bed: Bed, start_worker: Any) -> None:
    # Given a backlog written before any group existed
    bed.produce_events(50)
    assert bed.client.exists(EVENTS) and not bed.client.xinfo_groups(EVENTS)
    start_worker()
    # Then none of it is skipped (a group made at "$" would skip all 50)
    wait_until(lambda: bed.drained(EVENTS), 30)
    assert bed.count("audit_events") == 50


def test_redis_db0_is_never_touched(bed: Bed, start_worker: Any) -> None:
    import redis

    db0 = redis.Redis(port=bed.redis_port, db=0)
    db0.set("cache:key", "value")
    db0.xadd(EVENTS, {"message": b"in db 0"})
    try:
        bed.produce_events(5)
        start_worker()
        wait_until(lambda: bed.drained(EVENTS), 30)
        assert db0.get("cache:key") == b"value"
        assert db0.xlen(EVENTS) == 1 and db0.xinfo_groups(EVENTS) == []
    finally:
        db0.flushdb()
        db0.close()


def test_unique_ids_are_uuid_objects_in_table(bed: Bed, start_worker: Any) -> None:
    records = bed.produce_events(3)
    start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    assert sorted(bed.event_ids()) == sorted(str(uuid.UUID(r["event_id"])) for r in records)


def test_awkward_text_survives_the_copy_path_exactly(bed: Bed, start_worker: Any) -> None:
    # Tabs, newlines, backslashes, COPY's own \N, quotes and non-ASCII, in columns and JSON
    record = samples.audit_event(bed.rng, full=True)
    awkward = 'tab\there\nnew line\\back\\slash \\N "quoted" é✓ 🚀\r'
    record["error_message"] = awkward
    record["resource_name"] = "\\N"
    record["event_data"] = {"text": awkward, "nested": {"k\tey": ["\\", "\n", None, 1.5]},
                            "big": 123456789012345678901234567890,  # beyond 64 bits: exact
                            "small": -9223372036854775809}
    bed.xadd_raw(EVENTS, producer.build_message(producer.AUDIT_EVENT, record))
    start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30)
    with bed.engine.connect() as conn:
        row = conn.execute(text("SELECT error_message, resource_name, event_data "
                                "FROM audit_events")).one()
    assert row.error_message == awkward
    assert row.resource_name == "\\N"
    assert row.event_data == record["event_data"]


def test_database_without_temp_privilege_is_written_with_insert(
        bed: Bed, start_worker: Any, monkeypatch: Any) -> None:
    # Given a hardened database: the worker's role may insert but not create temp tables
    with bed.engine.begin() as conn:
        conn.exec_driver_sql(f'REVOKE TEMP ON DATABASE "{bed.dbname}" FROM PUBLIC')
        conn.exec_driver_sql("DO $$ BEGIN CREATE ROLE dlq_limited LOGIN; "
                             "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        conn.exec_driver_sql("GRANT SELECT, INSERT ON audit_events, notification_audit "
                             "TO dlq_limited")
        conn.exec_driver_sql("GRANT USAGE ON SEQUENCE notification_audit_id_seq "
                             "TO dlq_limited")
    monkeypatch.setattr(Sink, "copy_reprobe_seconds", 0.5)
    records = bed.produce_events(40)
    worker = start_worker(database={"user": "dlq_limited"})
    wait_until(lambda: bed.drained(EVENTS), 30)
    assert sorted(bed.event_ids()) == sorted(r["event_id"] for r in records)
    # New rows go straight into the table with COPY: no staging table needed
    assert worker.app.sink._copy_off_until == 0

    # When the same records come again (a redelivery: the staging path would tell them
    # apart, and it needs a temporary table), they are told apart with INSERT instead
    _produce_again(bed, records)
    wait_until(lambda: bed.drained(EVENTS), 30)
    assert worker.metric("dlq_worker_entries_duplicate_total", stream=EVENTS) == 40
    assert worker.app.sink._copy_off_until > 0, "staging should be off without TEMP"

    # When the privilege is granted back, COPY is probed again without a restart
    with bed.engine.begin() as conn:
        conn.exec_driver_sql(f'GRANT TEMP ON DATABASE "{bed.dbname}" TO dlq_limited')
    wait_until(lambda: time.monotonic() > worker.app.sink._copy_off_until, 5, "re-probe due")
    more = bed.produce_events(40)
    _produce_again(bed, more)
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 80, 30)
    assert worker.metric("dlq_worker_entries_duplicate_total", stream=EVENTS) == 80
    assert worker.app.sink._copy_off_until == 0, "COPY should be back"


def _produce_again(bed: Bed, records: list[dict[str, Any]]) -> None:
    for record in records:
        bed.client.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT,
                                                                   record)})


def test_rows_written_around_a_rejected_row_keep_absent_values_null(bed: Bed,
                                                                    start_worker: Any) -> None:
    # Given valid records without event_metadata in a batch with a row PostgreSQL refuses,
    # so the batch is written row by row under savepoints (INSERT, not COPY)
    valid = bed.produce_events(5)
    bad = samples.audit_event(bed.rng)
    bad["actor_id"] = "x" * 300
    bed.client.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, bad)})
    start_worker(worker={"max_deliveries": 1})
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")

    # Then an absent event_metadata is SQL NULL, exactly as the COPY path writes it, never
    # the JSON value null
    with bed.engine.connect() as conn:
        kinds = conn.execute(text(
            "SELECT event_metadata IS NULL, count(*) FROM audit_events GROUP BY 1")).all()
    assert kinds == [(True, len(valid))]
    assert all(r.get("event_metadata") is None for r in valid)


def test_metrics_carry_the_worker_process_own_series(bed: Bed, spawn_worker: Any) -> None:
    # Given a real `dlq-worker run` process that has drained a few records
    from dlq_worker.throwaway.embedded import free_port
    from tests.conftest import fast_env
    bed.produce_events(20)
    port = free_port()
    worker = spawn_worker({**bed.env(), **fast_env(), "DLQ_WORKER_HTTP_PORT": str(port),
                           "DLQ_WORKER_HTTP_HOST": "127.0.0.1"})
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")
    # When its /metrics is scraped
    body = _get(f"http://127.0.0.1:{port}/metrics")[1].decode()
    samples_ = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
                if line and not line.startswith("#")}
    # Then RSS, CPU, start time (restarts), GC and the Python version are there, and they
    # are that process's: its RSS is what the kernel reports for its PID
    with open(f"/proc/{worker.proc.pid}/status") as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))
    assert 0.5 * rss < samples_["process_resident_memory_bytes"] < 2 * rss
    assert samples_["process_cpu_seconds_total"] > 0
    assert abs(samples_["process_start_time_seconds"] - time.time()) < 120
    assert 'python_gc_objects_collected_total{generation="0"}' in samples_
    assert any(name.startswith("python_info{") for name in samples_)
