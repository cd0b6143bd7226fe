"""Secrets against servers that really require them: PostgreSQL with scram-sha-256, Redis
with an ACL user and password (the default user switched off). The passwords reach every
path that could leak them (connect, authentication failure, readiness, logs, metrics, the
operator CLI) and appear in none.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis

from dlq_worker import config as config_mod
from dlq_worker.drain.sink import Sink
from dlq_worker.throwaway.embedded import PostgresProcess, RedisProcess, free_port
from tests.conftest import EVENTS, fast_env, wait_until

PG_PASSWORD = "pg-Secret-9d1e"
REDIS_PASSWORD = "redis-Secret-4c7b"
REDIS_USER = "dlq-worker"


class AuthServers:
    """Both servers requiring passwords; with ``tls`` (a directory of trustme files, see
    test_tls.py) both also speak TLS: Redis on a TLS port that requires a client
    certificate, PostgreSQL with ssl on and non-TLS connections of the worker's role
    refused."""

    def __init__(self, root: Path, tls: Path | None = None) -> None:
        self.tls = tls
        self.tls_port = free_port()
        tls_args = [] if tls is None else [
            "--tls-port", str(self.tls_port), "--tls-cert-file", str(tls / "server.pem"),
            "--tls-key-file", str(tls / "server.key"), "--tls-ca-cert-file", str(tls / "ca.pem"),
            "--tls-auth-clients", "yes"]
        self.redis = RedisProcess(root / "redis", appendonly=False, extra_args=tls_args).start()
        admin = redis.Redis(port=self.redis.port)
        admin.execute_command("ACL", "SETUSER", REDIS_USER, "on", f">{REDIS_PASSWORD}",
                              "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "off")
        admin.close()
        self.pg = PostgresProcess(root / "pg").start()
        self.pg.create_database("action_history")
        conn = psycopg2.connect(host="127.0.0.1", port=self.pg.port, user="postgres",
                                dbname="action_history")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET password_encryption = 'scram-sha-256'")
            cur.execute(f"CREATE ROLE slm_user LOGIN PASSWORD '{PG_PASSWORD}'")
        conn.close()
        sink = Sink(config_mod.load(env={"DB_HOST": "127.0.0.1", "DB_PORT": str(self.pg.port),
                                         "DB_USER": "postgres"}).database)
        sink.init_schema()
        sink.close()
        conn = psycopg2.connect(host="127.0.0.1", port=self.pg.port, user="postgres",
                                dbname="action_history")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("GRANT SELECT, INSERT ON audit_events, notification_audit TO slm_user")
            cur.execute("GRANT USAGE ON SEQUENCE notification_audit_id_seq TO slm_user")
            cur.execute("GRANT CREATE ON SCHEMA public TO slm_user")
            hba = Path(self.pg.datadir) / "pg_hba.conf"
            rules = "host all slm_user 127.0.0.1/32 scram-sha-256\n"
            if tls is not None:
                rules = ("hostnossl all slm_user 127.0.0.1/32 reject\n"
                         "hostssl all slm_user 127.0.0.1/32 scram-sha-256\n")
                for name in ("server.pem", "server.key"):
                    target = Path(self.pg.datadir) / name
                    target.write_bytes((tls / name).read_bytes())
                    target.chmod(0o600)
                    if self.pg.user:
                        entry = pwd.getpwnam(self.pg.user)
                        os.chown(target, entry.pw_uid, entry.pw_gid)
                cur.execute("ALTER SYSTEM SET ssl_cert_file = 'server.pem'")
                cur.execute("ALTER SYSTEM SET ssl_key_file = 'server.key'")
                cur.execute("ALTER SYSTEM SET ssl = on")
            hba.write_text(rules + hba.read_text())
            cur.execute("SELECT pg_reload_conf()")
        conn.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port, db=1, username=REDIS_USER,
                           password=REDIS_PASSWORD)

    def env(self, redis_password: str = REDIS_PASSWORD, pg_password: str = PG_PASSWORD,
            ca: Path | None = None) -> dict[str, str]:
        env = {"REDIS_ADDR": f"127.0.0.1:{self.redis.port}", "REDIS_DB": "1",
               "REDIS_USERNAME": REDIS_USER, "REDIS_PASSWORD": redis_password,
               "DB_HOST": "127.0.0.1", "DB_PORT": str(self.pg.port), "DB_USER": "slm_user",
               "DB_PASSWORD": pg_password, "DB_NAME": "action_history"}
        if self.tls is not None:
            ca = ca or self.tls / "ca.pem"
            env.update({
                "REDIS_ADDR": f"rediss://127.0.0.1:{self.tls_port}",
                "DLQ_WORKER_REDIS_TLS_CA_FILE": str(ca),
                "DLQ_WORKER_REDIS_TLS_CERT_FILE": str(self.tls / "client.pem"),
                "DLQ_WORKER_REDIS_TLS_KEY_FILE": str(self.tls / "client.key"),
                "DB_SSLMODE": "verify-full", "DLQ_WORKER_DATABASE_SSLROOTCERT": str(ca)})
        return env

    def close(self) -> None:
        self.pg.kill()
        self.redis.kill()


@pytest.fixture
def auth() -> Iterator[AuthServers]:
    with tempfile.TemporaryDirectory(prefix="dlq-auth-") as root:
        Path(root).chmod(0o755)
        servers = AuthServers(Path(root))
        yield servers
        servers.close()


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert PG_PASSWORD not in text and REDIS_PASSWORD not in text


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_drains_with_scram_and_acl_and_never_shows_the_passwords(
        auth: AuthServers, spawn_worker: Any) -> None:
    # Given servers that refuse anyone without the password, and a backlog
    client = auth.client()
    import random

    from dlq_worker import producer
    from dlq_worker.throwaway import samples
    rng = random.Random(8)
    for _ in range(300):
        client.xadd(EVENTS, {"message": producer.build_message(
            producer.AUDIT_EVENT, samples.audit_event(rng))})
    with pytest.raises(redis.AuthenticationError):  # the default user is off
        redis.Redis(port=auth.redis.port).ping()

    # When a worker with the right passwords drains it
    port = free_port()
    worker = spawn_worker({**auth.env(), **fast_env(), "DLQ_WORKER_HTTP_PORT": str(port),
                           "DLQ_WORKER_HTTP_HOST": "127.0.0.1"})
    wait_until(lambda: client.xlen(EVENTS) == 0, 60, "drained")
    wait_until(lambda: _readyz(port)[0] == 200, 30, "ready")

    # Then every record is written, and no output carries a password
    conn = psycopg2.connect(host="127.0.0.1", port=auth.pg.port, user="postgres",
                            dbname="action_history")
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events")
        assert cur.fetchone() == (300,)
    conn.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        _no_secret(resp.read().decode(), _readyz(port)[1], worker.output())


@pytest.mark.parametrize("wrong", ["postgres", "redis"])
def test_wrong_password_is_a_clear_error_without_the_secret(
        auth: AuthServers, spawn_worker: Any, wrong: str) -> None:
    # Given a worker started with one wrong password
    bad = "wrong-Secret-0000"
    env = auth.env(**({"pg_password": bad} if wrong == "postgres" else {"redis_password": bad}))
    port = free_port()
    worker = spawn_worker({**env, **fast_env(), "DLQ_WORKER_HTTP_PORT": str(port),
                           "DLQ_WORKER_HTTP_HOST": "127.0.0.1"})

    # Then it is not ready and says why, naming the server and the refusal
    expected = ("password authentication failed" if wrong == "postgres"
                else "invalid username-password pair")
    wait_until(lambda: expected in _readyz(port)[1], 30, "unready with the reason")
    status, body = _readyz(port)
    assert status == 503
    wait_until(lambda: expected in worker.output(), 30, "logged")
    _no_secret(body, worker.output())
    assert bad not in body and bad not in worker.output()

    # And the operator CLI says it in one line, with a distinct exit code
    result = subprocess.run([sys.executable, "-m", "dlq_worker", "status"], capture_output=True,
                            text=True, timeout=60, check=False,
                            env={**os.environ, **env, "DLQ_WORKER_LOG_FORMAT": "json"})
    if wrong == "redis":
        assert result.returncode == 4
        assert result.stderr.count("\n") == 1 and expected in result.stderr
    _no_secret(result.stdout, result.stderr)
    assert bad not in result.stdout + result.stderr
    json.dumps(result.stderr)  # (a single printable line)
