"""The ``dlq-worker`` command line (click)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from dlq_worker import __version__, exitcodes, logs
from dlq_worker import config as config_mod
from dlq_worker.app import serve
from dlq_worker.config import Config
from dlq_worker.errors import (
    ConfigError,
    DlqWorkerError,
    NoRoom,
    NotFound,
    StartupError,
    TransientError,
)

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dlq-worker")
def cli() -> None:
    """Drain the audit dead-letter-queue Redis Streams into PostgreSQL, losing nothing."""


@cli.command()
@config_options
def run(config_path: str | None, **flags: Any) -> None:
    """Run the worker until SIGTERM/SIGINT.

    \b
    Example:
      REDIS_ADDR=redis:6379 DB_HOST=postgres DB_PASSWORD_FILE=/secrets/pw dlq-worker run
    """
    cfg = load_config(config_path, flags)
    logs.setup(cfg.log.level, cfg.log.format)
    sys.exit(serve(cfg))


@cli.command("check-config")
@config_options
@click.option("--show", is_flag=True, help="Print the effective configuration (secrets masked).")
def check_config(config_path: str | None, show: bool, **flags: Any) -> None:
    """Validate the configuration without connecting to anything.

    \b
    Example:
      dlq-worker check-config -c worker.yaml --show
    """
    cfg = load_config(config_path, flags)
    if show:
        click.echo(json.dumps(config_mod.describe(cfg), indent=2))
    else:
        click.echo(f"configuration ok ({config_path or 'defaults + environment'})")


@cli.group()
def db() -> None:
    """Database schema commands."""


@db.command("init")
@config_options
@click.option("--months-back", default=3, show_default=True, help="Partitions before this month.")
@click.option("--months-ahead", default=3, show_default=True, help="Partitions after this month.")
def db_init(config_path: str | None, months_back: int, months_ahead: int, **flags: Any) -> None:
    """Create audit_events (monthly partitions) and notification_audit, idempotently.

    \b
    Example:
      DB_HOST=localhost DB_USER=postgres dlq-worker db init --months-ahead 6
    """
    from dlq_worker.sink import Sink

    cfg = load_config(config_path, flags)
    sink = Sink(cfg.database)
    try:
        partitions = sink.init_schema(months_back, months_ahead)
    except TransientError as exc:
        raise StartupError(f"PostgreSQL {cfg.database.host}:{cfg.database.port}: {exc}") from exc
    finally:
        sink.close()
    click.echo(f"schema ready in {cfg.database.name}: audit_events "
               f"({len(partitions)} partitions {partitions[0]}..{partitions[-1]}), "
               "notification_audit")


@cli.command()
@click.option("--entries", default=5000, show_default=True, help="DLQ entries to produce.")
@click.option("--poison", default=3, show_default=True, help="Malformed entries among them.")
@click.option("--keep", is_flag=True, help="Leave the servers running until Ctrl-C.")
@click.option("--servers-only", is_flag=True,
              help="Only start the throwaway servers (with the schema), print where they are "
                   "and how to point the CLI at them, and keep them until Ctrl-C.")
def demo(entries: int, poison: int, keep: bool, servers_only: bool) -> None:
    """Run the worker end to end on throwaway local Redis and PostgreSQL servers.

    Ctrl-C or SIGTERM stops the servers and removes their files.

    \b
    Example:
      dlq-worker demo --entries 20000
      dlq-worker demo --keep
      dlq-worker demo --servers-only
    """
    from dlq_worker.demo import run_demo

    logs.setup("warning", "console")
    run_demo(entries=entries, poison=poison, keep=keep, servers_only=servers_only)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(exitcodes.ERROR)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"dlq-worker: config error: {exc}", err=True)
        sys.exit(exitcodes.CONFIG)
    except StartupError as exc:
        click.echo(f"dlq-worker: startup failed: {exc}", err=True)
        sys.exit(exitcodes.UNAVAILABLE)
    except TransientError as exc:
        click.echo(f"dlq-worker: unavailable: {exc}", err=True)
        sys.exit(exitcodes.UNAVAILABLE)
    except NotFound as exc:
        click.echo(f"dlq-worker: {exc}", err=True)
        sys.exit(exitcodes.NOT_FOUND)
    except NoRoom as exc:
        click.echo(f"dlq-worker: {exc}", err=True)
        sys.exit(exitcodes.NO_ROOM)
    except DlqWorkerError as exc:
        click.echo(f"dlq-worker: {exc}", err=True)
        sys.exit(exitcodes.ERROR)


# The operator commands register themselves on ``cli``.
from dlq_worker import cli_chain, cli_ops  # noqa: E402, F401
