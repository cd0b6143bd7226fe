"""The pieces of the benchmark suite: data, baselines, probes, the table."""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, text

from dlq_worker import producer
from dlq_worker.drain import pgcopy
from dlq_worker.drain.decode import AUDIT_EVENTS, decode_entry
from dlq_worker.drain.schema import audit_events
from dlq_worker.producer import Producer
from dlq_worker.throwaway import samples

EVENTS = "audit:dlq:events"


def messages(n: int, seed: int = 42) -> list[bytes]:
    """Realistic contract envelopes: ~1 KB, ~600 B of event_data, a third with every field."""
    rng = random.Random(seed)
    return [producer.build_message("audit_event", samples.audit_event(rng, full=i % 3 == 0))
            for i in range(n)]


def big_messages(n: int, size: int = 900_000, seed: int = 7) -> Iterator[bytes]:
    """Envelopes of about ``size`` bytes, valid under the contract: event_data of ~250 KB
    (under the producers' 256 KB limit) and a long error_message. Made one at a time: a
    backlog of them is gigabytes."""
    rng = random.Random(seed)
    for _ in range(n):
        record = samples.audit_event(rng)
        record["event_data"] = {"blob": "d" * 250_000, "n": rng.random()}
        record["error_message"] = "e" * max(0, size - 340_000 - 1_200)
        yield producer.build_message("audit_event", record)


def write_backlog(client: redis.Redis, batch: Iterable[bytes], chunk: int = 1000) -> None:
    pipe = client.pipeline(transaction=False)
    for i, message in enumerate(batch):
        pipe.xadd(EVENTS, {"message": message})
        if i % chunk == chunk - 1:
            pipe.execute()
    pipe.execute()
    client.close()


def ceiling(engine: Engine, batch: list[bytes]) -> dict[str, Any]:
    """Decode in Python, COPY straight into the identical table: no Redis, no idempotency."""
    started = time.perf_counter()
    rows = [decode_entry(AUDIT_EVENTS, {b"message": m}).values for m in batch]
    columns = list(rows[0])  # the columns the worker writes (not the hash chain's)
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            for i in range(0, len(rows), 500):
                cur.copy_expert(f"COPY audit_events ({', '.join(columns)}) FROM STDIN",
                                pgcopy.encode(rows[i:i + 500], columns))
        raw.commit()
    finally:
        raw.close()
    result = _rate(len(batch), started)
    engine.dispose()
    return result


#: The columns the worker writes for an audit event (the hash chain's excepted).
PLAIN_COLUMNS = (
    "event_id", "event_version", "event_timestamp", "event_date", "event_type",
    "event_category", "event_action", "event_outcome", "actor_type", "actor_id", "actor_ip",
    "resource_type", "resource_id", "resource_name", "correlation_id", "parent_event_id",
    "parent_event_date", "trace_id", "span_id", "namespace", "cluster_id", "event_data",
    "event_metadata", "severity", "duration_ms", "error_code", "error_message",
    "retention_days", "is_sensitive",
)
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _plain_row(message: bytes) -> list[Any]:
    """One entry as both plain loops write it: the payload's values in PLAIN_COLUMNS order,
    event_data and event_metadata decoded from base64 and serialized again."""
    def jsonb(value: Any) -> Any:
        return None if value is None else json.dumps(json.loads(base64.b64decode(value)))

    p = json.loads(message)["payload"]
    row = dict(p, event_version=p.get("version") or "1.0",
               event_date=p["event_timestamp"][:10], event_data=jsonb(p["event_data"]),
               event_metadata=jsonb(p.get("event_metadata")))
    return [row.get(c) for c in PLAIN_COLUMNS]


def plain_ceiling(engine: Engine, batch: list[bytes]) -> dict[str, Any]:
    """The honest ceiling: what a plain loop does with the same entries, none of the
    project's code on the path. json + base64 + json.dumps, COPY text straight into the
    same table in chunks of 500, one commit. No Redis, no validation, no idempotency."""
    def text_field(value: Any) -> str:
        if value is None:
            return "\\N"
        if isinstance(value, bool):
            return "t" if value else "f"
        return str(value).translate(_COPY_ESCAPES)

    started = time.perf_counter()
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            for start in range(0, len(batch), 500):
                lines = []
                for message in batch[start:start + 500]:
                    lines.append("\t".join([text_field(v) for v in _plain_row(message)]))
                lines.append("")
                cur.copy_expert(f"COPY audit_events ({', '.join(PLAIN_COLUMNS)}) FROM STDIN",
                                io.StringIO("\n".join(lines)))
        raw.commit()
    finally:
        raw.close()
    result = _rate(len(batch), started)
    engine.dispose()
    return result


def strong_ceiling(conninfo: str, batch: list[bytes]) -> dict[str, Any]:
    """The strongest plain loop on the same machine: json + base64 and psycopg 3's
    ``Copy.write_row`` (its C encoder), 5,000 rows per COPY, into the same partitioned
    table with its primary key, one commit. Nothing of the project's, no Redis, no checks.
    (psycopg 3 is in the bench extra only: the worker's driver stays psycopg2.)"""
    import psycopg

    names = ", ".join(PLAIN_COLUMNS)
    started = time.perf_counter()
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        for start in range(0, len(batch), 5000):
            with cur.copy(f"COPY audit_events ({names}) FROM STDIN") as copy:
                for message in batch[start:start + 5000]:
                    copy.write_row(_plain_row(message))
        conn.commit()
    return _rate(len(batch), started)


def naive(client: redis.Redis, engine: Engine, batch: list[bytes]) -> dict[str, Any]:
    """The loop people write first: XREADGROUP COUNT 1 -> INSERT -> COMMIT -> XACK."""
    write_backlog(client, batch)
    client = redis.Redis(connection_pool=client.connection_pool)
    client.xgroup_create(EVENTS, "naive", id="0")  # its own group: the same entries
    stmt = audit_events.insert()
    started = time.perf_counter()
    with engine.connect() as conn:
        while True:
            reply: Any = client.xreadgroup("naive", "c", {EVENTS: ">"}, count=1)
            if not reply:
                break
            entry_id, fields = reply[0][1][0]
            conn.execute(stmt, decode_entry(AUDIT_EVENTS, fields).values)
            conn.commit()
            client.xack(EVENTS, "naive", entry_id)
    client.close()
    result = _rate(len(batch), started)
    engine.dispose()
    return result


def _rate(entries: int, started: float) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    return {"entries": entries, "seconds": round(seconds, 3),
            "entries_per_second": round(entries / seconds)}


def produce_at_rate(client: redis.Redis, rate: int, seconds: float) -> dict[str, float]:
    """Records at ``rate`` per second (in ticks of 10 ms); event_id -> wall time sent."""
    rng = random.Random(7)
    sent: dict[str, float] = {}
    per_tick = max(1, rate // 100)
    start = time.perf_counter()
    tick = 0
    while time.perf_counter() - start < seconds:
        pipe = client.pipeline(transaction=False)
        for _ in range(per_tick):
            record = samples.audit_event(rng)
            pipe.xadd(EVENTS, {"message": producer.build_message("audit_event", record)})
            sent[record["event_id"]] = time.time()
        pipe.execute()
        tick += 1
        delay = start + tick * 0.01 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    client.close()
    return sent


def commit_latencies(engine: Engine, sent: dict[str, float]) -> list[float]:
    """Entry written -> row committed, from PostgreSQL's commit timestamps."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT event_id::text, extract(epoch FROM pg_xact_commit_timestamp(xmin)) "
            "FROM audit_events")).all()
    engine.dispose()
    return [float(committed) - sent[event_id] for event_id, committed in rows]


def enqueue_latencies(client: redis.Redis, n: int) -> list[float]:
    dlq = Producer(client)
    rng = random.Random(3)
    records = [samples.audit_event(rng) for _ in range(n)]
    latencies = []
    for record in records:
        started = time.perf_counter()
        dlq.enqueue(record, "audit_event")
        latencies.append(time.perf_counter() - started)
    client.close()
    return latencies


def start_profile(pid: int) -> tuple[subprocess.Popen[bytes], Path]:
    out = Path(tempfile.mkstemp(prefix="dlq-profile-", suffix=".txt")[1])
    proc = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw",
                             "--rate", "200", "--output", str(out), "--nonblocking", "--function"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, out


def stop_profile(spy: tuple[subprocess.Popen[bytes], Path]) -> dict[str, list[dict[str, Any]]]:
    """Top functions by own time (the leaf of each sampled stack), and the project's
    functions by inclusive time (anywhere on the stack), in percent of busy samples."""
    proc, out = spy
    proc.send_signal(2)
    proc.wait(30)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any("threading.py" in f and "wait" in f for f in frames[-2:]):
            continue  # idle threads (HTTP server, monitor) waiting
        n = int(count)
        own[frames[-1]] += n
        for name in {f for f in frames if "dlq_worker/" in f}:
            inclusive[name] += n
        total += n
    out.unlink()
    if not total:
        return {}
    return {side: [{"function": name, "percent": round(100 * n / total, 1)}
                   for name, n in counter.most_common(16)]
            for side, counter in (("own", own), ("inclusive", inclusive))}


def table(r: dict[str, Any]) -> str:
    rows = [
        ("plain ceiling: json + base64 + COPY, none of the project's code",
         f"{r['plain_ceiling']['entries_per_second']:,} entries/s"),
        ("ceiling: the project's decoder + COPY, no Redis, no idempotency",
         f"{r['ceiling']['entries_per_second']:,} entries/s"),
        ("naive: XREADGROUP 1 -> INSERT -> COMMIT -> XACK",
         f"{r['naive']['entries_per_second']:,} entries/s"),
        (f"dlq-worker drain ({r['drain']['entries']:,} backlog, hash chain on)",
         f"{r['drain']['entries_per_second']:,} entries/s"),
        ("  ... with the hash chain off",
         f"{r['drain_chain_off']['entries_per_second']:,} entries/s"),
        ("  ratio to the plain ceiling, hash chain off (target >= 0.5) / on",
         f"{r['ratios']['chain_off_vs_plain_ceiling']} / "
         f"{r['ratios']['chain_on_vs_plain_ceiling']}"),
        ("  ratio to the project-decoder ceiling, hash chain off",
         f"{r['ratios']['drain_vs_ceiling']}"),
        ("scale-out: 1 / 2 / 3 worker processes, hash chain off",
         " / ".join(f"{x['entries_per_second']:,}" for x in r["scale_out"]) + " entries/s"),
        ("  ratio to naive, hash chain off (target >= 10)", f"{r['ratios']['drain_vs_naive']}"),
        ("end-to-end latency at 1,000/s p50 / p99 (target p99 <= 20 ms)",
         f"{r['latency']['p50_ms']} / {r['latency']['p99_ms']} ms"),
        (f"peak RSS draining {r['drain_100k_rss']['entries']:,} (target <= 100 MiB)",
         f"{r['drain_100k_rss']['peak_rss_mib']} MiB"),
        (f"backlog of {r['recovery']['entries']:,} gone after PostgreSQL answers (target <= 1 s)",
         f"{r['recovery']['seconds_after_postgres_answers']} s"),
        ("one of two workers SIGKILLed mid-drain: kill -> drained",
         f"{r['takeover']['seconds_kill_to_drained']} s"
         + (f" ({r['takeover_without_heartbeats']['seconds_kill_to_drained']} s without "
            "heartbeats)" if "takeover_without_heartbeats" in r else "")),
        ("producer enqueue p50 / p99 (target p99 <= 1 ms)",
         f"{r['enqueue']['p50_ms']} / {r['enqueue']['p99_ms']} ms"),
    ]
    if "big_entries" in r:
        b = r["big_entries"]
        rows.append((f"peak RSS draining {b['entries']:,} entries of ~900 KB "
                     "(chart limit 256 MiB)", f"{b['peak_rss_mib']} MiB"))
    if "shared_redis" in r:
        h = r["shared_redis"]
        rows.append(("DB 0 GET p99, 3 replicas polling 10k pending (target < +10 %)",
                     f"{h['baseline']['p99_ms']} -> {h['bounded']['p99_ms']} ms "
                     f"({h['p99_increase_bounded']:+.0%}; unbounded walk "
                     f"{h['unbounded_reference']['p99_ms']} ms)"))
    if "soak" in r:
        s = r["soak"]
        rows.append((f"soak {s['seconds'] / 60:.0f} min at 1,000/s: RSS start -> end "
                     "(target growth < 10 %)",
                     f"{s['rss_start_mib']} -> {s['rss_end_mib']} MiB "
                     f"({s['growth_percent']} %)"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    hotspots = r["drain"].get("hotspots") or {}
    for side in ("own", "inclusive"):
        if hotspots.get(side):
            lines.append(f"\nhotspots of the drain ({side} time):")
            lines += [f"  {h['percent']:5.1f}%  {h['function']}" for h in hotspots[side]]
    return "\n".join(lines)

