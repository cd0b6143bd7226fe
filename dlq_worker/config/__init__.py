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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dlq_worker.config import platform as platform_config
from dlq_worker.config.settings import (
    _CHAIN_MODES,
    _FORMATS,
    _LEVELS,
    _PLATFORM_ENV,
    _SECRETS,
    _SECTIONS,
    _SSLMODES,
    ENV_PREFIX,
    PLATFORM_ENV,
    Config,
    DatabaseConfig,
    Duration,
    HttpConfig,
    LogConfig,
    RedisConfig,
    Secret,
    StreamsConfig,
    WorkerConfig,
    _split_addr,
    duration_seconds,
)
from dlq_worker.drain.decode import TABLES
from dlq_worker.errors import ConfigError

#: The settings' types, for the rest of the worker: ``from dlq_worker.config import Config``.
__all__ = [
    "ENV_PREFIX",
    "PLATFORM_ENV",
    "Config",
    "DatabaseConfig",
    "Duration",
    "HttpConfig",
    "LogConfig",
    "RedisConfig",
    "Secret",
    "StreamsConfig",
    "WorkerConfig",
    "describe",
    "duration_seconds",
    "load",
    "validate",
]


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
    """The settings the worker takes from the platform's config file (config/platform.py)."""
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



def _show(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _closest(key: str, known: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return matches[0] if matches else None
