"""What every provider request goes through: delay, authentication, faults, validation,
acceptance and the answer, for one-message providers (`ProviderRules`) and batch providers
(`BatchRules`); the dropped connection and the request log."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cdp_activation.sandbox.core import (
    Fault,
    MessageStore,
    SandboxAttempt,
    SandboxConfig,
    SandboxMessage,
    fault_draw,
    request_fault,
)
from cdp_activation.sandbox.status_webhooks import schedule_statuses


@dataclass(frozen=True)
class Candidate:
    """A valid request: the recipient and what would be recorded if it is accepted."""

    to: str
    record: dict[str, Any]
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProviderRules:
    """The provider-specific steps `provider_request` runs in a fixed order."""

    name: str
    authorized: Callable[[Request, SandboxConfig], bool]
    unauthorized: Callable[[], Response]
    parse: Callable[[Request, bytes], Response | Candidate]
    refuse: Callable[[SandboxConfig, Candidate], Response | None]
    accept: Callable[[Request, Candidate], tuple[SandboxMessage, Response]]
    fault_answer: Callable[[SandboxConfig, Fault, float], Response]


class _Exchange:
    """One provider request on its way through the sandbox: the raw body, which attempt of that
    body it is (what fault draws are keyed on), and a `log` that records how it was answered."""

    def __init__(self, request: Request, provider: str, raw: bytes, arrived: float) -> None:
        self.config: SandboxConfig = request.app.state.config
        self.store: MessageStore = request.app.state.store
        self.provider = provider
        self.raw = raw
        self.arrived = arrived
        self.request_hash = hashlib.sha256(raw).hexdigest()
        self.attempt = self.store.next_attempt(provider, self.request_hash)

    def log(
        self,
        result: str,
        status: int | None,
        retry_after: float | None = None,
        to: str | None = None,
    ) -> None:
        self.store.log(
            SandboxAttempt(
                provider=self.provider,
                request_hash=self.request_hash,
                attempt=self.attempt,
                arrived=self.arrived,
                answered=time.monotonic(),
                result=result,
                status=status,
                retry_after=retry_after,
                to=to,
            )
        )

    def fault(self) -> Fault:
        return request_fault(self.config, self.provider, self.request_hash, self.attempt)

    def fault_draw(self) -> float:
        return fault_draw(self.config, "5xx", self.provider, self.request_hash, self.attempt)


async def _begin(
    request: Request,
    provider: str,
    authorized: Callable[[Request, SandboxConfig], bool],
    unauthorized: Callable[[], Response],
) -> _Exchange | Response:
    """What every send route does first: read the whole body, wait the configured latency,
    check credentials. Returns the exchange, or the answer when it ends here."""
    store: MessageStore = request.app.state.store
    arrived = time.monotonic()
    try:
        raw = await request.body()
    except ClientDisconnect:
        # The client went away (killed, say) before its request was read: like a provider
        # that never got it, accept nothing. Logged so a test can count these.
        store.log(gone_attempt(provider, arrived))
        return DropConnection()
    exchange = _Exchange(request, provider, raw, arrived)
    await provider_delay(exchange.config, provider, exchange.request_hash, exchange.attempt)
    if not authorized(request, exchange.config):
        exchange.log("rejected", 401)
        return unauthorized()
    return exchange


async def _fault_before_accept(
    request: Request,
    exchange: _Exchange,
    fault: Fault,
    fault_answer: Callable[[SandboxConfig, Fault, float], Response],
    to: str | None,
) -> Response | None:
    """Throttling, server errors and timeouts: answered before anything is accepted."""
    config = exchange.config
    if fault in (Fault.THROTTLED, Fault.SERVER_ERROR):
        answer = fault_answer(config, fault, exchange.fault_draw())
        retry_after = config.retry_after_s if fault == Fault.THROTTLED else None
        exchange.log(fault.value, answer.status_code, retry_after, to=to)
        return answer
    if fault == Fault.TIMEOUT:
        await _wait_for_disconnect(request.receive, config.timeout_hold_ms / 1000)
        exchange.log(fault.value, None, to=to)
        return DropConnection()
    return None


async def provider_request(request: Request, rules: ProviderRules) -> Response:
    """Answer one send request, injecting the configured fault.

    Order: read the whole request, wait the configured latency, check credentials, validate,
    draw the fault; throttling, server errors and timeouts happen before anything is accepted,
    so those messages are surely not sent; only then refuse per recipient, and accept (record)
    the message, after which a drop-after-accept fault closes the connection unanswered.
    Credentials and validation errors (a wrong template, say) come before any fault, so they
    stay deterministic: an activation that must stop always stops.
    """
    begun = await _begin(request, rules.name, rules.authorized, rules.unauthorized)
    if isinstance(begun, Response):
        return begun
    exchange = begun
    parsed = rules.parse(request, exchange.raw)
    if isinstance(parsed, Response):
        exchange.log("rejected", parsed.status_code)
        return parsed
    fault = exchange.fault()
    early = await _fault_before_accept(request, exchange, fault, rules.fault_answer, parsed.to)
    if early is not None:
        return early
    refused = rules.refuse(exchange.config, parsed)
    if refused is not None:
        exchange.log("rejected", refused.status_code, to=parsed.to)
        return refused
    message, answer = rules.accept(request, parsed)
    exchange.store.add(message)
    schedule_statuses(request, message)
    if fault == Fault.DROP_AFTER_ACCEPT:
        exchange.log(fault.value, None, to=parsed.to)
        return DropConnection()
    if fault == Fault.SERVER_ERROR_AFTER_ACCEPT:
        return _server_error_after_accept(exchange, rules.fault_answer, parsed.to)
    if fault == Fault.GATEWAY_TIMEOUT_AFTER_ACCEPT:
        return _gateway_timeout_after_accept(exchange, parsed.to)
    exchange.log("accepted", answer.status_code, to=parsed.to)
    return answer


@dataclass(frozen=True)
class BatchRules:
    """The provider-specific steps of a many-messages-per-request route (Infobip, webhook).

    `refuse` and `accept` work per message and give the message's entry of the answer (plus,
    for `accept`, the message to record, or None when the provider already has it);
    `answer` wraps the entries into the provider's 200 body.
    """

    name: str
    authorized: Callable[[Request, SandboxConfig], bool]
    unauthorized: Callable[[], Response]
    parse: Callable[[Request, bytes], Response | list[Candidate]]
    refuse: Callable[[SandboxConfig, Candidate], dict[str, Any] | None]
    accept: Callable[[Request, Candidate], tuple[SandboxMessage | None, dict[str, Any]]]
    answer: Callable[[list[dict[str, Any]]], Response]
    fault_answer: Callable[[SandboxConfig, Fault, float], Response]
    # Providers that de-duplicate a request on a client key (LINE's X-Line-Retry-Key): the
    # answer to a repeat of an accepted request, or None (and the key is now remembered).
    replay: Callable[[Request, list[Candidate]], Response | None] | None = None
    # A refusal of the request as a whole before anything of it is accepted (LINE's monthly
    # quota), or None. Asked before `replay`, which remembers the key of what it lets through.
    refuse_request: Callable[[Request, SandboxConfig, list[Candidate]], Response | None] | None = (
        None
    )


async def batch_request(request: Request, rules: BatchRules) -> Response:
    """Like `provider_request`, for a request carrying many messages: a fault hits the whole
    request (one HTTP answer), refusals are per message inside the 200 answer, and a
    drop-after-accept drops the answer after every acceptable message was recorded."""
    begun = await _begin(request, rules.name, rules.authorized, rules.unauthorized)
    if isinstance(begun, Response):
        return begun
    exchange = begun
    parsed = rules.parse(request, exchange.raw)
    if isinstance(parsed, Response):
        exchange.log("rejected", parsed.status_code)
        return parsed
    only = parsed[0].to if len(parsed) == 1 else None
    fault = exchange.fault()
    early = await _fault_before_accept(request, exchange, fault, rules.fault_answer, only)
    if early is not None:
        return early
    if rules.refuse_request is not None:
        refused = rules.refuse_request(request, exchange.config, parsed)
        if refused is not None:
            exchange.log("refused", refused.status_code, to=only)
            return refused
    if rules.replay is not None and (replayed := rules.replay(request, parsed)) is not None:
        exchange.log("replayed", replayed.status_code, to=only)
        return replayed
    entries: list[dict[str, Any]] = []
    for candidate in parsed:
        refusal = rules.refuse(exchange.config, candidate)
        if refusal is not None:
            entries.append(refusal)
            continue
        message, entry = rules.accept(request, candidate)
        if message is not None:
            exchange.store.add(message)
            schedule_statuses(request, message)
        entries.append(entry)
    answer = rules.answer(entries)
    if fault == Fault.DROP_AFTER_ACCEPT:
        exchange.log(fault.value, None, to=only)
        return DropConnection()
    if fault == Fault.SERVER_ERROR_AFTER_ACCEPT:
        return _server_error_after_accept(exchange, rules.fault_answer, only)
    if fault == Fault.GATEWAY_TIMEOUT_AFTER_ACCEPT:
        return _gateway_timeout_after_accept(exchange, only)
    exchange.log("accepted", answer.status_code, to=only)
    return answer


def _server_error_after_accept(
    exchange: _Exchange,
    fault_answer: Callable[[SandboxConfig, Fault, float], Response],
    to: str | None,
) -> Response:
    """The provider's own server error, answered for a request it has taken (recorded)."""
    answer = fault_answer(exchange.config, Fault.SERVER_ERROR, exchange.fault_draw())
    exchange.log(Fault.SERVER_ERROR_AFTER_ACCEPT.value, answer.status_code, to=to)
    return answer


# What a load balancer or proxy in front of a provider answers when it gives up waiting for the
# provider (nginx's page): its own words, none of the provider's.
_GATEWAY_TIMEOUT_PAGE = (
    "<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    "<center><h1>504 Gateway Time-out</h1></center>\r\n</body>\r\n</html>\r\n"
)


def _gateway_timeout_after_accept(exchange: _Exchange, to: str | None) -> Response:
    """A gateway's 504 for a request the provider has taken (recorded)."""
    answer = Response(_GATEWAY_TIMEOUT_PAGE, status_code=504, media_type="text/html")
    exchange.log(Fault.GATEWAY_TIMEOUT_AFTER_ACCEPT.value, answer.status_code, to=to)
    return answer


def gone_attempt(provider: str, arrived: float) -> SandboxAttempt:
    return SandboxAttempt(
        provider=provider,
        request_hash="",
        attempt=0,
        arrived=arrived,
        answered=time.monotonic(),
        result="client_gone",
        status=None,
    )


async def provider_delay(
    config: SandboxConfig, provider: str = "", request_hash: str = "", attempt: int = 0
) -> None:
    """Latency before a provider answers: base + deterministic jitter + the occasional slow one
    (drawn per request; routes that are not sends draw with empty parts, which is fine)."""
    delay_ms = config.latency_ms
    if config.latency_jitter_ms > 0:
        jitter = fault_draw(config, "jitter", provider, request_hash, attempt)
        delay_ms += config.latency_jitter_ms * jitter
    if config.slow_rate > 0 and fault_draw(config, "slow", provider, request_hash, attempt) < (
        config.slow_rate
    ):
        delay_ms += config.slow_ms
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)


def retry_after_header(seconds: float) -> str:
    """Whole seconds as providers send them; a fraction only when configured as one."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


async def _wait_for_disconnect(receive: Receive, limit: float) -> bool:
    """Wait (at most `limit` s) for the client to go away; True if it did.

    The request body has been read, so the next ASGI message can only be `http.disconnect`.
    """
    try:
        async with asyncio.timeout(limit):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return False
    return True


class DropConnection(Response):
    """Not an answer: close the client's connection without sending a byte.

    ASGI has no "abort" message, so the transport is reached through the server's `send`
    callable (uvicorn's is a method of an object holding the transport), which
    `SandboxApp` stores in the scope. When that is not available (another ASGI
    server), the fallback starts a response and never finishes it, which makes the server close
    the connection: the client then holds a truncated answer, equally useless to it.
    """

    def __init__(self) -> None:
        super().__init__(status_code=599)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_send = scope.get(RAW_SEND)
        transport = getattr(getattr(raw_send, "__self__", None), "transport", None)
        if transport is not None and hasattr(transport, "abort"):
            if not transport.is_closing():
                transport.abort()
            # Let the server see the disconnect before anything else tries to answer.
            await _wait_for_disconnect(receive, 1.0)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
            }
        )


RAW_SEND = "cdp_sandbox.raw_send"
