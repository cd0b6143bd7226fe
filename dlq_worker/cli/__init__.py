"""The ``dlq-worker`` command line (click): the group, every command registered from
here (each is defined in its own module, which never imports this one), and the exit
code every error ends with."""

from __future__ import annotations

import sys

import click

from dlq_worker import __version__, exitcodes
from dlq_worker.cli import chain, ops, worker
from dlq_worker.errors import (
    ConfigError,
    DlqWorkerError,
    NoRoom,
    NotFound,
    StartupError,
    TransientError,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dlq-worker")
def cli() -> None:
    """Drain the audit dead-letter-queue Redis Streams into PostgreSQL, losing nothing."""


for command in [*worker.COMMANDS, *ops.COMMANDS, *chain.COMMANDS]:
    cli.add_command(command)


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
