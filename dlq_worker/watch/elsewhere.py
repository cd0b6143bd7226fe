"""Where DLQ streams in another database of the Redis instance are found.

The platform's Data Storage service writes its DLQ to DB 0 whatever its ConfigMap says
(its config has no ``redis.db`` and its client selects none), while the design puts the
DLQ in DB 1. A worker draining one database while the records pile up, and are trimmed,
in another is the worst failure this product can have: healthy and idle. So the worker
looks at every other database that holds keys, read-only and bounded: ``INFO keyspace``
names them, then ``SCAN MATCH <prefix>* TYPE stream`` examines at most ``scan_budget``
keys of each per look, its cursor kept between looks, so a large cache (DB 0 is one) is
walked a slice at a time, never all at once and never with KEYS. Streams once found are
re-measured (XLEN) at every look until they are gone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import redis

from dlq_worker.config import RedisConfig
from dlq_worker.drain.redis_io import glob_escape, make_client, translated

log = logging.getLogger(__name__)

#: Keys SCAN is asked to examine per call, and calls per database per look.
SCAN_COUNT = 1000
SCAN_CALLS = 10


class OtherDatabases:
    """Finds DLQ streams in the databases other than ``config.db`` (see module doc)."""

    def __init__(self, config: RedisConfig, prefix: str, *,
                 client_for: Callable[[int], redis.Redis] | None = None,
                 scan_calls: int = SCAN_CALLS) -> None:
        self.config = config
        self.prefix = prefix
        self.scan_calls = scan_calls
        self._client_for = client_for or (
            lambda db: make_client(dataclasses.replace(config, db=db)))
        self._clients: dict[int, redis.Redis] = {}
        #: db -> SCAN cursor of the walk under way (absent: start a new walk).
        self._cursors: dict[int, int] = {}
        #: db -> DLQ stream -> its length, as last seen.
        self.found: dict[int, dict[str, int]] = {}

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def look(self, own: redis.Redis) -> dict[int, dict[str, int]]:
        """One bounded look at every other database with keys; what is found so far."""
        with translated("INFO keyspace"):
            keyspace: Any = own.info("keyspace")
        dbs = sorted(int(name[2:]) for name in keyspace
                     if str(name).startswith("db") and str(name)[2:].isdigit())
        for db in [d for d in self.found if d not in dbs]:
            del self.found[db]  # emptied (or flushed) since
        for db in dbs:
            if db != self.config.db:
                self._look_at(db)
        return {db: dict(streams) for db, streams in self.found.items() if streams}

    def unfinished(self) -> list[int]:
        """Databases whose walk is under way (more keys than one look examines)."""
        return sorted(self._cursors)

    def _client(self, db: int) -> redis.Redis:
        if db not in self._clients:
            self._clients[db] = self._client_for(db)
        return self._clients[db]

    def _look_at(self, db: int) -> None:
        client = self._client(db)
        known = self.found.setdefault(db, {})
        with translated(f"XLEN (db {db})"):
            lengths = _lengths(client, sorted(known))
            for name in list(known):  # drained, deleted, or no longer a stream: forgotten
                if name in lengths:
                    known[name] = lengths[name]
                else:
                    del known[name]
            cursor = self._cursors.get(db, 0)
            pattern = glob_escape(self.prefix) + "*"
            new: list[str] = []
            for _ in range(self.scan_calls):
                cursor, keys = client.scan(cursor, match=pattern, count=SCAN_COUNT,
                                           _type="stream")
                new += [k.decode(errors="replace") if isinstance(k, bytes) else str(k)
                        for k in keys]
                if cursor == 0:
                    break
            if cursor == 0:
                self._cursors.pop(db, None)
            else:
                self._cursors[db] = cursor
            known.update(_lengths(client, [name for name in new if name not in known]))


def _lengths(client: redis.Redis, names: list[str]) -> dict[str, int]:
    """XLEN of each name, pipelined; only the non-empty streams."""
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.xlen(name)
    return {name: n for name, n in zip(names, pipe.execute(raise_on_error=False), strict=True)
            if isinstance(n, int) and n > 0}


#: For a one-shot command (status, doctor): keys SCAN may examine per database.
ONE_SHOT_SCAN_CALLS = 100


def find_once(config: RedisConfig, prefix: str, own: redis.Redis,
              ) -> tuple[dict[int, dict[str, int]], list[int]]:
    """One look for a command: (what was found, databases only partly walked, as their
    keys exceed ``ONE_SHOT_SCAN_CALLS * SCAN_COUNT``)."""
    finder = OtherDatabases(config, prefix, scan_calls=ONE_SHOT_SCAN_CALLS)
    try:
        return finder.look(own), finder.unfinished()
    finally:
        finder.close()


def describe(found: dict[int, dict[str, int]]) -> str:
    """``DB 0: audit:dlq:events (200 entries), ...`` for logs, status and doctor."""
    parts = []
    for db, streams in sorted(found.items()):
        names = ", ".join(f"{name} ({n} entries)" for name, n in sorted(streams.items())[:10])
        more = f" and {len(streams) - 10} more" if len(streams) > 10 else ""
        parts.append(f"DB {db}: {names}{more}")
    return "; ".join(parts)
