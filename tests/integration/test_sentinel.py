"""Redis behind Sentinel, for real: a master, a replica and three sentinels on loopback. The
master is killed in the middle of a drain while a producer keeps writing; the worker follows
the new master by itself and every record the producer was told is stored ends as one row."""

from __future__ import annotations

import random
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.sentinel import Sentinel

from dlq_worker import producer
from dlq_worker.throwaway import samples
from dlq_worker.throwaway.embedded import RedisProcess, find_redis_server, free_port
from tests.conftest import EVENTS, Bed, fast_env, wait_until

MASTER = "dlq"


@dataclass
class SentinelBed:
    root: Path
    master: RedisProcess
    replica: RedisProcess
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    @property
    def addrs(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def sentinel(self) -> Sentinel:
        return Sentinel([("127.0.0.1", p) for p in self.ports], socket_timeout=1.0)

    def master_port(self) -> int:
        """The master's port as the sentinels say, 0 while they know none (failing over)."""
        try:
            return int(self.sentinel().discover_master(MASTER)[1])
        except redis.RedisError:
            return 0

    def close(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait(10)
        self.replica.kill()
        self.master.kill()


@pytest.fixture
def sentinel_bed() -> Iterator[SentinelBed]:
    with tempfile.TemporaryDirectory(prefix="dlq-sentinel-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        master = RedisProcess(root / "master", appendonly=True).start()
        replica = RedisProcess(root / "replica", appendonly=True, extra_args=[
            "--replicaof", "127.0.0.1", str(master.port)]).start()
        bed = SentinelBed(root, master, replica)
        for i in range(3):
            port = free_port()
            conf = root / f"sentinel-{i}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {root}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {master.port} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 10000\n"
                            f"sentinel parallel-syncs {MASTER} 1\n")
            bed.sentinels.append(subprocess.Popen(
                [find_redis_server(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            bed.ports.append(port)
        wait_until(lambda: _sentinels_ready(bed), 30, "sentinels agree on the master")
        wait_until(lambda: redis.Redis(port=master.port).info("replication")
                   .get("connected_slaves") == 1, 30, "replica in sync")
        try:
            yield bed
        finally:
            bed.close()


def _sentinels_ready(bed: SentinelBed) -> bool:
    try:
        for port in bed.ports:
            info: Any = redis.Redis(port=port).sentinel_master(MASTER)
            if int(info["num-other-sentinels"]) < 2 or int(info["num-slaves"]) < 1:
                return False
        return True
    except (redis.RedisError, KeyError):
        return False


@dataclass
class Producer:
    """Writes records through Sentinel, as the platform's producers would; a record counts
    as stored once XADD answered and one replica has it (WAIT): the contract of a producer
    that must not lose what it was told is stored."""

    bed: SentinelBed
    stored: list[str] = field(default_factory=list)
    attempted: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = self.bed.sentinel().master_for(MASTER, db=1, socket_timeout=1.0)
        rng = random.Random(21)
        record = samples.audit_event(rng)
        while not self.stop.is_set():
            self.attempted.add(record["event_id"])
            try:
                client.xadd(EVENTS, {"message": producer.build_message(
                    producer.AUDIT_EVENT, record)}, maxlen=100000, approximate=True)
                if int(client.execute_command("WAIT", 1, 500)) >= 1:
                    self.stored.append(record["event_id"])
                    record = samples.audit_event(rng)
            except redis.RedisError:
                time.sleep(0.1)  # failing over: write the same record again
            time.sleep(0.005)


def test_the_worker_follows_a_failover_mid_drain_and_loses_nothing(
        sentinel_bed: SentinelBed, bed: Bed, spawn_worker: Any) -> None:
    s = sentinel_bed
    # Given a producer writing through Sentinel and a worker draining through it
    writer = Producer(s)
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    env = {**bed.env(), **fast_env(), "DLQ_WORKER_HTTP_ENABLED": "false",
           "DLQ_WORKER_REDIS_SENTINELS": s.addrs, "DLQ_WORKER_REDIS_MASTER_NAME": MASTER}
    worker = spawn_worker(env)
    wait_until(lambda: bed.count("audit_events") >= 200, 60, "draining")

    # When the master dies mid-drain
    old = s.master_port()
    s.master.kill()
    killed = time.monotonic()
    before = bed.count("audit_events")
    wait_until(lambda: s.master_port() not in (0, old), 60, "a sentinel failover")
    promoted = time.monotonic()
    # (the old master comes back; the sentinels make it a replica of the new one, so the
    # producer's WAIT is answered again)
    s.master.start()
    wait_until(lambda: bed.count("audit_events") > before, 60, "a row written after the kill")
    draining = time.monotonic()
    wait_until(lambda: bed.count("audit_events") > before + 50, 60, "draining on")
    time.sleep(2)
    writer.stop.set()
    thread.join(10)

    # Then the worker followed the new master by itself, and every record the producer was
    # told is stored is exactly one row
    new = redis.Redis(port=s.master_port(), db=1)
    wait_until(lambda: new.xlen(EVENTS) == 0, 60, "drained on the new master")
    with bed.engine.connect() as conn:
        from sqlalchemy import text
        rows = {str(r) for r in conn.execute(text("SELECT event_id FROM audit_events"))
                .scalars()}
    assert set(writer.stored) <= rows, len(set(writer.stored) - rows)
    assert rows <= writer.attempted  # and nothing else
    assert worker.proc.poll() is None
    # Anything replication lost while the worker held it is counted and logged, not silent;
    # and the failover itself is not mistaken for entries trimmed unread
    lost = worker.output().count('"event": "pending_deleted"')
    assert '"event": "trimmed_unread"' not in worker.output()
    print(f"\nfailover: master killed -> new master {promoted - killed:.1f} s, "
          f"-> first row written after the kill {draining - killed:.1f} s; "
          f"{len(writer.stored)} records stored, "
          f"{lost} loss reports")
