"""Operator commands and the producer library, against real servers, as real processes."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import sys
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text

from dlq_worker import producer
from dlq_worker.producer import DlqUnavailable, InvalidRecord, Producer, write_or_enqueue
from dlq_worker.throwaway import samples
from dlq_worker.throwaway.embedded import free_port
from tests.conftest import EVENTS, GROUP, NOTIFICATIONS, Bed, wait_until

DEAD = "audit:dead-letter:events"


def cli(bed: Bed | None, *args: str, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("DLQ_WORKER_", "REDIS_",
                                                                        "DB_"))}
    full.update(bed.env() if bed else {})
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "dlq_worker", *args], capture_output=True,
                          text=True, env=full, timeout=120, check=False)


def backlog_with_parked(bed: Bed, start_worker: Any) -> tuple[set[str], list[bytes]]:
    """Given: 3 parked entries (2 undecodable, 1 rejected), then 50 valid ones left unread."""
    poison = [bed.xadd_raw(EVENTS, samples.POISON_MESSAGES[0]),
              bed.xadd_raw(EVENTS, samples.POISON_MESSAGES[1])]
    bad_row = samples.audit_event(random.Random(8))
    bad_row["event_type"] = "y" * 120
    poison.append(bed.xadd_raw(EVENTS, producer.build_message("audit_event", bad_row)))
    worker = start_worker(worker={"max_deliveries": 1})
    wait_until(lambda: bed.drained(EVENTS) and len(bed.parked()) == 3, 30, "parked")
    worker.stop()
    originals = [f[b"message"] for f in bed.parked()]
    valid = {r["event_id"] for r in bed.produce_events(50)}
    bed.produce_notifications(7)
    return valid, originals


def test_status_json_matches_xlen_and_xpending(bed: Bed, start_worker: Any) -> None:
    backlog_with_parked(bed, start_worker)
    bed.client.xreadgroup(GROUP, "someone", {EVENTS: ">"}, count=5)  # 5 pending
    result = cli(bed, "status", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    by_stream = {s["stream"]: s for s in doc["streams"]}
    events = by_stream[EVENTS]
    assert events["depth"] == bed.client.xlen(EVENTS) == 50
    assert events["pending"] == bed.client.xpending(EVENTS, GROUP)["pending"] == 5
    assert events["lag"] == 45
    assert events["dead_letter_depth"] == bed.client.xlen(DEAD) == 3
    assert events["depth_ratio"] == pytest.approx(50 / 10000)
    assert {c["name"] for c in events["consumers"]} >= {"someone"}
    # every routed stream was created with its group when the worker started, before any
    # record arrived (KEDA's trigger needs both)
    assert by_stream[NOTIFICATIONS]["group_exists"] is True
    assert by_stream[NOTIFICATIONS]["depth"] == by_stream[NOTIFICATIONS]["lag"] == 7
    assert by_stream["audit:dlq:notification"]["depth"] == 0
    # a stream whose group is gone says so
    bed.client.xgroup_destroy(NOTIFICATIONS, GROUP)
    doc = json.loads(cli(bed, "status", "--json").stdout)
    gone = next(s for s in doc["streams"] if s["stream"] == NOTIFICATIONS)
    assert gone["group_exists"] is False and gone["depth"] == 7
    assert any(w.startswith("persistence") for w in doc["redis"]["warnings"])

    table = cli(bed, "status")
    assert table.returncode == 0 and EVENTS in table.stdout
    assert "WARNING persistence" in table.stdout
    print("\n" + table.stdout)


def test_replay_all_brings_parked_entries_back_unchanged(bed: Bed, start_worker: Any) -> None:
    valid, originals = backlog_with_parked(bed, start_worker)

    dry = cli(bed, "dead-letter", "replay", "--all", "--dry-run")
    assert dry.returncode == 0 and "would replay 3" in dry.stdout
    assert bed.client.xlen(DEAD) == 3

    result = cli(bed, "dead-letter", "replay", "--all")
    assert result.returncode == 0, result.stderr
    assert bed.client.xlen(DEAD) == 0
    replayed = [f[b"message"] for _, f in bed.client.xrange(EVENTS)
                if f[b"message"] in originals]
    assert sorted(replayed) == sorted(originals)  # byte for byte

    # A running worker then writes the valid ones and parks the poison again
    start_worker(worker={"max_deliveries": 1})
    wait_until(lambda: bed.drained(EVENTS), 30)
    assert set(bed.event_ids()) == valid
    assert bed.client.xlen(DEAD) == 3


def test_replay_by_reason_and_purge(bed: Bed, start_worker: Any) -> None:
    backlog_with_parked(bed, start_worker)
    listed = json.loads(cli(bed, "dead-letter", "list", "--json").stdout)
    assert {e["reason"] for e in listed} == {"bad_json", "bad_uuid", "value_too_long"}
    for e in listed:  # when it entered the DLQ: its ID's time, before it was parked
        assert e["first_failed_at"].endswith("Z")
        assert e["first_failed_at"][:19] <= e["moved_at"][:19]
        ms = int(e["original_id"].split("-")[0])
        assert e["first_failed_at"][:19] == dt.datetime.fromtimestamp(
            ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert "first failed 20" in cli(bed, "dead-letter", "list").stdout

    shown = cli(bed, "dead-letter", "show", listed[0]["id"], "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["reason"] == listed[0]["reason"]

    moved = cli(bed, "dead-letter", "replay", "--reason", "value_too_long")
    assert "replayed 1 entries" in moved.stdout
    assert bed.client.xlen(DEAD) == 2

    refused = cli(bed, "dead-letter", "purge", "--all")
    assert refused.returncode == 2 and bed.client.xlen(DEAD) == 2

    not_parked = cli(bed, "dead-letter", "purge", "--id", "1-0", "--yes")
    assert not_parked.returncode == 5 and "not parked" in not_parked.stderr

    purged = cli(bed, "dead-letter", "purge", "--error-class", "DecodeError", "--yes")
    assert purged.returncode == 0
    assert json.loads(purged.stdout.split(": ", 1)[1]) == {DEAD: 2}
    assert bed.client.xlen(DEAD) == 0


def test_peek_decodes_for_humans_and_redacts_sensitive(bed: Bed) -> None:
    record = samples.audit_event(random.Random(3))
    record["is_sensitive"] = True
    bed.xadd_raw(EVENTS, producer.build_message("audit_event", record))
    bed.xadd_raw(EVENTS, b"garbage")
    out = json.loads(cli(bed, "peek", "events", "--payload", "--json").stdout)
    assert out[0]["record_id"] == record["event_id"]
    assert out[0]["correlation_id"] == record["correlation_id"]
    assert out[0]["decode"] == "ok" and out[0]["payload"].startswith("<redacted")
    assert out[1]["decode"].startswith("error: bad_json")
    shown = json.loads(cli(bed, "peek", "events", "--payload", "--show-sensitive", "-n", "1",
                           "--json").stdout)
    assert shown[0]["payload"]["event_id"] == record["event_id"]


@pytest.mark.parametrize(("args", "code", "fragment"), [
    (("peek", "nope"), 5, "no stream 'nope'"),
    (("peek", "events", "--from", "yesterday"), 5, "is not a stream entry ID"),
    (("dead-letter", "show", "12-0"), 5, "no parked entry"),
    (("status", "--bogus"), 2, "No such option"),
])
def test_bad_input_gets_a_clear_answer(bed: Bed, args: tuple[str, ...], code: int,
                                       fragment: str) -> None:
    bed.produce_events(1)
    result = cli(bed, *args)
    assert result.returncode == code, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_redis_down_is_exit_4() -> None:
    result = cli(None, "status", env={"REDIS_ADDR": f"127.0.0.1:{free_port()}",
                                      "REDIS_PASSWORD": "pw-not-shown"})
    assert result.returncode == 4 and "unavailable" in result.stderr
    assert "pw-not-shown" not in result.stderr and "Traceback" not in result.stderr


def test_doctor(bed: Bed, start_worker: Any) -> None:
    backlog_with_parked(bed, start_worker)
    result = cli(bed, "doctor")
    print("\n" + result.stdout)
    assert result.returncode == 6  # warnings: no persistence here, parked entries
    assert "[warn] persistence on" in result.stdout
    assert "[warn] no parked entries: 3 parked" in result.stdout
    assert "[pass] tables present" in result.stdout
    assert "[pass] no entries trimmed unread" in result.stdout

    down = cli(bed, "doctor", "--json", env={"DB_PORT": str(free_port())})
    doc = json.loads(down.stdout)
    assert down.returncode == 7 and doc["status"] == "fail"
    failing = [c for c in doc["checks"] if c["status"] == "fail"]
    assert failing[0]["name"] == "postgresql reachable" and failing[0]["fix"]

    bad = cli(bed, "doctor", env={"DLQ_WORKER_WORKER_BATCH_SIZE": "zero"})
    assert bad.returncode == 7 and "[FAIL] config valid" in bad.stdout


def test_move_to_another_redis_is_resumable(bed: Bed, servers: Any, start_worker: Any) -> None:
    valid, _ = backlog_with_parked(bed, start_worker)
    other = servers.redis(appendonly=False)
    target = redis.Redis(port=other.port, db=1)
    # Given an interrupted earlier run that had copied the first 20 events already
    for entry_id, fields in bed.client.xrange(EVENTS, count=20):
        target.xadd(EVENTS, fields, id=entry_id)
    before = {k: bed.client.xlen(k) for k in (EVENTS, NOTIFICATIONS, DEAD)}

    result = cli(bed, "move", "--to", f"redis://127.0.0.1:{other.port}")
    assert result.returncode == 0, result.stderr
    assert "already on target 20" in result.stdout
    for key, n in before.items():
        assert target.xlen(key) == n, key  # no loss, no duplicate
        assert bed.client.xlen(key) == 0
    again = cli(bed, "move", "--to", f"redis://127.0.0.1:{other.port}")
    assert again.returncode == 0 and "moved 0 entries" in again.stdout

    # A worker on the new instance drains it
    cfg = bed.config(redis={"addr": f"127.0.0.1:{other.port}"})
    start_worker(cfg)
    wait_until(lambda: target.xlen(EVENTS) == 0, 30)
    assert set(bed.event_ids()) == valid
    target.close()


def test_producer_roundtrip_every_field(bed: Bed, start_worker: Any) -> None:
    registry = CollectorRegistry()
    dlq = Producer(bed.client, registry=registry)
    record = samples.audit_event(random.Random(12), full=True)
    record["parent_event_id"] = None
    note = samples.notification(random.Random(13))
    dlq.enqueue(record, "audit_event")
    dlq.enqueue(note, "notification_audit")
    assert registry.get_sample_value("dlq_producer_enqueue_duration_seconds_count",
                                     {"type": "audit_event"}) == 1
    start_worker()
    wait_until(lambda: bed.drained(EVENTS, NOTIFICATIONS), 30)
    with bed.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM audit_events")).mappings().one()
        nrow = conn.execute(text("SELECT * FROM notification_audit")).mappings().one()
    for name, value in record.items():
        column = "event_version" if name == "version" else name
        if name == "event_timestamp":
            assert row[column].isoformat().replace("+00:00", "Z") == value
        elif name == "actor_ip" or name in ("event_id",):
            assert str(row[column]) == value
        else:
            assert row[column] == value, name
    for name in ("remediation_id", "notification_id", "recipient", "channel", "message_summary",
                 "status", "delivery_status", "error_message", "escalation_level"):
        assert nrow[name] == note[name], name


def test_producer_validates_and_fails_loudly(bed: Bed) -> None:
    dlq = Producer(bed.client)
    big = samples.audit_event(random.Random(1))
    big["event_data"] = {"blob": "x" * (300 * 1024)}
    with pytest.raises(InvalidRecord, match="event_data"):
        dlq.enqueue(big, "audit_event")
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(12):
        node["n"] = {}
        node = node["n"]
    nested = samples.audit_event(random.Random(2))
    nested["event_data"] = deep
    with pytest.raises(InvalidRecord, match="nests deeper"):
        dlq.enqueue(nested, "audit_event")
    missing = samples.audit_event(random.Random(3))
    del missing["event_type"]
    with pytest.raises(InvalidRecord, match="event_type"):
        dlq.enqueue(missing, "audit_event")
    assert bed.depth(EVENTS) == 0
    down = Producer(redis.Redis(port=free_port(), socket_connect_timeout=1))
    with pytest.raises(DlqUnavailable):
        down.enqueue(samples.audit_event(random.Random(4)), "audit_event")


def test_write_or_enqueue_falls_back_when_postgres_fails(bed: Bed) -> None:
    dlq = Producer(bed.client)
    record = samples.audit_event(random.Random(5))
    assert write_or_enqueue(bed.engine, dlq, record, "audit_event") == "written"
    assert write_or_enqueue(bed.engine, dlq, record, "audit_event") == "written"  # duplicate
    dead_db = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/x")
    other = samples.audit_event(random.Random(6))
    entry_id = write_or_enqueue(dead_db, dlq, other, "audit_event")
    assert bed.client.xrange(EVENTS)[0][0].decode() == entry_id
    assert bed.count("audit_events") == 1
    dead_db.dispose()
    assert producer.go_timestamp().endswith("Z")


def test_dead_letter_ageing_time_filters_paging_and_purge_older_than(bed: Bed) -> None:
    # Given entries parked 10 days, 5 days (another type), 2 days and 1 hour ago (a parked
    # entry's ID is the time it was parked)
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    day = 86_400_000
    parked = {"10d": (DEAD, now_ms - 10 * day), "5d": ("audit:dead-letter:notifications",
                                                        now_ms - 5 * day),
              "2d": (DEAD, now_ms - 2 * day), "1h": (DEAD, now_ms - 3_600_000)}
    ids = {}
    for name, (stream, ms) in parked.items():
        ids[name] = bed.client.xadd(stream, {
            "original_stream": stream.replace("dead-letter", "dlq"), "original_id": f"{ms}-0",
            "reason": "bad_json", "error_class": "DecodeError", "error": "message is not JSON",
            "final_retry_count": "1", "message": "{"}, id=f"{ms}-0").decode()

    def listed(*args: str) -> list[str]:
        result = cli(bed, "dead-letter", "list", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [e["id"] for e in json.loads(result.stdout)]

    # Then every listing is oldest first, across both dead-letter streams
    assert listed() == [ids["10d"], ids["5d"], ids["2d"], ids["1h"]]
    assert listed("--since", "3d") == [ids["2d"], ids["1h"]]
    assert listed("--until", "3d") == [ids["10d"], ids["5d"]]
    since = dt.datetime.fromtimestamp((now_ms - 6 * day) / 1000, dt.UTC).isoformat()
    assert listed("--since", since, "--until", "1d") == [ids["5d"], ids["2d"]]
    # And pages follow one another with --after, the listing saying when there are more
    first = cli(bed, "dead-letter", "list", "--count", "3")
    assert f"--after {ids['2d']}" in first.stderr
    assert ids["1h"] not in first.stdout and "parked 20" in first.stdout
    assert listed("--count", "3", "--after", ids["2d"]) == [ids["1h"]]
    assert "more:" not in cli(bed, "dead-letter", "list", "--count", "3", "--after",
                              ids["2d"]).stderr

    # And the age of the oldest parked entry is measured: what `status` shows and the
    # worker's gauge (dlq_worker_dead_letter_oldest_age_seconds) reads
    bed.client.xadd(EVENTS, {"message": b"{}"})  # its DLQ stream exists
    status = json.loads(cli(bed, "status", "--json").stdout)
    events = next(s for s in status["streams"] if s["stream"] == EVENTS)
    assert 9.9 * 86400 < events["dead_letter_oldest_age_seconds"] < 10.1 * 86400

    # When the old ones are purged: only with --yes, only those parked before the cutoff
    refused = cli(bed, "dead-letter", "purge", "--older-than", "4d")
    assert refused.returncode == 2 and "2 parked entries selected" in refused.stderr
    done = cli(bed, "dead-letter", "purge", "--older-than", "4d", "--yes")
    assert done.returncode == 0, done.stderr
    assert listed() == [ids["2d"], ids["1h"]]
    bad = cli(bed, "dead-letter", "purge", "--older-than", "last week", "--yes")
    assert bad.returncode == 2 and "--older-than" in bad.stderr


def test_move_run_again_after_the_target_drained_deletes_from_the_source_only(
        bed: Bed, servers: Any, start_worker: Any) -> None:
    other = servers.redis(appendonly=False)
    target = redis.Redis(port=other.port, db=1)
    valid = {r["event_id"] for r in bed.produce_events(50)}
    kept = bed.client.xrange(EVENTS)
    # Given a move interrupted after copying, before deleting from the source (the source
    # still holds every entry, under the same IDs)
    first = cli(bed, "move", "--to", f"redis://127.0.0.1:{other.port}")
    assert first.returncode == 0, first.stderr
    bed.client.delete(EVENTS)
    for entry_id, fields in kept:
        bed.client.xadd(EVENTS, fields, id=entry_id)
    # and a worker on the target that has drained it since
    start_worker(bed.config(redis={"addr": f"127.0.0.1:{other.port}"}))
    wait_until(lambda: target.xlen(EVENTS) == 0, 30, "target drained")

    # When the move is run again
    again = cli(bed, "move", "--to", f"redis://127.0.0.1:{other.port}")

    # Then it knows those entries were copied: it deletes them from the source and copies
    # none of them again
    assert again.returncode == 0, again.stderr
    assert "copied 0" in again.stdout and "deleted from source 50" in again.stdout
    assert bed.client.xlen(EVENTS) == 0 and target.xlen(EVENTS) == 0
    assert set(bed.event_ids()) == valid
    target.close()


def test_move_never_fills_a_target_stream_past_the_producers_cap(
        bed: Bed, servers: Any) -> None:
    other = servers.redis(appendonly=False)
    target = redis.Redis(port=other.port, db=1)
    bed.produce_events(300)
    # Given a cap of 100 and no worker draining the target
    env = {"DLQ_WORKER_STREAMS_MAX_LENGTH": "100"}

    # When the whole DLQ is moved there
    result = cli(bed, "move", "--to", f"redis://127.0.0.1:{other.port}", "--wait", "1",
                 env=env)

    # Then it stops at half the cap with a clear message and exit 9, the rest still in
    # the source: nothing for the producers' MAXLEN to trim
    assert result.returncode == 9, result.stderr
    assert "did not drain" in result.stderr and "still in the source" in result.stderr
    assert target.xlen(EVENTS) == 50
    assert bed.client.xlen(EVENTS) == 250
    target.close()
