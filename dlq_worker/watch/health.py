"""Liveness and readiness, as the loop and the monitor observe them.

Liveness means the loop is turning (a heartbeat). Readiness means Redis and
PostgreSQL answer and the group exists on every stream found; a server that has
failed for less than ``unready_after`` does not yet make the worker unready, so a
blip does not flap the pod out of its Service.

Two observers report on each server: the monitor's probes (PING, SELECT 1) and the
loop's own work. Each clears only its own failures: a server that answers a ping but
fails every insert (a missing table, a missing privilege) keeps the worker unready.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SERVERS = ("redis", "postgres")


@dataclass
class _ServerState:
    failing_since: float | None = None
    reason: str = ""


@dataclass
class Health:
    liveness_timeout: float
    unready_after: float
    #: Entries held and nothing completed for this long: the drain stopped moving.
    stalled_after: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _heartbeat: float | None = None
    _servers: dict[tuple[str, str], _ServerState] = field(
        default_factory=lambda: {(name, src): _ServerState() for name in SERVERS
                                 for src in ("probe", "loop")}
    )
    _checked: set[str] = field(default_factory=set)
    _groups_missing: list[str] = field(default_factory=list)
    _warnings: list[str] = field(default_factory=list)
    _started: bool = False
    #: Entries held by the loop right now, and when an entry last completed (written,
    #: parked or acknowledged; None: not since the loop last held nothing).
    _held: int = 0
    _other_dbs: str = ""
    _progress_at: float | None = None
    #: Periodic jobs failing -> (since when, why).
    _jobs: dict[str, tuple[float, str]] = field(default_factory=dict)
    _paused: str = ""

    def beat(self) -> None:
        with self._lock:
            self._heartbeat = self.clock()

    def started(self) -> None:
        with self._lock:
            self._started = True

    def ok(self, server: str, source: str = "probe") -> None:
        with self._lock:
            self._servers[(server, source)] = _ServerState()
            if source == "probe":
                self._checked.add(server)

    def failed(self, server: str, reason: str, source: str = "probe") -> None:
        with self._lock:
            state = self._servers[(server, source)]
            if state.failing_since is None:
                state.failing_since = self.clock()
            state.reason = reason[:200]
            if source == "probe":
                self._checked.add(server)

    def holding(self, entries: int) -> None:
        """How many entries the loop holds (each turn). The stall clock starts when it
        begins to hold some."""
        with self._lock:
            if entries and not self._held:
                self._progress_at = self.clock()
            self._held = entries

    def progress(self) -> None:
        """An entry was written, parked or acknowledged."""
        with self._lock:
            self._progress_at = self.clock()

    def set_other_databases(self, description: str) -> None:
        """DLQ streams found in another database of the instance ('' when none): shown as
        a warning (another deployment may drain them; the alert and doctor speak up)."""
        with self._lock:
            self._other_dbs = description

    def job_failed(self, job: str, reason: str) -> None:
        """A periodic job the drain depends on failed (unready after ``unready_after``)."""
        with self._lock:
            since = self._jobs.get(job, (self.clock(), ""))[0]
            self._jobs[job] = (since, reason[:200])

    def job_ok(self, job: str) -> None:
        with self._lock:
            self._jobs.pop(job, None)

    def set_groups_missing(self, streams: list[str]) -> None:
        with self._lock:
            self._groups_missing = list(streams)

    def set_paused(self, description: str) -> None:
        """Paused by an operator ('' when not): shown, and while paused a failing
        PostgreSQL (maintenance, the reason to pause) is a warning, not unreadiness."""
        with self._lock:
            self._paused = description

    def set_warnings(self, warnings: list[str]) -> None:
        with self._lock:
            self._warnings = list(warnings)

    def live(self) -> tuple[bool, str]:
        with self._lock:
            if self._heartbeat is None:
                return True, "starting"
            age = self.clock() - self._heartbeat
        if age > self.liveness_timeout:
            return False, f"loop has not turned for {age:.0f}s"
        return True, f"loop turned {age:.1f}s ago"

    def ready(self) -> tuple[bool, list[str], list[str]]:
        """(ready, reasons it is not, warnings that do not fail readiness)."""
        now = self.clock()
        reasons: list[str] = []
        with self._lock:
            if not self._started:
                waiting = sorted({name for (name, _), state in self._servers.items()
                                  if state.failing_since is not None})
                # "starting" alone while it should take a moment; past that, what it waits for
                reasons.append(f"not started: waiting for {' and '.join(waiting)}"
                               if waiting else "starting")
            for name in SERVERS:
                if name not in self._checked:
                    reasons.append(f"{name}: not checked yet")
            warnings = []
            if self._paused:
                warnings.append(self._paused)
            for (name, _), state in self._servers.items():
                if state.failing_since is not None and (
                    now - state.failing_since >= self.unready_after
                ):
                    if self._paused and name == "postgres":
                        warnings.append(f"{name} (while paused): {state.reason}")
                    else:
                        reasons.append(f"{name}: {state.reason}")
            for job, (since, reason) in sorted(self._jobs.items()):
                if now - since >= self.unready_after:
                    reasons.append(f"housekeeping job {job} failing: {reason}")
            if (self._held and self._progress_at is not None and not self._paused
                    and now - self._progress_at >= self.stalled_after):
                reasons.append(f"drain stalled: {self._held} entries held and none written, "
                               f"parked or acknowledged for {now - self._progress_at:.0f}s")
            if self._groups_missing:
                reasons.append("group missing on: " + ", ".join(self._groups_missing[:5]))
            warnings += self._warnings
            if self._other_dbs:
                warnings.append(self._other_dbs)
        return not reasons, reasons, warnings
