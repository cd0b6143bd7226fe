"""The settings: every section, key, type and default (worker.yaml lists them all)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from dlq_worker.drain.decode import AUDIT_EVENTS, NOTIFICATION_AUDIT
from dlq_worker.errors import ConfigError

ENV_PREFIX = "DLQ_WORKER_"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def duration_seconds(text: str, *, unit_required: bool = False) -> float | None:
    """``30s``, ``500ms``, ``168h``, ``7d`` (or a bare number of seconds, unless a unit is
    required) in seconds; None if the text is not a duration."""
    m = _DURATION.match(text)
    if m is None or (unit_required and m[2] is None):
        return None
    return float(m[1]) * _UNITS[m[2]]


class Duration(float):
    """Seconds; written as a number of seconds or with a unit: ``50ms``, ``30s``, ``168h``."""


class Secret(str):
    """A string that never shows itself in repr() or logs."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


@dataclass(frozen=True)
class RedisConfig:
    #: ``host:port``, or a ``redis://``/``rediss://`` URL without credentials.
    addr: str = "127.0.0.1:6379"
    #: The DLQ's database. DB 0 belongs to another service's cache: never 0 by default.
    db: int = 1
    username: str = ""
    password: Secret = field(default=Secret(""), repr=False)
    password_file: str = ""
    tls: bool = False
    #: CA bundle to verify the server with (default: the system's).
    tls_ca_file: str = ""
    #: A client certificate and its key, for a server that requires one.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    socket_timeout: Duration = Duration(5.0)
    #: Redis behind Sentinel: the sentinels as ``host:port,host:port``, and the name they
    #: know the master by. The master's address then comes from them (addr is not used),
    #: and a failover is followed by itself.
    sentinels: str = ""
    master_name: str = ""

    @property
    def sentinel_addrs(self) -> list[tuple[str, int]]:
        addrs = []
        for item in (a.strip() for a in self.sentinels.split(",")):
            host, _, port = item.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")  # [IPv6]:port
            if not host or not port.isdigit() or not 0 < int(port) < 65536 or "@" in item:
                raise ConfigError(f"'redis.sentinels' expects host:port,host:port, got "
                                  f"{item[:40]!r}" if "@" not in item else
                                  "'redis.sentinels': credentials are not accepted there")
            addrs.append((host, int(port)))
        return addrs

    @property
    def host(self) -> str:
        return _split_addr(self.addr)[1]

    @property
    def port(self) -> int:
        return _split_addr(self.addr)[2]

    @property
    def use_tls(self) -> bool:
        return self.tls or _split_addr(self.addr)[0] == "rediss"


@dataclass(frozen=True)
class DatabaseConfig:
    host: str = "127.0.0.1"
    port: int = 5432
    name: str = "action_history"
    user: str = "slm_user"
    password: Secret = field(default=Secret(""), repr=False)
    password_file: str = ""
    #: libpq sslmode: disable, allow, prefer, require, verify-ca, verify-full.
    sslmode: str = "prefer"
    #: CA bundle to verify the server with (verify-ca, verify-full).
    sslrootcert: str = ""
    #: A client certificate and its key, for a server that requires one.
    sslcert: str = ""
    sslkey: str = ""
    connect_timeout: Duration = Duration(5.0)
    #: Server-side cap on one batch's statements; hitting it is transient, the batch is retried.
    statement_timeout: Duration = Duration(30.0)
    #: The longest wait on any lock (a chain's advisory lock, a key another transaction is
    #: inserting). A chain still locked then is left for a later batch, never waited on.
    lock_timeout: Duration = Duration(2.0)
    #: The server ends a session of ours idle this long inside a transaction (a frozen
    #: worker), releasing every lock it held.
    idle_in_transaction_timeout: Duration = Duration(15.0)
    #: Create a missing monthly partition of audit_events instead of rejecting the row.
    create_missing_partitions: bool = True
    #: ...but only for months this near the current one (UTC). A row outside the window
    #: whose partition does not exist is parked (``outside_partition_window``): input never
    #: decides DDL for year 9999. A year back covers any backlog the 7-day DLQ retention
    #: allows many times over; one month ahead covers clock skew across a month's end.
    partition_months_back: int = 12
    partition_months_ahead: int = 1
    #: The platform's tamper-evident hash chain for audit_events: auto, off, sha256, hmac.
    #: auto links rows when the target schema has the hash columns and the platform's
    #: audit_event_lock_id() (with HMAC when a key is set), and writes them unhashed if not.
    hash_chain: str = "auto"
    #: The platform's HMAC key (only from the environment or a file, like passwords).
    hash_chain_key: Secret = field(default=Secret(""), repr=False)
    hash_chain_key_file: str = ""


@dataclass(frozen=True)
class StreamsConfig:
    prefix: str = "audit:dlq:"
    dead_letter_prefix: str = "audit:dead-letter:"
    #: Stream name after the prefix -> target table.
    routes: Mapping[str, str] = field(
        default_factory=lambda: {
            "events": AUDIT_EVENTS,
            "notifications": NOTIFICATION_AUDIT,
            "notification": NOTIFICATION_AUDIT,
        }
    )
    group: str = "dlq-worker"
    #: At start, create every routed stream that does not exist yet (empty, with the
    #: group): KEDA's redis-streams trigger fails on a stream or group that is missing.
    create_routed: bool = True
    #: Unique per process; empty means ``<POD_NAME or hostname>-<pid>``.
    consumer: str = ""
    #: SCAN for new streams this often (every 200ms while none is known yet).
    discover_interval: Duration = Duration(5.0)
    #: The producers' ``MAXLEN ~`` cap, to report depth as a fraction of it.
    max_length: int = 10000
    #: The design's DLQ retention (``ttl``); entries older than this are reported, never deleted.
    ttl: Duration = Duration(168 * 3600.0)
    #: Look this often for DLQ streams in the instance's other databases (the platform
    #: writes DB 0 whatever its ConfigMap says); read-only and bounded. 0 turns it off.
    other_databases_interval: Duration = Duration(30.0)


@dataclass(frozen=True)
class WorkerConfig:
    batch_size: int = 1000
    #: A batch also flushes once its entries hold this many bytes: memory is bounded by
    #: bytes, not only by count (the contract allows 1 MiB envelopes).
    batch_max_bytes: int = 4 * 1024 * 1024
    #: How long a partial batch waits for more entries before it is flushed.
    linger: Duration = Duration(0.0)
    #: Write a batch in the background while the next one is read and decoded.
    overlap: bool = True
    #: XREADGROUP BLOCK when nothing is in hand.
    block: Duration = Duration(1.0)
    #: Deliveries (XPENDING's counter) after which a row PostgreSQL rejects is parked.
    max_deliveries: int = 5
    #: Distinct entries rejected in a row, for one cause and with no row accepted between
    #: them, that make a rejection systemic (a schema change, not bad rows): from then on
    #: nothing is parked, the worker turns unready and retries slowly until a row is accepted.
    systemic_after: int = 10
    #: Slowest retry while rejection is systemic.
    systemic_retry_max: Duration = Duration(60.0)
    #: First wait before a rejected entry is retried; doubles per delivery.
    reject_retry_initial: Duration = Duration(5.0)
    reject_retry_max: Duration = Duration(30.0)
    #: Backoff while a server is unavailable (exponential with jitter).
    backoff_initial: Duration = Duration(0.1)
    backoff_max: Duration = Duration(10.0)
    #: A transient outage longer than this turns /readyz to 503.
    unready_after: Duration = Duration(15.0)
    #: Entries held and none written, parked or acknowledged for this long: the drain has
    #: stopped moving (a lock held by a frozen replica, a write that never returns), and
    #: /readyz says so.
    stalled_after: Duration = Duration(60.0)
    #: Entries pending longer than this on another consumer are claimed (XAUTOCLAIM).
    claim_idle: Duration = Duration(60.0)
    claim_interval: Duration = Duration(15.0)
    #: A consumer whose heartbeat stopped this long ago is dead: its entries idle this long
    #: are claimed at once instead of after claim_idle (0 turns heartbeats off).
    takeover_after: Duration = Duration(5.0)
    #: Consumers idle this long and holding nothing are removed from the group.
    consumer_idle_delete: Duration = Duration(3600.0)
    #: SIGTERM: stop reading, flush and ack within this time, then exit.
    shutdown_timeout: Duration = Duration(20.0)
    #: Interval of the XINFO/INFO poll behind the depth, lag and durability metrics.
    stats_interval: Duration = Duration(10.0)
    #: /healthz fails when the loop has not turned for this long.
    liveness_timeout: Duration = Duration(60.0)


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = True
    host: str = "0.0.0.0"  # noqa: S104 - a pod's probes and scrapes come from outside
    port: int = 8080


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    #: json, console, or auto (console on a terminal, JSON otherwise).
    format: str = "auto"


@dataclass(frozen=True)
class Config:
    redis: RedisConfig = field(default_factory=RedisConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def consumer_name(self) -> str:
        if self.streams.consumer:
            return self.streams.consumer
        host = os.environ.get("POD_NAME") or socket.gethostname() or "worker"
        return f"{host}-{os.getpid()}"


_SECTIONS: dict[str, type[Any]] = {
    "redis": RedisConfig,
    "database": DatabaseConfig,
    "streams": StreamsConfig,
    "worker": WorkerConfig,
    "http": HttpConfig,
    "log": LogConfig,
}

#: Environment names from the platform's design; they need no prefix.
_PLATFORM_ENV = {
    "REDIS_ADDR": ("redis", "addr"),
    "REDIS_DB": ("redis", "db"),
    "REDIS_USERNAME": ("redis", "username"),
    "REDIS_PASSWORD": ("redis", "password"),
    "REDIS_PASSWORD_FILE": ("redis", "password_file"),
    "REDIS_TLS": ("redis", "tls"),
    "DB_HOST": ("database", "host"),
    "DB_PORT": ("database", "port"),
    "DB_NAME": ("database", "name"),
    "DB_USER": ("database", "user"),
    "DB_PASSWORD": ("database", "password"),
    "DB_PASSWORD_FILE": ("database", "password_file"),
    "DB_SSLMODE": ("database", "sslmode"),
}
_SECRETS = {("redis", "password"), ("database", "password"), ("database", "hash_chain_key")}
_CHAIN_MODES = {"auto", "off", "sha256", "hmac"}
_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
_LEVELS = {"debug", "info", "warning", "error"}
_FORMATS = {"auto", "json", "console"}


PLATFORM_ENV = "DLQ_WORKER_PLATFORM_CONFIG"

def _split_addr(addr: str) -> tuple[str, str, int]:
    """``host:port`` or ``redis[s]://host:port`` -> (scheme, host, port)."""
    text = addr.strip()
    if "@" in text:
        # user:pass@host:port, or a URL with credentials: refused without repeating the
        # address, which holds a secret.
        raise ConfigError(
            "'redis.addr': credentials in the address are not accepted (the value is not "
            "shown: it holds a secret); use REDIS_USERNAME and REDIS_PASSWORD(_FILE)"
        )
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError(
                f"'redis.addr': scheme must be redis:// or rediss://, got {parts.scheme}"
            )
        if parts.username or parts.password:
            raise ConfigError(
                "'redis.addr': credentials in the address are not accepted; "
                "use REDIS_USERNAME and REDIS_PASSWORD"
            )
        if parts.path not in ("", "/"):
            raise ConfigError("'redis.addr': select the database with redis.db / REDIS_DB")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ConfigError(f"'redis.addr': bad port in {text!r}") from None
        return parts.scheme, parts.hostname or "", port
    host, sep, port_text = text.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not port_text.isdigit() \
            or not 0 < int(port_text) < 65536:
        raise ConfigError(f"'redis.addr' expects host:port (an IPv6 address in brackets), "
                          f"got {text!r}")
    return "redis", host.strip("[]"), int(port_text)


#: A host name, an IPv4 address, or an IPv6 address in brackets.
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\]")
