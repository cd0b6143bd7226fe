"""A test double of the platform's own DLQ retry worker, which runs in every Data Storage pod
beside dlq-worker and cannot be turned off. Written from what that worker does (the
project's docs/contract.md), on real Redis and real PostgreSQL, its clock scaled:

- group ``data-storage-retry-workers``, created at 0 with MKSTREAM; consumer ``worker-<n>``;
- first poll: its own pending entries (``XREADGROUP ... 0``, COUNT 10) until none progress;
- every 30 s, per stream: ``XREADGROUP ... COUNT 10 BLOCK 5000 STREAMS <stream> >``;
- an entry is ready when its envelope ``timestamp`` + backoff[``retry_count``] has passed
  (1 m, 5 m, 15 m, 1 h, 4 h, 24 h); one not ready stays pending in its group, unacked;
- ``retry_count`` >= 6: dead letter (XADD ``audit:dead-letter:<type>`` MAXLEN ~ with
  ``message``, ``original_id``, ``moved_at``, ``final_retry_count``), then XDEL, then XACK;
- otherwise a plain INSERT (an existing key is an error). Success: XACK only, no XDEL.
  Failure: XADD a copy with ``retry_count`` + 1, ``last_error`` and ``timestamp`` = now
  (MAXLEN ~ 10000), then XDEL the original; never XACK;
- a janitor every 30 s: XAUTOCLAIM min-idle 60 s, COUNT 10, from 0-0; ``retry_count`` > 5
  goes to the dead letters, the rest is processed as above.

It writes rows unhashed (the platform links them into its chain; the loss accounting this
double serves does not depend on that).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis
from sqlalchemy import create_engine, insert

from dlq_worker.drain.decode import decode_entry
from dlq_worker.drain.schema import TABLES

GROUP = "data-storage-retry-workers"
BACKOFFS = (60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
TABLE_OF = {"audit:dlq:events": "audit_events", "audit:dlq:notifications": "notification_audit"}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _parse(stamp: str) -> float:
    text = stamp.replace("Z", "+00:00")
    if "." in text:  # Go writes up to 9 fractional digits; Python reads 6
        head, rest = text.split(".", 1)
        digits = "".join(c for c in rest if c.isdigit())
        text = f"{head}.{digits[:6]}{rest[len(digits):]}"
    return dt.datetime.fromisoformat(text).timestamp()


class PlatformRetryWorker:
    """One Data Storage pod's retry worker, its schedule divided by ``scale``."""

    def __init__(self, redis_port: int, pg_url: str, *, db: int = 1, name: str = "worker-1",
                 streams: Iterable[str] = ("audit:dlq:events",), scale: float = 30.0,
                 cap: int = 10000, dead_letter_prefix: str = "audit:dead-letter:") -> None:
        self.client = redis.Redis(port=redis_port, db=db)
        self.engine = create_engine(pg_url, pool_pre_ping=True, connect_args={
            "connect_timeout": 1})
        self.name = name
        self.streams = list(streams)
        self.scale = scale
        self.cap = cap
        self.dead_letter_prefix = dead_letter_prefix
        #: What it did, for the test to read.
        self.written = 0
        self.copied = 0
        self.dead_lettered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"platform-{name}", daemon=True)

    def create_groups(self) -> None:
        """Its group on each stream, at 0 with MKSTREAM, as it creates it on start."""
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def start(self) -> PlatformRetryWorker:
        self.create_groups()
        self._thread.start()
        return self

    def read_once(self, count: int = 10) -> int:
        """One read of its loop, run by the caller instead of its thread (for a test that
        orders events itself): XREADGROUP > COUNT ``count`` per stream, each entry
        processed. How many were read."""
        self.create_groups()
        n = 0
        for stream in self.streams:
            reply: Any = self.client.xreadgroup(GROUP, self.name, {stream: ">"}, count=count)
            for _, rows in reply or []:
                for entry_id, fields in rows:
                    self._process(stream, entry_id.decode(), fields)
                    n += 1
        return n

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.client.close()
        self.engine.dispose()

    # -- its loop --

    def _run(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._own_pending()
        next_janitor = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                for stream in self.streams:
                    reply: Any = self.client.xreadgroup(
                        GROUP, self.name, {stream: ">"}, count=10,
                        block=max(1, int(5000 / self.scale)))
                    for _, rows in reply or []:
                        for entry_id, fields in rows:
                            self._process(stream, entry_id.decode(), fields)
                if time.monotonic() >= next_janitor:
                    self._janitor()
                    next_janitor = time.monotonic() + 30.0 / self.scale
            except redis.RedisError:
                pass  # the platform logs and tries at its next tick
            self._stop.wait(max(0.0, 30.0 / self.scale - (time.monotonic() - started)))

    def _own_pending(self) -> None:
        for stream in self.streams:
            cursor = "0"
            while True:
                reply: Any = self.client.xreadgroup(GROUP, self.name, {stream: cursor}, count=10)
                rows = reply[0][1] if reply else []
                progressed = False
                for entry_id, fields in rows:
                    cursor = entry_id.decode()
                    progressed = True
                    if fields:
                        self._process(stream, cursor, fields)
                if not progressed:
                    break

    def _janitor(self) -> None:
        for stream in self.streams:
            reply: Any = self.client.xautoclaim(stream, GROUP, self.name,
                                                int(60_000 / self.scale), "0-0", count=10)
            for entry_id, fields in reply[1]:
                if entry_id is None or not fields:
                    continue
                envelope = json.loads(fields[b"message"])
                if int(envelope.get("retry_count", 0)) > 5:
                    self._dead_letter(stream, entry_id.decode(), fields, envelope)
                else:
                    self._process(stream, entry_id.decode(), fields)

    def _process(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        envelope = json.loads(fields[b"message"])
        retries = int(envelope.get("retry_count", 0))
        if retries >= 6:
            self._dead_letter(stream, entry_id, fields, envelope)
            return
        due = _parse(envelope["timestamp"]) + BACKOFFS[retries] / self.scale
        if dt.datetime.now(dt.UTC).timestamp() < due:
            return  # not ready: stays pending in its group, unacked
        try:
            record = decode_entry(TABLE_OF[stream], fields)
            with self.engine.begin() as conn:
                conn.execute(insert(TABLES[record.table]).values(**record.values))
        except Exception as exc:  # any failure: a copy at the tail, the original deleted
            copy = {**envelope, "retry_count": retries + 1, "timestamp": _now(),
                    "last_error": "database write failed" if "connect" in str(exc).lower()
                    else str(exc).splitlines()[0][:256]}
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(stream, {"message": json.dumps(copy, separators=(",", ":"))},
                      maxlen=10000, approximate=True)
            pipe.xdel(stream, entry_id)
            pipe.execute()
            self.copied += 1
            return
        self.client.xack(stream, GROUP, entry_id)
        self.written += 1

    def _dead_letter(self, stream: str, entry_id: str, fields: dict[bytes, bytes],
                     envelope: dict[str, Any]) -> None:
        target = self.dead_letter_prefix + stream.rsplit(":", 1)[1]
        self.client.xadd(target, {"message": fields[b"message"], "original_id": entry_id,
                                  "moved_at": _now(),
                                  "final_retry_count": str(envelope.get("retry_count", 0))},
                         maxlen=self.cap, approximate=True)
        self.client.xdel(stream, entry_id)
        self.client.xack(stream, GROUP, entry_id)
        self.dead_lettered += 1
