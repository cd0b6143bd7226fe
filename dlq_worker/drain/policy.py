"""When a batch flushes, how long to wait after failures: pure policy, no I/O."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from tenacity import wait_exponential_jitter


@dataclass(frozen=True)
class BatchPolicy:
    """A batch flushes when it is full (by count or by bytes), or when its first entry
    has waited ``linger``."""

    size: int
    linger: float
    max_bytes: int = 4 * 1024 * 1024

    def room(self, in_hand: int, bytes_in_hand: int = 0, entry_size: float = 1.0) -> int:
        """How many more entries to read for this batch: what the count allows, and what
        the bytes allow at ``entry_size`` each (the largest of the last read). Always at
        least one while the batch is empty, so an entry bigger than the budget still moves."""
        by_count = self.size - in_hand
        by_bytes = int((self.max_bytes - bytes_in_hand) // max(1.0, entry_size))
        room = min(by_count, by_bytes)
        return max(1 if in_hand == 0 else 0, room)

    def byte_room(self, in_hand: int, bytes_in_hand: int) -> int:
        """Bytes a read may still bring into this batch; at least one entry's worth (of any
        size) while the batch is empty, so an entry bigger than the budget still moves."""
        room = self.max_bytes - bytes_in_hand
        return max(1, room) if in_hand == 0 else max(0, room)

    def due(self, in_hand: int, first_at: float | None, now: float,
            bytes_in_hand: int = 0) -> bool:
        if in_hand == 0:
            return False
        if in_hand >= self.size or bytes_in_hand >= self.max_bytes:
            return True
        return first_at is not None and now - first_at >= self.linger

    def block_for(self, in_hand: int, first_at: float | None, now: float, idle: float) -> float:
        """How long a read may block: ``idle`` with nothing in hand, else what linger has left.

        Never zero: Redis treats BLOCK 0 as "forever".
        """
        if in_hand == 0 or first_at is None:
            return idle
        return max(0.001, self.linger - (now - first_at))


def transient_wait(initial: float, maximum: float) -> wait_exponential_jitter:
    """Capped exponential backoff with jitter while a server is unavailable."""
    # tenacity renamed ``initial`` to ``multiplier`` (9.2) and warns on the old name.
    if "multiplier" in inspect.signature(wait_exponential_jitter).parameters:
        return wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)
    return wait_exponential_jitter(initial=initial, max=maximum, jitter=initial)


def reject_delay(deliveries: int, initial: float, maximum: float) -> float:
    """Wait before re-delivering an entry PostgreSQL rejected, by its delivery count.

    Doubling from ``initial``: with the defaults (5s, cap 30s, 5 deliveries) a row
    that can never be written is parked after about 5+10+20+30 = 65 s.
    """
    exponent = max(0, deliveries - 1)
    return float(min(maximum, initial * (2**exponent)))


def park_schedule(max_deliveries: int, initial: float, maximum: float) -> list[float]:
    """The waits between deliveries of a rejected entry until it is parked (for docs)."""
    return [reject_delay(d, initial, maximum) for d in range(1, max_deliveries)]
