"""The daemon's garbage collector settings (dlq_worker.app.tune_collector): fewer runs of
the cyclic collector, and cyclic garbage still collected without anyone asking."""

from __future__ import annotations

import subprocess
import sys

#: Run in a fresh interpreter: the collector's settings are the whole process's.
_PROGRAM = """
import gc, weakref
from dlq_worker.app import GC_THRESHOLD, tune_collector

tune_collector()
assert gc.get_threshold()[0] == GC_THRESHOLD, gc.get_threshold()
assert gc.get_freeze_count() > 0  # start-up's objects are out of every collection


class Node:
    pass


seen = []
for i in range(3 * GC_THRESHOLD):
    node = Node()
    node.me = node  # a cycle: reference counting alone never frees it
    if i % 1000 == 0:
        seen.append(weakref.ref(node))
print(sum(ref() is None for ref in seen), len(seen))
"""


def test_cyclic_garbage_is_still_collected_with_the_daemons_settings() -> None:
    # Given the collector as `dlq-worker run` sets it
    # When a process makes three thresholds' worth of cyclic garbage, never calling collect
    out = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    collected, made = map(int, out.split())
    # Then the collector has run by itself and freed at least the first two thresholds' worth
    assert made == 150
    assert collected >= 2 * made // 3
