"""Next to the platform as it really runs: its DLQ in DB 0 whatever its ConfigMap says.

Each test here failed on the release before its fix.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import yaml

from dlq_worker import producer
from dlq_worker.throwaway import samples
from tests.conftest import EVENTS, Bed, OwnedBed, fast_env, wait_until
from tests.integration.test_auth import PG_PASSWORD, AuthServers, _no_secret
from tests.integration.test_ops import cli
from tests.integration.test_tls import _tls_client
from tests.platform_double import PlatformRetryWorker

DATA = Path(__file__).parents[1] / "data"


def _platform_writes_db0(bed: OwnedBed, n: int) -> redis.Redis:
    """The platform's client selects no database: its DLQ lands in DB 0."""
    db0 = redis.Redis(port=bed.redis_port, db=0)
    db0.set("cache:some-session", "x")  # DB 0 is another service's cache, too
    pipe = db0.pipeline(transaction=False)
    for _ in range(n):
        record = samples.audit_event(bed.rng)
        pipe.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, record)},
                  maxlen=10000, approximate=True)
    pipe.execute()
    return db0


def test_a_dlq_in_another_database_is_reported_within_a_minute(
        owned: OwnedBed, start_worker: Any, caplog: Any) -> None:
    # Given the platform's DLQ in DB 0, and a worker on DB 1 as the design says
    db0 = _platform_writes_db0(owned, 200)
    caplog.set_level(logging.ERROR, logger="dlq_worker.watch.monitor")
    started = time.monotonic()
    worker = start_worker(owned.config())  # the default interval: at the start, every 30 s

    # Then it says so: a metric, an error line naming the database and the stream, a
    # warning in /readyz
    wait_until(lambda: worker.metric("dlq_worker_other_db_entries", db="0") == 200, 60,
               "other database reported")
    print(f"\n[other db] reported {time.monotonic() - started:.2f}s after the worker started")
    assert worker.metric("dlq_worker_other_db_streams", db="0") == 1
    lines = [r for r in caplog.records if getattr(r, "event", "") == "dlq_in_other_database"]
    assert lines and "DB 0" in lines[0].getMessage() and EVENTS in lines[0].getMessage()
    with urllib.request.urlopen(worker.url + "/readyz", timeout=5) as reply:
        warnings = json.loads(reply.read())["warnings"]
    assert any("DB 0" in w and EVENTS in w for w in warnings)

    # and status shows them, doctor fails on them
    status = cli(owned, "status")
    assert f"DB 0 holds {EVENTS} (200 entries)" in status.stdout, status.stdout
    doctor = cli(owned, "doctor", "--json")
    assert doctor.returncode == 7, doctor.stdout
    check = next(c for c in json.loads(doctor.stdout)["checks"]
                 if c["name"] == "no DLQ in another database")
    assert check["status"] == "fail" and "DB 0" in check["detail"]

    # and DB 0 was only read: no group, nothing acknowledged, the cache key untouched
    assert db0.xlen(EVENTS) == 200 and db0.xinfo_groups(EVENTS) == []
    assert db0.get("cache:some-session") == b"x"

    # When the platform's entries are gone from DB 0, the report ends at the next look
    db0.delete(EVENTS)
    wait_until(lambda: worker.metric("dlq_worker_other_db_entries", db="0") == 0, 45,
               "report cleared")

    # and a DLQ that appears there later is reported within a minute
    appeared = time.monotonic()
    _platform_writes_db0(owned, 50).close()
    wait_until(lambda: worker.metric("dlq_worker_other_db_entries", db="0") == 50, 60,
               "a later DLQ reported")
    print(f"[other db] one written later reported {time.monotonic() - appeared:.1f}s after "
          "it appeared")
    db0.close()


def test_the_platforms_own_files_are_enough_to_drain_over_tls_with_its_hmac_key(
        tls_servers: AuthServers, spawn_worker: Any, tmp_path: Path) -> None:
    s = tls_servers
    assert s.tls is not None
    # Given the platform's Valkey: TLS with client certificates, its default user's password
    admin = _tls_client(s)
    admin.execute_command("ACL", "SETUSER", "default", "on", ">valkey-Secret-77",
                          "~*", "&*", "+@all")
    # and the platform's config file in today's shape, with its secrets files beside it
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "db-secrets.yaml").write_text(
        yaml.safe_dump({"username": "slm_user", "password": PG_PASSWORD}))
    (secrets / "valkey-secrets.yaml").write_text(yaml.safe_dump({"password": "valkey-Secret-77"}))
    (secrets / "audit-hmac-key.yaml").write_text(yaml.safe_dump({"hmacKey": "hmac-Secret-5"}))
    doc = yaml.safe_load((DATA / "datastorage-config.yaml").read_text())
    doc["database"].update({"host": "127.0.0.1", "port": s.pg.port,
                            "secretsFile": str(secrets / "db-secrets.yaml")})
    doc["redis"].update({"addr": f"127.0.0.1:{s.tls_port}",
                         "secretsFile": str(secrets / "valkey-secrets.yaml"),
                         "tls": {"enabled": True, "caFile": str(s.tls / "ca.pem"),
                                 "certFile": str(s.tls / "client.pem"),
                                 "keyFile": str(s.tls / "client.key")}})
    doc["audit"]["hashKeySecretsFile"] = str(secrets / "audit-hmac-key.yaml")
    platform = tmp_path / "config.yaml"
    platform.write_text(yaml.safe_dump(doc))
    # and the platform's DLQ, in DB 0 where it really writes it
    db0 = redis.Redis(port=s.tls_port, db=0, password="valkey-Secret-77", ssl=True,
                      ssl_ca_certs=str(s.tls / "ca.pem"), ssl_certfile=str(s.tls / "client.pem"),
                      ssl_keyfile=str(s.tls / "client.key"))
    rng = random.Random(4)
    for i in range(120):
        record = samples.audit_event(rng)
        record["correlation_id"] = f"rr-platform-{i % 6}"
        db0.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, record)})

    # When a worker runs with nothing but the platform's file
    env = {"DLQ_WORKER_PLATFORM_CONFIG": str(platform), **fast_env(),
           "DLQ_WORKER_HTTP_ENABLED": "false"}
    worker = spawn_worker(env)
    wait_until(lambda: db0.xlen(EVENTS) == 0, 60, "drained")

    # Then every record is a row linked with the platform's HMAC key: verify-chain with that
    # key accepts every chain, and with another key calls them tampered
    conn = psycopg2.connect(host="127.0.0.1", port=s.pg.port, user="postgres",
                            dbname="action_history")
    with conn.cursor() as cur:
        cur.execute("SELECT count(*), count(*) FILTER (WHERE hash_algorithm = 'hmac-sha256' "
                    "AND event_hash IS NOT NULL) FROM audit_events")
        assert cur.fetchone() == (120, 120)
    conn.close()
    good = cli(None, "verify-chain", "--all", env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = cli(None, "verify-chain", "--all", env={
        **env, "DLQ_WORKER_DATABASE_HASH_CHAIN_KEY": "another-key"})
    assert bad.returncode == 8, bad.stdout + bad.stderr
    _no_secret(worker.output(), good.stdout, good.stderr)
    for secret in ("valkey-Secret-77", "hmac-Secret-5"):
        assert secret not in worker.output() + good.stdout + good.stderr
    db0.close()
    admin.close()


def _produce_for(bed: OwnedBed, seconds: float, per_tick: int, ids: set[str],
                 maxlen: int = 10000) -> threading.Thread:
    """Producers writing throughout, in the platform's format, capped as they cap."""

    def run() -> None:
        rng = random.Random(17)
        client = redis.Redis(port=bed.redis_port, db=1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pipe = client.pipeline(transaction=False)
            for _ in range(per_tick):
                record = samples.audit_event(rng)
                ids.add(record["event_id"])
                pipe.xadd(EVENTS, {"message": producer.build_message(
                    producer.AUDIT_EVENT, record)}, maxlen=maxlen, approximate=True)
            pipe.execute()
            time.sleep(0.1)
        client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _dead_letters(bed: Bed) -> str:
    """The dead letters by who parked them: ours carry a reason, the platform's do not."""
    parked = bed.parked()
    ours = sum(1 for fields in parked if b"reason" in fields)
    return f"dead letters {ours} ours, {len(parked) - ours} the platform's"


def _platform_workers(bed: OwnedBed, n: int = 2) -> list[PlatformRetryWorker]:
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{bed.pg_port}/{bed.dbname}"
    return [PlatformRetryWorker(bed.redis_port, url, name=f"worker-{i}").start()
            for i in range(n)]


@pytest.mark.fault
def test_next_to_the_platforms_retry_worker_an_outage_counts_no_loss(
        owned: OwnedBed, start_worker: Any, caplog: Any) -> None:
    # Given the platform's retry workers (their clock 30x faster) and two dlq-workers on the
    # same stream, producers writing, and nothing ever trimmed (the cap is far away)
    caplog.set_level(logging.ERROR)
    produced: set[str] = set()
    platform = _platform_workers(owned)
    workers = [start_worker(owned.config(streams={"consumer": f"dlq-{i}"}))
               for i in range(2)]
    producers = _produce_for(owned, 30, 20, produced)

    # When PostgreSQL is down for a while in the middle
    time.sleep(5)
    owned.pg_server.stop()
    time.sleep(15)
    owned.pg_server.start()
    back = time.monotonic()
    producers.join()
    wait_until(lambda: set(owned.event_ids()) >= produced, 120, "every record written")
    written_after = time.monotonic() - back
    for p in platform:
        p.stop()

    # Then every record is a row, and not one loss was counted or logged
    lost = sum(w.metric("dlq_worker_entries_trimmed_unread_total", stream=EVENTS)
               + w.metric("dlq_worker_pending_deleted_total", stream=EVENTS) for w in workers)
    alarms = [r for r in caplog.records if "AUDIT LOSS" in r.getMessage()]
    print(f"\n[coexistence] {len(produced)} produced, {owned.count('audit_events')} rows, "
          f"platform copies {sum(p.copied for p in platform)}, platform rows "
          f"{sum(p.written for p in platform)}, counted lost {lost:.0f}, "
          f"AUDIT LOSS lines {len(alarms)}, {_dead_letters(owned)}, every record written "
          f"{written_after:.1f}s after PostgreSQL returned")
    assert owned.count("audit_events") == len(produced)
    assert lost == 0 and not alarms, [(getattr(r, "event", ""), getattr(r, "entries", ""))
                                      for r in alarms]


@pytest.mark.fault
@pytest.mark.parametrize("first", ["platform", "dlq-worker"])
def test_next_to_the_platform_either_side_restarted_in_either_start_order_counts_no_loss(
        owned: OwnedBed, spawn_worker: Any, first: str) -> None:
    # Given producers writing, the platform's retry workers and two dlq-worker processes,
    # started in either order (the platform's INSERT of a record we wrote first fails on its
    # key: it copies the entry and deletes the original, as on any failure)
    produced: set[str] = set()
    producers = _produce_for(owned, 24, 20, produced)
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{owned.pg_port}/{owned.dbname}"
    env = {**owned.env(), **fast_env(), "DLQ_WORKER_HTTP_ENABLED": "false"}
    platform: list[PlatformRetryWorker] = []
    workers: list[Any] = []

    def start_platform(name: str) -> None:
        platform.append(PlatformRetryWorker(owned.redis_port, url, name=name).start())

    def start_ours(i: int) -> None:
        workers.append(spawn_worker({**env, "DLQ_WORKER_STREAMS_CONSUMER": f"dlq-{i}"}))

    sides = [lambda: [start_platform(f"worker-{i}") for i in range(2)],
             lambda: [start_ours(i) for i in range(2)]]
    for start in sides if first == "platform" else sides[::-1]:
        start()
        time.sleep(2)

    # When each side is restarted mid-drain: a dlq-worker SIGKILLed and started again (its
    # entries in hand claimed by the other), a platform worker stopped and started again
    # (it re-reads its own pending entries first), and PostgreSQL down for a while
    time.sleep(3)
    workers[0].proc.kill()
    workers[0].proc.wait(10)
    start_ours(0)
    time.sleep(3)
    platform[0].stop()
    start_platform(platform[0].name)
    time.sleep(2)
    owned.pg_server.stop()
    time.sleep(6)
    owned.pg_server.start()
    producers.join()
    wait_until(lambda: set(owned.event_ids()) >= produced, 120, "every record written")
    time.sleep(2)  # a count or two more
    for p in platform:
        p.stop()
    for w in workers:
        if w.proc.poll() is None:
            w.proc.terminate()
            w.proc.wait(30)

    # Then every record is a row, and not one loss was counted or logged by any of them
    counted = int(owned.client.hget("dlq-worker:trimmed-unread", EVENTS) or 0)
    alarms = [line for w in workers for line in w.output().splitlines()
              if "AUDIT LOSS" in line]
    print(f"\n[coexistence, {first} first, both restarted] {len(produced)} produced, "
          f"{owned.count('audit_events')} rows, platform copies "
          f"{sum(p.copied for p in platform)}, counted lost {counted}, AUDIT LOSS lines "
          f"{len(alarms)}, {_dead_letters(owned)}")
    assert owned.count("audit_events") == len(produced)
    assert counted == 0 and not alarms, alarms[:3]


@pytest.mark.fault
def test_next_to_the_platforms_retry_worker_trimming_during_an_outage_is_counted(
        owned: OwnedBed, start_worker: Any, caplog: Any) -> None:
    # Given the platform's retry workers and two dlq-workers on one stream capped at 1,000
    caplog.set_level(logging.ERROR)
    produced: set[str] = set()
    platform = _platform_workers(owned)
    workers = [start_worker(owned.config(streams={"max_length": 1000, "consumer": f"dlq-{i}"},
                                         worker={"stats_interval": "300ms"}))
               for i in range(2)]
    time.sleep(2)

    # When PostgreSQL is down while producers write far past the cap (they trim)
    owned.pg_server.stop()
    uncertain_max = 0.0
    producers = _produce_for(owned, 12, 40, produced, maxlen=1000)
    while producers.is_alive():
        uncertain_max = max(uncertain_max, *(
            w.metric("dlq_worker_entries_gone_unread_uncertain", stream=EVENTS)
            for w in workers))
        time.sleep(0.2)
    time.sleep(3)
    owned.pg_server.start()
    wait_until(lambda: owned.drained(EVENTS) or owned.pending(EVENTS) == 0, 120, "drained")
    time.sleep(3)
    for p in platform:
        p.stop()

    # Then no record is counted lost that was written, and what is neither written nor
    # counted is within the uncertain figure the worker reported
    rows = len(set(owned.event_ids()) & produced)
    certain = sum(w.metric("dlq_worker_entries_trimmed_unread_total", stream=EVENTS)
                  for w in workers)
    print(f"\n[coexistence, trimming] {len(produced)} produced, {rows} rows, certain loss "
          f"{certain:.0f}, uncertain at most {uncertain_max:.0f}, unaccounted "
          f"{len(produced) - rows - certain:.0f}, {_dead_letters(owned)}")
    assert certain > 0
    assert rows + certain <= len(produced)
    assert len(produced) - rows - certain <= uncertain_max


def test_copies_of_records_held_in_memory_trimmed_unread_are_not_counted_lost(
        owned: OwnedBed, start_worker: Any, caplog: Any) -> None:
    # Given a worker holding 20 records in memory while PostgreSQL is down (and reading
    # nothing more meanwhile: one batch of 20, no overlap)
    caplog.set_level(logging.INFO)
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{owned.pg_port}/{owned.dbname}"
    platform = PlatformRetryWorker(owned.redis_port, url, scale=1e6)
    platform.create_groups()  # its group exists from the start, as it always does
    worker = start_worker(owned.config(
        streams={"max_length": 50},
        worker={"stats_interval": "300ms", "batch_size": 20, "overlap": False}))
    owned.pg_server.stop()
    held = {r["event_id"] for r in owned.produce_events(20)}
    wait_until(lambda: owned.pending(EVENTS) == 20, 10, "20 held")

    # When the platform's retry worker fails on the same 20 (copies at the tail, originals
    # deleted), the worker sees its originals deleted, and then producers trim past the
    # copies before any group reads them, with 150 more records lost to the cap
    assert platform.read_once(20) == 20 and platform.copied == 20
    wait_until(lambda: any(getattr(r, "event", "") == "trimmed_in_hand"
                           for r in caplog.records), 10, "originals seen deleted")
    time.sleep(1)  # a count or two with the platform's group where ours is
    fillers = {r["event_id"] for r in owned.produce_events(200, maxlen=50, exact=True)}
    owned.pg_server.start()
    wait_until(lambda: set(owned.event_ids()) >= held, 60, "held records written")
    wait_until(lambda: owned.pending(EVENTS) == 0 and owned.depth(EVENTS) == 0, 60, "drained")
    time.sleep(1)  # a count or two more
    platform.stop()

    # Then the 20 held records and the 50 left are rows, the 150 trimmed are counted lost,
    # exactly: the 20 copies trimmed unread are reported as uncertain, never as lost
    rows = set(owned.event_ids())
    certain = worker.metric("dlq_worker_entries_trimmed_unread_total", stream=EVENTS)
    copies = worker.metric("dlq_worker_entries_trimmed_unread_copies_total", stream=EVENTS)
    print(f"\n[copies in flight] rows {len(rows)}, certain {certain:.0f}, copies {copies:.0f}")
    assert rows == held | (fillers & rows) and len(rows) == 70
    assert certain == 150 and copies == 20
    assert worker.metric("dlq_worker_entries_gone_unread_uncertain", stream=EVENTS) >= 20
    assert len(rows) + certain == 20 + 200


def test_the_platforms_dead_letters_are_listed_shown_and_replayed_like_ours(
        bed: Bed) -> None:
    # Given a dead letter the platform's retry worker parked (its format: no reason, no
    # consumer; retry_count 6 in the envelope, its last error there)
    record = samples.audit_event(bed.rng)
    message = producer.build_message(producer.AUDIT_EVENT, record, retry_count=6,
                                     last_error="database write failed")
    parked_id = bed.client.xadd("audit:dead-letter:events", {
        "message": message, "original_id": "1-1", "moved_at": "2026-12-01T00:00:00Z",
        "final_retry_count": "6"}).decode()

    # Then our CLI lists it, says who parked it and why, and selects it by that reason
    listed = json.loads(cli(bed, "dead-letter", "list", "--json").stdout)
    assert [(e["id"], e["parked_by"], e["reason"], e["error"]) for e in listed] == [
        (parked_id, "platform retry worker", "retries_exhausted", "database write failed")]
    assert listed[0]["error_class"] == "PlatformRetriesExhausted"
    text = cli(bed, "dead-letter", "list").stdout
    assert "by platform retry worker" in text and "retries_exhausted" in text
    replay = cli(bed, "dead-letter", "replay", "--reason", "retries_exhausted")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert bed.depth(EVENTS) == 1 and not bed.parked()
