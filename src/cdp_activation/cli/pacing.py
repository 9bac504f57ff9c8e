"""Looking at something again and again from a thread, at a bounded cost.

The CLI's progress bar counts a partition's rows in the ledger: ~0.2 µs a row, so a look at a
million-row partition costs ~0.2 s of CPU, and a ten-million-row one ~2 s. Looked at every
half second, that would be a core of two kept busy for the whole send. Here a look that costs
more waits longer, so the looks never take more than a set share of one core.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# The most of one core the looks may take (a look of 0.2 s of CPU waits 4 s for the next).
LOOK_SHARE = 0.05


def look_until_stopped(
    look: Callable[[], None], stop: threading.Event, every: float, share: float = LOOK_SHARE
) -> None:
    """Call `look` every `every` seconds, or less often when a look costs more than `share`
    of the time between looks, until `stop` is set; then once more (the final figures)."""
    wait = every
    while True:
        finished = stop.wait(wait)
        began = time.thread_time()  # this thread's CPU: time spent waiting for the GIL is not
        look()
        wait = max(every, (time.thread_time() - began) / share)
        if finished:
            return
