"""The shipped image, end to end through the docker SDK: Redis, PostgreSQL and the worker as
containers sharing one network namespace (as in a pod), everything reached from the test
through published loopback ports.

Selected with ``-m container``; needs DOCKER_HOST and DLQ_TEST_IMAGE (the built worker
image). CI builds the image and runs this (see .ci/run).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import redis
from sqlalchemy import create_engine, text

from dlq_worker import producer
from dlq_worker.throwaway import samples
from dlq_worker.throwaway.embedded import free_port, wait_postgres, wait_redis

pytestmark = pytest.mark.container

EVENTS, NOTES = "audit:dlq:events", "audit:dlq:notifications"


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} must be set for the container tests (see .ci/run)")
    return value


@pytest.fixture
def pod() -> Iterator[dict[str, Any]]:
    client = docker.from_env(timeout=60)
    ports = {"redis": free_port(), "postgres": free_port(), "http": free_port()}
    created: list[Any] = []
    try:
        # The first container holds the shared network namespace and publishes every port.
        holder = client.api.create_container(
            os.environ.get("DLQ_TEST_REDIS_IMAGE", "redis:7"),
            command=["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no",
                     "--appendonly", "yes", "--appendfsync", "always"],
            ports=[6379, 5432, 8080], stop_timeout=10,
            host_config=client.api.create_host_config(port_bindings={
                6379: ("127.0.0.1", ports["redis"]), 5432: ("127.0.0.1", ports["postgres"]),
                8080: ("127.0.0.1", ports["http"])}))
        redis_c = client.containers.get(holder["Id"])
        created.append(redis_c)
        redis_c.start()
        postgres_c = client.containers.run(
            os.environ.get("DLQ_TEST_POSTGRES_IMAGE", "postgres:16"), detach=True,
            network_mode=f"container:{redis_c.id}",
            environment={"POSTGRES_HOST_AUTH_METHOD": "trust", "POSTGRES_DB": "action_history"})
        created.append(postgres_c)
        wait_redis(ports["redis"], 60)
        wait_postgres(ports["postgres"], 120)
        yield {"client": client, "ports": ports, "netns": f"container:{redis_c.id}",
               "created": created}
    finally:
        for container in reversed(created):
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
        client.close()


def _worker_env() -> dict[str, str]:
    return {"REDIS_ADDR": "127.0.0.1:6379", "REDIS_DB": "1", "DB_HOST": "127.0.0.1",
            "DB_PORT": "5432", "DB_USER": "postgres", "DB_NAME": "action_history",
            "DB_PASSWORD": "pw-never-in-logs"}


def _http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except OSError:
        return 0, b""


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_image_drains_a_backlog_and_stops_cleanly_on_sigterm(pod: dict[str, Any]) -> None:
    client, ports, image = pod["client"], pod["ports"], _env("DLQ_TEST_IMAGE")

    # Given the schema (created by the image's own `db init`) and a mixed backlog
    init = client.containers.run(image, ["db", "init"], network_mode=pod["netns"],
                                 environment=_worker_env(), remove=True)
    assert b"schema ready" in init
    r = redis.Redis(port=ports["redis"], db=1)
    rng = random.Random(5)
    events = [samples.audit_event(rng) for _ in range(2000)]
    for record in events:
        r.xadd(EVENTS, {"message": producer.build_message("audit_event", record)})
    for _ in range(500):
        r.xadd(NOTES, {"message": producer.build_message("notification_audit",
                                                         samples.notification(rng))})
    poison = r.xadd(EVENTS, {"message": b"not json"})

    # When the worker image runs against it
    worker = client.containers.run(image, detach=True, network_mode=pod["netns"],
                                   environment=_worker_env(), stop_signal="SIGTERM")
    pod["created"].append(worker)
    base = f"http://127.0.0.1:{ports['http']}"
    _wait(lambda: r.xlen(EVENTS) == 0 and r.xlen(NOTES) == 0, 120, "backlog drained")
    _wait(lambda: _http(base + "/readyz")[0] == 200, 60, "/readyz through the published port")

    # Then every record is a row, the poison is parked, and the endpoints answer
    engine = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{ports['postgres']}"
                           "/action_history")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one() == 2000
        assert conn.execute(text("SELECT count(*) FROM notification_audit")).scalar_one() == 500
    parked = r.xrange("audit:dead-letter:events")
    assert [f[b"original_id"] for _, f in parked] == [poison]
    status, body = _http(base + "/metrics")
    assert status == 200
    assert b'dlq_worker_entries_written_total{stream="audit:dlq:events",table="audit_events"} ' \
           b"2000.0" in body
    assert _http(base + "/healthz")[0] == 200

    # And SIGTERM in the middle of a second backlog exits 0 with nothing lost or unacked
    more = [samples.audit_event(rng) for _ in range(5000)]
    pipe = r.pipeline(transaction=False)
    for record in more:
        pipe.xadd(EVENTS, {"message": producer.build_message("audit_event", record)})
    pipe.execute()
    time.sleep(0.3)
    worker.kill(signal="SIGTERM")
    result = worker.wait(timeout=60)
    assert result["StatusCode"] == 0
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one()
    assert rows == 2000 + 5000 - r.xlen(EVENTS)
    assert r.xpending(EVENTS, "dlq-worker")["pending"] == 0

    logs = worker.logs().decode()
    assert "pw-never-in-logs" not in logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert {"started", "stopping", "stopped"} <= {line.get("event") for line in lines}
    config = client.api.inspect_image(image)["Config"]
    assert config["User"] not in ("", "0", "root")
    assert config["Entrypoint"] == ["dlq-worker"]
    print(f"\n[image] {image}: {client.api.inspect_image(image)['Size'] / 1e6:.0f} MB; "
          f"drained 2500 entries, SIGTERM mid-drain exit 0 with {r.xlen(EVENTS)} left unread")
    engine.dispose()
    r.close()
