"""``dlq-worker verify-chain``: check the platform's hash chains without the platform's API."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

import click

from dlq_worker import chain, exitcodes
from dlq_worker.cli.options import config_options, load_config
from dlq_worker.drain.sink import Sink
from dlq_worker.errors import ConfigError, NotFound, StartupError


@click.command("verify-chain")
@config_options
@click.argument("correlation_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every chain with an event since --since.")
@click.option("--since", help="With --all: RFC 3339 time or a date (default: 24 hours ago).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_chain(config_path: str | None, correlation_ids: tuple[str, ...], everything: bool,
                 since: str | None, as_json: bool, **flags: Any) -> None:
    """Verify audit_events hash chains the way the platform's verify-chain does.

    Exit 0 when every chain verifies, 8 when one does not (the rows are listed), 5 when
    no event has the correlation ID. Unhashed rows (late or written with the chain off)
    are counted, and left out as the platform leaves them out. The HMAC key comes from
    DLQ_WORKER_DATABASE_HASH_CHAIN_KEY or database.hash_chain_key_file.

    \b
    Example:
      dlq-worker verify-chain rr-2026-001
      dlq-worker verify-chain --all --since 2026-11-01
    """
    cfg = load_config(config_path, flags)
    if not correlation_ids and not everything:
        raise click.UsageError("give one or more CORRELATION_IDs, or --all")
    if correlation_ids and everything:
        raise click.UsageError("give CORRELATION_IDs or --all, not both")
    key = cfg.database.hash_chain_key.encode() if cfg.database.hash_chain_key else None
    sink = Sink(cfg.database)
    try:
        with sink.engine.connect() as conn:
            ids = list(correlation_ids) or chain.correlation_ids_since(conn, _since(since))
            reports = chain.verify(conn, ids, key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:
        raise StartupError(f"PostgreSQL {cfg.database.host}:{cfg.database.port}: "
                           f"{_reason(exc)}") from exc
    finally:
        sink.close()
    if correlation_ids and all(r.total_events + r.skipped_null_hash == 0 for r in reports):
        raise NotFound(f"no audit events for {', '.join(correlation_ids)}")
    if as_json:
        click.echo(json.dumps([{"correlation_id": r.correlation_id, "is_valid": r.valid,
                                "total_events": r.total_events,
                                "verified_events": r.verified_events,
                                "skipped_null_hash": r.skipped_null_hash,
                                "tampered_events": [{"event_id": e, "message": m}
                                                    for e, m in r.tampered]}
                               for r in reports], indent=2))
    else:
        # Tampered chains first; with --all the valid ones are a count, not a line each
        for r in sorted(reports, key=lambda r: (r.valid, r.correlation_id)):
            if r.valid and everything:
                continue
            state = "ok" if r.valid else "TAMPERED"
            click.echo(f"{r.correlation_id}: {state}: {r.verified_events}/{r.total_events} "
                       f"hashed events verified, {r.skipped_null_hash} unhashed left out")
            for event_id, message in r.tampered:
                click.echo(f"    {event_id}: {message}")
        bad = [r for r in reports if not r.valid]
        click.echo(f"{len(reports)} chains: {len(reports) - len(bad)} verify, {len(bad)} "
                   f"tampered; {sum(r.verified_events for r in reports)} events verified, "
                   f"{sum(r.skipped_null_hash for r in reports)} unhashed left out")
    if not all(r.valid for r in reports):
        sys.exit(exitcodes.TAMPERED)


def _since(text: str | None) -> dt.datetime:
    if not text:
        return dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"--since expects an RFC 3339 time or a date, got {text!r}") \
            from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _reason(exc: BaseException) -> str:
    """The driver's first line (connection refused, authentication failed...): no SQL,
    no parameters, no password (SQLAlchemy hides parameters; a DSN is never printed)."""
    orig: Any = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0][:240] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first}" if first else type(orig).__name__


COMMANDS = [verify_chain]
