"""Operator commands: status, peek, dead-letter, doctor, move. Every read command has --json."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import time
from typing import Any

import click
import redis

from dlq_worker import config as config_mod
from dlq_worker import exitcodes
from dlq_worker.cli.options import config_options, flag_overrides, load_config
from dlq_worker.config import Config, RedisConfig
from dlq_worker.drain.redis_io import make_client, translated
from dlq_worker.errors import ConfigError
from dlq_worker.ops import deadletter as dl
from dlq_worker.ops import doctor as doctor_mod
from dlq_worker.ops.move import Pace, count_entries, stream_keys
from dlq_worker.ops.move import move as move_streams
from dlq_worker.ops.status import (
    check_id,
    describe_for_humans,
    format_status,
    gather_status,
    resolve_stream,
)
from dlq_worker.watch import control


def _client(cfg: Config) -> redis.Redis:
    client = make_client(cfg.redis)
    with translated(f"PING {cfg.redis.host}:{cfg.redis.port}"):
        client.ping()
    return client


def _emit(doc: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(doc, indent=2, default=str) if as_json else text)


@click.command()
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


@click.command()
@config_options
@click.option("--reason", default="", help="Why: shown in status, /readyz and the log.")
def pause(config_path: str | None, reason: str, **flags: Any) -> None:
    """Stop every replica of this consumer group taking new entries.

    Within one poll each replica finishes what it holds (written and acknowledged) and
    then reads, claims and retries nothing until `resume`. The pause is kept in Redis: it
    survives restarts and new replicas obey it. Use it for PostgreSQL maintenance instead
    of scaling to zero: the pods stay up, ready, and show that they are paused.

    \b
    Example:
      dlq-worker pause --reason "PostgreSQL upgrade, ticket OPS-123"
    """
    cfg = load_config(config_path, flags)
    client = _client(cfg)
    try:
        with translated("pause"):
            found = control.pause(client, cfg.streams.group, reason)
    finally:
        client.close()
    click.echo(f"group {cfg.streams.group}: {found.describe()}")


@click.command()
@config_options
def resume(config_path: str | None, **flags: Any) -> None:
    """Lift a pause: every replica takes new entries again within one poll.

    \b
    Example:
      dlq-worker resume
    """
    cfg = load_config(config_path, flags)
    client = _client(cfg)
    try:
        with translated("resume"):
            lifted = control.resume(client, cfg.streams.group)
    finally:
        client.close()
    if lifted is None:
        click.echo(f"group {cfg.streams.group}: was not paused")
    else:
        click.echo(f"group {cfg.streams.group}: resumed ({lifted.describe()})")


@click.command()
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
        # What could not be decoded is left out, not printed as None
        facts = [f"{label}={e[name]}" for label, name in (
            ("type", "type"), ("record", "record_id"), ("correlation", "correlation_id"),
            ("at", "timestamp"), ("retry_count", "retry_count")) if e.get(name) is not None]
        click.echo("  ".join([e["id"], *facts, f"decode={e['decode']}"]))
        if e.get("last_error"):
            click.echo(f"    last_error: {e['last_error']}")
        if e.get("reason"):
            click.echo(f"    parked: {e['reason']} ({e.get('error_class')}): {e.get('error')}")
        if "payload" in e:
            click.echo("    payload: " + json.dumps(e["payload"], default=str))
    if not entries:
        click.echo(f"(no entries in {key} from {from_id})")


@click.group("dead-letter")
def dead_letter() -> None:
    """Parked entries: list, show, replay, purge."""


def _selection_options(func: Any) -> Any:
    for option in reversed([
        click.option("--id", "ids", multiple=True, help="A parked entry ID (repeatable)."),
        click.option("--stream", help="Only this type: events, notifications..."),
        click.option("--reason", help="Only this reason, e.g. value_too_long."),
        click.option("--error-class", help="Only this class: DecodeError, RejectedError..."),
        click.option("--since", metavar="WHEN",
                     help="Only entries parked at or after WHEN: RFC 3339 time, a date, or "
                          "a duration ago (24h, 7d)."),
        click.option("--until", metavar="WHEN", help="Only entries parked before WHEN."),
    ]):
        func = option(func)
    return func


def _when_ms(text: str | None, option: str) -> int | None:
    """WHEN as Unix milliseconds: an RFC 3339 time, a date (midnight UTC), or a duration
    ago."""
    if text is None:
        return None
    ago = config_mod.duration_seconds(text, unit_required=True)
    if ago is not None:
        return int((time.time() - ago) * 1000)
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"expects an RFC 3339 time, a date or a duration (24h), "
                                 f"got {text!r}", param_hint=option) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def _selection(ids: tuple[str, ...], stream: str | None, reason: str | None,
               error_class: str | None, since: str | None, until: str | None,
               everything: bool = False, after: str | None = None, *,
               required: bool = False) -> dl.Selection:
    selection = dl.Selection(ids, stream, reason, error_class, everything,
                             since_ms=_when_ms(since, "--since"),
                             until_ms=_when_ms(until, "--until"), after=after)
    if required and selection.empty:  # a usage error (exit 2), not "not found"
        raise click.UsageError("select entries with --id, --stream, --reason, --error-class, "
                               "--since/--until or --all")
    return selection


@dead_letter.command("list")
@config_options
@_selection_options
@click.option("--count", "-n", default=100, show_default=True, help="Entries per page.")
@click.option("--after", metavar="ID", help="The next page: entries after this parked ID.")
@click.option("--json", "as_json", is_flag=True)
def dl_list(config_path: str | None, ids: tuple[str, ...], stream: str | None,
            reason: str | None, error_class: str | None, since: str | None,
            until: str | None, count: int, after: str | None, as_json: bool,
            **flags: Any) -> None:
    """List parked entries, oldest first, with their reasons, a page at a time.

    \b
    Example:
      dlq-worker dead-letter list --reason value_too_long
      dlq-worker dead-letter list --since 24h --count 50
      dlq-worker dead-letter list --since 24h --count 50 --after 1732700000000-0
    """
    cfg = load_config(config_path, flags)
    client = _client(cfg)
    try:
        store = dl.DeadLetters(client, cfg)
        selection = _selection(ids, stream, reason, error_class, since, until, after=after)
        entries = [e.summary() for e in store.iterate(selection, limit=count + 1)]
    finally:
        client.close()
    more = len(entries) > count
    entries = entries[:count]
    text = "\n".join(f"{e['id']}  parked {e['parked_at']} by {e['parked_by']}  "
                     f"{e['original_stream']} "
                     f"{e['original_id']}  {e['reason']} ({e['error_class']}, "
                     f"{_deliveries(e['final_retry_count'])}, first failed "
                     f"{e['first_failed_at'] or 'unknown'})  "
                     f"{e['error'][:80]}" for e in entries) or "(no parked entries)"
    _emit(entries, as_json, text)
    if more:  # on stderr: the JSON on stdout stays a plain list (page with the last ID)
        click.echo(f"more: next page with --after {entries[-1]['id']}", err=True)


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
@click.option("--max-fill", type=click.FloatRange(0.01, 0.9), default=0.5, show_default=True,
              help="Never fill a DLQ stream past this fraction of the producers' cap.")
@click.option("--wait", "wait_seconds", type=click.FloatRange(0), default=600.0,
              show_default=True, help="Seconds to wait for the worker to make room.")
def dl_replay(config_path: str | None, ids: tuple[str, ...], stream: str | None,
              reason: str | None, error_class: str | None, since: str | None,
              until: str | None, everything: bool, dry_run: bool, max_fill: float,
              wait_seconds: float, **flags: Any) -> None:
    """Move parked entries back to their DLQ stream, unchanged, for the worker to retry.

    Each entry moves atomically: at no moment is it in neither place, nor in both.

    The producers cap each stream (XADD MAXLEN ~ streams.max_length) and trim the oldest
    entries, read or not: a replay that filled a stream past the cap would delete records.
    So it never fills a stream past --max-fill of the cap. While a stream is that full it
    paces itself against the worker's drain, and after --wait seconds without room it
    stops (exit 9), leaving the rest parked; run it again to go on.

    \b
    Example:
      dlq-worker dead-letter replay --reason missing_partition --dry-run
      dlq-worker dead-letter replay --all
      dlq-worker dead-letter replay --all --max-fill 0.3 --wait 60
    """
    cfg = load_config(config_path, flags)
    client = _client(cfg)
    try:
        store = dl.DeadLetters(client, cfg)
        entries = store.select(_selection(ids, stream, reason, error_class, since, until,
                                          everything, required=True))
        counts = _by_target(store, entries)
        if dry_run:
            click.echo(f"would replay {len(entries)} entries: {json.dumps(counts)}")
            return
        with click.progressbar(length=len(entries), label="replaying", file=sys.stderr,
                               show_pos=True) as bar:
            moved = store.replay(entries, progress=bar.update, max_fill=max_fill,
                                 wait=wait_seconds)
    finally:
        client.close()
    click.echo(f"replayed {sum(moved.values())} entries: {json.dumps(moved)}")


@dead_letter.command("purge")
@config_options
@_selection_options
@click.option("--all", "everything", is_flag=True, help="Every parked entry.")
@click.option("--older-than", metavar="DURATION",
              help="Only entries parked longer ago than this (e.g. 90d).")
@click.option("--yes", is_flag=True, help="Really delete (required).")
def dl_purge(config_path: str | None, ids: tuple[str, ...], stream: str | None,
             reason: str | None, error_class: str | None, since: str | None,
             until: str | None, everything: bool, older_than: str | None, yes: bool,
             **flags: Any) -> None:
    """Delete parked entries for good (only parked ones; only with --yes).

    \b
    Example:
      dlq-worker dead-letter purge --id 1732700000000-0 --yes
      dlq-worker dead-letter purge --older-than 90d --yes
    """
    selection = _selection(ids, stream, reason, error_class, since, until, everything,
                           required=older_than is None)
    if older_than is not None:
        if config_mod.duration_seconds(older_than, unit_required=True) is None:
            raise click.BadParameter(f"expects a duration (90d, 12h), got {older_than!r}",
                                     param_hint="--older-than")
        cutoff = _when_ms(older_than, "--older-than")
        assert cutoff is not None
        selection = dataclasses.replace(selection, until_ms=min(
            cutoff, selection.until_ms if selection.until_ms is not None else cutoff))
    cfg = load_config(config_path, flags)
    client = _client(cfg)
    try:
        store = dl.DeadLetters(client, cfg)
        entries = store.select(selection)
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


@click.command()
@config_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--fail-on", type=click.Choice(["warn", "fail"]), default="warn",
              show_default=True,
              help="The worst result that still exits 0 is the one below this.")
def doctor(config_path: str | None, as_json: bool, fail_on: str, **flags: Any) -> None:
    """Check everything no-loss depends on; say what to do. Exit 0 pass, 6 warn, 7 fail
    (with --fail-on fail, warnings exit 0: what `helm test` runs).

    \b
    Example:
      dlq-worker doctor -c worker.yaml
    """
    overrides = flag_overrides(flags)
    checks = doctor_mod.run_checks(config_path, overrides, flags.get("platform_config"))
    worst = doctor_mod.overall(checks)
    _emit({"status": worst, "checks": [c.__dict__ for c in checks]}, as_json,
          doctor_mod.format_checks(checks))
    if fail_on == "fail" and worst == doctor_mod.WARN:
        sys.exit(exitcodes.OK)
    sys.exit(doctor_mod.EXIT[worst])


@click.command()
@config_options
@click.option("--to", "to_url", required=True, help="Target: redis[s]://host:port")
@click.option("--db", "to_db", type=int, default=None, help="Target database (default: same).")
@click.option("--max-fill", type=click.FloatRange(0.01, 0.9), default=0.5, show_default=True,
              help="Never fill a DLQ stream on the target past this fraction of the "
                   "producers' cap.")
@click.option("--wait", "wait_seconds", type=click.FloatRange(0), default=600.0,
              show_default=True, help="Seconds to wait for a worker there to make room.")
def move(config_path: str | None, to_url: str, to_db: int | None, max_fill: float,
         wait_seconds: float, **flags: Any) -> None:
    """Move every DLQ and dead-letter stream to another Redis, resumably, losing nothing.

    Entries keep their IDs; each is deleted from the source only once it is verified on
    the target, or recorded there as copied (a worker on the target may have drained it
    since). Safe to re-run after an interruption.

    The producers cap each DLQ stream (XADD MAXLEN ~ streams.max_length) and trim the
    oldest entries, read or not. So the move never fills a stream on the target past
    --max-fill of the cap: while it is that full it waits for a worker there to drain it,
    and after --wait seconds without room it stops (exit 9) with the rest still in the
    source; run it again to go on.

    \b
    Example:
      dlq-worker move --to redis://dlq-redis:6379 --db 0
      dlq-worker move --to redis://dlq-redis:6379 --max-fill 0.3 --wait 60
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
            report = move_streams(source, target, cfg, progress=bar.update,
                                  pace=Pace(max_fill=max_fill, wait=wait_seconds))
    finally:
        source.close()
        target.close()
    click.echo(f"moved {sum(report.streams.values())} entries in {len(report.streams)} streams "
               f"(copied {report.copied}, already on target {report.already_there}, "
               f"deleted from source {report.deleted}): {json.dumps(report.streams)}")


def _deliveries(count: Any) -> str:
    return f"{count} delivery" if str(count) == "1" else f"{count} deliveries"


COMMANDS = [status, pause, resume, peek, dead_letter, doctor, move]
