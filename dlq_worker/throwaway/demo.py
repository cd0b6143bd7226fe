"""`dlq-worker demo`: the whole path on throwaway servers, for a first look."""

from __future__ import annotations

import random
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import click
import redis
from sqlalchemy import text

from dlq_worker import config as config_mod
from dlq_worker import producer
from dlq_worker.app import App
from dlq_worker.throwaway import samples
from dlq_worker.throwaway.embedded import PostgresProcess, RedisProcess


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the same clean-up as Ctrl-C: servers stopped, files removed


def _where(redis_port: int, pg_port: int) -> None:
    click.echo(f"Redis: 127.0.0.1:{redis_port} (DB 1)   PostgreSQL: 127.0.0.1:{pg_port} "
               "(database action_history, user postgres)")
    click.echo("point the CLI at them with:")
    click.echo(f"  export REDIS_ADDR=127.0.0.1:{redis_port} REDIS_DB=1 DB_HOST=127.0.0.1 "
               f"DB_PORT={pg_port} DB_USER=postgres")


def run_demo(entries: int, poison: int, keep: bool, servers_only: bool = False) -> None:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    root = Path(tempfile.mkdtemp(prefix="dlq-demo-"))
    root.chmod(0o755)  # the PostgreSQL cluster may belong to another OS user
    # AOF on, as production's should be: the worker would rightly warn about a Redis that
    # keeps nothing on disk.
    redis_server = RedisProcess(root / "redis", appendonly=True)
    postgres = PostgresProcess(root / "pg")
    try:
        click.echo(f"starting throwaway Redis and PostgreSQL in {root} ...")
        redis_server.start()
        postgres.start()
        postgres.create_database("action_history")
        cfg = config_mod.load(env={
            "REDIS_ADDR": redis_server.addr, "REDIS_DB": "1",
            "DB_HOST": "127.0.0.1", "DB_PORT": str(postgres.port), "DB_USER": "postgres",
        }, overrides={"http": {"port": 0, "host": "127.0.0.1"}})

        app = App(cfg)
        partitions = app.sink.init_schema()
        click.echo(f"schema created: audit_events ({len(partitions)} monthly partitions), "
                   "notification_audit")
        if servers_only:
            _where(redis_server.port, postgres.port)
            click.echo("servers running; Ctrl-C (or SIGTERM) stops them and removes their files")
            while True:
                time.sleep(3600)

        client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=1)
        rng = random.Random(7)
        pipe = client.pipeline(transaction=False)
        n_events = n_notes = 0
        for i in range(entries):
            if i % 5 == 4:
                message = producer.build_message(producer.NOTIFICATION, samples.notification(rng))
                pipe.xadd("audit:dlq:notifications", {"message": message}, maxlen=10000,
                          approximate=True)
                n_notes += 1
            else:
                record = samples.audit_event(rng, full=i % 3 == 0)
                message = producer.build_message(producer.AUDIT_EVENT, record)
                pipe.xadd("audit:dlq:events", {"message": message}, maxlen=10000,
                          approximate=True)
                n_events += 1
        for i in range(poison):
            pipe.xadd("audit:dlq:events",
                      {"message": samples.POISON_MESSAGES[i % len(samples.POISON_MESSAGES)]})
        pipe.execute()
        click.echo(f"produced {n_events} audit events and {n_notes} notification records "
                   f"in the contract's wire format, plus {poison} malformed entries")
        if poison:
            click.echo(f"the {poison} malformed entries are planted: the worker parks each in "
                       "the dead-letter stream with its reason, so the ERROR lines below are "
                       "expected")

        thread = threading.Thread(target=app.run, name="worker", daemon=True)
        started = time.monotonic()
        thread.start()
        while True:
            depth = client.xlen("audit:dlq:events") + client.xlen("audit:dlq:notifications")
            if depth == 0:
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        total = entries + poison
        click.echo(f"drained {total} entries in {elapsed:.2f}s "
                   f"({total / elapsed:,.0f} entries/s, including worker start-up)")

        with app.sink.engine.connect() as conn:
            events = conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one()
            notes = conn.execute(text("SELECT count(*) FROM notification_audit")).scalar_one()
            sample = conn.execute(text(
                "SELECT event_id, event_date, event_type, correlation_id, "
                "event_data->>'signal_name' AS signal FROM audit_events LIMIT 1")).one()
        click.echo(f"rows: audit_events={events} notification_audit={notes}")
        click.echo(f"sample row: {dict(sample._mapping)}")
        parked: Any = client.xrange("audit:dead-letter:events")
        click.echo(f"parked in audit:dead-letter:events: {len(parked)}")
        for entry_id, fields in parked:
            # the entry's own ID, as the ERROR lines above name it, and its dead letter's
            click.echo(f"  entry {fields[b'original_id'].decode()} (dead letter "
                       f"{entry_id.decode()})  reason={fields[b'reason'].decode()}  "
                       f"error={fields[b'error'].decode()[:80]}")

        assert app.http is not None
        base = f"http://127.0.0.1:{app.http.port}"
        click.echo(f"endpoints: {base}/healthz {base}/readyz {base}/metrics"
                   + ("" if keep else " (they stop with the demo: `dlq-worker demo --keep` "
                      "keeps the servers and the endpoints up until Ctrl-C)"))
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:  # noqa: S310
            body = resp.read().decode()
        click.echo("selected metrics:")
        for line in body.splitlines():
            interesting = line.startswith((
                "dlq_worker_entries_written_total", "dlq_worker_entries_parked_total",
                "dlq_worker_flush_duration_seconds_count"))
            if interesting and not line.rstrip().endswith(" 0.0"):
                click.echo(f"  {line}")
        if keep:
            _where(redis_server.port, postgres.port)
            click.echo("servers kept running; Ctrl-C (or SIGTERM) stops them")
            while True:
                time.sleep(3600)
        app.stop()
        thread.join(timeout=30)
        client.close()
    except KeyboardInterrupt:
        pass
    finally:
        # A second signal must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        postgres.stop()
        redis_server.stop()
        shutil.rmtree(root, ignore_errors=True)
