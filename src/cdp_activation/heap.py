"""The garbage collector, set once for a process that sends or receives messages at volume.

CPython's collector runs a young pass every 700 net new container objects, and every tenth of
those an older one that walks what survived. A delivery keeps hundreds of requests in the air
and the receiver a hundred reports, each holding a few dozen live objects, so the count crosses
700 over and over with little garbage to find, and each pass also walks the hundreds of
thousands of objects imported at start-up (Dagster, polars, SQLAlchemy) when it reaches the
old generation: measured here, 14% of the engine's CPU and 20% of the receiver's
(`python -m bench collector`, bench/results_collector.md).

`tune_for_volume` runs once a process, after start-up:

- `gc.freeze()` moves everything alive then (modules, classes, settings) out of every later
  pass. It is all kept for the process's life anyway.
- the young threshold goes from 700 to 50,000 net new objects: the same garbage is still
  collected, a few times a second at most instead of hundreds. It holds at most ~50,000
  uncollected objects in between (a few MB).

A process whose collector was disabled, or given another young threshold above it, is left
as it is.
"""

from __future__ import annotations

import gc
import threading

YOUNG_THRESHOLD = 50_000

_lock = threading.Lock()
_tuned = False


def tune_for_volume() -> None:
    """Freeze what start-up left and raise the young threshold, once per process."""
    global _tuned
    with _lock:
        if _tuned:
            return
        _tuned = True
    if not gc.isenabled():
        return
    young, middle, old = gc.get_threshold()
    if young == 0 or young >= YOUNG_THRESHOLD:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
