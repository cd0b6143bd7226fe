"""The worker's own commands: run it, check its configuration, create the schema, the demo."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from dlq_worker import config as config_mod
from dlq_worker import logs
from dlq_worker.app import serve
from dlq_worker.cli.options import config_options, load_config
from dlq_worker.errors import StartupError, TransientError


@click.command()
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


@click.command("check-config")
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


@click.group()
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
    from dlq_worker.drain.sink import Sink

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


@click.command()
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
    from dlq_worker.throwaway.demo import run_demo

    logs.setup("warning", "console")
    run_demo(entries=entries, poison=poison, keep=keep, servers_only=servers_only)


COMMANDS = [run, check_config, db, demo]
