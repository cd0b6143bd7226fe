"""`dlq-worker run` as a real process: environment-only start, signals, exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import pytest

from dlq_worker.throwaway.embedded import free_port
from tests.conftest import EVENTS, NOTIFICATIONS, Bed, OwnedBed, fast_env, wait_until


def _http_port_env() -> tuple[int, dict[str, str]]:
    port = free_port()
    return port, {"DLQ_WORKER_HTTP_PORT": str(port), "DLQ_WORKER_HTTP_HOST": "127.0.0.1"}


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def test_env_only_worker_drains_and_exits_0_on_sigterm(bed: Bed, spawn_worker: Any) -> None:
    # Given a mixed backlog and a worker configured by the platform's env names only
    events = bed.produce_events(2000)
    bed.produce_notifications(500)
    port, http_env = _http_port_env()
    secret = "pw-7f3a-never-logged"  # trust auth accepts it; it must never be shown
    worker = spawn_worker({**bed.env(), **fast_env(), **http_env, "DB_PASSWORD": secret})

    # When it has drained everything
    wait_until(lambda: bed.drained(EVENTS, NOTIFICATIONS), 60, "drained")
    wait_until(lambda: _ready(port), 15, "ready")
    assert bed.count("audit_events") == len(events)
    assert bed.count("notification_audit") == 500

    # Then SIGTERM stops it with exit code 0, and its logs are JSON lines without secrets
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert secret.encode() not in resp.read()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(15) == 0
    assert secret not in worker.output()
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    assert {"started", "stream_found", "stopped"} <= {line.get("event") for line in lines}


def test_sigterm_mid_drain_flushes_what_is_in_hand(bed: Bed, spawn_worker: Any) -> None:
    # Given a worker draining a large backlog in small batches
    bed.produce_events(6000)
    worker = spawn_worker({**bed.env(), **fast_env(), "DLQ_WORKER_WORKER_BATCH_SIZE": "50",
                           "DLQ_WORKER_HTTP_ENABLED": "false"})
    wait_until(lambda: bed.count("audit_events") > 500, 60, "draining started")

    # When SIGTERM arrives in the middle
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(15) == 0

    # Then everything it took is committed and acked: no pending entry, rows = removed entries
    assert bed.pending(EVENTS) == 0
    assert bed.count("audit_events") == 6000 - bed.depth(EVENTS)
    assert bed.depth(EVENTS) > 0, "the backlog was too small to stop mid-drain"


def test_second_signal_exits_at_once_without_acking(bed: Bed, spawn_worker: Any) -> None:
    # Given a worker holding a batch it cannot write (nothing listens on its DB port)
    bed.produce_events(20)
    env = {**bed.env(), **fast_env(), "DB_PORT": str(free_port()),
           "DLQ_WORKER_WORKER_SHUTDOWN_TIMEOUT": "60s", "DLQ_WORKER_HTTP_ENABLED": "false"}
    worker = spawn_worker(env)
    wait_until(lambda: bed.pending(EVENTS) == 20, 30, "batch in hand")

    # When it gets SIGTERM (it keeps trying to flush) and then SIGINT
    worker.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: '"stopping"' in worker.output(), 10, "first signal handled")
    worker.proc.send_signal(signal.SIGINT)

    # Then it exits at once (not after its 60 s shutdown timeout), non-zero, and nothing
    # was acknowledged
    assert worker.proc.wait(3) == 130
    assert bed.pending(EVENTS) == 20 and bed.depth(EVENTS) == 20


def test_shutdown_timeout_bounds_exit_during_outage(bed: Bed, spawn_worker: Any) -> None:
    # Given a worker holding a batch it cannot write (PostgreSQL unreachable)
    bed.produce_events(10)
    env = {**bed.env(), **fast_env(), "DB_PORT": str(free_port()),
           "DLQ_WORKER_WORKER_SHUTDOWN_TIMEOUT": "2s", "DLQ_WORKER_HTTP_ENABLED": "false"}
    worker = spawn_worker(env)
    wait_until(lambda: bed.pending(EVENTS) == 10, 30, "batch in hand")

    # When SIGTERM arrives, it waits no longer than shutdown_timeout (+1 s) and exits 0
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(3.5) == 0
    # the entries stay pending for redelivery: nothing lost, nothing acked
    assert bed.pending(EVENTS) == 10
    assert "shutdown_incomplete" in worker.output()


@pytest.mark.fault
def test_sigterm_while_redis_is_down_with_nothing_in_hand_exits_0_at_once(
        owned: OwnedBed, spawn_worker: Any) -> None:
    # Given an idle worker (nothing in hand) whose Redis goes away
    owned.produce_events(5)
    env = {**owned.env(), **fast_env(), "DLQ_WORKER_WORKER_SHUTDOWN_TIMEOUT": "20s",
           "DLQ_WORKER_HTTP_ENABLED": "false"}
    worker = spawn_worker(env)
    wait_until(lambda: owned.drained(EVENTS), 30, "drained")
    owned.redis_server.stop()
    wait_until(lambda: "redis unavailable" in worker.output(), 30, "outage noticed")

    # When SIGTERM arrives, it does not wait out the 20 s: there is nothing to finish
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(5) == 0
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    stopped = [line for line in lines if line.get("event") == "stopped"]
    assert stopped and stopped[-1]["left_pending"] == 0
    assert "shutdown_incomplete" not in worker.output()


@pytest.mark.fault
def test_sigterm_with_entries_in_hand_while_both_servers_are_down(owned: OwnedBed,
                                                                  spawn_worker: Any) -> None:
    # Given a worker holding a batch (PostgreSQL down), and then Redis down too
    owned.produce_events(10)
    owned.pg_server.stop()
    env = {**owned.env(), **fast_env(), "DLQ_WORKER_WORKER_SHUTDOWN_TIMEOUT": "2s",
           "DLQ_WORKER_HTTP_ENABLED": "false"}
    worker = spawn_worker(env)
    wait_until(lambda: owned.pending(EVENTS) == 10, 30, "batch in hand")
    owned.redis_server.stop()

    # When SIGTERM arrives, it gives up at the deadline, says what it left, and exits 0
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(3.5) == 0
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    incomplete = [line for line in lines if line.get("event") == "shutdown_incomplete"]
    assert incomplete and incomplete[-1]["entries"] == 10

    # And nothing was lost: the entries are still pending once Redis is back
    owned.redis_server.start()
    wait_until(lambda: owned.pending(EVENTS) == 10, 30, "still pending after restart")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dlq_worker", *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def test_run_with_bad_config_exits_3_with_one_line(tmp_path: Any) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text("worker:\n  batch_sise: 10\n")
    result = _cli("run", "-c", str(path), env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "worker.batch_sise" in lines[0] and "worker.batch_size" in lines[0]
    assert "Traceback" not in result.stderr


def test_db_init_against_unreachable_server_exits_4() -> None:
    result = _cli("db", "init", "--db-port", str(free_port()), "--db-host", "127.0.0.1",
                  env={"PATH": "/usr/bin:/bin", "DB_PASSWORD": "hunter2-secret"})
    assert result.returncode == 4
    assert "startup failed" in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout
