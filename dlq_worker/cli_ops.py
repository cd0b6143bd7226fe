"""Operator commands: status, peek, dead-letter, doctor, move. Every read command has --json."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import redis

from dlq_worker import deadletter as dl
from dlq_worker import doctor as doctor_mod
from dlq_worker.cli import cli, config_options, flag_overrides, load_config
from dlq_worker.config import Config, RedisConfig
from dlq_worker.errors import ConfigError
from dlq_worker.move import count_entries, stream_keys
from dlq_worker.move import move as move_streams
from dlq_worker.source import make_client, translated
from dlq_worker.status import (
    check_id,
    describe_for_humans,
    format_status,
    gather_status,
    resolve_stream,
)


def _client(cfg: Config) -> redis.Redis:
    client = make_client(cfg.redis)
    with translated(f"PING {cfg.redis.host}:{cfg.redis.port}"):
        client.ping()
    return client


def _emit(doc: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(doc, indent=2, default=str) if as_json else text)


@cli.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="Refresh every SECONDS until Ctrl-C.")
@click.option("--metrics-url", help="A worker's /metrics, to add its counters.")
def status(config_path: str | None, as_json: bool, watch: float | None,
           metrics_url: str | None, **flags: Any) -> None:
    """How bad is it: depth, cap, pending, lag, age, consumers, parked, lost, per stream.

    \b
    Example:
      dlq-worker status --metrics-url http://dlq-worker:8080/metrics
      dlq-worker status --json | jq '.streams[] | {stream, depth, lag}'
    """
    cfg = load_config(config_path, flags)
    client = _client(cfg)
    try:
        while True:
            doc = gather_status(client, cfg, metrics_url)
            if watch:
                click.clear()
            _emit(doc, as_json, format_status(doc))
            if not watch:
                break
            time.sleep(watch)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


@cli.command()
@config_options
@click.argument("stream")
@click.option("--count", "-n", default=10, show_default=True, help="Entries to show.")
@click.option("--from", "from_id", default="-", help="First entry ID (default: the oldest).")
@click.option("--payload", is_flag=True, help="Include the record itself.")
@click.option("--show-sensitive", is_flag=True, help="Do not redact is_sensitive records.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def peek(config_path: str | None, stream: str, count: int, from_id: str, payload: bool,
         show_sensitive: bool, as_json: bool, **flags: Any) -> None:
    """Show entries of a DLQ (or dead-letter) stream, decoded for humans.

    \b
    Example:
      dlq-worker peek events --count 5
      dlq-worker peek audit:dlq:notifications --from 1732700000000-0 --payload
    """
    cfg = load_config(config_path, flags)
    if from_id != "-":
        check_id(from_id)
    client = _client(cfg)
    try:
        key = resolve_stream(cfg, client, stream)
        with translated(f"XRANGE {key}"):
            rows: Any = client.xrange(key, min=from_id, count=count)
        entries = [describe_for_humans(cfg, key, raw_id.decode(), fields, payload=payload,
                                       show_sensitive=show_sensitive) for raw_id, fields in rows]
    finally:
        client.close()
    if as_json:
        _emit(entries, True, "")
        return
    for e in entries:
        click.echo(f"{e['id']}  type={e.get('type')}  record={e.get('record_id')}  "
                   f"correlation={e.get('correlation_id')}  at={e.get('timestamp')}  "
                   f"retry_count={e.get('retry_count')}  decode={e['decode']}")
        if e.get("last_error"):
            click.echo(f"    last_error: {e['last_error']}")
        if e.get("reason"):
            click.echo(f"    parked: {e['reason']} ({e.get('error_class')}): {e.get('error')}")
        if "payload" in e:
            click.echo("    payload: " + json.dumps(e["payload"], default=str))
    if not entries:
        click.echo(f"(no entries in {key} from {from_id})")


@cli.group("dead-letter")
def dead_letter() -> None:
    """Parked entries: list, show, replay, purge."""


def _selection_options(func: Any) -> Any:
    for option in reversed([
        click.option("--id", "ids", multiple=True, help="A parked entry ID (repeatable)."),
        click.option("--stream", help="Only this type: events, notifications..."),
        click.option("--reason", help="Only this reason, e.g. value_too_long."),
        click.option("--error-class", help="Only this class: DecodeError, RejectedError..."),
    ]):
        func = option(func)
    return func


@dead_letter.command("list")
@config_options
@_selection_options
@click.option("--count", "-n", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dl_list(config_path: str | None, ids: tuple[str, ...], stream: str | None,
            reason: str | None, error_class: str | None, count: int, as_json: bool,
            **flags: Any) -> None:
    """List parked entries with their reasons.

    \b
    Example:
      dlq-worker dead-letter list --reason value_too_long
    """
    cfg = load_config(config_path, flags)
    client = _client(cfg)
    try:
        store = dl.DeadLetters(client, cfg)
        selection = dl.Selection(ids, stream, reason, error_class)
        entries = [e.summary() for e in store.iterate(selection, limit=count)]
    finally:
        client.close()
    text = "\n".join(f"{e['id']}  {e['original_stream']} {e['original_id']}  {e['reason']} "
                     f"({e['error_class']}, {e['final_retry_count']} deliveries, in trouble "
                     f"since {e['first_failed_at'] or 'unknown'})  "
                     f"{e['error'][:80]}" for e in entries) or "(no parked entries)"
    _emit(entries, as_json, text)


@dead_letter.command("show")
@config_options
@click.argument("entry_id")
@click.option("--payload", is_flag=True, help="Include the record itself.")
@click.option("--show-sensitive", is_flag=True, help="Do not redact is_sensitive records.")
@click.option("--json", "as_json", is_flag=True)
def dl_show(config_path: str | None, entry_id: str, payload: bool, show_sensitive: bool,
            as_json: bool, **flags: Any) -> None:
    """Show one parked entry: why it was parked, and the record.

    \b
    Example:
      dlq-worker dead-letter show 1732700000000-0 --payload
    """
    cfg = load_config(config_path, flags)
    client = _client(cfg)
    try:
        entry = dl.DeadLetters(client, cfg).show(entry_id)
    finally:
        client.close()
    doc = describe_for_humans(cfg, entry.dead_letter_stream, entry.id, entry.fields,
                              payload=payload, show_sensitive=show_sensitive)
    _emit(doc, as_json, "\n".join(f"{k}: {v}" for k, v in doc.items()))


@dead_letter.command("replay")
@config_options
@_selection_options
@click.option("--all", "everything", is_flag=True, help="Every parked entry.")
@click.option("--dry-run", is_flag=True, help="Only say what would be replayed.")
def dl_replay(config_path: str | None, ids: tuple[str, ...], stream: str | None,
              reason: str | None, error_class: str | None, everything: bool, dry_run: bool,
              **flags: Any) -> None:
    """Move parked entries back to their DLQ stream, unchanged, for the worker to retry.

    Each entry moves atomically: at no moment is it in neither place, nor in both.

    \b
    Example:
      dlq-worker dead-letter replay --reason missing_partition --dry-run
      dlq-worker dead-letter replay --all
    """
    cfg = load_config(config_path, flags)
    client = _client(cfg)
    try:
        store = dl.DeadLetters(client, cfg)
        entries = store.select(dl.Selection(ids, stream, reason, error_class, everything))
        counts = _by_target(store, entries)
        if dry_run:
            click.echo(f"would replay {len(entries)} entries: {json.dumps(counts)}")
            return
        with click.progressbar(length=len(entries), label="replaying", file=sys.stderr,
                               show_pos=True) as bar:
            moved = store.replay(entries, progress=bar.update)
    finally:
        client.close()
    click.echo(f"replayed {sum(moved.values())} entries: {json.dumps(moved)}")


@dead_letter.command("purge")
@config_options
@_selection_options
@click.option("--all", "everything", is_flag=True, help="Every parked entry.")
@click.option("--yes", is_flag=True, help="Really delete (required).")
def dl_purge(config_path: str | None, ids: tuple[str, ...], stream: str | None,
             reason: str | None, error_class: str | None, everything: bool, yes: bool,
             **flags: Any) -> None:
    """Delete parked entries for good (only parked ones; only with --yes).

    \b
    Example:
      dlq-worker dead-letter purge --id 1732700000000-0 --yes
    """
    cfg = load_config(config_path, flags)
    client = _client(cfg)
    try:
        store = dl.DeadLetters(client, cfg)
        entries = store.select(dl.Selection(ids, stream, reason, error_class, everything))
        if not yes:
            raise click.UsageError(
                f"{len(entries)} parked entries selected; nothing deleted without --yes")
        removed = store.purge(entries)
    finally:
        client.close()
    click.echo(f"purged {sum(removed.values())} parked entries: {json.dumps(removed)}")


def _by_target(store: dl.DeadLetters, entries: list[dl.Parked]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        target = store.target_stream(entry)
        counts[target] = counts.get(target, 0) + 1
    return counts


@cli.command()
@config_options
@click.option("--json", "as_json", is_flag=True)
def doctor(config_path: str | None, as_json: bool, **flags: Any) -> None:
    """Check everything no-loss depends on; say what to do. Exit 0 pass, 1 warn, 2 fail.

    \b
    Example:
      dlq-worker doctor -c worker.yaml
    """
    overrides = flag_overrides(flags)
    checks = doctor_mod.run_checks(config_path, overrides)
    worst = doctor_mod.overall(checks)
    _emit({"status": worst, "checks": [c.__dict__ for c in checks]}, as_json,
          doctor_mod.format_checks(checks))
    sys.exit(doctor_mod.EXIT[worst])


@cli.command()
@config_options
@click.option("--to", "to_url", required=True, help="Target: redis[s]://host:port")
@click.option("--db", "to_db", type=int, default=None, help="Target database (default: same).")
def move(config_path: str | None, to_url: str, to_db: int | None, **flags: Any) -> None:
    """Move every DLQ and dead-letter stream to another Redis, resumably, losing nothing.

    Entries keep their IDs; each is deleted from the source only once verified on the
    target. Safe to re-run after an interruption.

    \b
    Example:
      dlq-worker move --to redis://dlq-redis:6379 --db 0
    """
    cfg = load_config(config_path, flags)
    target_cfg = RedisConfig(addr=to_url, db=cfg.redis.db if to_db is None else to_db,
                             username=cfg.redis.username, password=cfg.redis.password)
    if (target_cfg.host, target_cfg.port, target_cfg.db) == \
            (cfg.redis.host, cfg.redis.port, cfg.redis.db):
        raise ConfigError("--to: the target is the source itself")
    source, target = _client(cfg), make_client(target_cfg)
    try:
        with translated(f"PING {target_cfg.host}:{target_cfg.port}"):
            target.ping()
        total = count_entries(source, stream_keys(source, cfg))
        with click.progressbar(length=total, label="moving", file=sys.stderr,
                               show_pos=True) as bar:
            report = move_streams(source, target, cfg, progress=bar.update)
    finally:
        source.close()
        target.close()
    click.echo(f"moved {sum(report.streams.values())} entries in {len(report.streams)} streams "
               f"(copied {report.copied}, already on target {report.already_there}, "
               f"deleted from source {report.deleted}): {json.dumps(report.streams)}")
