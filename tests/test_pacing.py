"""The CLI's repeated looks (its progress bar's counts) stay cheap on a large partition."""

from __future__ import annotations

import threading
import time

from cdp_activation.cli.pacing import look_until_stopped


def _burn(seconds: float) -> None:
    """`seconds` of this thread's CPU, as a count over a large partition would cost."""
    began = time.thread_time()
    while time.thread_time() - began < seconds:
        pass


def _looks_in(seconds: float, cost: float, every: float) -> list[float]:
    """When `look_until_stopped` looked, over `seconds`, with looks of `cost` CPU seconds,
    and when it was stopped (the last item)."""
    looked: list[float] = []
    stop = threading.Event()

    def look() -> None:
        _burn(cost)
        looked.append(time.monotonic())

    thread = threading.Thread(target=look_until_stopped, args=(look, stop, every))
    thread.start()
    time.sleep(seconds)
    stopped = time.monotonic()
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return [*looked, stopped]


def test_cheap_looks_come_every_interval_and_once_more_when_stopped() -> None:
    *looked, stopped = _looks_in(0.6, cost=0.0, every=0.05)
    assert len(looked) >= 5  # ~12 at 0.05 s; a loaded machine may manage fewer
    assert looked[-1] >= stopped  # the final figures are read after the stop


def test_costly_looks_take_at_most_a_twentieth_of_a_core() -> None:
    # Each look costs 0.05 s of CPU: the next may come only 1 s later. Looked at every 0.01 s
    # instead, the 0.6 s would have held about ten looks, one core busy all along.
    *looked, stopped = _looks_in(0.6, cost=0.05, every=0.01)
    assert len(looked) == 2, looked  # the first, then the final one once stopped
    assert looked[-1] >= stopped
