"""The benchmark suite: one command, baselines measured in the same run on the same rows.

    python -m bench.run            # full suite (about 15 minutes: includes a 10-minute soak)
    python -m bench.run --quick    # smoke version (CI): small sizes, no soak
    python -m bench.run --drain-only 20000   # just the drain rate, three runs

Servers are this run's own: Redis (AOF, appendfsync everysec) and PostgreSQL (fsync on,
track_commit_timestamp on, so a row's commit time is known exactly). The worker runs as a
real `dlq-worker run` process and is ready before any backlog is written; the DLQ stream
exists, empty, with its group, as in steady state. Prints a table, then one JSON document
on the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, create_engine, text

from bench import workloads
from bench.shared_redis import bench_shared_redis
from dlq_worker import config as config_mod
from dlq_worker.drain.sink import Sink
from dlq_worker.throwaway.embedded import PostgresProcess, RedisProcess, free_port
from dlq_worker.watch import control

EVENTS = "audit:dlq:events"


@dataclass
class Servers:
    redis: RedisProcess
    postgres: PostgresProcess
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {"REDIS_ADDR": f"127.0.0.1:{self.redis.port}", "REDIS_DB": "1",
                "DB_HOST": "127.0.0.1", "DB_PORT": str(self.postgres.port),
                "DB_USER": "postgres", "DB_NAME": "action_history"}

    def redis_client(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port, db=1)

    def engine(self) -> Engine:
        return create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{self.postgres.port}"
                             "/action_history", pool_pre_ping=True)


@contextmanager
def servers() -> Iterator[Servers]:
    root = Path(tempfile.mkdtemp(prefix="dlq-bench-"))
    root.chmod(0o755)
    r = RedisProcess(root / "redis", appendonly=True, extra_args=["--appendfsync", "everysec"])
    pg = PostgresProcess(root / "pg", fsync=True, extra_args=["-c", "track_commit_timestamp=on"])
    try:
        r.start()
        pg.start()
        pg.create_database("action_history")
        result = Servers(r, pg, root)
        sink = Sink(config_mod.load(env=result.env).database)
        sink.init_schema()
        sink.close()
        yield result
    finally:
        pg.stop()
        r.stop()
        shutil.rmtree(root, ignore_errors=True)


class WorkerProcess:
    """`dlq-worker run` as a separate process, with its peak RSS read from /proc."""

    def __init__(self, env: dict[str, str], cgroup: Path | None = None,
                 **settings: str) -> None:
        self.port = free_port()
        full = {k: v for k, v in os.environ.items() if not k.startswith("DLQ_WORKER_")}
        full.update(env)
        full.update({"DLQ_WORKER_HTTP_PORT": str(self.port), "DLQ_WORKER_HTTP_HOST": "127.0.0.1",
                     "DLQ_WORKER_LOG_LEVEL": "warning", "DLQ_WORKER_LOG_FORMAT": "json",
                     "DLQ_WORKER_WORKER_BACKOFF_MAX": "200ms"})
        full.update({f"DLQ_WORKER_{k.upper()}": v for k, v in settings.items()})
        self.log = tempfile.NamedTemporaryFile(prefix="dlq-bench-worker-", suffix=".log",  # noqa: SIM115
                                               delete=False)
        join = None
        if cgroup is not None:  # in the memory cgroup before the worker's first allocation
            def join() -> None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        self.proc = subprocess.Popen([sys.executable, "-m", "dlq_worker", "run"], env=full,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=join)  # noqa: PLW1509 - cgroup join only

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{self.port}/readyz"
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("worker not ready in time")

    def rss(self) -> tuple[int, int]:
        """(current, peak) resident set size in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()
        os.unlink(self.log.name)


def reset(s: Servers) -> None:
    """Empty tables, and the DLQ streams as in steady state: present, empty, with a group."""
    client = s.redis_client()
    client.flushdb()
    client.xgroup_create(EVENTS, "dlq-worker", id="0", mkstream=True)
    client.close()
    engine = s.engine()
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE audit_events, notification_audit"))
    engine.dispose()


def wait_drained(s: Servers, expected_rows: int, timeout: float = 600) -> float:
    """Until XLEN is 0 and every row is committed; returns the moment (perf_counter)."""
    client, engine = s.redis_client(), s.engine()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if client.xlen(EVENTS) == 0:
                with engine.connect() as conn:
                    rows = conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one()
                if rows >= expected_rows:
                    return time.perf_counter()
            time.sleep(0.002)
        raise RuntimeError("not drained in time")
    finally:
        client.close()
        engine.dispose()


# -- the measurements --

def bench_ceiling(s: Servers, messages: list[bytes]) -> dict[str, Any]:
    reset(s)
    return workloads.ceiling(s.engine(), messages)


def bench_plain_ceiling(s: Servers, messages: list[bytes]) -> dict[str, Any]:
    reset(s)
    return workloads.plain_ceiling(s.engine(), messages)


def bench_naive(s: Servers, messages: list[bytes]) -> dict[str, Any]:
    reset(s)
    return workloads.naive(s.redis_client(), s.engine(), messages)


def bench_drain(s: Servers, messages: list[bytes], profile: bool = False, workers: int = 1,
                **settings: str) -> dict[str, Any]:
    """A backlog written while ``workers`` processes (one consumer group) wait, ready."""
    reset(s)
    procs = [WorkerProcess(s.env, **settings) for _ in range(workers)]
    spy = None
    try:
        for worker in procs:
            worker.wait_ready()
        if profile and shutil.which("py-spy"):
            spy = workloads.start_profile(procs[0].proc.pid)
        started = time.perf_counter()
        workloads.write_backlog(s.redis_client(), messages)
        done = wait_drained(s, len(messages))
        peak = max(worker.rss()[1] for worker in procs)
    finally:
        hotspots = workloads.stop_profile(spy) if spy else {}
        for worker in procs:
            worker.stop()
    seconds = done - started
    result: dict[str, Any] = {"entries": len(messages), "seconds": round(seconds, 3),
                              "entries_per_second": round(len(messages) / seconds),
                              "peak_rss_mib": round(peak / 2**20, 1)}
    if workers > 1:
        result["workers"] = workers
    if hotspots:
        result["hotspots"] = hotspots
    return result


def bench_big_entries(s: Servers, n: int, **settings: str) -> dict[str, Any]:
    """Peak RSS while draining a backlog of ~900 KB entries: memory is bounded by bytes
    (worker.batch_max_bytes), not by the entry count. The backlog is in Redis before the
    worker starts."""
    reset(s)
    workloads.write_backlog(s.redis_client(), workloads.big_messages(n), chunk=20)
    worker = WorkerProcess(s.env, **settings)
    try:
        started = time.perf_counter()
        done = wait_drained(s, n, timeout=1800)
        _, peak = worker.rss()
    finally:
        worker.stop()
    return {"entries": n, "entry_bytes": 900_000, "seconds": round(done - started, 1),
            "peak_rss_mib": round(peak / 2**20, 1), **settings}


def bench_memory_limit(s: Servers, big: int, limit_mib: int = 256, workers: int = 2,
                       **settings: str) -> dict[str, Any]:
    """Worker processes under a real memory limit (a cgroup v1 memory group, as a pod's
    limit is), draining ~1 KB and ~900 KB entries in blocks and interleaved: whether any
    was OOM-killed, and each one's peak RSS. The backlog is in Redis before they start."""
    group = Path(f"/sys/fs/cgroup/memory/dlq-bench-{os.getpid()}")
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_mib * 2**20))
        with contextlib.suppress(OSError):  # no swap accounting: then swap is simply off
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_mib * 2**20))
        reset(s)
        small = workloads.messages(4 * big)
        bigs = workloads.big_messages(big)
        quarter = big // 4
        order: list[bytes] = small[:big] + [next(bigs) for _ in range(quarter)]
        for i in range(quarter):  # interleaved
            order += [small[big + i], next(bigs)]
        order += small[big + quarter:] + list(bigs)  # small, then a block of big ones
        workloads.write_backlog(s.redis_client(), order, chunk=20)
        procs = [WorkerProcess(s.env, cgroup=group, streams_consumer=f"mem-{i}", **settings)
                 for i in range(workers)]
        try:
            started = time.perf_counter()
            done = wait_drained(s, len(order), timeout=1800)
            peaks = [round(p.rss()[1] / 2**20, 1) for p in procs]
            alive = [p.proc.poll() is None for p in procs]
        finally:
            for p in procs:
                p.stop()
        oom = (group / "memory.oom_control").read_text()
        kills = int(next((line.split()[1] for line in oom.splitlines()
                          if line.startswith("oom_kill ")), "0"))
        return {"limit_mib": limit_mib, "workers": workers, "entries": len(order),
                "big_entries": big, "seconds": round(done - started, 1),
                "peak_rss_mib": peaks, "group_peak_mib": round(int(
                    (group / "memory.max_usage_in_bytes").read_text()) / 2**20, 1),
                "oom_kills": kills, "all_alive": all(alive), **settings}
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def bench_latency(s: Servers, rate: int, seconds: float, **settings: str) -> dict[str, Any]:
    reset(s)
    worker = WorkerProcess(s.env, **settings)
    try:
        worker.wait_ready()
        sent = workloads.produce_at_rate(s.redis_client(), rate, seconds)
        wait_drained(s, len(sent), timeout=60)
    finally:
        worker.stop()
    latencies = workloads.commit_latencies(s.engine(), sent)
    return {"rate": rate, "seconds": seconds, "entries": len(latencies),
            "p50_ms": round(_pct(latencies, 50) * 1000, 2),
            "p99_ms": round(_pct(latencies, 99) * 1000, 2),
            "max_ms": round(max(latencies) * 1000, 2)}


def bench_soak(s: Servers, rate: int, seconds: float) -> dict[str, Any]:
    reset(s)
    worker = WorkerProcess(s.env)
    samples: list[tuple[float, int]] = []
    try:
        worker.wait_ready()
        stop = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.wait(5):
                samples.append((time.monotonic() - t0, worker.rss()[0]))

        sampler = threading.Thread(target=sample)
        sampler.start()
        sent = workloads.produce_at_rate(s.redis_client(), rate, seconds)
        stop.set()
        sampler.join()
        wait_drained(s, len(sent), timeout=120)
    finally:
        worker.stop()
    warm = [rss for t, rss in samples if t >= 60] or [rss for _, rss in samples]
    start, end = warm[0], warm[-1]
    return {"rate": rate, "seconds": seconds, "rss_start_mib": round(start / 2**20, 1),
            "rss_end_mib": round(end / 2**20, 1),
            "growth_percent": round((end - start) / start * 100, 1)}


def bench_recovery(s: Servers, messages: list[bytes]) -> dict[str, Any]:
    reset(s)
    worker = WorkerProcess(s.env)
    try:
        worker.wait_ready()
        s.postgres.stop()
        workloads.write_backlog(s.redis_client(), messages)
        time.sleep(2)
        s.postgres.start()
        answered = time.perf_counter()
        done = wait_drained(s, len(messages))
    finally:
        worker.stop()
    return {"entries": len(messages), "seconds_after_postgres_answers": round(done - answered, 3)}


def bench_takeover(s: Servers, messages: list[bytes], **settings: str) -> dict[str, Any]:
    """SIGKILL one of two workers mid-drain: seconds until the backlog is gone (what it
    held is taken over by the other: heartbeats, or claim_idle when they are off)."""
    reset(s)
    procs = [WorkerProcess(s.env, streams_consumer=f"bench-{i}", **settings) for i in range(2)]
    client = s.redis_client()
    try:
        for worker in procs:
            worker.wait_ready()
        workloads.write_backlog(s.redis_client(), messages)
        deadline = time.monotonic() + 60
        held = 0
        while time.monotonic() < deadline and not held:
            summary: Any = client.xpending(EVENTS, "dlq-worker")
            held = sum(int(c["pending"]) for c in summary.get("consumers", [])
                       if c["name"] == b"bench-0")
        procs[0].proc.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        done = wait_drained(s, len(messages))
    finally:
        client.close()
        for worker in procs:
            worker.stop()
    return {"entries": len(messages), "held_when_killed": held,
            "seconds_kill_to_drained": round(done - killed, 2), **settings}


def bench_enqueue(s: Servers, n: int) -> dict[str, Any]:
    reset(s)
    latencies = workloads.enqueue_latencies(s.redis_client(), n)
    return {"calls": n, "p50_ms": round(_pct(latencies, 50) * 1000, 3),
            "p99_ms": round(_pct(latencies, 99) * 1000, 3)}


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc (its own rusage)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_strong_ceiling(s: Servers, messages: list[bytes]) -> dict[str, Any]:
    reset(s)
    env = s.env
    return workloads.strong_ceiling(
        f"host=127.0.0.1 port={env['DB_PORT']} user={env['DB_USER']} dbname={env['DB_NAME']}",
        messages)


def bench_backlog(s: Servers, messages: list[bytes], workers: int = 1,
                  **settings: str) -> dict[str, Any]:
    """A backlog already in Redis before any worker starts, measured as the ceilings are:
    the clock runs from the first row's commit to the last one's (PostgreSQL's own commit
    timestamps), and the rows of the first commit are not counted. With the workers' own
    CPU (user + system, from /proc) from ready to drained, per 10,000 entries: the group
    is paused while they start, so their start-up is not counted."""
    reset(s)
    workloads.write_backlog(s.redis_client(), messages)
    client = s.redis_client()
    control.pause(client, "dlq-worker", "bench: workers starting")
    procs = [WorkerProcess(s.env, **settings) for _ in range(workers)]
    try:
        for worker in procs:
            worker.wait_ready()
        time.sleep(0.5)  # past the start's own work
        cpu_start = [_cpu_seconds(w.proc.pid) for w in procs]
        control.resume(client, "dlq-worker")
        wait_drained(s, len(messages))
        cpu = sum(_cpu_seconds(w.proc.pid) - c for w, c in zip(procs, cpu_start, strict=True))
    finally:
        client.close()
        for worker in procs:
            worker.stop()
    engine = s.engine()
    with engine.connect() as conn:
        first, last, in_first = conn.execute(text(
            "WITH t AS (SELECT pg_xact_commit_timestamp(xmin) AS c FROM audit_events) "
            "SELECT min(c), max(c), count(*) FILTER (WHERE c = (SELECT min(c) FROM t)) "
            "FROM t")).one()
    engine.dispose()
    seconds = (last - first).total_seconds()
    rate = (len(messages) - in_first) / seconds if seconds > 0 else float("nan")
    result: dict[str, Any] = {"entries": len(messages), "seconds": round(seconds, 3),
                              "entries_per_second": round(rate),
                              "cpu_seconds_per_10k": round(cpu / len(messages) * 10_000, 3)}
    if workers > 1:
        result["workers"] = workers
    return result


def throughput(s: Servers, batch: list[bytes], profile: bool = False, rounds: int = 1,
               ) -> Iterator[dict[str, Any]]:
    """CPU per entry, against the strongest plain loop (psycopg 3's write_row) measured in
    the same run, and the older plain ceiling beside it; a backlog written before the
    clock starts, as the ceilings have it; the worker's own CPU-seconds per 10,000 entries
    (what sizes a pod's CPU request), the hash chain off and on; the scale-out line.

    With several ``rounds`` the ceilings and the drains are measured again, interleaved,
    each drain against its own round's ceilings, and a summary gives the medians: on a
    shared machine one short ceiling run moves by a third from one minute to the next."""
    ratios: dict[str, list[float]] = {"off": [], "sha256": []}
    figures: dict[str, list[float]] = {}
    for round_ in range(1, rounds + 1):
        tag = {"round": round_} if rounds > 1 else {}
        strong = bench_strong_ceiling(s, batch)
        yield {"bench": "strong_ceiling", **tag, **strong}
        plain = bench_plain_ceiling(s, batch)
        yield {"bench": "plain_ceiling", **tag, **plain}
        figures.setdefault("strong_ceiling", []).append(strong["entries_per_second"])
        for mode in ("off", "sha256"):
            drain = bench_backlog(s, batch, database_hash_chain=mode)
            ratio = drain["entries_per_second"] / strong["entries_per_second"]
            ratios[mode].append(ratio)
            figures.setdefault(f"drain_{mode}", []).append(drain["entries_per_second"])
            figures.setdefault(f"cpu_seconds_per_10k_{mode}", []).append(
                drain["cpu_seconds_per_10k"])
            yield {"bench": "drain", **tag, "hash_chain": mode, **drain,
                   "vs_strong_ceiling": round(ratio, 3),
                   "vs_plain_ceiling": round(drain["entries_per_second"]
                                             / plain["entries_per_second"], 3)}
    if rounds > 1:
        yield {"bench": "throughput_summary", "rounds": rounds,
               **{f"median_{k}": round(statistics.median(v), 3) for k, v in figures.items()},
               **{f"median_vs_strong_ceiling_{k}": round(statistics.median(v), 3)
                  for k, v in ratios.items()},
               **{f"range_vs_strong_ceiling_{k}": [round(min(v), 3), round(max(v), 3)]
                  for k, v in ratios.items()}}
    if profile:
        drain = bench_drain(s, batch, profile=True, database_hash_chain="sha256")
        yield {"bench": "profile", "hash_chain": "sha256", **drain}
    for workers in (1, 2, 3):
        drain = bench_backlog(s, batch, workers=workers, database_hash_chain="off")
        yield {"bench": "scale_out", "workers": workers, "hash_chain": "off", **drain}


def compare_commits(s: Servers, revisions: list[str], batch: list[bytes], rounds: int,
                    ) -> Iterator[dict[str, Any]]:
    """What each change bought: the drain (hash chain off and on) run from a checkout of
    each revision in turn, ``rounds`` times interleaved, with one strong ceiling a round,
    all on the same servers and backlog (the machine's drift lands on every revision
    alike). Every other round runs the revisions in reverse order: a run's place in the
    round (after the previous run's writes, say) is no revision's own. The worker process
    imports the checkout it is started in."""
    root = Path(tempfile.mkdtemp(prefix="dlq-bench-commits-"))
    here = Path.cwd()
    trees = {}
    try:
        for rev in revisions:
            tree = root / rev.replace("/", "_")
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev],
                           check=True)
            trees[rev] = tree
        for round_ in range(1, rounds + 1):
            strong = bench_strong_ceiling(s, batch)["entries_per_second"]
            yield {"bench": "strong_ceiling", "round": round_, "entries_per_second": strong}
            order = list(trees.items())
            for rev, tree in order if round_ % 2 else reversed(order):
                os.chdir(tree)
                try:
                    for mode in ("off", "sha256"):
                        drain = bench_backlog(s, batch, database_hash_chain=mode)
                        yield {"bench": "drain", "revision": rev, "round": round_,
                               "hash_chain": mode, **drain,
                               "vs_strong_ceiling": round(
                                   drain["entries_per_second"] / strong, 3)}
                finally:
                    os.chdir(here)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="dlq-worker benchmark suite")
    parser.add_argument("--quick", action="store_true", help="smoke sizes, no soak (CI)")
    parser.add_argument("--no-soak", action="store_true", help="skip the 10-minute soak")
    parser.add_argument("--profile", action="store_true", help="py-spy the 50k drain")
    parser.add_argument("--drain-only", type=int, metavar="N",
                        help="only the drain of an N-entry backlog, three times")
    parser.add_argument("--chain-compare", type=int, metavar="N",
                        help="only the drain of an N-entry backlog with the hash chain off and "
                             "on (sha256), alternating, twice each")
    parser.add_argument("--memory-limit", type=int, metavar="N",
                        help="two workers in a 256 MiB memory cgroup, N ~900 KB entries "
                             "among 4N ~1 KB ones, in blocks and interleaved (needs root)")
    parser.add_argument("--big-entries", type=int, metavar="N",
                        help="only the peak RSS of an N-entry backlog of ~900 KB entries, with "
                             "the default byte bound and with a count-only bound")
    parser.add_argument("--hash-chain", choices=("off", "sha256", "hmac", "auto"),
                        help="the hash chain mode for --drain-only (default: auto)")
    parser.add_argument("--throughput", type=int, metavar="N",
                        help="only the CPU-per-entry comparison on one N-entry backlog: the "
                             "plain ceiling, the drain with the hash chain off and on, and "
                             "1, 2 and 3 worker processes")
    parser.add_argument("--commits", metavar="REV,REV,...",
                        help="only the drain, chain off and on, from a checkout of each of "
                             "these revisions, interleaved (with --throughput N for the backlog "
                             "size, default 30000, and --rounds)")
    parser.add_argument("--rounds", type=int,
                        help="rounds for --commits (default 3) and --throughput (default 1)")
    parser.add_argument("--takeover", type=int, metavar="N",
                        help="only SIGKILL-to-drained on an N-entry backlog, with and without "
                             "heartbeats")
    args = parser.parse_args()
    if args.commits:
        with servers() as s:
            batch = workloads.messages(args.throughput or 30000)
            for line in compare_commits(s, args.commits.split(","), batch,
                                        args.rounds or 3):
                print(json.dumps(line), flush=True)
        return
    if args.takeover:
        with servers() as s:
            batch = workloads.messages(args.takeover)
            for settings in ({}, {"worker_takeover_after": "0"}):
                print(json.dumps({"bench": "takeover", **bench_takeover(s, batch, **settings)}),
                      flush=True)
        return
    if args.throughput:
        with servers() as s:
            for line in throughput(s, workloads.messages(args.throughput), args.profile,
                                   args.rounds or 1):
                print(json.dumps(line), flush=True)
        return
    if args.chain_compare:
        with servers() as s:
            batch = workloads.messages(args.chain_compare)
            for run in range(4):
                mode = ("off", "sha256")[run % 2]
                print(json.dumps({"bench": "drain", "hash_chain": mode, "run": run // 2 + 1,
                                  **bench_drain(s, batch, database_hash_chain=mode)}),
                      flush=True)
        return
    if args.memory_limit:
        with servers() as s:
            print(json.dumps({"bench": "memory_limit",
                              **bench_memory_limit(s, args.memory_limit)}), flush=True)
        return
    if args.big_entries:
        with servers() as s:
            for settings in ({}, {"worker_batch_max_bytes": str(2**40)}):
                print(json.dumps({"bench": "big_entries",
                                  **bench_big_entries(s, args.big_entries, **settings)}),
                      flush=True)
        return
    if args.drain_only:
        with servers() as s:
            batch = workloads.messages(args.drain_only)
            settings = {"database_hash_chain": args.hash_chain} if args.hash_chain else {}
            for run in range(3):
                print(json.dumps({"bench": "drain", "run": run + 1,
                                  **bench_drain(s, batch, args.profile and run == 0,
                                                **settings)}), flush=True)
        return
    quick = args.quick
    n_drain = 5000 if quick else 50000
    n_rss = 10000 if quick else 100000
    results: dict[str, Any] = {"machine": {"python": platform.python_version(),
                                           "cpus": os.cpu_count(), "quick": quick}}
    messages = workloads.messages(n_rss)
    with servers() as s:
        results["plain_ceiling"] = bench_plain_ceiling(s, messages[:n_drain])
        results["ceiling"] = bench_ceiling(s, messages[:n_drain])
        results["naive"] = bench_naive(s, messages[: (500 if quick else 3000)])
        results["drain"] = bench_drain(s, messages[:n_drain], profile=args.profile)
        results["drain_chain_off"] = bench_drain(s, messages[:n_drain],
                                                 database_hash_chain="off")
        results["scale_out"] = [
            {"workers": k, "entries_per_second": bench_drain(
                s, messages[:n_drain], workers=k, database_hash_chain="off")["entries_per_second"]}
            for k in (1, 2, 3)]
        results["drain_100k_rss"] = bench_drain(s, messages[:n_rss])
        results["latency"] = bench_latency(s, 1000, 10 if quick else 60)
        results["recovery"] = bench_recovery(s, messages[: (2000 if quick else 10000)])
        results["takeover"] = bench_takeover(s, messages[:n_drain])
        if not quick:
            results["takeover_without_heartbeats"] = bench_takeover(
                s, messages[:n_drain], worker_takeover_after="0")
        results["enqueue"] = bench_enqueue(s, 1000 if quick else 10000)
        results["big_entries"] = bench_big_entries(s, 200 if quick else 5000)
        results["shared_redis"] = bench_shared_redis(s.redis.port, 5 if quick else 15)
        if not (quick or args.no_soak):
            results["soak"] = bench_soak(s, 1000, 600)
    plain = results["plain_ceiling"]["entries_per_second"]
    ratios = {
        "chain_off_vs_plain_ceiling": round(
            results["drain_chain_off"]["entries_per_second"] / plain, 3),
        "chain_on_vs_plain_ceiling": round(results["drain"]["entries_per_second"] / plain, 3),
        # Neither the project-decoder ceiling nor the naive loop hashes: compared with the
        # drain that does not either.
        "drain_vs_ceiling": round(results["drain_chain_off"]["entries_per_second"]
                                  / results["ceiling"]["entries_per_second"], 3),
        "drain_vs_naive": round(results["drain_chain_off"]["entries_per_second"]
                                / results["naive"]["entries_per_second"], 1),
    }
    results["ratios"] = ratios
    print(workloads.table(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
