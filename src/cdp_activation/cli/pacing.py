"""Looking at something again and again from a thread, at a bounded cost.

The CLI's progress bar counts a partition's rows in the ledger: ~0.2 µs a row on SQLite, so a
look at a million-row partition takes ~0.2 s, and at ten million ~2 s. Looked at every half
second, that would keep a core of two busy for the whole send. Here a look that takes longer
waits longer, so the looks take at most a set share of the time (SQLite counts in this
thread; PostgreSQL in its server, which the look's time measures all the same).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# The most of the time the looks may take (a look of 0.2 s waits 4 s for the next).
LOOK_SHARE = 0.05
# The longest wait between two looks: rich's progress bar forgets what it saw over 30 s ago,
# and with fewer than two looks in that time it has no rate, and so no ETA, to show.
LONGEST_WAIT_S = 20.0


def look_until_stopped(
    look: Callable[[], None],
    stop: threading.Event,
    every: float,
    share: float = LOOK_SHARE,
    longest: float = LONGEST_WAIT_S,
) -> None:
    """Call `look` every `every` seconds until `stop` is set, then once more (the final
    figures). A look that takes more than `share` of the time between looks makes the next
    wait longer, up to `longest`. A look that fails is tried again at the next one."""
    wait = every
    while True:
        finished = stop.wait(wait)
        began = time.perf_counter()
        try:
            look()
        except Exception as err:  # a busy or unreachable ledger: the bar waits for the next
            log.debug("a look failed (%s): trying again at the next", type(err).__name__)
        wait = min(longest, max(every, (time.perf_counter() - began) / share))
        if finished:
            return
