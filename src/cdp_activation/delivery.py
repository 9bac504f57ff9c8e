"""Delivery: planned ledger rows -> connector batches, rate-limited and retried, results recorded.

Rows go out in batches of each connector's size through a pool of workers (a sliding window:
a worker takes the next batch as soon as its request is answered), under the connector's rate
limit. A batch is marked in_flight just before its request and its outcomes written just
after the answer, both by group commit (one statement for every batch that asked in the
meantime). Transient failures (429, 5xx, a request that never left) are retried with jittered
exponential backoff that honours Retry-After; permanent ones are recorded, never retried. A
Retry-After answer also pauses every request to that connector until it has passed: throttling
is about the sender, not one message, so the other messages must slow down too. A template or
credentials error stops the whole activation: requests not yet made, and messages the provider
refused with a retryable answer, are released back to `planned` for the next run.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from types import SimpleNamespace

import httpx
from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    stop_after_attempt,
    wait_exponential_jitter,
)

from cdp_activation.connectors.base import (
    Connector,
    ConnectorError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateRef,
)
from cdp_activation.group_commit import GroupCommit
from cdp_activation.ledger import Ledger, PlannedSend
from cdp_activation.transport import make_client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryOptions:
    concurrency: int = 32
    max_attempts: int = 4
    rate_per_second: float | None = None  # None: the connector's default
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    timeout_seconds: float = 15.0
    progress_seconds: float = 5.0  # a progress log line this often (done, rate, ETA)


MAX_RETRY_AFTER = 60.0  # seconds: a provider's longer Retry-After is capped (then dead-lettered)


@dataclass
class DeliveryReport:
    sent: int = 0
    failed: int = 0
    unknown: int = 0
    dead_letter: int = 0
    attempts: int = 0
    throttled: int = 0  # answers carrying Retry-After, each pausing its connector
    error_codes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    stopped_by: str | None = None

    def latency_ms(self, quantile: float) -> float:
        if not self.latencies:
            return 0.0
        if len(self.latencies) == 1:
            return self.latencies[0] * 1000
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return cuts[min(98, max(0, int(quantile * 100) - 1))] * 1000


def to_outbound(row: PlannedSend) -> OutboundMessage:
    message = row.message
    template = None
    if "template" in message:
        template = TemplateRef(
            name=message["template"],
            language=message["language"],
            parameters=tuple(message.get("parameters") or ()),
            parameter_names=tuple(message.get("names") or ()),
        )
    return OutboundMessage(
        key=row.idempotency_key,
        to=row.recipient,
        channel=row.channel,
        template=template,
        body=message.get("body"),
        customer_id=row.customer_id,
        purpose=row.purpose,
    )


class _Stop(Exception):
    """Raised inside a send task once the activation has been stopped."""


class _Throttle:
    """A connector's shared pause: a Retry-After answer holds every request to that connector.

    Per-message backoff alone would let the other requests in flight keep hitting a provider
    that has just said "too many"; with one pause per connector the whole sender slows down,
    as Meta's and Twilio's throughput limits (per sender, not per message) expect.
    """

    def __init__(self) -> None:
        self.until = 0.0  # time.monotonic() before which no request may start

    def hold(self, seconds: float) -> None:
        self.until = max(self.until, time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.until - time.monotonic()

    async def wait(self, stop: asyncio.Event) -> None:
        while (delay := self.remaining()) > 0 and not stop.is_set():
            await asyncio.sleep(delay)


def deliver(
    ledger: Ledger,
    rows: Sequence[PlannedSend],
    connectors: Mapping[str, Connector],
    options: DeliveryOptions | None = None,
) -> DeliveryReport:
    """Send every row (already `planned` in the ledger) and record each outcome."""
    return asyncio.run(deliver_async(ledger, rows, connectors, options or DeliveryOptions()))


async def deliver_async(
    ledger: Ledger,
    rows: Sequence[PlannedSend],
    connectors: Mapping[str, Connector],
    options: DeliveryOptions,
) -> DeliveryReport:
    """Send the rows' batches through a pool of `options.concurrency` workers.

    Each worker takes the next batch as soon as its previous one is answered (a sliding
    window, never a barrier that waits for the slowest request of a group), so the number of
    requests in the air stays at the concurrency; rows are marked in flight per batch just
    before its request, so a crash leaves `unknown` only what was really in the air.
    """
    report = DeliveryReport()
    started = time.perf_counter()
    limiters = {name: AsyncLimiter(rate_of(c, options), 1) for name, c in connectors.items()}
    throttles = {name: _Throttle() for name in connectors}
    semaphore = asyncio.Semaphore(options.concurrency)
    stop = asyncio.Event()
    stop_error: list[ConnectorError] = []
    batches = _batches(rows, connectors)
    # A million rows are a million long-lived objects: without this every full collection
    # walks them all again, and the cost per message grew with the run (bench/throughput.py).
    gc.collect()
    gc.freeze()

    # httpx API over an aiohttp transport: plain httpx collapses past a few requests in flight
    # (bench/results_delivery.md); the transport maps errors exactly as httpx would.
    async with make_client(
        timeout=options.timeout_seconds, max_in_flight=options.concurrency
    ) as client:
        marks: GroupCommit[tuple[int, int | None]] = GroupCommit(
            lambda items: _mark_in_flight(ledger, items), "marking in flight"
        )
        records: GroupCommit[tuple[int, SendResult, int]] = GroupCommit(
            ledger.record, "recording outcomes"
        )
        releases: GroupCommit[int] = GroupCommit(ledger.release, "releasing unsent rows")
        queue = iter(batches)  # shared by the workers: each batch goes to exactly one

        async def worker() -> None:
            for name, batch in queue:
                if stop.is_set():
                    return  # the rest was never marked: it stays planned
                never_sent = await _send_batch(
                    client,
                    connectors[name],
                    limiters[name],
                    throttles[name],
                    semaphore,
                    batch,
                    options,
                    stop,
                    stop_error,
                    report,
                    marks,
                    records,
                )
                await releases.submit(never_sent)

        progress = asyncio.create_task(
            _log_progress_every(report, len(rows), started, options.progress_seconds)
        )
        try:
            await asyncio.gather(*(worker() for _ in range(min(options.concurrency, len(batches)))))
        finally:
            progress.cancel()
            gc.unfreeze()
    report.elapsed = time.perf_counter() - started
    if stop_error:
        report.stopped_by = str(stop_error[0])
        raise stop_error[0]
    return report


def _mark_in_flight(ledger: Ledger, items: list[tuple[int, int | None]]) -> None:
    """(row id, request id or None) pairs in flight, in one transaction."""
    ledger.mark_in_flight(
        [row for row, request in items if request is None],
        [(row, request) for row, request in items if request is not None],
    )


def groups_requests(connector: Connector) -> bool:
    """Whether the provider de-duplicates a whole request on one key (LINE's retry key, the
    webhook's Idempotency-Key): then a request's rows must always travel together, or a resent
    request would carry a new key and reach its recipients again."""
    return connector.capabilities.idempotency and connector.capabilities.max_batch_size > 1


def rate_of(connector: Connector, options: DeliveryOptions | None = None) -> float:
    """Messages per second for a connector: run option, then configured, then its default."""
    if options is not None and options.rate_per_second:
        return options.rate_per_second
    return connector.rate_per_second or connector.capabilities.default_rate_per_second


def _batches(
    rows: Sequence[PlannedSend], connectors: Mapping[str, Connector]
) -> list[tuple[str, list[PlannedSend]]]:
    """The rows in batches of each connector's size, the connectors taking turns (each has its
    own rate limit, so interleaving keeps all of them busy).

    Rows a crash left in a request that is de-duplicated as a whole (`request_id` set, see
    `groups_requests`) go first, each request's rows together as they were, so the request
    is sent again exactly as before and the provider recognises it.
    """
    by_connector: dict[str, list[PlannedSend]] = {}
    for row in rows:
        if row.connector not in connectors:
            raise ConnectorError(f"no connector named {row.connector!r} is configured")
        by_connector.setdefault(row.connector, []).append(row)
    per_connector: list[list[tuple[str, list[PlannedSend]]]] = []
    for name, items in by_connector.items():
        size = connectors[name].capabilities.max_batch_size
        interrupted: dict[int, list[PlannedSend]] = {}
        if groups_requests(connectors[name]):
            for row in items:
                if row.request_id is not None:
                    interrupted.setdefault(row.request_id, []).append(row)
            items = [row for row in items if row.request_id is None]
        batches = [(name, group) for group in interrupted.values()]
        batches += [(name, items[i : i + size]) for i in range(0, len(items), size)]
        per_connector.append(batches)
    return [batch for turn in zip_longest(*per_connector) for batch in turn if batch is not None]


async def _send_batch(
    client: httpx.AsyncClient,
    connector: Connector,
    limiter: AsyncLimiter,
    throttle: _Throttle,
    semaphore: asyncio.Semaphore,
    batch: list[PlannedSend],
    options: DeliveryOptions,
    stop: asyncio.Event,
    stop_error: list[ConnectorError],
    report: DeliveryReport,
    marks: GroupCommit[tuple[int, int | None]],
    records: GroupCommit[tuple[int, SendResult, int]],
) -> list[int]:
    """Send one batch, retrying what is retryable, and record each outcome in the ledger.

    Returns the ids of rows never accepted (the activation stopped first, or the provider
    refused the whole request with a template or credentials error, or answered it with a
    retryable refusal before the activation stopped): they go back to `planned`.
    """
    pending = [to_outbound(r) for r in batch]
    # The request's id in the ledger, for providers that de-duplicate whole requests: the
    # first row's own id, kept when a crash makes the batch go out again.
    request_id = min(row.id for row in batch) if groups_requests(connector) else None
    final: dict[str, SendResult] = {}
    attempts = 0

    async def attempt_once() -> list[SendResult]:
        nonlocal pending, attempts
        while True:
            # Wait out a connector pause before taking a slot, so one throttled provider does
            # not hold the semaphore the other connectors share.
            await throttle.wait(stop)
            if stop.is_set():
                raise _Stop
            async with semaphore:
                await limiter.acquire(len(pending))
                if stop.is_set():
                    raise _Stop
                if throttle.remaining() > 0:
                    continue  # a Retry-After arrived while this request queued
                if attempts == 0:
                    # Durably in flight before the request leaves, and not a moment earlier.
                    await marks.submit([(row.id, request_id) for row in batch])
                attempts += 1
                report.attempts += 1
                began = time.perf_counter()
                results = await connector.send_batch(client, pending)
                report.latencies.append(time.perf_counter() - began)
            break
        if connector.capabilities.idempotency:
            # The provider de-duplicates on our key: an answer lost in the air is safe to ask
            # again, so UNKNOWN is retried (with the same key) instead of given up on.
            results = [
                replace(r, outcome=Outcome.RETRY) if r.outcome == Outcome.UNKNOWN else r
                for r in results
            ]
        final.update((r.key, r) for r in results)
        hinted = [r.retry_after for r in results if r.retry_after is not None]
        if hinted:
            report.throttled += len(hinted)
            throttle.hold(min(max(hinted), MAX_RETRY_AFTER))
        pending = [m for m in pending if m.key in final and final[m.key].outcome == Outcome.RETRY]
        return [final[m.key] for m in pending]

    backoff = wait_exponential_jitter(
        multiplier=options.backoff_initial, max=options.backoff_max, jitter=options.backoff_initial
    )

    def pause_before(attempt: int, retryable: list[SendResult]) -> float:
        """Jittered exponential backoff before `attempt` (2, 3, …), at least Retry-After."""
        hinted = max((r.retry_after or 0.0 for r in retryable), default=0.0)
        return max(
            backoff(SimpleNamespace(attempt_number=attempt - 1)), min(hinted, MAX_RETRY_AFTER)
        )

    def wait(state: RetryCallState) -> float:
        retryable: list[SendResult] = state.outcome.result() if state.outcome else []
        return pause_before(state.attempt_number + 2, retryable)

    try:
        # Most batches are answered at the first try: tenacity only drives the retries.
        retryable = await attempt_once()
        if retryable and options.max_attempts > 1:
            await asyncio.sleep(pause_before(2, retryable))
            retrying = AsyncRetrying(
                stop=stop_after_attempt(options.max_attempts - 1),
                wait=wait,
                retry=retry_if_result(bool),  # retry while some messages are still retryable
                retry_error_callback=lambda state: state.outcome.result() if state.outcome else [],
                reraise=True,
            )
            await retrying(attempt_once)
    except _Stop:
        # What is still pending was refused with a retryable answer (or never sent) and not
        # retried because the activation stopped: not accepted, retries not exhausted, so it
        # goes back to `planned` for the next run rather than to dead_letter.
        for message in pending:
            final.pop(message.key, None)
    except ConnectorError as err:
        stop_error.append(err)
        stop.set()
        # The provider refused the request as a whole: those messages were not accepted.
        for message in pending:
            final.pop(message.key, None)
    recorded: list[tuple[int, SendResult, int]] = []
    never_sent: list[int] = []
    for row in batch:
        result = final.get(row.idempotency_key)
        if result is None and (stop.is_set() or attempts == 0):
            never_sent.append(row.id)
            continue
        if result is None:
            result = SendResult(
                row.idempotency_key,
                Outcome.UNKNOWN,
                error_message="the provider's answer did not mention this message",
            )
        recorded.append((row.id, result, row.attempts + attempts))
        _count(report, result)
    await records.submit(recorded)
    return never_sent


def _count(report: DeliveryReport, result: SendResult) -> None:
    if result.outcome == Outcome.SENT:
        report.sent += 1
    elif result.outcome == Outcome.FAILED:
        report.failed += 1
    elif result.outcome == Outcome.UNKNOWN:
        report.unknown += 1
    else:
        report.dead_letter += 1
    if result.error_code:
        report.error_codes[result.error_code] += 1


async def _log_progress_every(
    report: DeliveryReport, total: int, started: float, seconds: float = 5.0
) -> None:
    """A progress line every few seconds: done, sent, failed, rate and ETA."""
    while True:
        await asyncio.sleep(seconds)
        _log_progress(report, total, started)


def _log_progress(report: DeliveryReport, total: int, started: float) -> None:
    done = report.sent + report.failed + report.unknown + report.dead_letter
    elapsed = time.perf_counter() - started
    rate = done / elapsed if elapsed else 0.0
    eta = (total - done) / rate if rate else 0.0
    log.info(
        "delivery progress: %d/%d done, sent %d, failed %d, %.0f msg/s, ETA %.0fs",
        done,
        total,
        report.sent,
        report.failed,
        rate,
        eta,
    )
