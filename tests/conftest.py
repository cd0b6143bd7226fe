"""Fixtures: real servers (see servers.py), a per-test bed, and workers that clean up."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, text

from dlq_worker import config as config_mod
from dlq_worker import producer
from dlq_worker.app import App
from dlq_worker.config import Config
from dlq_worker.drain.sink import Sink
from dlq_worker.throwaway import samples
from tests.servers import Server, Servers, create_database, drop_database

EVENTS = "audit:dlq:events"
NOTIFICATIONS = "audit:dlq:notifications"
GROUP = "dlq-worker"

#: Short timings so behaviour that takes minutes in production takes a second here.
FAST: dict[str, dict[str, Any]] = {
    "worker": {
        "linger": "20ms", "block": "200ms", "claim_idle": "2s", "claim_interval": "500ms",
        "reject_retry_initial": "200ms", "reject_retry_max": "500ms",
        "backoff_initial": "50ms", "backoff_max": "500ms", "unready_after": "1s",
        "stats_interval": "300ms", "shutdown_timeout": "10s", "consumer_idle_delete": "1h",
        "systemic_retry_max": "1s", "takeover_after": "1s",
    },
    "streams": {"discover_interval": "300ms"},
    "http": {"host": "127.0.0.1", "port": 0},
    "database": {"connect_timeout": "2s", "statement_timeout": "10s"},
}


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.close()


@pytest.fixture(scope="session")
def shared_redis(servers: Servers) -> Server:
    return servers.redis(appendonly=False)


@pytest.fixture(scope="session")
def shared_postgres(servers: Servers) -> Server:
    pg = servers.postgres()
    make_template(pg.port)
    return pg


def make_template(port: int) -> None:
    """A database with the schema, cloned per test (CREATE DATABASE ... TEMPLATE)."""
    create_database(port, "dlq_template")
    cfg = config_mod.load(env={"DB_HOST": "127.0.0.1", "DB_PORT": str(port),
                               "DB_USER": "postgres", "DB_NAME": "dlq_template"})
    sink = Sink(cfg.database)
    sink.init_schema(months_back=2, months_ahead=2)
    sink.close()


@dataclass
class Bed:
    """One test's world: Redis DB 1 emptied, a fresh database, helpers to fill and inspect."""

    redis_port: int
    pg_port: int
    dbname: str
    client: redis.Redis
    engine: Engine
    rng: random.Random = field(default_factory=lambda: random.Random(1234))

    def env(self) -> dict[str, str]:
        """The platform's environment names, as a Deployment would set them."""
        return {"REDIS_ADDR": f"127.0.0.1:{self.redis_port}", "REDIS_DB": "1",
                "DB_HOST": "127.0.0.1", "DB_PORT": str(self.pg_port), "DB_USER": "postgres",
                "DB_NAME": self.dbname}

    def config(self, env: dict[str, str] | None = None, **sections: dict[str, Any]) -> Config:
        overrides = {name: dict(values) for name, values in FAST.items()}
        for name, values in sections.items():
            overrides.setdefault(name, {}).update(values)
        return config_mod.load(env={**self.env(), **(env or {})}, overrides=overrides)

    # -- producing, in the producers' exact wire format --

    def produce_events(self, n: int, *, maxlen: int = 100000, exact: bool = False,
                       **kwargs: Any) -> list[dict[str, Any]]:
        """n events, capped as producers cap (``exact``: MAXLEN = rather than ~)."""
        records = [samples.audit_event(self.rng, **kwargs) for _ in range(n)]
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            pipe.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, record)},
                      maxlen=maxlen, approximate=not exact)
        pipe.execute()
        return records

    def produce_notifications(self, n: int) -> list[dict[str, Any]]:
        records = [samples.notification(self.rng) for _ in range(n)]
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            pipe.xadd(NOTIFICATIONS,
                      {"message": producer.build_message(producer.NOTIFICATION, record)})
        pipe.execute()
        return records

    def xadd_raw(self, stream: str, message: bytes) -> str:
        return str(self.client.xadd(stream, {"message": message}).decode())

    # -- inspecting --

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())

    def event_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return [str(r) for r in conn.execute(text("SELECT event_id FROM audit_events"))
                    .scalars()]

    def depth(self, stream: str = EVENTS) -> int:
        return int(self.client.xlen(stream))

    def pending(self, stream: str = EVENTS) -> int:
        try:
            return int(self.client.xpending(stream, GROUP)["pending"])
        except redis.ResponseError:
            return 0

    def parked(self, stream: str = "audit:dead-letter:events") -> list[dict[bytes, bytes]]:
        return [fields for _, fields in self.client.xrange(stream)]

    def drained(self, *streams: str) -> bool:
        streams = streams or (EVENTS,)
        return all(self.depth(s) == 0 and self.pending(s) == 0 for s in streams)


@pytest.fixture
def bed(shared_redis: Server, shared_postgres: Server) -> Iterator[Bed]:
    client = redis.Redis(port=shared_redis.port, db=1)
    client.flushdb()
    name = f"t_{uuid.uuid4().hex[:12]}"
    create_database(shared_postgres.port, name, template="dlq_template")
    engine = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{shared_postgres.port}/{name}")
    yield Bed(shared_redis.port, shared_postgres.port, name, client, engine)
    engine.dispose()
    client.close()
    drop_database(shared_postgres.port, name)


@dataclass
class RunningWorker:
    app: App
    thread: threading.Thread
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    @property
    def url(self) -> str:
        assert self.app.http is not None
        return f"http://127.0.0.1:{self.app.http.port}"

    def stop(self, timeout: float = 30) -> None:
        self.app.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"


@pytest.fixture
def start_worker(bed: Bed) -> Iterator[Callable[..., RunningWorker]]:
    """Factory: start an in-process worker (own metrics registry); all are stopped after."""
    running: list[RunningWorker] = []

    def start(config: Config | None = None, **sections: dict[str, Any]) -> RunningWorker:
        cfg = config or bed.config(**sections)
        registry = CollectorRegistry()
        app = App(cfg, registry=registry)
        thread = threading.Thread(target=app.run, name="worker", daemon=True)
        thread.start()
        worker = RunningWorker(app, thread, registry)
        running.append(worker)
        return worker

    yield start
    for worker in running:
        if worker.thread.is_alive():
            worker.stop()


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log_path: str

    def output(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()


@pytest.fixture
def spawn_worker(tmp_path: Any) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: `dlq-worker run` as a real process; killed at teardown if still alive."""
    procs: list[WorkerProcess] = []

    def spawn(env: dict[str, str], *args: str) -> WorkerProcess:
        log_path = str(tmp_path / f"worker-{len(procs)}.log")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DLQ_WORKER_")}
        full_env.update(env)
        full_env.setdefault("DLQ_WORKER_LOG_FORMAT", "json")
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "dlq_worker", "run", *args],
                                    env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
        worker = WorkerProcess(proc, log_path)
        procs.append(worker)
        return worker

    yield spawn
    for worker in procs:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGKILL)
            worker.proc.wait(10)


def fast_env() -> dict[str, str]:
    """FAST as DLQ_WORKER_* variables, for worker processes."""
    env: dict[str, str] = {}
    for section, values in FAST.items():
        for key, value in values.items():
            env[f"DLQ_WORKER_{section.upper()}_{key.upper()}"] = str(value)
    return env


@dataclass
class OwnedBed(Bed):
    """A Bed on servers this test owns, so it may stop, kill and restart them."""

    redis_server: Any = None
    pg_server: Any = None


@pytest.fixture
def owned(servers: Servers) -> Iterator[OwnedBed]:
    yield from _owned(servers, fsync="always")


@pytest.fixture
def owned_everysec(servers: Servers) -> Iterator[OwnedBed]:
    """An OwnedBed whose Redis syncs its AOF once a second, as production usually does."""
    yield from _owned(servers, fsync="everysec")


def _owned(servers: Servers, fsync: str) -> Iterator[OwnedBed]:
    redis_server = servers.redis(appendonly=True, fsync=fsync)
    pg_server = servers.postgres()
    make_template(pg_server.port)
    create_database(pg_server.port, "dlq", template="dlq_template")
    client = redis.Redis(port=redis_server.port, db=1)
    engine = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{pg_server.port}/dlq",
                           pool_pre_ping=True)
    bed = OwnedBed(redis_server.port, pg_server.port, "dlq", client, engine,
                   redis_server=redis_server, pg_server=pg_server)
    yield bed
    engine.dispose()
    client.close()
    for server in (redis_server, pg_server):
        server.kill()
