"""The options every command shares, and the configuration they load."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from dlq_worker import config as config_mod
from dlq_worker.config import Config

F = TypeVar("F", bound=Callable[..., Any])

#: CLI flag -> (section, key). Secrets have no flag on purpose.
_FLAGS: dict[str, tuple[str, str]] = {
    "redis_addr": ("redis", "addr"),
    "redis_db": ("redis", "db"),
    "db_host": ("database", "host"),
    "db_port": ("database", "port"),
    "db_name": ("database", "name"),
    "db_user": ("database", "user"),
    "db_sslmode": ("database", "sslmode"),
    "http_port": ("http", "port"),
    "log_level": ("log", "level"),
    "log_format": ("log", "format"),
    "batch_size": ("worker", "batch_size"),
    "consumer": ("streams", "consumer"),
}


def config_options(func: F) -> F:
    """The options every command shares: where the config comes from."""
    options = [
        click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                     envvar="DLQ_WORKER_CONFIG", help="YAML config file (env DLQ_WORKER_CONFIG)."),
        click.option("--platform-config", type=click.Path(dir_okay=False),
                     envvar=config_mod.PLATFORM_ENV,
                     help="The platform's own config file (the Data Storage service's "
                          "datastorage-config): the Redis, stream and database settings are "
                          "taken from it, the rest ignored; -c and the environment win "
                          "(env DLQ_WORKER_PLATFORM_CONFIG)."),
        click.option("--redis-addr", help="Redis host:port or rediss://host:port (REDIS_ADDR)."),
        click.option("--redis-db", type=int, help="Redis database of the DLQ (REDIS_DB)."),
        click.option("--db-host", help="PostgreSQL host (DB_HOST)."),
        click.option("--db-port", type=int, help="PostgreSQL port (DB_PORT)."),
        click.option("--db-name", help="PostgreSQL database (DB_NAME)."),
        click.option("--db-user", help="PostgreSQL user (DB_USER)."),
        click.option("--db-sslmode", help="libpq sslmode (DB_SSLMODE)."),
        click.option("--http-port", type=int, help="Port of /healthz, /readyz, /metrics."),
        click.option("--log-level", help="debug, info, warning or error."),
        click.option("--log-format", help="json, console or auto."),
        click.option("--batch-size", type=int, help="Entries per batch."),
        click.option("--consumer", help="Consumer name (default: <pod or host>-<pid>)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def flag_overrides(flags: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The flags that were given, as config sections."""
    overrides: dict[str, dict[str, Any]] = {}
    for name, value in flags.items():
        if value is not None and name in _FLAGS:
            section, key = _FLAGS[name]
            overrides.setdefault(section, {})[key] = value
    return overrides


def load_config(config_path: str | None, flags: dict[str, Any]) -> Config:
    return config_mod.load(config_path, overrides=flag_overrides(flags),
                           platform_path=flags.get("platform_config"))
