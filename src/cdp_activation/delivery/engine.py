"""Delivery: due ledger rows -> connector batches, claimed, rate-limited, retried, recorded.

The ledger is the only arbiter of who sends what. A delivery registers a worker in the ledger
(a lease it renews while it lives) and its coroutines take turns at claiming: one statement
moves a batch of due rows `planned -> in_flight` for this worker and returns them (group
commit: every coroutine that asked meanwhile is served by the same transaction), the request
goes out, and the answer is recorded by the next group commit. So a row is sent only by the
worker the ledger handed it to, however many runs overlap, and `in_flight` means "may be on
the wire": a crash at any instant leaves in flight only requests that had left or were leaving.

A retryable answer (429, 5xx, a request that never left) puts the row back to `planned`, due
again after a jittered exponential backoff that honours Retry-After; the backoff is waited out
in the ledger, not in flight, and any worker may take the row when it is due. A Retry-After
also pauses every request to that connector (throttling is about the sender). A message that
used up its attempts in this run waits for a later run; when its provider accepted nothing
since that message's first try, or failed many requests in a row, the provider is taken to be
down and the step stops: every row not yet sent stays `planned`, none is given up on. A
template or credentials error stops the step the same way. A template whose newest word in
the ledger is PAUSED or DISABLED (Meta's template status webhook; `template_states.py`) stops
only its connector: claimed rows go back unsent, the other connectors of the step go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import sqlalchemy as sa
from aiolimiter import AsyncLimiter
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from cdp_activation import heap, metrics
from cdp_activation.connectors.base import (
    Connector,
    ConnectorError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateRef,
    send_reference,
)
from cdp_activation.delivery.rate_limits import SharedLimiter, sender_key
from cdp_activation.delivery.transport import make_client
from cdp_activation.group_commit import GroupCommit
from cdp_activation.ledger import (
    FAILED,
    INITIAL_STEP,
    PLANNED,
    SENT,
    UNKNOWN,
    ClaimRequest,
    FrequencyCap,
    LeaseLost,
    Ledger,
    PlannedSend,
    Settlement,
)
from cdp_activation.ledger.base import awake_together
from cdp_activation.ledger.templates import TemplateGate, TemplateState
from cdp_activation.logs import BATCHES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryOptions:
    concurrency: int = 32  # requests in the air at once
    max_attempts: int = 4  # requests per message in one run; then it waits for a later run
    rate_per_second: float | None = None  # None: the connector's configured or default rate
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    timeout_seconds: float = 15.0
    progress_seconds: float = 5.0  # a progress log line this often (done, rate, ETA)
    lease_seconds: float = 30.0  # a worker silent this long is taken for dead
    retry_later_seconds: float = 300.0  # how long a message that used its attempts waits
    # Requests in a row that a connector failed (5xx, no connection, no answer) with none
    # accepted in between: the provider is down, the step stops.
    outage_after: int = 12
    # Redis URL of rate limits shared with every other process sending for the same sender
    # (rate_limits.py); None: this process limits itself.
    rate_limit_url: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "concurrency",
            "max_attempts",
            "backoff_initial",
            "backoff_max",
            "timeout_seconds",
            "progress_seconds",
            "lease_seconds",
            "retry_later_seconds",
            "outage_after",
        ):
            if getattr(self, name) <= 0:
                value = getattr(self, name)
                raise ValueError(f"delivery option {name} must be greater than 0, got {value}")
        if self.rate_per_second is not None and self.rate_per_second <= 0:
            raise ValueError(
                "delivery option rate_per_second must be greater than 0, "
                f"got {self.rate_per_second}"
            )


@dataclass(frozen=True)
class DeliveryScope:
    """The rows one delivery sends: one activation's partition, one step."""

    activation: str
    partition_key: str
    step: str = INITIAL_STEP
    run_id: str | None = None
    # The activation's frequency caps, held again at each claim (`Ledger.claim`).
    caps: tuple[FrequencyCap, ...] = ()


MAX_RETRY_AFTER = 60.0  # seconds: a provider's longer Retry-After is capped
# How long a request the provider may hold waits for all its customers to be out of their
# quiet hours at once: well within the day a provider keeps a request's key (LINE's retry key).
RESEND_WHOLE_WITHIN = timedelta(hours=12)
_IN_QUIET_HOURS = "in the customer's quiet hours: it waits for them to end"
_NO_MOMENT = (
    "its request's answer was lost, and its customers are not all out of their quiet hours "
    f"at any moment within {RESEND_WHOLE_WITHIN.total_seconds() / 3600:g} hours: not sent "
    "again, as that would change its key"
)
# What became of an answered request's messages (the metrics' and batch lines' `outcome`),
# in `_Delivery._counts` order, then `refused` (the whole request refused).
_OUTCOMES = ("sent", "failed", "unknown", "retry", "retry_later", "refused")


class ProviderUnavailable(ConnectorError):
    """A provider kept failing (down, refusing connections, throttling without end): the step
    stopped and every row not yet sent stays planned for the next run."""


class TemplateBlocked(ConnectorError):
    """A template this step sends is paused or disabled (its newest word in the ledger's
    `template_states`): its rows were not sent and stay planned."""


class DeliveryIncomplete(ConnectorError):
    """Some messages were not accepted after every attempt this run allowed; they stay
    planned and a later run sends them."""


class DeliveryInterrupted(ConnectorError):
    """The process was asked to stop (SIGTERM, Ctrl-C): requests in the air were answered and
    recorded, nothing else was claimed."""


@dataclass
class DeliveryReport:
    sent: int = 0
    failed: int = 0
    unknown: int = 0
    retried: int = 0  # retryable answers whose message went back to wait for its next try
    retry_later: int = 0  # messages that used their attempts: planned for a later run
    # Messages claimed after their customer's quiet hours began (a long send, retries): given
    # back, unsent, until those end.
    quiet_hours: int = 0
    attempts: int = 0
    throttled: int = 0  # answers carrying Retry-After, each pausing its connector
    error_codes: Counter[str] = field(default_factory=Counter)
    # Accepted messages the provider qualified (Meta: held_for_quality_assessment, paused).
    provider_statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    last_error: dict[str, str] = field(default_factory=dict)  # per connector
    worker: str = ""  # which claim worker of the step (activation_run.send_due)
    stopped_by: str | None = None  # why that worker stopped early (activation_run.send_due)

    @classmethod
    def combined(cls, reports: Sequence[DeliveryReport]) -> DeliveryReport:
        """The sum of several claim workers' reports (elapsed: the longest)."""
        total = cls()
        for r in reports:
            for name in (
                "sent",
                "failed",
                "unknown",
                "retried",
                "retry_later",
                "quiet_hours",
                "attempts",
                "throttled",
            ):
                setattr(total, name, getattr(total, name) + getattr(r, name))
            total.error_codes.update(r.error_codes)
            total.provider_statuses.update(r.provider_statuses)
            total.latencies.extend(r.latencies)
            total.elapsed = max(total.elapsed, r.elapsed)
            total.last_error.update(r.last_error)
        return total

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
        reference=send_reference(row.id),
    )


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
            await _sleep_unless(stop, delay)

    async def share(self, seconds: float) -> None:
        """Tell the other processes sending for this sender (nobody, here)."""


class _SharedThrottle(_Throttle):
    """The pause shared through the rate limit's Redis: every process sending for the sender
    waits out a Retry-After that any of them was given."""

    def __init__(self, limiter: SharedLimiter) -> None:
        super().__init__()
        self.limiter = limiter

    async def wait(self, stop: asyncio.Event) -> None:
        shared = await self.limiter.pause_until() - time.time()
        if shared > 0:
            self.hold(shared)
        await super().wait(stop)

    async def share(self, seconds: float) -> None:
        await self.limiter.hold(seconds)


def _limits_for(
    connector: Connector, options: DeliveryOptions
) -> tuple[AsyncLimiter | SharedLimiter, _Throttle]:
    """The connector's rate limit and Retry-After pause: this process's own, or shared with
    every process sending for the same sender (`options.rate_limit_url`)."""
    rate = rate_of(connector, options)
    if not options.rate_limit_url:
        return AsyncLimiter(rate, 1), _Throttle()
    shared = SharedLimiter(options.rate_limit_url, sender_key(connector), rate)
    return shared, _SharedThrottle(shared)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if the delivery is stopped meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0.0))


def deliver(
    ledger: Ledger,
    scope: DeliveryScope,
    connectors: Mapping[str, Connector],
    options: DeliveryOptions | None = None,
) -> DeliveryReport:
    """Send every due `planned` row of `scope` and record each outcome (see the module doc).

    Raises `ProviderUnavailable`, `DeliveryIncomplete`, `DeliveryInterrupted`, `LeaseLost` or
    another `ConnectorError` when the step did not finish: what was not sent stays planned.
    """
    return asyncio.run(deliver_async(ledger, scope, connectors, options or DeliveryOptions()))


def claim_horizon(options: DeliveryOptions) -> timedelta:
    """How far ahead a delivery waits for rows to fall due (retries it backed off)."""
    return timedelta(seconds=MAX_RETRY_AFTER + options.backoff_max + 1.0)


class _Delivery:
    """One delivery's shared state: the stop signal, its cause, per-connector health."""

    def __init__(self, options: DeliveryOptions, scope: DeliveryScope | None = None) -> None:
        self.options = options
        self.scope = scope or DeliveryScope("", "")
        # connector -> its messages counters, one per outcome (`_OUTCOMES`), looked up once.
        self._counters: dict[str, tuple[Any, ...]] = {}
        self.report = DeliveryReport()
        self.stop = asyncio.Event()
        self.error: BaseException | None = None
        self.interrupted = False  # a first SIGTERM/SIGINT arrived
        # A row's requests in this run and when its first went (monotonic), kept only while
        # it waits for a retry here: a run of millions holds only the rows being retried.
        self.tries: dict[int, int] = {}
        self.first_try: dict[int, float] = {}
        self.last_accepted: dict[str, float] = {}  # connector -> monotonic time
        self.failing: Counter[str] = Counter()  # connector -> requests failed in a row
        self.in_the_air: Counter[str] = Counter()  # connector -> batches awaiting an answer
        # Connectors stopped while the others go on (a paused template): connector -> why.
        self.halted: dict[str, ConnectorError] = {}
        self.backoff = wait_exponential_jitter(
            multiplier=options.backoff_initial,
            max=options.backoff_max,
            jitter=options.backoff_initial,
        )

    def fail(self, error: BaseException) -> None:
        """Stop claiming; the first cause is the one raised at the end."""
        if self.error is None:
            self.error = error
        self.stop.set()

    @property
    def horizon(self) -> timedelta:
        return claim_horizon(self.options)

    def settle(
        self,
        connector: Connector,
        rows: Sequence[PlannedSend],
        results: Sequence[SendResult],
        refused: ConnectorError | None,
    ) -> list[Settlement]:
        """What becomes of each row of an answered request (see the module doc)."""
        now = datetime.now(UTC)
        name = connector.name
        by_key = {r.key: r for r in results}
        out: list[Settlement] = []
        retryable: list[tuple[PlannedSend, SendResult, bool]] = []
        accepted = False
        unanswered = 0  # rows the provider refused with the request (`refused`)
        before = self._counts()
        tries, first_try, clock = self.tries, self.first_try, time.monotonic()
        idempotent = connector.capabilities.idempotency
        for row in rows:
            tried, first = tries.pop(row.id, 0) + 1, first_try.pop(row.id, clock)
            if refused is not None and row.idempotency_key not in by_key:
                # Refused before the provider took it (`ConnectorError.answered` holds what
                # was answered): due again once the run is resumed.
                # A request asked again may have reached the provider the first time: it
                # keeps its request (and so its key), refused now or not.
                out.append(
                    Settlement(
                        row.id,
                        PLANNED,
                        error_message=connector.redact(str(refused)),
                        uncertain=row.resent_request,
                    )
                )
                unanswered += 1
                continue
            result = by_key.get(row.idempotency_key) or SendResult(
                row.idempotency_key,
                Outcome.UNKNOWN,
                error_message="the provider's answer did not mention this message",
            )
            # A request asked again may have reached the provider the first time: its rows
            # keep their request whatever the answer now (a 5xx now says nothing of then).
            uncertain = row.resent_request
            if result.outcome == Outcome.UNKNOWN and idempotent:
                # The provider de-duplicates on our key: a lost answer is safe to ask again.
                result, uncertain = replace(result, outcome=Outcome.RETRY), True
            elif result.may_be_taken and idempotent:
                # A 5xx (or "still in progress") after which the provider may hold the
                # request: asked again whole, under its key, as for a lost answer.
                uncertain = True
            if result.outcome == Outcome.RETRY:
                tries[row.id], first_try[row.id] = tried, first
                retryable.append((row, result, uncertain))
                continue
            state = _ANSWERED.get(result.outcome, UNKNOWN)
            if state != UNKNOWN:
                accepted = True  # the provider is up and answering
            out.append(
                Settlement(
                    row.id,
                    state,
                    provider_message_id=result.provider_message_id,
                    error_code=result.error_code,
                    error_message=result.error_message,
                    provider_status=result.provider_status,
                )
            )
            self._count(state, result)
            if state == UNKNOWN:
                self.report.last_error[name] = _describe(result)
        if accepted:
            self.last_accepted[name] = time.monotonic()
            self.failing[name] = 0
        elif any(r.retry_after is None for _, r, _ in retryable) or any(
            s.state == UNKNOWN for s in out
        ):
            self.failing[name] += 1  # throttling (Retry-After) is not failing
        hinted = [r.retry_after for _, r, _ in retryable if r.retry_after is not None]
        if hinted:
            self.report.throttled += len(hinted)
            metrics.child(metrics.THROTTLED, name).inc(len(hinted))
        out += self._retry(name, retryable, now, max(hinted, default=0.0))
        self._observe(name, before, len(rows), unanswered if refused is not None else None)
        if self.failing[name] >= self.options.outage_after:
            self.fail(
                ProviderUnavailable(
                    f"{name} failed {self.failing[name]} requests in a row and accepted none "
                    f"(last error: {self.report.last_error.get(name, 'no answer')}); the step "
                    "stopped and every message not sent yet stays planned for the next run"
                )
            )
        return out

    def _counts(self) -> tuple[int, int, int, int, int]:
        r = self.report
        return r.sent, r.failed, r.unknown, r.retried, r.retry_later

    def _observe(
        self,
        name: str,
        before: tuple[int, int, int, int, int],
        size: int,
        refused: int | None,
    ) -> None:
        """One answered request into the metrics and the batch log line (`logs.py`): what
        became of its messages, never who they were."""
        counters = self._counters.get(name)
        if counters is None:
            counters = self._counters[name] = tuple(
                metrics.child(metrics.MESSAGES, self.scope.activation, name, outcome)
                for outcome in _OUTCOMES
            )
        changes = [now - then for now, then in zip(self._counts(), before, strict=True)]
        if refused is not None:  # the request was refused: its unanswered rows
            changes.append(refused)
        for counter, count in zip(counters, changes, strict=False):
            if count:
                counter.inc(count)
        if BATCHES.isEnabledFor(logging.INFO):
            outcomes = dict(zip(_OUTCOMES, changes, strict=False))
            troubled = refused is not None or outcomes["unknown"] or outcomes["retry"]
            BATCHES.info(
                "batch of %d to %s: %s",
                size,
                name,
                ", ".join(f"{k} {v}" for k, v in outcomes.items() if v) or "nothing settled",
                extra={
                    "event": "batch",
                    "activation": self.scope.activation,
                    "partition": self.scope.partition_key,
                    "step": self.scope.step,
                    "run_id": self.scope.run_id,
                    "connector": name,
                    "messages": size,
                    **outcomes,
                    "error": self.report.last_error.get(name) if troubled else None,
                },
            )

    def _retry(
        self,
        name: str,
        retryable: list[tuple[PlannedSend, SendResult, bool]],
        now: datetime,
        hinted: float,
    ) -> list[Settlement]:
        out = []
        for row, result, uncertain in retryable:
            self.report.error_codes[result.error_code or "retry"] += 1
            self.report.last_error[name] = _describe(result)
            tries = self.tries[row.id]
            if tries >= self.options.max_attempts:
                wait = self.options.retry_later_seconds
                self.report.retry_later += 1
                if self.last_accepted.get(name, -math.inf) < self.first_try[row.id]:
                    self.fail(
                        ProviderUnavailable(
                            f"{name} accepted nothing while one message was tried "
                            f"{tries} times (last error: {_describe(result)}); the step "
                            "stopped and every message not sent yet stays planned for the "
                            "next run"
                        )
                    )
            else:
                attempt = SimpleNamespace(attempt_number=tries)
                wait = max(self.backoff(attempt), min(hinted, MAX_RETRY_AFTER))  # type: ignore[arg-type]
                self.report.retried += 1
            out.append(
                Settlement(
                    row.id,
                    PLANNED,
                    error_code=result.error_code,
                    error_message=result.error_message,
                    not_before=now + timedelta(seconds=wait),
                    uncertain=uncertain,
                )
            )
        return out

    def _count(self, state: str, result: SendResult) -> None:
        if state == SENT:
            self.report.sent += 1
        elif state == FAILED:
            self.report.failed += 1
        else:
            self.report.unknown += 1
        if result.error_code:
            self.report.error_codes[result.error_code] += 1
        if result.provider_status and result.provider_status != "accepted":
            self.report.provider_statuses[result.provider_status] += 1


# The state an answered request's outcome leaves a row in (anything else: `unknown`).
_ANSWERED = {Outcome.SENT: SENT, Outcome.FAILED: FAILED}


def _settle_retrying(ledger: Ledger, worker_id: str, items: list[Settlement]) -> None:
    """`Ledger.settle`, tried again on a transient database error (a lock timeout, a
    deadlock, a dropped connection): it is safe to repeat, and answers known but not written
    would otherwise end `unknown`."""
    for attempt in Retrying(
        retry=retry_if_exception_type(sa.exc.OperationalError),
        stop=stop_after_attempt(4),
        wait=wait_exponential_jitter(multiplier=0.05, max=1.0),
        reraise=True,
    ):
        with attempt:
            ledger.settle(worker_id, items)


def _describe(result: SendResult) -> str:
    parts = [p for p in (result.error_code, result.error_message) if p]
    return " ".join(parts)[:200] or result.outcome.value


async def deliver_async(
    ledger: Ledger,
    scope: DeliveryScope,
    connectors: Mapping[str, Connector],
    options: DeliveryOptions,
) -> DeliveryReport:
    """Claim and send the scope's due rows with `options.concurrency` requests in the air.

    Each coroutine claims its next batch as soon as its previous one is answered (a sliding
    window, never a barrier), so the requests in the air stay at the concurrency, and a row
    is claimed only once its request is about to leave (rate limit and pauses waited first).
    """
    run = _Delivery(options, scope)
    report = run.report
    started = time.perf_counter()
    due = await asyncio.to_thread(
        ledger.due_counts,
        scope.activation,
        scope.partition_key,
        scope.step,
        datetime.now(UTC) + run.horizon,
    )
    missing = sorted(set(due) - set(connectors))
    if missing:
        raise ConnectorError(f"no connector named {missing[0]!r} is configured")
    if not due:
        return report
    worker_id = await asyncio.to_thread(
        ledger.register_worker,
        scope.activation,
        scope.partition_key,
        scope.step,
        options.lease_seconds,
        scope.run_id,
    )
    limits = {name: _limits_for(connectors[name], options) for name in due}
    limiters = {name: limit for name, (limit, _) in limits.items()}
    throttles = {name: throttle for name, (_, throttle) in limits.items()}
    semaphore = asyncio.Semaphore(options.concurrency)

    def claim(requests: list[ClaimRequest]) -> list[list[PlannedSend]]:
        with metrics.timed(metrics.LEDGER_LATENCY, "claim"):
            try:
                return ledger.claim(
                    worker_id,
                    scope.activation,
                    scope.partition_key,
                    scope.step,
                    requests,
                    caps=scope.caps,
                )
            except sa.exc.OperationalError:
                # The server may have ended a transaction this worker left idle past its lease
                # (stalled: `Ledger._bound_idle`); if the lease is gone, say so.
                if not ledger.heartbeat(worker_id):
                    raise LeaseLost(
                        f"delivery worker {worker_id[:8]} lost its lease (it was stalled "
                        "longer than its lease and another run recovered its rows): it stops "
                        "here"
                    ) from None
                raise

    def record(items: list[Settlement]) -> None:
        with metrics.timed(metrics.LEDGER_LATENCY, "record"):
            _settle_retrying(ledger, worker_id, items)

    claims: GroupCommit[ClaimRequest] = GroupCommit(claim, "claiming")
    settles: GroupCommit[Settlement] = GroupCommit(record, "recording outcomes")
    gate = TemplateGate(ledger.engine)

    async def send_from(name: str, client: httpx.AsyncClient) -> None:
        connector = connectors[name]
        size = connector.capabilities.max_batch_size
        whole = groups_requests(connector)
        limiter, throttle = limiters[name], throttles[name]
        limiter_wait = metrics.child(metrics.LIMITER_WAIT, name)
        request_seconds = metrics.child(metrics.PROVIDER_LATENCY, name)
        while not run.stop.is_set() and name not in run.halted:
            await throttle.wait(run.stop)
            rows: list[PlannedSend] = []
            results: list[SendResult] = []
            refused: ConnectorError | None = None
            async with semaphore:
                if run.stop.is_set():
                    return
                queued = time.perf_counter()
                await limiter.acquire(min(size, limiter.max_rate))
                limiter_wait.observe(time.perf_counter() - queued)
                if run.stop.is_set():
                    return
                if throttle.remaining() > 0:
                    continue  # a Retry-After arrived while this request queued
                claimed = await claims.submit([ClaimRequest(name, size, whole)])
                rows = claimed[0] if claimed else []
                if any(r.reopens_at is not None for r in rows):
                    rows = await hold_for_quiet_hours(rows)
                    if not rows:
                        continue
                blocked = await gate.blocking(name, rows) if rows else None
                if blocked is not None:
                    await settles.submit([Settlement(r.id, PLANNED, unsent=True) for r in rows])
                    run.halted.setdefault(name, _blocked_error(blocked))
                    return
                if rows:
                    try:
                        outbound = [to_outbound(r) for r in rows]
                    except Exception as err:  # a row the engine cannot read: nothing left
                        await settles.submit([Settlement(r.id, PLANNED, unsent=True) for r in rows])
                        raise ValueError(
                            f"a {name} message in the ledger is malformed: {err}"
                        ) from err
                    run.in_the_air[name] += 1
                    began = time.perf_counter()
                    try:
                        results = await connector.send_batch(client, outbound)
                    except ConnectorError as err:
                        refused, results = err, list(err.answered)
                    report.attempts += 1
                    took = time.perf_counter() - began
                    report.latencies.append(took)
                    request_seconds.observe(took)
            if not rows:
                if not await wait_for_due(name):
                    return
                continue
            try:
                await settles.submit(run.settle(connector, rows, results, refused))
            finally:
                run.in_the_air[name] -= 1
            if refused is not None:
                run.fail(refused)
                return
            hinted = [r.retry_after for r in results if r.retry_after is not None]
            if hinted:
                pause = min(max(hinted), MAX_RETRY_AFTER)
                metrics.child(metrics.RETRY_AFTER_SECONDS, name).inc(pause)
                throttle.hold(pause)
                await throttle.share(pause)

    async def hold_for_quiet_hours(rows: list[PlannedSend]) -> list[PlannedSend]:
        """The claimed rows whose customer is not in quiet hours; the others go back, unsent,
        until those end. A request made before (the provider may hold it) goes out again
        whole or not at all: taking a recipient out would give it another key. It waits,
        in its request, for the first moment none of its customers is in quiet hours; with
        none within `RESEND_WHOLE_WITHIN` (the provider forgets a key after a day) it is
        not sent again: `unknown`, as through a provider without a key."""
        if not rows[0].resent_request:
            held = [r for r in rows if r.reopens_at is not None]
            await wait_out_quiet_hours([(r, r.reopens_at) for r in held], whole=False)
            return [r for r in rows if r.reopens_at is None]
        windows = await asyncio.to_thread(ledger.quiet_windows, [r.id for r in rows])
        moment = awake_together(windows, datetime.now(UTC), RESEND_WHOLE_WITHIN)
        if moment is None:
            await settles.submit(
                [Settlement(r.id, UNKNOWN, error_message=_NO_MOMENT) for r in rows]
            )
            report.unknown += len(rows)
        else:
            await wait_out_quiet_hours([(r, moment) for r in rows], whole=True)
        return []

    async def wait_out_quiet_hours(
        waits: list[tuple[PlannedSend, datetime | None]], whole: bool
    ) -> None:
        """Each row back to planned, unsent, until its moment; `whole`: kept in its request."""
        await settles.submit(
            [
                Settlement(
                    r.id,
                    PLANNED,
                    not_before=until,
                    error_message=_IN_QUIET_HOURS,
                    deferred=True,
                    uncertain=whole,
                )
                for r, until in waits
            ]
        )
        report.quiet_hours += len(waits)

    async def wait_for_due(name: str) -> bool:
        """Nothing is due now: wait for the next row of this connector falling due within
        the horizon (a retry backing off), or for a batch still in the air that may come
        back retryable; False when there is nothing left to wait for."""
        while not run.stop.is_set():
            now = datetime.now(UTC)
            next_due = await asyncio.to_thread(
                ledger.next_due,
                scope.activation,
                scope.partition_key,
                scope.step,
                name,
                now + run.horizon,
            )
            if next_due is not None:
                delay = (next_due - now).total_seconds()
                await _sleep_unless(run.stop, min(max(delay, 0.005), 1.0))
                return True
            if run.in_the_air[name] == 0:
                return False
            await _sleep_unless(run.stop, 0.05)
        return False

    async def guarded(name: str, client: httpx.AsyncClient) -> None:
        try:
            await send_from(name, client)
        except Exception as err:  # a failed claim or write stops the delivery, loudly
            run.fail(err)

    async def keep_lease() -> None:
        while True:
            await asyncio.sleep(options.lease_seconds / 3)
            try:
                alive = await asyncio.to_thread(ledger.heartbeat, worker_id)
            except Exception as err:  # the ledger is unreachable: the claims will say so too
                log.warning("could not renew the delivery lease: %s", err)
                continue
            if not alive:
                run.fail(LeaseLost(f"delivery worker {worker_id[:8]} lost its lease"))
                return

    def workers_for(name: str) -> int:
        batches = math.ceil(due[name] / connectors[name].capabilities.max_batch_size)
        return max(1, min(options.concurrency, batches))

    restore = _stop_on_signals(run)
    try:
        # What start-up and earlier steps left: out of every pass of the collector (heap.py).
        with heap.delivering():
            async with make_client(
                timeout=options.timeout_seconds, max_in_flight=options.concurrency
            ) as client:
                lease = asyncio.create_task(keep_lease())
                progress = asyncio.create_task(
                    _log_progress_every(
                        report, sum(due.values()), started, options.progress_seconds
                    )
                )
                try:
                    await asyncio.gather(
                        *(guarded(name, client) for name in due for _ in range(workers_for(name)))
                    )
                finally:
                    lease.cancel()
                    progress.cancel()
    finally:
        restore()
        await asyncio.to_thread(ledger.stop_worker, worker_id)
    report.elapsed = time.perf_counter() - started
    if run.error is not None:
        raise _with_report(report, run.error)
    if run.halted:
        raise _with_report(report, next(iter(run.halted.values())))
    if report.retry_later:
        last = "; ".join(f"{n}: {e}" for n, e in sorted(report.last_error.items()))
        raise _with_report(
            report,
            DeliveryIncomplete(
                f"{report.retry_later} message(s) were not accepted after {options.max_attempts} "
                f"attempts each (last error: {last}); they stay planned and the next run or the "
                f"deferred-sends sensor retries them in {options.retry_later_seconds:g} s"
            ),
        )
    return report


def _blocked_error(state: TemplateState) -> TemplateBlocked:
    return TemplateBlocked(
        f"{state.describe()}: its messages were not sent and stay planned; they go on the next "
        "run once the template is approved again (the other channels of this step went on)"
    )


def _with_report(report: DeliveryReport, error: BaseException) -> BaseException:
    """`error` carrying what the delivery did before it stopped (`error.report`)."""
    error.report = report  # type: ignore[attr-defined]
    return error


def _stop_on_signals(run: _Delivery) -> Callable[[], None]:
    """SIGTERM and SIGINT stop claiming; requests in the air are answered and recorded, then
    the delivery raises `DeliveryInterrupted`. A second signal interrupts at once. Only in the
    main thread (where signals are delivered); returns what restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(sig: signal.Signals) -> None:
        if run.interrupted:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            return
        run.interrupted = True
        log.warning("%s: finishing the requests in the air, claiming nothing more", sig.name)
        run.fail(
            DeliveryInterrupted(
                f"stopped by {sig.name}: requests in the air were answered and recorded; "
                "every message not sent yet stays planned for the next run"
            )
        )

    for sig in previous:
        loop.add_signal_handler(sig, on_signal, sig)

    def restore() -> None:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)

    return restore


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


async def _log_progress_every(
    report: DeliveryReport, total: int, started: float, seconds: float = 5.0
) -> None:
    """A progress line every few seconds: done, sent, failed, rate and ETA."""
    while True:
        await asyncio.sleep(seconds)
        _log_progress(report, total, started)


def _log_progress(report: DeliveryReport, total: int, started: float) -> None:
    done = report.sent + report.failed + report.unknown
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
