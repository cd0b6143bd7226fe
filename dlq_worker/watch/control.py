"""Operator control kept in Redis, so every replica sees it and it survives restarts.

A pause is one hash per consumer group, ``dlq-worker:paused:<group>`` in the DLQ's
database: its reason, who set it and when. Every replica of that group stops taking new
entries within one poll (it finishes what it holds) until the key is deleted. This is what
operators use during PostgreSQL maintenance instead of scaling to zero: the pods stay up,
report that they are paused, and start again at once on ``resume``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis

PAUSE_KEY_PREFIX = "dlq-worker:paused:"


def pause_key(group: str) -> str:
    return PAUSE_KEY_PREFIX + group


@dataclass(frozen=True)
class Pause:
    reason: str
    by: str
    since: float  # Unix time

    def describe(self) -> str:
        when = dt.datetime.fromtimestamp(self.since, dt.UTC).isoformat(timespec="seconds")
        return f"paused since {when} by {self.by}: {self.reason or '(no reason given)'}"

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "by": self.by, "since": self.since,
                "seconds": round(time.time() - self.since, 1)}


def read_pause(client: redis.Redis, group: str) -> Pause | None:
    """The group's pause, or None. Raises redis errors (the caller decides)."""
    fields: Any = client.hgetall(pause_key(group))
    if not fields:
        return None
    text = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
            for k, v in fields.items()}
    try:
        since = float(text.get("since", "0"))
    except ValueError:
        since = 0.0
    return Pause(reason=text.get("reason", ""), by=text.get("by", "?"), since=since)


def pause(client: redis.Redis, group: str, reason: str) -> Pause:
    """Pause the group (kept if already paused: the first pause's time and author stay,
    the reason is updated)."""
    key = pause_key(group)
    pipe = client.pipeline(transaction=True)
    pipe.hsetnx(key, "since", repr(time.time()))
    pipe.hsetnx(key, "by", _who())
    pipe.hset(key, "reason", reason)
    pipe.execute()
    found = read_pause(client, group)
    assert found is not None
    return found


def resume(client: redis.Redis, group: str) -> Pause | None:
    """Lift the pause; returns the pause that was lifted, or None if there was none."""
    found = read_pause(client, group)
    client.delete(pause_key(group))
    return found


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
