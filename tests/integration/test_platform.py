"""Next to the platform as it really runs: its DLQ in DB 0 whatever its ConfigMap says.

Each test here failed on the release before its fix.
"""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg2
import redis
import yaml

from dlq_worker import producer, samples
from tests.conftest import EVENTS, OwnedBed, fast_env, wait_until
from tests.integration.test_auth import PG_PASSWORD, AuthServers, _no_secret
from tests.integration.test_ops import cli
from tests.integration.test_tls import _tls_client

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
    caplog.set_level(logging.ERROR, logger="dlq_worker.monitor")
    started = time.monotonic()
    worker = start_worker(owned.config(streams={"other_databases_interval": "1s"}))

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

    # When the platform's entries are gone from DB 0, the report ends
    db0.delete(EVENTS)
    wait_until(lambda: worker.metric("dlq_worker_other_db_entries", db="0") == 0, 30,
               "report cleared")
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

