"""The garbage collector, set for a process while it sends or receives messages at volume.

CPython's collector runs a young pass every 700 net new container objects, and every tenth of
those an older one that walks what survived. A delivery keeps hundreds of requests in the air
and the receiver a hundred reports, each holding a few dozen live objects, so the count crosses
700 over and over with little garbage to find, and each pass that reaches the old generation
also walks the hundreds of thousands of objects imported at start-up (Dagster, polars,
SQLAlchemy): measured here, 12% of the engine's CPU and 20% of the receiver's
(`python -m bench collector`, bench/results_collector.md).

Two settings, together:

- `gc.collect()` then `gc.freeze()` moves everything alive then (modules, classes, settings,
  an earlier step's objects) out of every later pass;
- the young threshold goes from 700 to 50,000 net new objects: the same garbage is still
  collected, a few times a second at most instead of hundreds, with at most ~50,000
  uncollected objects in between (a few MB).

A delivery holds them while it runs (`delivering`; deliveries overlapping in one process
share them, and the last to end gives back what it froze and the threshold before the first);
the receiver's process, which lives to take reports, sets them once and for good
(`tune_for_serving`), whatever deliveries it also runs. A process whose collector was disabled
is left as it is, and a young threshold set higher than this is kept.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 50_000

_lock = threading.Lock()
_serving = False
_delivering = 0  # deliveries running in this process
_threshold_before: tuple[int, int, int] | None = None


def _freeze_and_raise() -> tuple[int, int, int]:
    """Freeze what is alive now and raise the young threshold; the thresholds before."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    young, middle, old = before
    if 0 < young < YOUNG_THRESHOLD:
        gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    return before


@contextmanager
def delivering() -> Iterator[None]:
    """The collector set for a delivery while it runs, and as it was once the last delivery
    running here ends (what it froze is collectable again: a long-lived process running many
    deliveries keeps nothing for good)."""
    global _delivering, _threshold_before
    with _lock:
        _delivering += 1
        if _delivering == 1 and gc.isenabled() and not _serving:
            _threshold_before = _freeze_and_raise()
    try:
        yield
    finally:
        with _lock:
            _delivering -= 1
            if _delivering == 0 and _threshold_before is not None:
                if not _serving:
                    gc.set_threshold(*_threshold_before)
                    gc.unfreeze()
                _threshold_before = None


def tune_for_serving() -> None:
    """The collector set for the rest of the process, once."""
    global _serving
    with _lock:
        if _serving or not gc.isenabled():
            return
        _serving = True
        _freeze_and_raise()
