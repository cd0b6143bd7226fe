"""Typed, frozen, strict configuration.

Layers, later wins: defaults < YAML file < environment < CLI flags. Every layer is
checked against the same schema, so an unknown key, a bad type or a bad value in any
of them is a ConfigError naming the key, where it came from, and what was expected.
Secrets (passwords) come only from the environment or from files, never from YAML
or flags, and are never part of ``repr()``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from dlq_worker import platform_config
from dlq_worker.decode import AUDIT_EVENTS, NOTIFICATION_AUDIT, TABLES
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
    batch_size: int = 500
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


def load(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    platform_path: str | Path | None = None,
) -> Config:
    """Build the Config, later layers winning: the platform's config file (if given, or
    named by DLQ_WORKER_PLATFORM_CONFIG), the worker's YAML file, the environment, the
    command line."""
    env = os.environ if env is None else env
    layers: list[tuple[str, Mapping[str, Any]]] = []
    platform_path = platform_path or env.get(PLATFORM_ENV) or None
    if platform_path is not None:
        layers += _from_platform(Path(platform_path))
    if path is not None:
        layers.append((str(path), _checked_not_platform(Path(path), _read_yaml(Path(path)))))
    layers.append(("environment", _from_env(env)))
    if overrides:
        layers.append(("command line", overrides))

    merged: dict[str, dict[str, tuple[str, Any]]] = {name: {} for name in _SECTIONS}
    for origin, layer in layers:
        for section, values in layer.items():
            if section not in _SECTIONS:
                raise ConfigError(
                    f"{origin}: unknown section '{section}' "
                    f"(expected one of: {', '.join(_SECTIONS)})"
                )
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise ConfigError(f"{origin}: '{section}' must be a mapping")
            known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
            for key, value in values.items():
                if key not in known:
                    hint = _closest(str(key), known)
                    raise ConfigError(
                        f"{origin}: unknown key '{section}.{key}'"
                        + (f" (did you mean '{section}.{hint}'?)" if hint else "")
                    )
                if (section, key) in _SECRETS and origin != "environment" and \
                        not origin.startswith(platform_config.SECRET_ORIGIN):
                    raise ConfigError(
                        f"{origin}: '{section}.{key}' is a secret: set it through the environment "
                        f"or '{section}.password_file', never in a file or on the command line"
                    )
                merged[section][key] = (origin, value)

    sections = {
        name: _build_section(name, cls, merged[name]) for name, cls in _SECTIONS.items()
    }
    config = Config(**sections)
    config = _resolve_password_files(config)
    validate(config, {f"{section}.{key}": origin for section, values in merged.items()
                      for key, (origin, _) in values.items()})
    return config


def validate(config: Config, origins: Mapping[str, str] | None = None) -> None:
    """Check ranges and relations between values (types are checked while loading). An
    error names where the value came from (``origins``: key -> file, environment or
    command line; the default otherwise) and the value itself, secrets excepted."""
    origins = origins or {}

    def _check(ok: bool, key: str, expected: str) -> None:
        if ok:
            return
        section, name = key.split(".", 1)
        value: Any = getattr(getattr(config, section), name, None)
        if isinstance(value, Duration):
            shown = f", got {float(value):g}s"
        elif (section, name) in _SECRETS or value is None:
            shown = ""
        else:
            shown = f", got {_show(value)}"
        raise ConfigError(f"{origins.get(key, 'default')}: '{key}' expects {expected}{shown}")

    r, d, s, w, h, lg = (
        config.redis,
        config.database,
        config.streams,
        config.worker,
        config.http,
        config.log,
    )
    try:
        _split_addr(r.addr)
    except ConfigError as exc:
        raise ConfigError(f"{origins.get('redis.addr', 'default')}: {exc}") from None
    _check(r.db >= 0, "redis.db", "a database number >= 0")
    if r.sentinels:
        r.sentinel_addrs  # noqa: B018 - each must parse as host:port
        _check(bool(r.master_name), "redis.master_name",
               "the master's name as the sentinels know it (redis.sentinels is set)")
    _check(1 <= d.port <= 65535, "database.port", "a port between 1 and 65535")
    _check(d.sslmode in _SSLMODES, "database.sslmode", f"one of {', '.join(sorted(_SSLMODES))}")
    _check(d.hash_chain in _CHAIN_MODES, "database.hash_chain",
           f"one of {', '.join(sorted(_CHAIN_MODES))}")
    _check(d.hash_chain != "hmac" or bool(d.hash_chain_key), "database.hash_chain_key",
           "a key (DLQ_WORKER_DATABASE_HASH_CHAIN_KEY or database.hash_chain_key_file) "
           "when hash_chain is hmac")
    _check(bool(d.name), "database.name", "a database name")
    _check(bool(d.user), "database.user", "a user name")
    _check(bool(s.prefix), "streams.prefix", "a non-empty key prefix")
    _check(bool(s.dead_letter_prefix), "streams.dead_letter_prefix", "a non-empty key prefix")
    _check(
        not s.dead_letter_prefix.startswith(s.prefix),
        "streams.dead_letter_prefix",
        "a prefix outside streams.prefix (parked entries must not be drained again)",
    )
    _check(bool(s.routes), "streams.routes", "at least one route")
    for name, table in s.routes.items():
        _check(
            table in TABLES, f"streams.routes.{name}", f"a table: {', '.join(sorted(TABLES))}"
        )
    _check(bool(s.group), "streams.group", "a consumer group name")
    _check(s.max_length > 0, "streams.max_length", "a positive number")
    _check(1 <= w.batch_size <= 10000, "worker.batch_size", "between 1 and 10000")
    _check(w.batch_max_bytes >= 1024 * 1024, "worker.batch_max_bytes", "at least 1048576 (1 MiB)")
    _check(w.systemic_after >= 2, "worker.systemic_after", "at least 2")
    _check(w.systemic_retry_max >= w.backoff_initial, "worker.systemic_retry_max",
           ">= backoff_initial")
    _check(0 <= d.partition_months_back <= 1200, "database.partition_months_back",
           "between 0 and 1200")
    _check(0 <= d.partition_months_ahead <= 120, "database.partition_months_ahead",
           "between 0 and 120")
    _check(w.max_deliveries >= 1, "worker.max_deliveries", "at least 1")
    _check(w.block >= 0.001, "worker.block", "at least 1ms")
    _check(w.backoff_max >= w.backoff_initial > 0, "worker.backoff_max", ">= backoff_initial > 0")
    _check(w.reject_retry_max >= w.reject_retry_initial, "worker.reject_retry_max",
           ">= reject_retry_initial")
    _check(w.claim_idle >= 1, "worker.claim_idle", "at least 1s")
    _check(float(w.takeover_after) == 0 or 0.5 <= w.takeover_after <= w.claim_idle,
           "worker.takeover_after", "0 (off) or from 0.5s up to claim_idle")
    _check(w.shutdown_timeout > 0, "worker.shutdown_timeout", "a positive duration")
    _check(0 <= h.port <= 65535, "http.port", "a port between 0 and 65535")
    _check(lg.level in _LEVELS, "log.level", f"one of {', '.join(sorted(_LEVELS))}")
    _check(lg.format in _FORMATS, "log.format", f"one of {', '.join(sorted(_FORMATS))}")


def describe(config: Config) -> dict[str, dict[str, Any]]:
    """The effective configuration as plain data, secrets masked."""
    out: dict[str, dict[str, Any]] = {}
    for name in _SECTIONS:
        section = getattr(config, name)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, Secret):
                value = "***" if value else ""
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, Duration):
                value = float(value)
            values[f.name] = value
        out[name] = values
    return out


# -- internals --


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return doc


def _from_platform(path: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """The settings the worker takes from the platform's config file (platform_config.py)."""
    return platform_config.layers(_read_yaml(path), path)


def _checked_not_platform(path: Path, doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """worker.yaml is strict; the platform's file given in its place gets a pointer."""
    sign = platform_config.looks_like_platform(doc)
    if sign is not None:
        raise ConfigError(f"{path}: this is the platform's config (it has {sign}), not the "
                          "worker's: pass it with --platform-config (or "
                          f"{PLATFORM_ENV}), which takes what the worker needs from it")
    return doc


def _from_env(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, (section, key) in _PLATFORM_ENV.items():
        if name in env and env[name] != "":
            out.setdefault(section, {})[key] = env[name]
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        # Only names shaped like a setting are ours; Kubernetes injects others
        # (DLQ_WORKER_SERVICE_HOST, DLQ_WORKER_PORT_8080_TCP...) for a Service of that name.
        if section not in _SECTIONS or not key:
            continue
        known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        if key not in known:
            hint = _closest(key, known)
            raise ConfigError(
                f"environment: unknown setting {name}"
                + (f" (did you mean {ENV_PREFIX}{section.upper()}_{hint.upper()}?)" if hint else "")
            )
        if key == "routes":
            out.setdefault(section, {})[key] = _parse_routes(name, value)
        else:
            out.setdefault(section, {})[key] = value
    return out


def _parse_routes(name: str, value: str) -> dict[str, str]:
    routes: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        stream, sep, table = part.partition("=")
        if not sep or not stream.strip() or not table.strip():
            raise ConfigError(f"environment: {name} expects 'stream=table,stream=table'")
        routes[stream.strip()] = table.strip()
    return routes


def _build_section(name: str, cls: type[Any], values: Mapping[str, tuple[str, Any]]) -> Any:
    kwargs: dict[str, Any] = {}
    types = {f.name: f for f in dataclasses.fields(cls)}
    for key, (origin, raw) in values.items():
        f = types[key]
        kwargs[key] = _coerce(f"{origin}: '{name}.{key}'", f.type, raw)
    return cls(**kwargs)


def _coerce(where: str, type_name: Any, raw: Any) -> Any:
    t = str(type_name)
    if t == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in {"true", "1", "yes", "on"}:
            return True
        if isinstance(raw, str) and raw.strip().lower() in {"false", "0", "no", "off"}:
            return False
        raise ConfigError(f"{where} expects true or false, got {_show(raw)}")
    if t == "int":
        if isinstance(raw, bool):
            raise ConfigError(f"{where} expects an integer, got {_show(raw)}")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
            return int(raw)
        raise ConfigError(f"{where} expects an integer, got {_show(raw)}")
    if t == "Duration":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw >= 0:
            return Duration(float(raw))
        if isinstance(raw, str):
            seconds = duration_seconds(raw)
            if seconds is not None:
                return Duration(seconds)
        raise ConfigError(
            f"{where} expects a duration such as 30s, 500ms, 168h or a number of seconds, "
            f"got {_show(raw)}"
        )
    if t == "Secret":
        if not isinstance(raw, str):
            raise ConfigError(f"{where} expects a string")
        return Secret(raw)
    if t == "str":
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"{where} expects a string, got {_show(raw)}")
    if t.startswith("Mapping"):
        if not isinstance(raw, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise ConfigError(f"{where} expects a mapping of stream name to table name")
        return dict(raw)
    raise AssertionError(f"unhandled config type {t}")  # pragma: no cover


def _resolve_password_files(config: Config) -> Config:
    redis, database = config.redis, config.database
    if redis.password_file and not redis.password:
        redis = dataclasses.replace(
            redis, password=_read_secret("redis.password_file", redis.password_file)
        )
    if database.password_file and not database.password:
        database = dataclasses.replace(
            database, password=_read_secret("database.password_file", database.password_file)
        )
    if database.hash_chain_key_file and not database.hash_chain_key:
        database = dataclasses.replace(database, hash_chain_key=_read_secret(
            "database.hash_chain_key_file", database.hash_chain_key_file))
    return dataclasses.replace(config, redis=redis, database=database)


def _read_secret(key: str, path: str) -> Secret:
    try:
        return Secret(Path(path).read_text(encoding="utf-8").strip())
    except OSError as exc:
        raise ConfigError(f"'{key}': cannot read {path}: {exc.strerror}") from None


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


def _show(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _closest(key: str, known: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return matches[0] if matches else None
