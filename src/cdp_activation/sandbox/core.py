"""The sandbox's core: its behaviour settings and fault model (`SandboxConfig`, `Fault`,
`request_fault`), and the store of accepted messages and requests (`MessageStore`)."""

from __future__ import annotations

import builtins
import dataclasses
import re
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from cdp_activation.sandbox.draws import draw
from cdp_activation.sandbox_credentials import (
    SANDBOX_BRAZE_API_KEY,
    SANDBOX_INFOBIP_API_KEY,
    SANDBOX_LINE_TOKEN,
    SANDBOX_META_TOKEN,
    SANDBOX_TWILIO_ACCOUNT_SID,
    SANDBOX_TWILIO_AUTH_TOKEN,
    SANDBOX_VONAGE_API_KEY,
    SANDBOX_VONAGE_API_SECRET,
    SANDBOX_WEBHOOK_TOKEN,
    SANDBOX_WECHAT_APP_ID,
    SANDBOX_WECHAT_APP_SECRET,
)

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox behaves. Defaults are the published sandbox credentials in settings and
    no faults at all, so the embedded default behaves like a healthy provider.

    Rates are probabilities per request (0..1). `rate_429`, `rate_5xx`, `rate_timeout`,
    `rate_drop_after_accept`, `rate_5xx_after_accept` (accepted and recorded, then answered
    500, as LINE warns a 5xx may be, or a gateway in front of a receiver that took the request)
    and `rate_504_after_accept` (accepted and recorded, then a gateway in front of the provider
    answers 504 in its own words, an HTML page, having given up waiting for the provider's
    answer) exclude each other (their sum must not exceed 1); `slow_rate` adds
    `slow_ms` on top of `latency_ms` (+ up to `latency_jitter_ms`); the per-recipient rates
    (`rate_not_on_whatsapp` for Meta, `rate_opted_out` for Twilio) fail a number permanently,
    every time it is sent to, the way a real provider does. `retry_after_s` is the Retry-After
    of a 429; it may be fractional (real providers send whole seconds, the client accepts both)
    so tests can stay fast. A timed-out request is held until the client gives up or
    `timeout_hold_ms` passes, then the connection is closed without an answer.
    """

    meta_token: str = SANDBOX_META_TOKEN
    twilio_account_sid: str = SANDBOX_TWILIO_ACCOUNT_SID
    twilio_auth_token: str = SANDBOX_TWILIO_AUTH_TOKEN
    infobip_api_key: str = SANDBOX_INFOBIP_API_KEY
    vonage_api_key: str = SANDBOX_VONAGE_API_KEY
    vonage_api_secret: str = SANDBOX_VONAGE_API_SECRET
    webhook_token: str = SANDBOX_WEBHOOK_TOKEN
    braze_api_key: str = SANDBOX_BRAZE_API_KEY
    line_token: str = SANDBOX_LINE_TOKEN
    wechat_app_id: str = SANDBOX_WECHAT_APP_ID
    wechat_app_secret: str = SANDBOX_WECHAT_APP_SECRET
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    seed: int = 0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    rate_5xx: float = 0.0
    rate_timeout: float = 0.0
    timeout_hold_ms: float = 30_000.0
    rate_drop_after_accept: float = 0.0
    rate_5xx_after_accept: float = 0.0
    rate_504_after_accept: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 0.0
    rate_not_on_whatsapp: float = 0.0
    rate_opted_out: float = 0.0
    # Share of accepted Meta template messages answered `message_status:
    # held_for_quality_assessment` (Meta holding a marketing message while it judges the
    # template) instead of `accepted`.
    meta_held_rate: float = 0.0
    # LINE messages the channel may still send this month (0: no limit). A push or multicast
    # that would take more than is left is refused whole, 429 "You have reached your monthly
    # limit.", as LINE refuses it; a repeat of an accepted retry key is still answered 409.
    line_monthly_quota: int = 0
    # Status webhooks back to a receiver (`status_webhooks_url`, e.g. http://127.0.0.1:8788;
    # empty: none), each provider's shape and signature: per accepted message `sent`, then
    # `delivered` (share `status_delivered_rate`, of which `status_read_rate` also `read`) or
    # `failed` with the provider's real code (`status_failed_rate`); the rest stay `sent`
    # (undelivered). Each report `status_delay_ms` after the previous; a share is sent twice
    # (`status_duplicate_rate`) or in reverse order (`status_reorder_rate`). Meta's reports
    # go up to `status_batch_max` to a webhook, as Meta batches them (1: one each).
    status_webhooks_url: str = ""
    status_delivered_rate: float = 1.0
    status_failed_rate: float = 0.0
    status_read_rate: float = 0.0
    status_delay_ms: float = 20.0
    status_duplicate_rate: float = 0.0
    status_reorder_rate: float = 0.0
    status_batch_max: int = 1
    # Customers answering (Meta and Twilio messages, after `delivered`): a share
    # `reply_rate` of them replies, and of those a share `reply_stop_rate` opts out (Meta: the
    # template's "Stop promotions" button; SMS and Twilio WhatsApp: "STOP"); the others write
    # a line of text. Posted signed, like the provider's, to the receiver's route.
    reply_rate: float = 0.0
    reply_stop_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in FAULT_FIELDS:
            value = getattr(self, name)
            whole = name in _WHOLE_FIELDS
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (whole and not isinstance(value, int))
            ):
                raise ValueError(f"sandbox fault setting {name} must be a number, got {value!r}")
            number = float(value)
            if name != "seed" and number < 0:
                raise ValueError(f"sandbox fault setting {name} must not be negative: {value}")
            if name in _RATE_FIELDS and number > 1:
                raise ValueError(f"sandbox fault rate {name} must be at most 1: {value}")
        if not 1 <= self.status_batch_max <= 1000:
            raise ValueError(
                f"sandbox setting status_batch_max must be 1 to 1000 (Meta's largest batch), "
                f"got {self.status_batch_max}"
            )
        if self.status_delivered_rate + self.status_failed_rate > 1 + 1e-9:
            raise ValueError("status_delivered_rate + status_failed_rate must not exceed 1")
        exclusive = sum(getattr(self, name) for name in _EXCLUSIVE_RATES)
        if exclusive > 1 + 1e-9:
            raise ValueError(
                f"{' + '.join(_EXCLUSIVE_RATES)} must not exceed 1 (got {exclusive:g}): each "
                "request suffers at most one of these faults"
            )

    def faults(self) -> dict[str, float | int | str]:
        """The behaviour settings (everything but credentials), as `GET /_sandbox/faults`."""
        return {name: getattr(self, name) for name in (*FAULT_FIELDS, *_TEXT_FIELDS)}

    def with_faults(self, changes: Mapping[str, Any]) -> SandboxConfig:
        """A copy with some behaviour settings changed; credentials cannot be changed this way
        (the control route is unauthenticated). Raises ValueError for unknown or bad values."""
        unknown = sorted(set(changes) - set(FAULT_FIELDS) - set(_TEXT_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown sandbox fault setting(s) {', '.join(unknown)}; known: "
                f"{', '.join((*FAULT_FIELDS, *_TEXT_FIELDS))}"
            )
        for name in _TEXT_FIELDS:
            if name in changes and not isinstance(changes[name], str):
                raise ValueError(f"sandbox setting {name} must be text")
        return dataclasses.replace(self, **dict(changes))


_CREDENTIAL_FIELDS = (
    "meta_token",
    "twilio_account_sid",
    "twilio_auth_token",
    "infobip_api_key",
    "vonage_api_key",
    "vonage_api_secret",
    "webhook_token",
    "braze_api_key",
    "line_token",
    "wechat_app_id",
    "wechat_app_secret",
)
_TEXT_FIELDS = ("status_webhooks_url",)
FAULT_FIELDS: tuple[str, ...] = tuple(
    f.name
    for f in dataclasses.fields(SandboxConfig)
    if f.name not in _CREDENTIAL_FIELDS and f.name not in _TEXT_FIELDS
)
_WHOLE_FIELDS = ("seed", "status_batch_max", "line_monthly_quota")
_EXCLUSIVE_RATES = (
    "rate_429",
    "rate_5xx",
    "rate_timeout",
    "rate_drop_after_accept",
    "rate_5xx_after_accept",
    "rate_504_after_accept",
)
_RATE_FIELDS = frozenset(name for name in FAULT_FIELDS if "rate" in name)


class Fault(StrEnum):
    """What the sandbox does to one request instead of (or after) answering it normally."""

    NONE = "none"
    THROTTLED = "throttled"  # 429 + Retry-After, nothing accepted
    SERVER_ERROR = "server_error"  # 500 or 503, nothing accepted
    TIMEOUT = "timeout"  # read, then never answered; nothing accepted
    DROP_AFTER_ACCEPT = "dropped_after_accept"  # accepted and recorded, then no answer
    SERVER_ERROR_AFTER_ACCEPT = "server_error_after_accept"  # accepted and recorded, then 500
    # Accepted and recorded, then a gateway's 504 (an HTML page, not the provider's error).
    GATEWAY_TIMEOUT_AFTER_ACCEPT = "gateway_timeout_after_accept"


def fault_draw(config: SandboxConfig, *parts: object) -> float:
    """`draws.draw` with the configured seed."""
    return draw(config.seed, *parts)


def request_fault(config: SandboxConfig, provider: str, request_hash: str, attempt: int) -> Fault:
    """The fault for the `attempt`-th request carrying this exact body (1 = first)."""
    draw = fault_draw(config, "fault", provider, request_hash, attempt)
    for fault, rate in (
        (Fault.THROTTLED, config.rate_429),
        (Fault.SERVER_ERROR, config.rate_5xx),
        (Fault.TIMEOUT, config.rate_timeout),
        (Fault.DROP_AFTER_ACCEPT, config.rate_drop_after_accept),
        (Fault.SERVER_ERROR_AFTER_ACCEPT, config.rate_5xx_after_accept),
        (Fault.GATEWAY_TIMEOUT_AFTER_ACCEPT, config.rate_504_after_accept),
    ):
        if draw < rate:
            return fault
        draw -= rate
    return Fault.NONE


@dataclass(frozen=True)
class SandboxMessage:
    """One message the sandbox accepted, as a test or the demo wants to inspect it."""

    provider: str  # "meta_whatsapp" | "twilio" | "infobip" | "vonage" | "webhook"
    channel: str  # "whatsapp" | "sms" | any channel a webhook message names
    to: str
    provider_message_id: str
    received_at: str  # ISO 8601, UTC
    template_name: str | None = None
    template_language: str | None = None
    template_category: str | None = None  # the catalog's, lower case: Meta bills by it
    parameters: tuple[str, ...] = ()
    body: str | None = None
    idempotency_key: str | None = None  # the client's Idempotency-Key header, when it sent one
    # What the provider echoes in this message's status reports: Meta's
    # `biz_opaque_callback_data`, Infobip's `callbackData`, Vonage's `client_ref`.
    callback_data: str | None = None
    status_callback: str | None = None  # Twilio: the StatusCallback URL its reports go to
    endpoint: str = "messages"  # Meta: `messages`, or `marketing_messages` (the MM API)

    @property
    def content_key(self) -> tuple[Any, ...]:
        """What makes two accepted messages the same message to the customer."""
        return (
            self.provider,
            self.to,
            self.template_name,
            self.template_language,
            self.parameters,
            self.body,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        data = asdict(self)
        data["parameters"] = list(self.parameters)
        return data


@dataclass(frozen=True)
class SandboxAttempt:
    """One provider request as the sandbox saw it, whatever it answered.

    `request_hash` is the SHA-256 of the raw body: every retry of one message carries the same
    body, so it groups a message's attempts. Times are `time.monotonic()` seconds, comparable
    with the client's when both run on one machine.
    """

    provider: str
    request_hash: str
    attempt: int  # 1 for the first request with this body, 2 for its first retry, ...
    arrived: float
    answered: float
    # A `Fault` value other than none, "accepted", "rejected", "replayed" (a repeat of an
    # accepted request answered without sending again) or "client_gone".
    result: str
    status: int | None  # HTTP status answered; None when the connection was dropped
    retry_after: float | None = None
    to: str | None = None  # the recipient, once the request has been parsed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MessageStore:
    """Thread-safe in-memory record of accepted messages and of every request.

    uvicorn serves from its own thread while tests read from the main one, hence the lock.
    """

    _messages: list[SandboxMessage] = field(default_factory=list)
    _attempts: list[SandboxAttempt] = field(default_factory=list)
    _seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    _first_ids: dict[tuple[str, str], str] = field(default_factory=dict)
    _tracked: dict[str, dict[str, Any]] = field(default_factory=dict)  # Braze user attributes
    _by_id: dict[tuple[str, str], SandboxMessage] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _in_progress: int = 0

    def track(self, attributes: list[dict[str, Any]]) -> bool:
        """Merge Braze `/users/track` attribute objects into each user's profile; whether any
        profile changed."""
        changed = False
        with self._lock:
            for item in attributes:
                profile = self._tracked.setdefault(str(item["external_id"]), {})
                changed = changed or any(profile.get(k, object()) != v for k, v in item.items())
                profile.update(item)
        return changed

    def profiles(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {user: dict(values) for user, values in self._tracked.items()}

    def add(self, message: SandboxMessage) -> None:
        with self._lock:
            self._messages.append(message)
            self._by_id[(message.provider, message.provider_message_id)] = message

    def find(self, provider: str, provider_message_id: str) -> SandboxMessage | None:
        """An accepted message by its provider's id (a Message resource's GET)."""
        with self._lock:
            return self._by_id.get((provider, provider_message_id))

    def list(self) -> list[SandboxMessage]:
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        """Forget messages, requests and attempt counters (fault draws start afresh)."""
        with self._lock:
            self._messages.clear()
            self._by_id.clear()
            self._attempts.clear()
            self._seen.clear()
            self._first_ids.clear()
            self._tracked.clear()

    def knows(self, provider: str, key: str) -> bool:
        """Whether a client key was accepted before (`first_id` remembers it)."""
        with self._lock:
            return (provider, key) in self._first_ids

    def accepted_count(self, provider: str) -> int:
        """Messages accepted so far through one provider."""
        with self._lock:
            return sum(1 for m in self._messages if m.provider == provider)

    def first_id(self, provider: str, key: str, new_id: str) -> tuple[str, bool]:
        """For providers that de-duplicate on a client key: the id the key was first accepted
        under and False, or `new_id` and True when the key is new (and now remembered)."""
        with self._lock:
            known = self._first_ids.get((provider, key))
            if known is not None:
                return known, False
            self._first_ids[(provider, key)] = new_id
            return new_id, True

    def next_attempt(self, provider: str, request_hash: str) -> int:
        """Count one more request with this body; returns its number (1 = first)."""
        with self._lock:
            self._seen[(provider, request_hash)] += 1
            return self._seen[(provider, request_hash)]

    def arrived(self) -> None:
        with self._lock:
            self._in_progress += 1

    def answered(self) -> None:
        with self._lock:
            self._in_progress -= 1

    @property
    def in_progress(self) -> int:
        """Requests received and not answered yet (held for latency, a timeout, …)."""
        with self._lock:
            return self._in_progress

    def log(self, attempt: SandboxAttempt) -> None:
        with self._lock:
            self._attempts.append(attempt)

    def attempts(self) -> builtins.list[SandboxAttempt]:
        """Every provider request so far, in the order they were answered."""
        with self._lock:
            return list(self._attempts)

    def accepted_counts(self) -> Counter[tuple[Any, ...]]:
        """Accepted messages per (provider, to, template, language, parameters, body)."""
        with self._lock:
            return Counter(m.content_key for m in self._messages)

    def duplicates(self) -> dict[tuple[Any, ...], int]:
        """Content keys accepted more than once: a customer messaged twice. Should be empty."""
        return {key: n for key, n in self.accepted_counts().items() if n > 1}

    def idempotency_duplicates(self) -> dict[tuple[str, str], int]:
        """(provider, client idempotency key) accepted more than once, for providers that
        take one: a provider honouring the key would have refused the second."""
        with self._lock:
            counts = Counter(
                (m.provider, m.idempotency_key) for m in self._messages if m.idempotency_key
            )
        return {key: n for key, n in counts.items() if n > 1}

    def stats(self) -> dict[str, Any]:
        """Totals for the control route: accepted, duplicates, requests by result."""
        duplicates = self.duplicates()
        with self._lock:
            accepted = len(self._messages)
            results = Counter(a.result for a in self._attempts)
        return {
            "accepted": accepted,
            "duplicate_messages": len(duplicates),
            "duplicate_accepts": sum(n - 1 for n in duplicates.values()),
            "requests": sum(results.values()),
            "requests_by_result": dict(sorted(results.items())),
        }


def utc_now() -> datetime:
    return datetime.now(UTC)


def is_not_on_whatsapp(digits: str) -> bool:
    """Deterministic stand-in for "this number has no WhatsApp account" (~1% of numbers)."""
    return digits.endswith("13")


def digits_ok(to: Any) -> bool:
    digits = str(to or "").removeprefix("+")
    return isinstance(to, str) and digits.isdigit() and 7 <= len(digits) <= 15
