"""The platform's hash chain, checked by an independent Go verifier (tests/chain/verifier.go):
chains written by the worker alone, interleaved with a platform writer whose hashes Go
computes, both algorithms, three worker processes on the same correlation IDs, late
events, and tampering caught by both the Go verifier and `dlq-worker verify-chain`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from dlq_worker import producer
from dlq_worker.throwaway import samples
from tests.conftest import EVENTS, Bed, fast_env, wait_until

pytestmark = pytest.mark.go

KEY = "platform-audit-hmac-key-0123456789"
BASE = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)

_COLUMNS = """event_id::text AS event_id, event_timestamp, event_type, event_version,
    event_category, event_action, event_outcome, correlation_id,
    parent_event_id::text AS parent_event_id, parent_event_date::text AS parent_event_date,
    resource_type, resource_id, namespace, cluster_id, actor_id, actor_type,
    actor_ip::text AS actor_ip, severity, duration_ms, error_code, error_message,
    retention_days, is_sensitive, event_data::text AS event_data, event_hash,
    previous_event_hash, hash_algorithm"""


def export(engine: Engine) -> list[str]:
    """Every row as the platform's verifier reads it, one JSON line each."""
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT {_COLUMNS} FROM audit_events")).mappings().all()
    out = []
    for row in rows:
        doc = dict(row)
        doc["event_timestamp"] = row["event_timestamp"].astimezone(dt.UTC).isoformat().replace(
            "+00:00", "Z")
        out.append(json.dumps(doc))
    return out


def go(verifier: Path, command: str, lines: list[str], key: str | None = None) -> list[str]:
    env = {**os.environ, "VERIFIER_HMAC_KEY": key or ""}
    result = subprocess.run([str(verifier), command], input="\n".join(lines) + "\n",
                            capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def go_verify(verifier: Path, engine: Engine, key: str | None = None) -> list[dict[str, Any]]:
    return list(json.loads(go(verifier, "verify", export(engine), key)[0]))


def event(rng: random.Random, correlation: str, seconds: float) -> dict[str, Any]:
    record = samples.audit_event(rng, full=rng.random() < 0.3,
                                 when=BASE + dt.timedelta(seconds=seconds))
    record["correlation_id"] = correlation
    record["event_data"]["numbers"] = [1, 2.5, 1e21, 1e-7, 0.1, 12345678901234567890, -0.0]
    record["event_data"]["html"] = "<b>&amp;</b> \u2028 é"
    return record


def produce(bed: Bed, records: list[dict[str, Any]]) -> None:
    pipe = bed.client.pipeline(transaction=False)
    for record in records:
        pipe.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, record)})
    pipe.execute()


def platform_write(bed: Bed, verifier: Path, record: dict[str, Any],
                   key: str | None = None) -> None:
    """The platform's own write of one event: under its advisory lock, link to the head
    (by event_timestamp, event_id), with the hash computed by the Go program."""
    algorithm = "hmac-sha256" if key else "sha256-unkeyed"
    with bed.engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(audit_event_lock_id(:c))"),
                     {"c": record["correlation_id"]})
        head = conn.execute(text(
            "SELECT event_hash FROM audit_events WHERE correlation_id = :c AND event_hash IS "
            "NOT NULL ORDER BY event_timestamp DESC, event_id DESC LIMIT 1"),
            {"c": record["correlation_id"]}).scalar()
        data = conn.execute(text("SELECT CAST(:d AS jsonb)::text"),
                            {"d": json.dumps(record["event_data"])}).scalar_one()
        row = {"event_id": record["event_id"], "event_timestamp": record["event_timestamp"],
               "event_type": record["event_type"], "event_version": record["version"],
               "event_category": record["event_category"],
               "event_action": record["event_action"], "event_outcome": record["event_outcome"],
               "correlation_id": record["correlation_id"], "resource_type":
               record["resource_type"], "resource_id": record["resource_id"],
               "namespace": record.get("namespace"), "actor_id": record["actor_id"],
               "actor_type": record["actor_type"], "severity": record.get("severity"),
               "duration_ms": record.get("duration_ms"),
               "retention_days": record["retention_days"],
               "is_sensitive": record["is_sensitive"], "event_data": data}
        (digest,) = go(verifier, "hash", [json.dumps(
            {"previous": head or "", "algorithm": algorithm, "row": row})], key)
        stamp = dt.datetime.fromisoformat(record["event_timestamp"].replace("Z", "+00:00"))
        conn.execute(text(
            "INSERT INTO audit_events (event_id, event_version, event_timestamp, event_date, "
            "event_type, event_category, event_action, event_outcome, actor_type, actor_id, "
            "resource_type, resource_id, correlation_id, namespace, event_data, severity, "
            "duration_ms, retention_days, is_sensitive, event_hash, previous_event_hash, "
            "hash_algorithm) VALUES (:id, :v, :ts, :d, :t, :c, :a, :o, :at, :ai, :rt, :ri, "
            ":cid, :ns, CAST(:data AS jsonb), :sev, :dur, :ret, :sens, :h, :p, :alg)"),
            {"id": record["event_id"], "v": record["version"], "ts": stamp, "d": stamp.date(),
             "t": record["event_type"], "c": record["event_category"],
             "a": record["event_action"], "o": record["event_outcome"],
             "at": record["actor_type"], "ai": record["actor_id"],
             "rt": record["resource_type"], "ri": record["resource_id"],
             "cid": record["correlation_id"], "ns": record.get("namespace"), "data": data,
             "sev": record.get("severity"), "dur": record.get("duration_ms"),
             "ret": record["retention_days"], "sens": record["is_sensitive"], "h": digest,
             "p": head or "", "alg": algorithm})


def assert_all_valid(reports: list[dict[str, Any]], hashed: int, skipped: int = 0) -> None:
    assert reports, "no chains"
    for report in reports:
        assert report["is_valid"], report
        assert report["verified_events"] == report["total_events"], report
    assert sum(r["total_events"] for r in reports) == hashed
    assert sum(r["skipped_null_hash"] for r in reports) == skipped


def test_chains_written_by_the_worker_verify_in_go(bed: Bed, start_worker: Any,
                                                   verifier: Path) -> None:
    # Given events of five correlation IDs, shuffled in the DLQ (so some arrive after a
    # later event of their chain was already linked)
    rng = random.Random(1)
    records = [event(rng, f"rr-chain-{i % 5}", i * 0.5) for i in range(200)]
    rng.shuffle(records)
    produce(bed, records)
    worker = start_worker(worker={"batch_size": 37})
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")

    # Then every hashed chain verifies in Go, and what is unhashed is what was counted late
    linked = worker.metric("dlq_worker_chain_linked_total", stream=EVENTS)
    late = worker.metric("dlq_worker_chain_late_events_total", stream=EVENTS)
    assert linked + late == 200 and linked >= 5
    assert_all_valid(go_verify(verifier, bed.engine), int(linked), int(late))
    with bed.engine.connect() as conn:
        algorithms = set(conn.execute(text(
            "SELECT hash_algorithm FROM audit_events WHERE event_hash IS NOT NULL")).scalars())
    assert algorithms == {"sha256-unkeyed"}


def test_a_late_event_is_written_unhashed_and_the_chain_still_verifies(
        bed: Bed, start_worker: Any, verifier: Path) -> None:
    # Given a chain whose head is at t = 100 s
    rng = random.Random(5)
    produce(bed, [event(rng, "rr-late", t) for t in (10, 50, 100)])
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")

    # When an event from t = 60 s arrives from the DLQ (the chain moved on meanwhile), and
    # then one from t = 150 s
    produce(bed, [event(rng, "rr-late", 60)])
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 4, 30, "late")
    produce(bed, [event(rng, "rr-late", 150)])
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 5, 30, "next")

    # Then the late one is written unhashed and counted; the chain goes on from t = 100 s
    # to t = 150 s and verifies
    assert worker.metric("dlq_worker_chain_late_events_total", stream=EVENTS) == 1
    assert_all_valid(go_verify(verifier, bed.engine), 4, 1)
    assert _verify_chain(bed, "rr-late").returncode == 0


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_worker_and_platform_writers_interleave(bed: Bed, start_worker: Any, verifier: Path,
                                                key: str | None) -> None:
    # Given the platform writing events itself (hashes computed by Go) while the worker
    # drains DLQ events of the same correlation IDs, alternating in time
    start_worker(bed.config(env={"DLQ_WORKER_DATABASE_HASH_CHAIN_KEY": key} if key else {},
                            database={"hash_chain": "hmac" if key else "sha256"}))
    rng = random.Random(2)
    t = 0.0
    for _ in range(6):
        for record in [event(rng, f"rr-mix-{i % 3}", t + i) for i in range(3)]:
            platform_write(bed, verifier, record, key)
        t += 3
        produce(bed, [event(rng, f"rr-mix-{i % 3}", t + i) for i in range(6)])
        t += 6
        wait_until(lambda: bed.drained(EVENTS), 30, "drained")

    # Then every chain verifies, with the right algorithm, and nothing is unhashed
    assert_all_valid(go_verify(verifier, bed.engine, key), 6 * 9, 0)
    if key:  # and without the key the HMAC rows cannot be checked
        result = subprocess.run([str(verifier), "verify"], input="\n".join(export(bed.engine)),
                                capture_output=True, text=True, timeout=60, check=False,
                                env={**os.environ, "VERIFIER_HMAC_KEY": ""})
        assert result.returncode == 1 and "no key" in result.stderr


def test_three_worker_processes_on_the_same_correlation_ids(bed: Bed, spawn_worker: Any,
                                                            verifier: Path) -> None:
    # Given three worker processes draining events of the same four correlation IDs
    rng = random.Random(3)
    env = {**bed.env(), **fast_env(), "DLQ_WORKER_HTTP_ENABLED": "false",
           "DLQ_WORKER_WORKER_BATCH_SIZE": "20"}
    workers = [spawn_worker(env) for _ in range(3)]
    for round_ in range(10):
        produce(bed, [event(rng, f"rr-multi-{i % 4}", round_ * 100 + i) for i in range(60)])
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 600, 90, "drained")

    # Then the chains verify: the advisory locks serialised the writers; and every event,
    # produced in its chain's order, is hashed: none made late by another replica
    reports = go_verify(verifier, bed.engine)
    assert all(r["is_valid"] for r in reports), [r for r in reports if not r["is_valid"]][:1]
    assert sum(r["total_events"] for r in reports) == 600
    assert sum(r["skipped_null_hash"] for r in reports) == 0
    assert all(w.proc.poll() is None for w in workers)


def test_tampering_is_caught_by_go_and_by_verify_chain(bed: Bed, start_worker: Any,
                                                       verifier: Path) -> None:
    # Given a verified chain written by the worker
    rng = random.Random(4)
    produce(bed, [event(rng, "rr-tamper", i) for i in range(10)])
    start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")
    assert_all_valid(go_verify(verifier, bed.engine), 10)
    assert _verify_chain(bed, "rr-tamper").returncode == 0

    # When one byte of one stored row changes (the immutability trigger set aside)
    with bed.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
        conn.execute(text(
            "UPDATE audit_events SET actor_id = actor_id || 'x' WHERE event_id = ("
            "SELECT event_id FROM audit_events ORDER BY event_timestamp LIMIT 1 OFFSET 4)"))
        conn.exec_driver_sql("ALTER TABLE audit_events ENABLE TRIGGER USER")

    # Then both verifiers report that row
    (report,) = go_verify(verifier, bed.engine)
    assert not report["is_valid"] and len(report["tampered_events"]) == 1
    cli = _verify_chain(bed, "rr-tamper")
    assert cli.returncode == 8
    assert report["tampered_events"][0]["event_id"] in cli.stdout
    assert "tampered" in cli.stdout


def _verify_chain(bed: Bed, correlation: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dlq_worker", "verify-chain", correlation],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **bed.env()})


def test_a_number_beyond_float64_is_written_unhashed_not_parked(
        bed: Bed, start_worker: Any, verifier: Path) -> None:
    # Given an event whose event_data holds 1e400 (jsonb keeps it; Go's float64 cannot)
    rng = random.Random(6)
    produce(bed, [event(rng, "rr-huge", 1), event(rng, "rr-huge", 2)])
    huge = event(rng, "rr-huge", 3)
    huge["event_data"] = base64.b64encode(b'{"n":1e400}').decode()
    produce(bed, [huge])
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 3, 30, "drained")

    # Then it is a row (unhashed, counted with the late ones), and the chain verifies
    assert bed.parked("audit:dead-letter:events") == []
    assert worker.metric("dlq_worker_chain_late_events_total", stream=EVENTS) == 1
    assert_all_valid(go_verify(verifier, bed.engine), 2, 1)


def test_hostile_and_full_records_chain_and_verify_in_go(bed: Bed, start_worker: Any,
                                                         verifier: Path) -> None:
    # Given the hostile suite's backlog (odd text, unicode, metacharacters, deep nesting,
    # numbers a double cannot hold, reused keys...) and records with every optional field
    from tests.integration.test_hostile import collision_cases, hostile_cases

    for case in hostile_cases() + collision_cases(bed):
        bed.client.xadd(case.stream, case.fields)  # type: ignore[arg-type]
    bed.produce_events(100, full=True)
    start_worker()
    wait_until(lambda: bed.drained(EVENTS, "audit:dlq:notifications"), 120, "drained")

    # Then every chain they formed verifies in Go
    reports = go_verify(verifier, bed.engine)
    assert all(r["is_valid"] for r in reports), [r for r in reports if not r["is_valid"]][:1]
    assert sum(r["verified_events"] for r in reports) >= 100
