"""Consumers prove they are alive, so a dead one's entries are taken over in seconds.

Without this, entries held by a consumer that died wait ``claim_idle`` (60 s) before
another replica claims them: idleness is all Redis knows, and a live consumer may take a
while over a batch. Here each worker beats in a thread of its own (not the loop, which may
be busy in a long write): ``takeover_after``/5 apart it writes Redis's own clock and its own
``takeover_after`` into one hash per group, ``dlq-worker:heartbeats:<group>``, under its
consumer name. A consumer whose beat is older than the ``takeover_after`` it beat for is
dead, and its entries idle at least that long are claimed at once.

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

from dlq_worker.drain.redis_io import translated

log = logging.getLogger(__name__)

KEY_PREFIX = "dlq-worker:heartbeats:"

#: Write our beat with Redis's own clock (replicas' clocks never compared), and the
#: ``takeover_after`` we beat for: "<ms>:<takeover ms>". A replica is judged by its own
#: promise, not the judge's: during a rollout that lowers the setting, the old pods,
#: beating less often, are not taken for dead.
_BEAT = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], (t[1] * 1000 + math.floor(t[2] / 1000)) .. ':' .. ARGV[2])
return 1
"""

#: Consumers whose beat is older than their own takeover_after (a bare number, from a
#: version that did not say it, is judged by ours, ARGV[1] ms), each followed by that
#: takeover_after in ms; beats older than ARGV[2] ms are removed (consumers gone for good:
#: the hash does not grow with every pod that ever ran).
_DEAD = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local beats = redis.call('HGETALL', KEYS[1])
local dead = {}
for i = 1, #beats, 2 do
  -- A value that is no beat of ours is never judged, never removed.
  local beat, after = string.match(beats[i + 1], '^(%d+):(%d+)$')
  if beat then
    beat, after = tonumber(beat), tonumber(after)
  else
    beat, after = tonumber(beats[i + 1]), tonumber(ARGV[1])
  end
  if beat then
    local age = now - beat
    if age > math.max(tonumber(ARGV[2]), after) then
      redis.call('HDEL', KEYS[1], beats[i])
    elseif age > after then
      table.insert(dead, beats[i])
      table.insert(dead, after)
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
            self._beat(keys=[self.key],
                       args=[self.consumer, int(self.takeover_after * 1000)])
        except redis.RedisError as exc:
            if self._flowing_since is not None:
                log.debug("heartbeat failed", extra={"event": "heartbeat_failed",
                                                     "error": str(exc)[:200]})
            self._flowing_since = None
            return False
        if self._flowing_since is None:
            self._flowing_since = self.clock()
        return True

    def dead_consumers(self) -> dict[str, float]:
        """Other consumers whose beat stopped more than their own ``takeover_after`` ago,
        with that setting in seconds; empty until our own beats have flowed for the
        longest of them (after an outage everyone's beat is stale)."""
        since = self._flowing_since
        if since is None:
            return {}
        with translated(f"heartbeats {self.key}"):
            found: Any = self._dead(keys=[self.key], args=[int(self.takeover_after * 1000),
                                                           int(self.forget_after * 1000)])
        found = list(found or [])
        flowing = self.clock() - since
        dead = {}
        for name, after_ms in zip(found[::2], found[1::2], strict=True):
            consumer = name.decode() if isinstance(name, bytes) else str(name)
            after = int(after_ms) / 1000
            if consumer != self.consumer and flowing >= max(after, self.takeover_after):
                dead[consumer] = after
        return dead

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
