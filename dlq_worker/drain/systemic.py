"""Tell a schema change from bad rows: pure policy, no I/O.

A migration that adds a NOT NULL column without a default, a trigger that raises on
every row, a CHECK tightened for every row: each makes PostgreSQL refuse *every* row
for the same reason. Treated row by row, the whole DLQ would be parked within a minute.
The sign is a streak: distinct entries refused one after another for one cause (same
SQLSTATE, table and constraint or column), across more than one batch that brought new
ones, with no row of that table accepted in between and no pause of ten minutes. While
such a streak lasts the refusal is systemic: the worker holds its batch like an outage
and parks nothing. The first accepted row ends it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass
class _Streak:
    signature: str
    entries: set[tuple[str, str]] = field(default_factory=set)
    #: Batches that brought new entries to the streak (a redelivery of the same entries
    #: is the same evidence again, not more of it).
    batches: int = 0
    last_at: float = 0.0


@dataclass
class SystemicDetector:
    #: Distinct entries in a streak that make it systemic.
    threshold: int
    #: A streak with no new refusal for this long is forgotten: bad rows a week apart are
    #: not a schema change.
    expire_after: float = 600.0
    clock: Callable[[], float] = time.monotonic
    _streaks: dict[str, _Streak] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, table: str, accepted: int,
                rejected: Iterable[tuple[tuple[str, str], str]]) -> None:
        """One batch's outcome for one table: rows accepted (written or duplicate) and
        the (entry key, signature) of each row refused for a reason of the database's."""
        rejected = list(rejected)
        with self._lock:
            if accepted:
                self._streaks.pop(table, None)
                return
            signatures = {signature for _, signature in rejected}
            if len(signatures) != 1:
                self._streaks.pop(table, None)  # mixed causes: bad rows, not the schema
                return
            (signature,) = signatures
            now = self.clock()
            streak = self._streaks.get(table)
            if (streak is None or streak.signature != signature
                    or now - streak.last_at > self.expire_after):
                streak = self._streaks[table] = _Streak(signature)
            keys = {key for key, _ in rejected}
            if keys - streak.entries:
                streak.batches += 1
                streak.entries |= keys
            streak.last_at = now

    def systemic(self) -> dict[str, str]:
        """Tables whose rows are refused systemically -> the cause."""
        with self._lock:
            return {table: s.signature for table, s in self._streaks.items()
                    if len(s.entries) >= self.threshold and s.batches >= 2}
