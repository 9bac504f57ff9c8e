"""Rate limits are the sender's: several processes sending for one sender share its rate and
its Retry-After pauses through Redis (`CDP_RATE_LIMIT_URL`), never one bucket per process.

Needs the Redis these machines run on 127.0.0.1:6379; skipped, saying so, without it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cdp_activation.delivery.rate_limits import RateLimitUnavailable, SharedLimiter, masked
from cdp_activation.sandbox import SandboxConfig, SandboxServer
from crash_worker import Worker

# Serial: these time requests against a pause another process shares; another test's load
# on the same cores shifted arrivals past the window (make test runs them alone).
pytestmark = [pytest.mark.integration, pytest.mark.serial]

REDIS = "redis://127.0.0.1:6379/0"


def _redis_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        return False
    return True


needs_redis = pytest.mark.skipif(
    not _redis_answers(), reason="no Redis on 127.0.0.1:6379 (these machines run one; CI uses it)"
)


def busiest_second(arrivals: list[float]) -> int:
    """The most requests that arrived within any one second (a sliding window)."""
    arrivals = sorted(arrivals)
    most, start = 0, 0
    for end, at in enumerate(arrivals):
        while at - arrivals[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


@needs_redis
def test_four_workers_sharing_one_sender_never_exceed_its_rate(ledger_url: str) -> None:
    """Four processes send one partition for one Meta number and one Twilio account at
    80/s each: together they keep to 80/s per sender in every second, where four in-process
    limiters would allow 320."""
    rate, n = 80, 1200  # 600 a sender: about 7.5 s at 80/s
    env = {"CRASH_WORKER_RATE": str(rate), "CRASH_WORKER_RATE_LIMIT_URL": REDIS}
    ledger = ledger_url
    with SandboxServer(config=SandboxConfig(latency_ms=5, seed=3)) as sandbox:
        workers = [Worker(ledger, sandbox.url, 8, n=n, env=env) for _ in range(4)]
        summaries = [w.summary(timeout=120) for w in workers]
        assert [w.process.wait(30) for w in workers] == [0] * 4, summaries
        attempts = sandbox.attempts()
        duplicates = sandbox.duplicates()
    by_provider: dict[str, list[float]] = {}
    for attempt in attempts:
        by_provider.setdefault(attempt.provider, []).append(attempt.arrived)
    busiest = {p: busiest_second(a) for p, a in by_provider.items()}
    overall = {p: (len(a) - 1) / (max(a) - min(a)) for p, a in by_provider.items()}
    print(f"\nshared 80/s across 4 workers: busiest second {busiest}, overall {overall}")
    assert sum(1 for s in summaries if s["sent"]) >= 2, summaries  # they really shared
    assert duplicates == {}
    # Four in-process limiters would let 320/s through. The moving window admits at most
    # 80 requests in any second; on the wire a request follows its admission by its claim's
    # latency (a database write, shared by 4 processes and the sandbox on 2 cores here), so
    # a second may also carry requests admitted just before it: the documented burst is the
    # rate times that latency (up to about a third here). Over the run: the rate, plus the first
    # second's allowance.
    assert all(most <= rate * 1.5 for most in busiest.values()), busiest
    assert all(r <= rate * 1.1 for r in overall.values()), overall


@needs_redis
def test_a_retry_after_pauses_every_process_sending_for_that_sender() -> None:
    async def scenario() -> tuple[float, float]:
        one = SharedLimiter(REDIS, f"test:pause:{time.time()}", 100)
        other = SharedLimiter(REDIS, one.sender, 100)
        await one.hold(0.4)
        return await other.pause_until() - time.time(), await one.pause_until()

    left, until = asyncio.run(scenario())
    assert 0.2 < left <= 0.4 and until > 0


def test_redis_down_stops_the_step_rather_than_send_unthrottled(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    """With the shared limit configured and its Redis gone, nothing is sent unthrottled: the
    step stops before it claims a row, naming the URL with its password masked."""
    from cdp_activation.delivery.engine import DeliveryOptions, DeliveryScope, deliver
    from cdp_activation.ledger import Ledger
    from crash_worker import audience, sandbox_connectors

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ledger.plan("limited", "p", audience(20))
    options = DeliveryOptions(rate_limit_url=url)
    with pytest.raises(RateLimitUnavailable) as raised:
        deliver(ledger, DeliveryScope("limited", "p"), sandbox_connectors(sandbox.url), options)
    assert "hunter2" not in str(raised.value) and masked(url) in str(raised.value)
    assert ledger.counts("limited", "p") == {"planned": 20}
    assert sandbox.attempts() == []
    ledger.dispose()


@needs_redis
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-process"])
def test_a_429_pauses_every_delivery_sending_for_that_sender(tmp_path: Path, shared: bool) -> None:
    """Two deliveries of one partition at once (two runs, or two workers) send for one Twilio
    account. After a 429, neither starts a request until its Retry-After has passed: the
    pause is the sender's, through Redis. Requests already started still arrive, within
    `grace` (a claim's write and a settle's, then Redis). Without the shared pause
    (per-process), the other delivery keeps sending through the pause: shown too."""
    from concurrent.futures import ThreadPoolExecutor

    from cdp_activation.delivery.engine import DeliveryOptions, DeliveryScope, deliver
    from cdp_activation.ledger import Ledger
    from cdp_activation.sandbox import Fault
    from crash_worker import audience, sandbox_connectors

    retry_after, grace, concurrency = 0.5, 0.25, 4
    options = DeliveryOptions(
        concurrency=concurrency,
        rate_per_second=2000,
        max_attempts=10,
        backoff_initial=0.02,
        backoff_max=0.2,
        rate_limit_url=REDIS if shared else None,
    )

    def two_deliveries(ledger_url: str) -> list[Any]:
        """Both deliveries of a fresh partition to a fresh sandbox: what reached the sandbox."""
        ledger = Ledger(ledger_url)
        ledger.plan("pause", "p", audience(240).filter(pl.col("channel") == "sms"))
        config = SandboxConfig(seed=5, rate_429=0.1, retry_after_s=retry_after)
        with SandboxServer(config=config) as sb:
            connectors = sandbox_connectors(sb.url)

            def one() -> int:
                own = Ledger(ledger_url)
                try:
                    return deliver(own, DeliveryScope("pause", "p"), connectors, options).sent
                finally:
                    own.dispose()

            with ThreadPoolExecutor(2) as pool:
                sent = [f.result(timeout=120) for f in [pool.submit(one), pool.submit(one)]]
            attempts = sb.attempts()
        ledger.dispose()
        assert sum(sent) == 120 and all(sent), sent
        return attempts

    def late_arrivals(attempts: list[Any]) -> tuple[int, list[float]]:
        """The 429s, and the requests that arrived during a pause after its grace."""
        throttled = [a for a in attempts if a.result == Fault.THROTTLED]
        assert len(throttled) >= 5
        late = []
        for answer in throttled:
            during = [a.arrived - answer.answered for a in attempts]
            # With the shared pause the window ends 50 ms short of the Retry-After: a request
            # that passed the pause check just before the 429 was answered can be held on its
            # way (its claim waiting for the other delivery's ledger write) and reach the
            # sandbox late, past `grace`: seen at 0.488 s of 0.5 with the test run alone.
            end = retry_after - (0.05 if shared else 0.0)
            late += [t for t in during if grace < t < end]
        return len(throttled), late

    # The control (per-process) shows the other delivery sending through a pause when the two
    # overlap; on a busy machine one can send its fresh rows before the other starts (one CI
    # run saw no overlap at all), so it may take a second try. The shared arm gets one.
    for attempt in range(1 if shared else 3):
        throttled, late = late_arrivals(two_deliveries(f"sqlite:///{tmp_path}/ledger{attempt}.db"))
        print(
            f"\n{'shared' if shared else 'per-process'}: {throttled} 429s, "
            f"{len(late)} requests arrived during a pause after its grace"
        )
        if shared or late:
            break
    if shared:
        assert late == [], sorted(late)[:10]
    else:
        assert late, "without the shared pause the other delivery should have kept sending"
