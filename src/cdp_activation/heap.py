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
  an earlier step's objects) out of every later pass (a command's start-up: `gc.freeze()`
  alone, below);
- the young threshold goes from 700 to 50,000 net new objects: the same garbage is still
  collected, a few times a second at most instead of hundreds, with at most ~50,000
  uncollected objects in between (a few MB).

A delivery holds them while it runs (`delivering`; deliveries overlapping in one process
share them, and the last to end gives back what it froze and the threshold before the first);
the receiver's process, which lives to take reports, sets them once and for good
(`tune_for_serving`), whatever deliveries it also runs. A process whose collector was disabled
is left as it is, and a young threshold set higher than this is kept.

A command that runs activations (`cdp-activation run`, `preview`, `fallback`, `demo`) starts by
importing Dagster, polars and SQLAlchemy and loading the definitions: a million objects that
all live on, which the collector walks again and again as they pile up, for nothing. In a
process of its own (the `cdp-activation` script, not a program calling the click command), such
a command, and a serving one (`sandbox`, `webhooks serve`), turns the collector off for its
start-up (`start_up`). Start-up ends (`started`) at the first of: the definitions loaded, a
wait behind another run of the activation, a local sandbox started for the run, a delivery, a
server starting, the command's end. What it made is then frozen for the rest of the process,
without a collection first (start-up leaves next to no garbage), and the collector is on again
with its own thresholds. A delivery in that process raises the young threshold while it runs
and freezes nothing more; it never unfreezes start-up: unfrozen, start-up's objects were walked
again by every old pass of the steps after the delivery, ~1 s of a 200-recipient run's CPU.
Together: 0.72 of the CPU for that run (`python -m bench startup`). The young threshold stays
700 outside deliveries: raised for the whole command it saved ~0.1 s more but kept ~70 MB more
at the peak of a 1,000,000-customer run (cyclic garbage holding frames collected later).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 50_000

_lock = threading.Lock()
_for_good = False  # set for the rest of the process: a server's (the receiver, the sandbox)
_starting = False  # the collector turned off by `start_up`, until `started`
_started_up = False  # a command's start-up ended here: what it froze stays frozen
_delivering = 0  # deliveries running in this process
_threshold_before: tuple[int, int, int] | None = None


def _freeze_and_raise(freeze: bool = True) -> tuple[int, int, int]:
    """Freeze what is alive now and raise the young threshold; the thresholds before."""
    before = gc.get_threshold()
    if freeze:
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
    deliveries keeps nothing for good). After a command's start-up, which stays frozen, a
    delivery only raises the threshold: it freezes nothing of the run for good."""
    global _delivering, _threshold_before
    with _lock:
        _delivering += 1
        _end_start_up()
        if _delivering == 1 and gc.isenabled() and not _for_good:
            _threshold_before = _freeze_and_raise(freeze=not _started_up)
    try:
        yield
    finally:
        with _lock:
            _delivering -= 1
            if _delivering == 0 and _threshold_before is not None:
                if not _for_good:
                    gc.set_threshold(*_threshold_before)
                    if not _started_up:
                        gc.unfreeze()
                _threshold_before = None


def tune_for_serving() -> None:
    """The collector set for the rest of the process, once."""
    global _for_good
    with _lock:
        _end_start_up()
        if _for_good or not gc.isenabled():
            return
        _for_good = True
        _freeze_and_raise()


def start_up() -> None:
    """The collector off while a command imports and loads its definitions, until `started`
    (a process whose collector is already off is left as it is)."""
    global _starting
    with _lock:
        if gc.isenabled() and not (_starting or _started_up or _for_good):
            gc.disable()
            _starting = True


def started() -> None:
    """The end of a command's start-up: what it made frozen for the rest of the process, the
    collector on again. Nothing if `start_up` was not called (a library caller, a test, a
    step process)."""
    with _lock:
        _end_start_up()


def _end_start_up() -> None:
    global _starting, _started_up
    if not _starting:
        return
    _starting = False
    _started_up = True
    # No collection first: start-up leaves next to no garbage (~700 objects of 250,000
    # measured after the definitions loaded), and a full pass costs ~80 ms.
    gc.freeze()
    gc.enable()
