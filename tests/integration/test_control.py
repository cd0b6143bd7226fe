"""Operator control against real worker processes: pause and resume a consumer group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import redis

from dlq_worker.throwaway.embedded import free_port
from tests.conftest import EVENTS, GROUP, Bed, fast_env, wait_until


def _cli(bed: Bed, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLQ_WORKER_")}
    env.update(bed.env())
    done = subprocess.run([sys.executable, "-m", "dlq_worker", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _metric(port: int, name: str) -> float | None:
    for line in _get(port, "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return None


def test_pause_holds_every_replica_survives_a_restart_and_resume_drains(
        bed: Bed, spawn_worker: Any) -> None:
    # Given two replicas of one group, draining
    ports = [free_port(), free_port()]

    def spawn(port: int) -> Any:
        return spawn_worker({**bed.env(), **fast_env(), "DLQ_WORKER_HTTP_PORT": str(port),
                             "DLQ_WORKER_HTTP_HOST": "127.0.0.1"})

    workers = [spawn(port) for port in ports]
    bed.produce_events(50)
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 50, 30, "drained")

    # When an operator pauses the group
    out = _cli(bed, "pause", "--reason", "PostgreSQL maintenance")
    assert "paused since" in out and "PostgreSQL maintenance" in out

    # Then within a poll both replicas say so, and new entries stay in the stream
    wait_until(lambda: all(_metric(p, "dlq_worker_paused") == 1 for p in ports), 5, "paused")
    bed.produce_events(30)
    time.sleep(1.5)
    assert bed.depth(EVENTS) == 30 and bed.pending(EVENTS) == 0
    assert bed.count("audit_events") == 50
    for port in ports:
        status, body = _get(port, "/readyz")
        assert status == 200 and "PostgreSQL maintenance" in body, body
        assert (_metric(port, "dlq_worker_paused_since_seconds") or 0) > time.time() - 60
    shown = _cli(bed, "status")
    assert "PAUSED" in shown and "PostgreSQL maintenance" in shown
    print("\n" + shown)

    # When one replica restarts while paused, it stays paused (the state is in Redis)
    workers[0].proc.send_signal(signal.SIGTERM)
    assert workers[0].proc.wait(30) == 0
    workers[0] = spawn(ports[0])
    wait_until(lambda: _metric(ports[0], "dlq_worker_paused") == 1, 30, "restarted, paused")
    time.sleep(1.0)
    assert bed.depth(EVENTS) == 30 and bed.count("audit_events") == 50

    # When the operator resumes, every replica takes entries again and the backlog drains
    assert "resumed" in _cli(bed, "resume")
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 80, 30, "drained")
    wait_until(lambda: all(_metric(p, "dlq_worker_paused") == 0 for p in ports), 5, "resumed")
    assert "was not paused" in _cli(bed, "resume")
    logs = workers[1].output()
    assert '"event": "paused"' in logs and '"event": "resumed"' in logs


def _slow_inserts(bed: Bed, seconds: float) -> None:
    with bed.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE FUNCTION slow() RETURNS trigger AS $$ BEGIN "
                             f"PERFORM pg_sleep({seconds}); RETURN NULL; END $$ "
                             "LANGUAGE plpgsql")
        conn.exec_driver_sql("CREATE TRIGGER slow AFTER INSERT ON audit_events "
                             "FOR EACH STATEMENT EXECUTE FUNCTION slow()")


def test_a_pause_lets_what_is_in_hand_finish(bed: Bed, start_worker: Any) -> None:
    # Given a worker whose inserts take a while (a trigger sleeps), holding a batch
    _slow_inserts(bed, 1)
    worker = start_worker()
    bed.produce_events(20)
    wait_until(lambda: bed.pending(EVENTS) == 20, 10, "taken")
    # When the group is paused mid-write
    from dlq_worker.watch import control
    control.pause(bed.client, GROUP, "test")
    # Then what it held is written and acknowledged, and nothing new is taken
    wait_until(lambda: bed.count("audit_events") == 20 and bed.pending(EVENTS) == 0, 15,
               "held batch finished")
    bed.produce_events(5)
    time.sleep(1.0)
    assert bed.depth(EVENTS) == 5 and bed.pending(EVENTS) == 0
    assert worker.metric("dlq_worker_paused") == 1
    control.resume(bed.client, GROUP)
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 25, 15, "drained")


def _pending_on(bed: Bed) -> dict[str, int]:
    try:
        info: Any = bed.client.xpending(EVENTS, GROUP)
    except redis.ResponseError:  # no group yet
        return {}
    return {c["name"].decode(): int(c["pending"]) for c in info.get("consumers", [])}


#: claim_idle as in production: only the heartbeat can explain a takeover in seconds.
_SLOW_CLAIM = {"DLQ_WORKER_WORKER_CLAIM_IDLE": "60s", "DLQ_WORKER_WORKER_TAKEOVER_AFTER": "2s",
               "DLQ_WORKER_WORKER_BATCH_SIZE": "50"}


def test_a_killed_consumers_entries_are_taken_over_in_seconds(bed: Bed,
                                                              spawn_worker: Any) -> None:
    # Given consumer A holding entries in a slow write, and consumer B idle beside it
    _slow_inserts(bed, 3)
    env = {**bed.env(), **fast_env(), **_SLOW_CLAIM, "DLQ_WORKER_HTTP_ENABLED": "false"}
    a = spawn_worker({**env, "DLQ_WORKER_STREAMS_CONSUMER": "worker-a"})
    bed.produce_events(100)
    wait_until(lambda: _pending_on(bed).get("worker-a", 0) > 0, 30, "A holds entries")
    b = spawn_worker({**env, "DLQ_WORKER_STREAMS_CONSUMER": "worker-b"})
    time.sleep(2.5)  # B's own heartbeat has flowed takeover_after: it may judge others
    # When A is killed outright
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    killed = time.monotonic()
    # Then B takes A's entries over within seconds (not claim_idle's 60 s), and all drain
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 100, 40, "drained")
    elapsed = time.monotonic() - killed
    print(f"\nSIGKILL to drained: {elapsed:.1f} s (slow inserts: 3 s per statement)")
    assert elapsed < 30
    assert "took over entries of consumers whose heartbeat stopped" in b.output()


def test_a_live_consumer_in_a_long_write_is_never_taken_over(bed: Bed,
                                                             spawn_worker: Any) -> None:
    # Given consumer A in a write that lasts three times takeover_after, and B beside it
    _slow_inserts(bed, 6)
    env = {**bed.env(), **fast_env(), **_SLOW_CLAIM, "DLQ_WORKER_HTTP_ENABLED": "false"}
    a = spawn_worker({**env, "DLQ_WORKER_STREAMS_CONSUMER": "worker-a"})
    bed.produce_events(30)
    wait_until(lambda: _pending_on(bed).get("worker-a", 0) == 30, 30, "A holds all")
    b = spawn_worker({**env, "DLQ_WORKER_STREAMS_CONSUMER": "worker-b"})
    # When the write goes on long past takeover_after, A alive and beating
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 30, 40, "drained")
    # Then B never claimed from it: A wrote and acknowledged all of its own entries
    assert "took over" not in b.output()
    assert '"event": "claimed"' not in b.output()
    assert a.proc.poll() is None


def test_taking_over_a_dead_consumer_counts_a_deleted_entry_lost_once(bed: Bed) -> None:
    # Given three entries pending on a dead consumer, one of them deleted from the stream
    from dlq_worker.drain.source import Source
    ids = [bed.xadd_raw(EVENTS, b"{}") for _ in range(3)]
    bed.client.xgroup_create(EVENTS, GROUP, id="0")
    bed.client.xreadgroup(GROUP, "dead", {EVENTS: ">"})
    bed.client.xdel(EVENTS, ids[1])
    time.sleep(0.2)
    source = Source(bed.config(), "alive")
    lost: list[str] = []
    # When a live consumer takes its entries over (twice, as two replicas would)
    first = source.claim_from(EVENTS, ["dead"], 0.1, 10, lost.extend)
    second = source.claim_from(EVENTS, ["dead"], 0.1, 10, lost.extend)
    source.close()
    # Then the two entries still there are taken, and the deleted one is counted lost, once
    assert sorted(e.id for e in first) == sorted([ids[0], ids[2]]) and second == []
    assert lost == [ids[1]]
    pending: Any = bed.client.xpending(EVENTS, GROUP)
    assert pending["pending"] == 2 and pending["consumers"] == [
        {"name": b"alive", "pending": 2}]


def test_a_live_consumer_in_a_write_longer_than_claim_idle_keeps_its_entries(
        bed: Bed, spawn_worker: Any) -> None:
    # Given consumer A in a write that lasts three times claim_idle (no heartbeat: only
    # idle time can tell B what is free), and B beside it
    _slow_inserts(bed, 6)
    env = {**bed.env(), **fast_env(), "DLQ_WORKER_WORKER_CLAIM_IDLE": "2s",
           "DLQ_WORKER_WORKER_TAKEOVER_AFTER": "0", "DLQ_WORKER_WORKER_BATCH_SIZE": "50",
           "DLQ_WORKER_HTTP_ENABLED": "false"}
    a = spawn_worker({**env, "DLQ_WORKER_STREAMS_CONSUMER": "worker-a"})
    bed.produce_events(30)
    wait_until(lambda: _pending_on(bed).get("worker-a", 0) == 30, 30, "A holds all")
    b = spawn_worker({**env, "DLQ_WORKER_STREAMS_CONSUMER": "worker-b"})
    # When the write goes on past claim_idle, A alive
    wait_until(lambda: bed.drained(EVENTS) and bed.count("audit_events") == 30, 40, "drained")
    # Then A kept its entries fresh while it wrote: B never claimed them
    assert '"event": "claimed"' not in b.output()
    assert a.proc.poll() is None
