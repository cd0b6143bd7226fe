"""Consumers prove they are alive, so a dead one's entries are taken over in seconds.

Without this, entries held by a consumer that died wait ``claim_idle`` (60 s) before
another replica claims them: idleness is all Redis knows, and a live consumer may take a
while over a batch. Here each worker beats in a thread of its own (not the loop, which may
be busy in a long write): once a second it writes Redis's own clock into one hash per group,
``dlq-worker:heartbeats:<group>``, under its consumer name. A consumer whose beat is older
than ``takeover_after`` is dead, and its entries idle at least that long are claimed at once.

Never while the owner still works on them: its beat thread keeps its entry fresh however
long a write takes. A consumer that never beat (an older version) is not judged by this:
``claim_idle`` still covers it. After a Redis outage every beat is stale; no replica judges
the others until its own beats have been flowing again for ``takeover_after``, by which
time every live replica has beaten too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from dlq_worker.source import translated

log = logging.getLogger(__name__)

KEY_PREFIX = "dlq-worker:heartbeats:"

#: Write our beat with Redis's own clock (replicas' clocks never compared).
_BEAT = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], t[1] * 1000 + math.floor(t[2] / 1000))
return 1
"""

#: Consumers whose beat is older than ARGV[1] ms; beats older than ARGV[2] ms are removed
#: (consumers gone for good: the hash does not grow with every pod that ever ran).
_DEAD = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local beats = redis.call('HGETALL', KEYS[1])
local dead = {}
for i = 1, #beats, 2 do
  -- A value that is not a number is no beat of ours: never judged, never removed.
  local beat = tonumber(beats[i + 1])
  if beat then
    local age = now - beat
    if age > tonumber(ARGV[2]) then
      redis.call('HDEL', KEYS[1], beats[i])
    elseif age > tonumber(ARGV[1]) then
      table.insert(dead, beats[i])
    end
  end
end
return dead
"""


def key(group: str) -> str:
    return KEY_PREFIX + group


class Heartbeat:
    """Beats for one consumer in a daemon thread; tells which other consumers are dead."""

    def __init__(self, client: redis.Redis, group: str, consumer: str, takeover_after: float,
                 forget_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.key = key(group)
        self.consumer = consumer
        self.takeover_after = takeover_after
        self.forget_after = forget_after
        self.interval = max(0.05, takeover_after / 5)
        self.clock = clock
        self._beat = client.register_script(_BEAT)
        self._dead = client.register_script(_DEAD)
        #: Since when our own beats have been landing without a failure (None: failing).
        self._flowing_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()

    def beat(self) -> bool:
        try:
            self._beat(keys=[self.key], args=[self.consumer])
        except redis.RedisError as exc:
            if self._flowing_since is not None:
                log.debug("heartbeat failed", extra={"event": "heartbeat_failed",
                                                     "error": str(exc)[:200]})
            self._flowing_since = None
            return False
        if self._flowing_since is None:
            self._flowing_since = self.clock()
        return True

    def dead_consumers(self) -> list[str]:
        """Other consumers whose beat stopped more than ``takeover_after`` ago; empty until
        our own beats have flowed that long (after an outage everyone's beat is stale)."""
        since = self._flowing_since
        if since is None or self.clock() - since < self.takeover_after:
            return []
        with translated(f"heartbeats {self.key}"):
            found: Any = self._dead(keys=[self.key], args=[int(self.takeover_after * 1000),
                                                           int(self.forget_after * 1000)])
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in found or []]
        return [n for n in names if n != self.consumer]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
