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


def test_costly_looks_take_at_most_a_twentieth_of_the_time() -> None:
    # Each look takes 0.05 s: the next may come only 1 s later. Looked at every 0.01 s
    # instead, the 0.6 s would have held about ten looks, one core busy all along.
    *looked, stopped = _looks_in(0.6, cost=0.05, every=0.01)
    assert len(looked) == 2, looked  # the first, then the final one once stopped
    assert looked[-1] >= stopped


def test_a_look_that_waits_counts_as_much_as_one_that_works() -> None:
    """A PostgreSQL ledger counts in its server: this thread only waits for the answer."""
    looked: list[float] = []
    stop = threading.Event()

    def look() -> None:
        time.sleep(0.05)
        looked.append(time.monotonic())

    thread = threading.Thread(target=look_until_stopped, args=(look, stop, 0.01))
    thread.start()
    time.sleep(0.6)
    stop.set()
    thread.join(timeout=30)
    assert len(looked) == 2, looked


def test_the_wait_never_passes_the_longest_and_a_failed_look_is_tried_again() -> None:
    looks: list[float] = []
    stop = threading.Event()

    def look() -> None:
        looks.append(time.monotonic())
        if len(looks) % 2:
            _burn(0.05)  # 1 s at the 5% share: held to the longest wait, 0.1 s
            raise RuntimeError("database is locked")

    thread = threading.Thread(target=look_until_stopped, args=(look, stop, 0.01, 0.05, 0.1))
    thread.start()
    time.sleep(0.8)
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(looks) >= 5, looks  # every ~0.1 s, failures or not (about 7)
