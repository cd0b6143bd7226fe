"""Where the platform's own config file is read, as the Data Storage service has it today.

``--platform-config`` (or ``DLQ_WORKER_PLATFORM_CONFIG``) names the service's ConfigMap
file; the worker takes from it what it needs, so a deployment beside Data Storage copies
no setting. Two shapes are read: the service's today (``redis.addr``, ``redis.dlqMaxLen``,
``redis.tls``, ``redis.secretsFile``/``passwordKey``, ``database.*`` with
``secretsFile``/``usernameKey``/``passwordKey``, ``audit.hashKeySecretsFile``/
``hashKeyKey``), and the design document's (``redis.dlq.stream_prefix``,
``redis.dlq.max_length``). Secrets come from the YAML (or JSON) files those keys name, the
ones the platform mounts under ``/etc/datastorage/secrets/``; never from the file itself.
Everything else in it is the platform's and is ignored.

**The database number.** The service's config has no ``redis.db`` and its client selects
none: it writes its DLQ to DB 0 whatever its ConfigMap says (a design document's
``db: 1`` there is ignored by the service, and so by this reader). So with the platform's
file the worker drains DB 0, where the records really are: a worker on DB 1 would sit idle
while they are trimmed. ``REDIS_DB`` (or ``redis.db`` in worker.yaml) still wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dlq_worker.errors import ConfigError

#: Where in the platform's file a plain setting lives -> the worker's (section, key).
PLAIN: dict[tuple[str, ...], tuple[str, str]] = {
    ("database", "host"): ("database", "host"),
    ("database", "port"): ("database", "port"),
    ("database", "name"): ("database", "name"),
    ("database", "user"): ("database", "user"),
    ("database", "sslMode"): ("database", "sslmode"),
    ("database", "sslmode"): ("database", "sslmode"),
    ("redis", "addr"): ("redis", "addr"),
    ("redis", "dlqMaxLen"): ("streams", "max_length"),
    ("redis", "tls", "enabled"): ("redis", "tls"),
    ("redis", "tls", "caFile"): ("redis", "tls_ca_file"),
    ("redis", "tls", "certFile"): ("redis", "tls_cert_file"),
    ("redis", "tls", "keyFile"): ("redis", "tls_key_file"),
    ("redis", "dlq", "stream_prefix"): ("streams", "prefix"),
    ("redis", "dlq", "max_length"): ("streams", "max_length"),
}

#: Settings read from a secrets file: (where the file is named, where the key's name is,
#: the key's name when that is unset) -> the worker's (section, key).
SECRET_FILES: dict[tuple[tuple[str, ...], tuple[str, ...], str], tuple[str, str]] = {
    (("database", "secretsFile"), ("database", "usernameKey"), "username"):
        ("database", "user"),
    (("database", "secretsFile"), ("database", "passwordKey"), "password"):
        ("database", "password"),
    (("redis", "secretsFile"), ("redis", "passwordKey"), "password"): ("redis", "password"),
    (("audit", "hashKeySecretsFile"), ("audit", "hashKeyKey"), "hmacKey"):
        ("database", "hash_chain_key"),
}

#: The database the platform's DLQ is in (see the module's docstring).
PLATFORM_REDIS_DB = 0

#: Origins of values read from a secrets file start so (config/ accepts secrets only
#: from the environment and from these).
SECRET_ORIGIN = "platform secrets file "  # noqa: S105 - a label, not a secret


def layers(doc: Mapping[str, Any], path: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """The worker's settings from the platform's file, one layer per setting (so that an
    error names where in that file, or in which secrets file, the value was)."""
    out: list[tuple[str, Mapping[str, Any]]] = []
    for where, (section, key) in PLAIN.items():
        value = _get(doc, where)
        if value is not None:
            out.append((f"{path} (platform config '{'.'.join(where)}')", {section: {key: value}}))
    if not out:
        raise ConfigError(f"{path}: no setting the worker uses found in this platform config "
                          f"(expected some of: {', '.join('.'.join(k) for k in PLAIN)})")
    out.insert(0, (f"{path} (the platform writes its DLQ to Redis DB {PLATFORM_REDIS_DB}: "
                   "its config has no redis.db)", {"redis": {"db": PLATFORM_REDIS_DB}}))
    for (file_at, key_at, default_key), (section, key) in SECRET_FILES.items():
        name = _get(doc, file_at)
        if name is None or name == "":
            continue
        secret_key = str(_get(doc, key_at) or default_key)
        value = _secret(path, file_at, Path(str(name)), secret_key)
        out.append((f"{SECRET_ORIGIN}{name} (key '{secret_key}', named by {path} "
                    f"'{'.'.join(file_at)}')", {section: {key: value}}))
    return out


def looks_like_platform(doc: Mapping[str, Any]) -> str | None:
    """The key that shows a file is the platform's rather than worker.yaml, or None."""
    redis_section = doc.get("redis")
    if "server" in doc:
        return "server"
    if isinstance(redis_section, Mapping):
        for key in ("dlq", "dlqMaxLen", "secretsFile"):
            if key in redis_section:
                return f"redis.{key}"
    return None


def _get(doc: Any, where: tuple[str, ...]) -> Any:
    for part in where:
        doc = doc.get(part) if isinstance(doc, Mapping) else None
    return doc


def _secret(path: Path, file_at: tuple[str, ...], name: Path, key: str) -> str:
    where = f"{path} '{'.'.join(file_at)}'"
    try:
        doc = yaml.safe_load(name.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the secrets file {name}: "
                          f"{exc.strerror}") from None
    except yaml.YAMLError:
        raise ConfigError(f"{where}: the secrets file {name} is not YAML or JSON") from None
    value = doc.get(key) if isinstance(doc, Mapping) else None
    if value is None or value == "":
        raise ConfigError(f"{where}: the secrets file {name} has no key '{key}'")
    return str(value)
