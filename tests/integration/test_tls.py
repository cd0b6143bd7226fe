"""TLS against real servers: Redis on a TLS port that requires a client certificate (and an
ACL user with a password), PostgreSQL with ssl on, scram-sha-256, and the worker's role
refused without TLS; the worker verifies both servers (sslmode=verify-full). The test CA
and certificates are made here by trustme."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import trustme

from dlq_worker import producer
from dlq_worker.throwaway import samples
from dlq_worker.throwaway.embedded import free_port
from tests.conftest import EVENTS, fast_env, wait_until
from tests.integration.test_auth import (
    PG_PASSWORD,
    REDIS_PASSWORD,
    AuthServers,
    _no_secret,
    _readyz,
)


def _write_certs(ca: trustme.CA, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    where.chmod(0o755)
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(where / "server.pem"))
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(str(where / "server.pem"), append=True)
    server.private_key_pem.write_to_path(str(where / "server.key"))
    client = ca.issue_cert("dlq-worker")
    client.cert_chain_pems[0].write_to_path(str(where / "client.pem"))
    client.private_key_pem.write_to_path(str(where / "client.key"))
    return where


def _tls_client(s: AuthServers) -> redis.Redis:
    assert s.tls is not None
    return redis.Redis(port=s.tls_port, db=1, username="dlq-worker", password=REDIS_PASSWORD,
                       ssl=True, ssl_ca_certs=str(s.tls / "ca.pem"),
                       ssl_certfile=str(s.tls / "client.pem"),
                       ssl_keyfile=str(s.tls / "client.key"))


def test_a_backlog_drains_over_tls_to_both_servers(tls_servers: AuthServers,
                                                   spawn_worker: Any) -> None:
    s = tls_servers
    assert s.tls is not None
    # Given servers that refuse the worker without TLS (and Redis without a client cert)
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host="127.0.0.1", port=s.pg.port, user="slm_user",
                         password=PG_PASSWORD, dbname="action_history", sslmode="disable")
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=s.tls_port, ssl=True, ssl_ca_certs=str(s.tls / "ca.pem"),
                    username="dlq-worker", password=REDIS_PASSWORD).ping()
    client = _tls_client(s)
    rng = random.Random(11)
    for _ in range(200):
        client.xadd(EVENTS, {"message": producer.build_message(
            producer.AUDIT_EVENT, samples.audit_event(rng))})

    # When a worker verifying both servers drains it
    worker = spawn_worker({**s.env(), **fast_env(), "DLQ_WORKER_HTTP_ENABLED": "false"})
    wait_until(lambda: client.xlen(EVENTS) == 0, 60, "drained")

    # Then every record is a row, written over a verified TLS connection
    conn = psycopg2.connect(host="127.0.0.1", port=s.pg.port, user="postgres",
                            dbname="action_history")
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events")
        assert cur.fetchone() == (200,)
        cur.execute("SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) "
                    "WHERE usename = 'slm_user'")
        assert cur.fetchone() == (True,)
    conn.close()
    _no_secret(worker.output())


@pytest.mark.parametrize("server", ["redis", "postgres"])
def test_a_server_signed_by_another_ca_is_one_clear_error(
        tls_servers: AuthServers, spawn_worker: Any, server: str, tmp_path: Path) -> None:
    s = tls_servers
    # Given a CA bundle that did not sign that server's certificate
    other = _write_certs(trustme.CA(), tmp_path / "other")
    env = s.env()
    key = "DLQ_WORKER_REDIS_TLS_CA_FILE" if server == "redis" else \
        "DLQ_WORKER_DATABASE_SSLROOTCERT"
    env[key] = str(other / "ca.pem")

    # When an operator command connects: one line that says why, exit 4, no secret
    command = ["status"] if server == "redis" else ["db", "init"]
    result = subprocess.run([sys.executable, "-m", "dlq_worker", *command],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**env, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 4, result.stderr
    assert result.stderr.count("\n") == 1 and "certificate verify failed" in result.stderr
    _no_secret(result.stdout, result.stderr)

    # When the worker runs: it stays up, unready, and says why in /readyz and the log
    port = free_port()
    worker = spawn_worker({**env, **fast_env(), "DLQ_WORKER_HTTP_PORT": str(port),
                           "DLQ_WORKER_HTTP_HOST": "127.0.0.1"})
    wait_until(lambda: "certificate verify failed" in _readyz(port)[1], 30, "unready, why")
    assert _readyz(port)[0] == 503
    wait_until(lambda: "certificate verify failed" in worker.output(), 30, "logged")
    _no_secret(_readyz(port)[1], worker.output())
