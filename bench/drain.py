"""Drain-rate benchmark: a backlog in the producers' wire format, one worker, wall time.

    python bench/drain.py --entries 20000            # own throwaway servers (fsync on)
    python bench/drain.py --entries 20000 --repeat 3 # several runs, one JSON line each

The full backlog is written first; the clock runs from the worker's start to the moment
both streams' XLEN is 0 (entries are deleted only after their rows are committed), so it
includes the worker's start-up. Servers: own Redis (AOF, appendfsync always) and own
PostgreSQL with fsync on. Prints one JSON object per run on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import redis
from sqlalchemy import text

from dlq_worker import config as config_mod
from dlq_worker import producer, samples
from dlq_worker.app import App
from dlq_worker.embedded import PostgresProcess, RedisProcess

EVENTS, NOTES = "audit:dlq:events", "audit:dlq:notifications"


def fill(client: redis.Redis, entries: int, seed: int) -> None:
    rng = random.Random(seed)
    pipe = client.pipeline(transaction=False)
    for i in range(entries):
        if i % 5 == 4:
            pipe.xadd(NOTES, {"message": producer.build_message(
                producer.NOTIFICATION, samples.notification(rng))})
        else:
            pipe.xadd(EVENTS, {"message": producer.build_message(
                producer.AUDIT_EVENT, samples.audit_event(rng, full=i % 3 == 0))})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def one_run(redis_port: int, pg_port: int, entries: int, batch_size: int, seed: int) -> dict[
        str, object]:
    client = redis.Redis(port=redis_port, db=1)
    client.flushdb()
    cfg = config_mod.load(env={
        "REDIS_ADDR": f"127.0.0.1:{redis_port}", "DB_HOST": "127.0.0.1", "DB_PORT": str(pg_port),
        "DB_USER": "postgres", "DB_NAME": "action_history",
        "DLQ_WORKER_LOG_LEVEL": "warning",
    }, overrides={"http": {"enabled": False}, "worker": {"batch_size": batch_size}})
    app = App(cfg)
    app.sink.init_schema()
    with app.sink.engine.begin() as conn:
        conn.execute(text("TRUNCATE audit_events, notification_audit"))
    fill(client, entries, seed)
    started = time.perf_counter()
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    while client.xlen(EVENTS) + client.xlen(NOTES) > 0:
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    app.stop()
    thread.join(30)
    with app.sink.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT (SELECT count(*) FROM audit_events) + "
            "(SELECT count(*) FROM notification_audit)")).scalar_one()
    client.close()
    return {"entries": entries, "rows": rows, "batch_size": batch_size,
            "seconds": round(elapsed, 3), "entries_per_second": round(entries / elapsed),
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dlq-bench-"))
    root.chmod(0o755)
    redis_server = RedisProcess(root / "redis", appendonly=True)
    postgres = PostgresProcess(root / "pg", fsync=True)
    try:
        redis_server.start()
        postgres.start()
        postgres.create_database("action_history")
        for i in range(args.repeat):
            result = one_run(redis_server.port, postgres.port, args.entries, args.batch_size, i)
            print(json.dumps({"bench": "drain", "run": i + 1, **result}), flush=True)
    finally:
        postgres.stop()
        redis_server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
