"""The sandbox provider: a local ASGI app answering like Meta, Twilio, Infobip, Vonage, Braze.

Why emulate instead of mocking: the connectors, the delivery engine, the demo and the tests all
talk real HTTP to it, so timeouts, connection reuse, status codes and error bodies are exercised
exactly as in production. Status codes, ids and error bodies follow the vendor specs in
`shared/vendor-specs/` and the providers' published error-code tables:

- Meta (prefix `/meta`): `POST /{version}/{phone_number_id}/messages` and
  `GET /{version}/{waba_id}/message_templates` (cursor paging), Graph API error bodies
  `{"error": {"message", "type", "code", "error_data", "fbtrace_id"}}`.
- Twilio (prefix `/twilio`): `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`,
  form-encoded, HTTP Basic auth, `{"code", "message", "more_info", "status"}` error bodies.
- Infobip (prefix `/infobip`): `POST /whatsapp/1/message/template`, `POST /sms/3/messages` and
  `POST /viber/2/messages` (text),
  many messages per request, `Authorization: App <key>`; a 200 answer carries a status per
  message (PENDING, or REJECTED for a destination that is not a number); a template that is
  unknown, not approved or given the wrong placeholder count fails the whole request with a
  400 `requestError.serviceException` naming `content.templateName` / `placeholders` (real
  Infobip may accept and report such a message failed later; the sandbox makes it immediate).
- Vonage (prefix `/vonage`): `POST /v1/messages`, HTTP Basic, 202 `{message_uuid}`, 422 problem
  bodies whose `type` ends in the x-errors code (1022 template, 1430 recipient, …).
- Webhook (prefix `/webhook`): `POST /messages` under the contract of `connectors/webhook.py`,
  bearer token; each message `key` is accepted once, a repeat gets its first id back.
- Braze (prefix `/braze`): `POST /campaigns/trigger/send` and `POST /canvas/trigger/send`
  (up to 50 recipients, 201 with one `dispatch_id` for the batch; the campaigns of
  `BRAZE_CAMPAIGNS`, the Canvases of `BRAZE_CANVASES`) and `POST /users/track`
  (75 attribute objects, merged into `MessageStore.profiles()`), `Authorization: Bearer`.
- LINE (prefix `/line`): `POST /v2/bot/message/multicast` (1-500 user ids) and
  `POST /v2/bot/message/push`, text messages, `Authorization: Bearer`; a request repeating
  an accepted `X-Line-Retry-Key` is answered 409 with `x-line-accepted-request-id` and sends
  nothing.
- Status webhooks (`status_webhooks_url`): each accepted message's sent / delivered / read /
  failed reports, in the provider's shape and signature (`status_webhooks.py`).
- Control (prefix `/_sandbox`): `GET messages`, `GET attempts`, `GET stats`, `POST reset`,
  `GET health`, and `GET`/`POST faults` to read or change fault injection while running.

Deterministic rules make outcomes reproducible: a WhatsApp number whose digits end in `13`
(about 1% of numbers) is "not on WhatsApp" (Meta code 131026).

Fault injection (`SandboxConfig`) makes the failures a delivery engine must survive happen on
demand: throttling (429 + Retry-After), server errors (500/503), requests that are read and then
never answered (the client times out; nothing is accepted), and the dangerous one, a message
that is accepted and recorded after which the connection is dropped without an answer. Every
draw is a hash of the seed, the request body and how many times that same body has been seen,
so a run is reproducible whatever order concurrent requests arrive in, and a retry of the same
message draws afresh. Every request is logged (`MessageStore.attempts`) with its arrival and
answer times, so tests can check how a client paced its retries, and accepted messages are
countable per recipient and content, so a duplicate is a number, not a suspicion.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from cdp_activation.sandbox.draws import draw
from cdp_activation.sandbox.status_webhooks import schedule_statuses, schedule_template_update
from cdp_activation.settings import (
    SANDBOX_BRAZE_API_KEY,
    SANDBOX_INFOBIP_API_KEY,
    SANDBOX_LINE_TOKEN,
    SANDBOX_META_TOKEN,
    SANDBOX_TWILIO_ACCOUNT_SID,
    SANDBOX_TWILIO_AUTH_TOKEN,
    SANDBOX_VONAGE_API_KEY,
    SANDBOX_VONAGE_API_SECRET,
    SANDBOX_WEBHOOK_TOKEN,
)

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_PLACEHOLDER = re.compile(r"\{\{\s*(\d+)\s*\}\}")
_TWILIO_BODY_LIMIT = 1600  # characters; Twilio error 21617 beyond it
_NOT_APPROVED = {"PENDING", "REJECTED", "IN_APPEAL", "PENDING_DELETION", "DELETED"}
_META_CALLBACK_DATA_MAX = 512  # biz_opaque_callback_data
_INFOBIP_CALLBACK_DATA_MAX = 4000  # callbackData
_VONAGE_CLIENT_REF_MAX = 40  # client_ref


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox behaves. Defaults are the published sandbox credentials in settings and
    no faults at all, so the embedded default behaves like a healthy provider.

    Rates are probabilities per request (0..1). `rate_429`, `rate_5xx`, `rate_timeout` and
    `rate_drop_after_accept` exclude each other (their sum must not exceed 1); `slow_rate` adds
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
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    seed: int = 0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    rate_5xx: float = 0.0
    rate_timeout: float = 0.0
    timeout_hold_ms: float = 30_000.0
    rate_drop_after_accept: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 0.0
    rate_not_on_whatsapp: float = 0.0
    rate_opted_out: float = 0.0
    # Share of accepted Meta template messages answered `message_status:
    # held_for_quality_assessment` (Meta holding a marketing message while it judges the
    # template) instead of `accepted`.
    meta_held_rate: float = 0.0
    # Status webhooks back to a receiver (`status_webhooks_url`, e.g. http://127.0.0.1:8788;
    # empty: none), each provider's shape and signature: per accepted message `sent`, then
    # `delivered` (share `status_delivered_rate`, of which `status_read_rate` also `read`) or
    # `failed` with the provider's real code (`status_failed_rate`); the rest stay `sent`
    # (undelivered). Each report `status_delay_ms` after the previous; a share is sent twice
    # (`status_duplicate_rate`) or in reverse order (`status_reorder_rate`).
    status_webhooks_url: str = ""
    status_delivered_rate: float = 1.0
    status_failed_rate: float = 0.0
    status_read_rate: float = 0.0
    status_delay_ms: float = 20.0
    status_duplicate_rate: float = 0.0
    status_reorder_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in FAULT_FIELDS:
            value = getattr(self, name)
            whole = name == "seed"
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
)
_TEXT_FIELDS = ("status_webhooks_url",)
FAULT_FIELDS: tuple[str, ...] = tuple(
    f.name
    for f in dataclasses.fields(SandboxConfig)
    if f.name not in _CREDENTIAL_FIELDS and f.name not in _TEXT_FIELDS
)
_EXCLUSIVE_RATES = ("rate_429", "rate_5xx", "rate_timeout", "rate_drop_after_accept")
_RATE_FIELDS = frozenset(name for name in FAULT_FIELDS if "rate" in name)


class Fault(StrEnum):
    """What the sandbox does to one request instead of (or after) answering it normally."""

    NONE = "none"
    THROTTLED = "throttled"  # 429 + Retry-After, nothing accepted
    SERVER_ERROR = "server_error"  # 500 or 503, nothing accepted
    TIMEOUT = "timeout"  # read, then never answered; nothing accepted
    DROP_AFTER_ACCEPT = "dropped_after_accept"  # accepted and recorded, then no answer


def _draw(config: SandboxConfig, *parts: object) -> float:
    """`draws.draw` with the configured seed."""
    return draw(config.seed, *parts)


def request_fault(config: SandboxConfig, provider: str, request_hash: str, attempt: int) -> Fault:
    """The fault for the `attempt`-th request carrying this exact body (1 = first)."""
    draw = _draw(config, "fault", provider, request_hash, attempt)
    for fault, rate in (
        (Fault.THROTTLED, config.rate_429),
        (Fault.SERVER_ERROR, config.rate_5xx),
        (Fault.TIMEOUT, config.rate_timeout),
        (Fault.DROP_AFTER_ACCEPT, config.rate_drop_after_accept),
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
    parameters: tuple[str, ...] = ()
    body: str | None = None
    idempotency_key: str | None = None  # the client's Idempotency-Key header, when it sent one
    # What the provider echoes in this message's status reports: Meta's
    # `biz_opaque_callback_data`, Infobip's `callbackData`, Vonage's `client_ref`.
    callback_data: str | None = None
    status_callback: str | None = None  # Twilio: the StatusCallback URL its reports go to

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
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _in_progress: int = 0

    def track(self, attributes: list[dict[str, Any]]) -> None:
        """Merge Braze `/users/track` attribute objects into each user's profile."""
        with self._lock:
            for item in attributes:
                self._tracked.setdefault(str(item["external_id"]), {}).update(item)

    def profiles(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {user: dict(values) for user, values in self._tracked.items()}

    def add(self, message: SandboxMessage) -> None:
        with self._lock:
            self._messages.append(message)

    def list(self) -> list[SandboxMessage]:
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        """Forget messages, requests and attempt counters (fault draws start afresh)."""
        with self._lock:
            self._messages.clear()
            self._attempts.clear()
            self._seen.clear()
            self._first_ids.clear()
            self._tracked.clear()

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


@cache
def load_catalog() -> tuple[dict[str, Any], ...]:
    """The local WhatsApp template catalog (`templates.json`), in Meta's template shape."""
    text = resources.files(__package__).joinpath("templates.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


def body_parameter_count(template: dict[str, Any]) -> int:
    """Highest `{{n}}` in the template's BODY component (Meta numbers them 1..n)."""
    for component in template.get("components", []):
        if str(component.get("type", "")).upper() == "BODY":
            numbers = [int(n) for n in _PLACEHOLDER.findall(component.get("text", ""))]
            return max(numbers, default=0)
    return 0


def _now() -> datetime:
    return datetime.now(UTC)


def _not_on_whatsapp(digits: str) -> bool:
    """Deterministic stand-in for "this number has no WhatsApp account" (~1% of numbers)."""
    return digits.endswith("13")


# --------------------------------------------------------------------------------------------
# Meta WhatsApp Cloud API
# --------------------------------------------------------------------------------------------


def _meta_error(
    status: int,
    code: int,
    message: str,
    *,
    details: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A Graph API error body, as Meta returns it."""
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code}
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    error["fbtrace_id"] = "A" + secrets.token_urlsafe(16)
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _meta_unauthorized() -> JSONResponse:
    message = "Invalid OAuth access token - Cannot parse access token"
    return _meta_error(
        401,
        190,
        message,
        headers={"WWW-Authenticate": f'OAuth "Facebook Platform" "invalid_token" "{message}"'},
    )


def _meta_authorized(request: Request, config: SandboxConfig) -> bool:
    """Bearer header, or the `access_token` query parameter the Graph API also accepts."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        token = request.query_params.get("access_token", "")
    return bool(token) and hmac.compare_digest(token.strip(), config.meta_token)


def _find_template(
    name: str, language: str, statuses: Mapping[tuple[str, str], str] | None = None
) -> dict[str, Any] | None:
    """The catalog's template, with the status a test set (`POST /_sandbox/templates`)."""
    for template in load_catalog():
        if template["name"] == name and template["language"] == language:
            return _with_status(template, statuses)
    return None


def _with_status(
    template: dict[str, Any], statuses: Mapping[tuple[str, str], str] | None
) -> dict[str, Any]:
    status = (statuses or {}).get((template["name"], template["language"]))
    return template if status is None else {**template, "status": status}


def _template_statuses(request: Request) -> dict[tuple[str, str], str]:
    """Template statuses changed while running (name, language) -> status; per app."""
    statuses: dict[tuple[str, str], str] = request.app.state.template_statuses
    return statuses


def _template_error(template: dict[str, Any] | None, name: str, language: str) -> Response | None:
    """Meta's answer for a template that cannot be sent, or None when it can."""
    if template is None or template["status"] in _NOT_APPROVED:
        return _meta_error(
            400,
            132001,
            "(#132001) Template name does not exist in the translation",
            details=f"template name ({name}) does not exist in {language}",
        )
    if template["status"] == "PAUSED":
        return _meta_error(
            400,
            132015,
            "(#132015) Template is Paused",
            details=f"Template {name} is paused due to low quality",
        )
    if template["status"] == "DISABLED":
        return _meta_error(
            400,
            132016,
            "(#132016) Template is disabled",
            details=f"Template {name} has been disabled due to low quality",
        )
    return None


def _body_parameters(template_request: dict[str, Any]) -> list[str] | None:
    """Text of the body component's parameters; None when the shape is not Meta's."""
    components = template_request.get("components") or []
    if not isinstance(components, list):
        return None
    for component in components:
        if not isinstance(component, dict):
            return None
        if component.get("type") == "body":
            params = component.get("parameters") or []
            if not isinstance(params, list) or not all(isinstance(p, dict) for p in params):
                return None
            return [str(p.get("text", "")) for p in params]
    return []


def _parse_meta(request: Request, raw: bytes) -> Response | _Candidate:
    """Validate a `/messages` body like Meta does: the error answer, or what would be sent."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _meta_error(400, 100, "(#100) Invalid parameter", details="Invalid JSON body")
    if not isinstance(payload, dict) or payload.get("messaging_product") != "whatsapp":
        return _meta_error(
            400,
            100,
            "(#100) The parameter messaging_product is required.",
        )
    to = payload.get("to")
    digits = str(to or "").removeprefix("+")
    if not isinstance(to, str) or not digits.isdigit() or not 7 <= len(digits) <= 15:
        return _meta_error(400, 100, "(#100) Invalid parameter", details="Invalid 'to' parameter")

    callback_data = payload.get("biz_opaque_callback_data")
    if callback_data is not None and (
        not isinstance(callback_data, str) or len(callback_data) > _META_CALLBACK_DATA_MAX
    ):
        return _meta_error(
            400,
            100,
            "(#100) Invalid parameter",
            details="biz_opaque_callback_data must be a string of at most 512 characters",
        )
    kind = payload.get("type", "text")
    record: dict[str, Any]
    if kind == "template":
        tpl = payload.get("template")
        if not isinstance(tpl, dict) or not isinstance(tpl.get("name"), str):
            return _meta_error(400, 100, "(#100) The parameter template['name'] is required.")
        name = tpl["name"]
        language = (tpl.get("language") or {}).get("code", "")
        template = _find_template(name, language, _template_statuses(request))
        refused = _template_error(template, name, language)
        if refused is not None or template is None:
            return refused or _meta_error(400, 132001, "(#132001) Template not found")
        params = _body_parameters(tpl)
        expected = body_parameter_count(template)
        if params is None or len(params) != expected:
            got = "?" if params is None else len(params)
            return _meta_error(
                400,
                132000,
                "(#132000) Number of parameters does not match the expected number of params",
                details=f"body: number of localizable_params ({got}) does not match the "
                f"expected number of params ({expected})",
            )
        record = {
            "template_name": name,
            "template_language": language,
            "parameters": tuple(params),
        }
    elif kind == "text":
        text = payload.get("text")
        if not isinstance(text, dict) or not isinstance(text.get("body"), str):
            return _meta_error(400, 100, "(#100) The parameter text['body'] is required.")
        record = {"body": text["body"]}
    else:
        return _meta_error(
            400,
            100,
            f'(#100) Param type must be one of {{TEMPLATE, TEXT}} - got "{kind}".',
        )
    return _Candidate(to=to, record={**record, "callback_data": callback_data})


def _refuse_meta(config: SandboxConfig, candidate: _Candidate) -> Response | None:
    """Meta's per-recipient refusal: the number has no WhatsApp account (rule or fault rate)."""
    digits = candidate.to.removeprefix("+")
    rate = config.rate_not_on_whatsapp
    if _not_on_whatsapp(digits) or (rate and _draw(config, "not_on_whatsapp", digits) < rate):
        return _meta_error(
            400,
            131026,
            "(#131026) Message undeliverable",
            details="Message Undeliverable.",
        )
    return None


def _accept_meta(request: Request, candidate: _Candidate) -> tuple[SandboxMessage, Response]:
    wamid = "wamid." + base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    message = SandboxMessage(
        provider="meta_whatsapp",
        channel="whatsapp",
        to=candidate.to,
        provider_message_id=wamid,
        received_at=_now().isoformat(),
        idempotency_key=request.headers.get("idempotency-key"),
        **candidate.record,
    )
    config: SandboxConfig = request.app.state.config
    status = "accepted"
    held = config.meta_held_rate
    if "template_name" in candidate.record and held and _draw(config, "held", wamid) < held:
        status = "held_for_quality_assessment"
    answer = JSONResponse(
        {
            "messaging_product": "whatsapp",
            "contacts": [{"input": candidate.to, "wa_id": candidate.to.removeprefix("+")}],
            "messages": [{"id": wamid, "message_status": status}],
        }
    )
    return message, answer


def _meta_fault_answer(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    """Graph API bodies for throttling (130429) and server errors (131000 / 2)."""
    if fault == Fault.THROTTLED:
        return _meta_error(
            429,
            130429,
            "(#130429) Rate limit hit",
            details="Cloud API message throughput has been reached.",
            headers={"Retry-After": _retry_after_header(config.retry_after_s)},
        )
    if draw < 0.5:
        return _meta_error(500, 131000, "(#131000) Something went wrong")
    return _meta_error(503, 2, "(#2) Service temporarily unavailable")


async def meta_send_message(request: Request) -> Response:
    """`POST /{version}/{phone_number_id}/messages`: template or text message to one user."""
    return await _provider_request(request, _META)


def _cursor(index: int) -> str:
    """Opaque cursor like Meta's (base64 of the position); clients must not parse it."""
    return base64.urlsafe_b64encode(str(index).encode()).decode().rstrip("=")


def _cursor_index(cursor: str) -> int | None:
    try:
        return int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


async def meta_list_templates(request: Request) -> Response:
    """`GET /{version}/{waba_id}/message_templates` with `limit`/`after` cursor paging."""
    config: SandboxConfig = request.app.state.config
    await _provider_delay(config)
    if not _meta_authorized(request, config):
        return _meta_unauthorized()
    query = request.query_params
    try:
        limit = int(query.get("limit", "25"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 1000:
        return _meta_error(400, 100, "(#100) Param limit must be a positive integer")
    start = 0
    if after := query.get("after"):
        index = _cursor_index(after)
        if index is None:
            return _meta_error(400, 100, "(#100) Invalid cursor", details="after")
        start = index + 1
    statuses = _template_statuses(request)
    templates = [
        t
        for t in (_with_status(t, statuses) for t in load_catalog())
        if (not query.get("name") or t["name"] == query["name"])
        and (not query.get("status") or t["status"] == query["status"].upper())
    ]
    page = templates[start : start + limit]
    body: dict[str, Any] = {"data": list(page)}
    if page:
        last = start + len(page) - 1
        body["paging"] = {"cursors": {"before": _cursor(start), "after": _cursor(last)}}
        if last + 1 < len(templates):
            next_url = request.url.remove_query_params("access_token").include_query_params(
                limit=limit, after=_cursor(last)
            )
            body["paging"]["next"] = str(next_url)
    return JSONResponse(body)


def twilio_content_sid(name: str, language: str) -> str:
    """The sandbox's Content SID for a catalog template: stable, `HX` + 32 hex digits."""
    return "HX" + hashlib.md5(f"{name}|{language}".encode()).hexdigest()


@cache
def twilio_contents() -> tuple[dict[str, Any], ...]:
    """The local catalog as Twilio Content resources with their WhatsApp approvals."""
    contents = []
    for template in load_catalog():
        examples = []
        for component in template.get("components", []):
            if str(component.get("type", "")).upper() == "BODY":
                examples = (component.get("example") or {}).get("body_text", [[]])[0]
        count = body_parameter_count(template)
        sid = twilio_content_sid(template["name"], template["language"])
        contents.append(
            {
                "sid": sid,
                "account_sid": SANDBOX_TWILIO_ACCOUNT_SID,
                "friendly_name": template["name"],
                "language": template["language"],
                "variables": {
                    str(i): (examples[i - 1] if i <= len(examples) else f"value{i}")
                    for i in range(1, count + 1)
                },
                "types": {"twilio/text": {"body": _body_text(template)}},
                "url": f"https://content.twilio.com/v1/Content/{sid}",
                "approval_requests": {
                    "name": template["name"],
                    "category": template["category"].lower(),
                    "content_type": "twilio/text",
                    "status": template["status"].lower(),
                    "rejection_reason": "",
                    "allow_category_change": False,
                },
            }
        )
    return tuple(contents)


def _body_text(template: dict[str, Any]) -> str:
    for component in template.get("components", []):
        if str(component.get("type", "")).upper() == "BODY":
            return str(component.get("text", ""))
    return ""


async def twilio_content_and_approvals(request: Request) -> Response:
    """`GET /v1/ContentAndApprovals` with `PageSize` / `PageToken` paging (Content API)."""
    config: SandboxConfig = request.app.state.config
    await _provider_delay(config)
    if not _twilio_authorized(request, config.twilio_account_sid, config):
        return _twilio_error(401, 20003, "Authenticate")
    query = request.query_params
    try:
        size = int(query.get("PageSize", "50"))
    except ValueError:
        size = -1
    if not 1 <= size <= 1000:
        return _twilio_error(400, 20001, "PageSize must be between 1 and 1000")
    start = 0
    if token := query.get("PageToken"):
        index = _cursor_index(token)
        if index is None:
            return _twilio_error(400, 20001, "Invalid PageToken")
        start = index + 1
    contents = twilio_contents()
    page = contents[start : start + size]
    url = "https://content.twilio.com/v1/ContentAndApprovals"
    next_url = None
    if page and start + len(page) < len(contents):
        next_url = f"{url}?PageSize={size}&PageToken={_cursor(start + len(page) - 1)}"
    meta = {
        "page": start // size,
        "page_size": size,
        "first_page_url": f"{url}?PageSize={size}",
        "previous_page_url": None,
        "url": str(request.url),
        "next_page_url": next_url,
        "key": "contents",
    }
    return JSONResponse({"contents": list(page), "meta": meta})


# --------------------------------------------------------------------------------------------
# Twilio Programmable Messaging
# --------------------------------------------------------------------------------------------


def _twilio_error(status: int, code: int, message: str) -> JSONResponse:
    """Twilio's REST error body."""
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else None
    return JSONResponse(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status_code=status,
        headers=headers,
    )


def _twilio_authorized(request: Request, account_sid: str, config: SandboxConfig) -> bool:
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded.strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return (
        hmac.compare_digest(user, config.twilio_account_sid)
        and hmac.compare_digest(password, config.twilio_auth_token)
        and account_sid == config.twilio_account_sid
    )


def _segments(body: str) -> int:
    """Rough SMS segment count (GSM-7 sizes), enough for a realistic `num_segments`."""
    return 1 if len(body) <= 160 else -(-len(body) // 153)


def _parse_twilio(request: Request, raw: bytes) -> Response | _Candidate:
    """Validate a form-encoded `CreateMessageRequest` like Twilio does."""
    try:
        form = {k: v[-1] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
    except UnicodeDecodeError:
        return _twilio_error(400, 21602, "Message body is required.")
    raw_to = form.get("To", "")
    if not raw_to:
        return _twilio_error(400, 21604, "A 'To' phone number is required.")
    whatsapp = raw_to.startswith("whatsapp:")
    to = raw_to.removeprefix("whatsapp:")
    if not _E164.match(to):
        return _twilio_error(400, 21211, f"Invalid 'To' Phone Number: {raw_to}")
    sender = form.get("From", "")
    if sender and whatsapp != sender.startswith("whatsapp:"):
        # Twilio: "'To' and 'From' must be on the same channel" (error 21910).
        return _twilio_error(
            400, 21910, "Invalid From and To pair. From and To should be of the same channel"
        )
    service = form.get("MessagingServiceSid", "")
    if not sender and not service:
        return _twilio_error(400, 21603, "A 'From' phone number is required.")
    body = form.get("Body", "")
    content_sid = form.get("ContentSid", "")
    if not body and not content_sid and not form.get("MediaUrl"):
        return _twilio_error(400, 21602, "Message body is required.")
    if len(body) > _TWILIO_BODY_LIMIT:
        return _twilio_error(
            400, 21617, "The concatenated message body exceeds the 1600 character limit."
        )
    status_callback = form.get("StatusCallback") or None
    if status_callback is not None and not _callback_url_ok(status_callback):
        return _twilio_error(400, 21609, f"Invalid StatusCallback url: {status_callback}")
    variables: dict[str, Any] = {}
    if content_sid:
        try:
            variables = json.loads(form.get("ContentVariables") or "{}")
            if not isinstance(variables, dict):
                raise ValueError("not an object")
        except ValueError:
            return _twilio_error(400, 21656, "The ContentVariables Parameter is invalid.")
    record = {
        "template_name": content_sid or None,
        "parameters": tuple(str(variables[k]) for k in sorted(variables, key=_numeric_key)),
        "body": body or None,
        "status_callback": status_callback,
    }
    extra = {"from": sender, "service": service, "channel": "whatsapp" if whatsapp else "sms"}
    return _Candidate(to=to, record=record, extra=extra)


def _callback_url_ok(url: str) -> bool:
    """Twilio's rule for a StatusCallback: an http(s) URL with a host name, no underscores."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and "_" not in (host or "")


def _refuse_twilio(config: SandboxConfig, candidate: _Candidate) -> Response | None:
    """Twilio's refusals: a Content SID that is not an approved template (63027), or the
    number opted out (error 21610, by fault rate); on WhatsApp, a number that is not on
    WhatsApp (63003, the sandbox's digits-ending-in-13 rule; real Twilio reports it in the
    status callback, the sandbox at once)."""
    content_sid = candidate.record.get("template_name")
    if content_sid:
        approved = {
            c["sid"] for c in twilio_contents() if c["approval_requests"]["status"] == "approved"
        }
        if content_sid not in approved:
            return _twilio_error(
                400, 63027, f"Template does not exist or is not approved: {content_sid}"
            )
    if candidate.extra["channel"] == "whatsapp" and _not_on_whatsapp(candidate.to[1:]):
        return _twilio_error(400, 63003, "Channel could not find To address")
    rate = config.rate_opted_out
    if rate and _draw(config, "opted_out", candidate.to) < rate:
        return _twilio_error(400, 21610, "Attempt to send to unsubscribed recipient")
    return None


def _accept_twilio(request: Request, candidate: _Candidate) -> tuple[SandboxMessage, Response]:
    account_sid = request.path_params["account_sid"]
    sid = "SM" + uuid.uuid4().hex
    created = format_datetime(_now())
    message = SandboxMessage(
        provider="twilio",
        channel=candidate.extra["channel"],
        to=candidate.to,
        provider_message_id=sid,
        received_at=_now().isoformat(),
        idempotency_key=request.headers.get("idempotency-key"),
        **candidate.record,
    )
    body = message.body or ""
    sender, service = candidate.extra["from"], candidate.extra["service"]
    uri = f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}"
    answer = JSONResponse(
        {
            "account_sid": account_sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": created,
            "date_sent": None,
            "date_updated": created,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender or None,
            "messaging_service_sid": service or None,
            "num_media": "0",
            "num_segments": str(_segments(body)),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": f"{uri}/Media.json"},
            "to": ("whatsapp:" if candidate.extra["channel"] == "whatsapp" else "") + candidate.to,
            "uri": f"{uri}.json",
        },
        status_code=201,
    )
    return message, answer


def _twilio_fault_answer(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    """Twilio error bodies for throttling (20429) and server errors (20500 / 20503)."""
    if fault == Fault.THROTTLED:
        answer = _twilio_error(429, 20429, "Too Many Requests")
        answer.headers["Retry-After"] = _retry_after_header(config.retry_after_s)
        return answer
    if draw < 0.5:
        return _twilio_error(500, 20500, "Internal Server Error")
    return _twilio_error(503, 20503, "Service Unavailable")


async def twilio_create_message(request: Request) -> Response:
    """`POST /2010-04-01/Accounts/{AccountSid}/Messages.json` (form-encoded), 201 on success."""
    return await _provider_request(request, _TWILIO)


def _numeric_key(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 30, key)


# --------------------------------------------------------------------------------------------
# Control routes and the app
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# What every provider request goes through: delay, auth, faults, validation, acceptance
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    """A valid request: the recipient and what would be recorded if it is accepted."""

    to: str
    record: dict[str, Any]
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _ProviderRules:
    """The provider-specific steps `_provider_request` runs in a fixed order."""

    name: str
    authorized: Callable[[Request, SandboxConfig], bool]
    unauthorized: Callable[[], Response]
    parse: Callable[[Request, bytes], Response | _Candidate]
    refuse: Callable[[SandboxConfig, _Candidate], Response | None]
    accept: Callable[[Request, _Candidate], tuple[SandboxMessage, Response]]
    fault_answer: Callable[[SandboxConfig, Fault, float], Response]


def _twilio_request_authorized(request: Request, config: SandboxConfig) -> bool:
    return _twilio_authorized(request, request.path_params["account_sid"], config)


_META = _ProviderRules(
    name="meta_whatsapp",
    authorized=_meta_authorized,
    unauthorized=_meta_unauthorized,
    parse=_parse_meta,
    refuse=_refuse_meta,
    accept=_accept_meta,
    fault_answer=_meta_fault_answer,
)
_TWILIO = _ProviderRules(
    name="twilio",
    authorized=_twilio_request_authorized,
    unauthorized=lambda: _twilio_error(401, 20003, "Authenticate"),
    parse=_parse_twilio,
    refuse=_refuse_twilio,
    accept=_accept_twilio,
    fault_answer=_twilio_fault_answer,
)


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
        return _draw(self.config, "5xx", self.provider, self.request_hash, self.attempt)


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
        store.log(_gone(provider, arrived))
        return _DropConnection()
    exchange = _Exchange(request, provider, raw, arrived)
    await _provider_delay(exchange.config, provider, exchange.request_hash, exchange.attempt)
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
        return _DropConnection()
    return None


async def _provider_request(request: Request, rules: _ProviderRules) -> Response:
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
        return _DropConnection()
    exchange.log("accepted", answer.status_code, to=parsed.to)
    return answer


@dataclass(frozen=True)
class _BatchRules:
    """The provider-specific steps of a many-messages-per-request route (Infobip, webhook).

    `refuse` and `accept` work per message and give the message's entry of the answer (plus,
    for `accept`, the message to record, or None when the provider already has it);
    `answer` wraps the entries into the provider's 200 body.
    """

    name: str
    authorized: Callable[[Request, SandboxConfig], bool]
    unauthorized: Callable[[], Response]
    parse: Callable[[Request, bytes], Response | list[_Candidate]]
    refuse: Callable[[SandboxConfig, _Candidate], dict[str, Any] | None]
    accept: Callable[[Request, _Candidate], tuple[SandboxMessage | None, dict[str, Any]]]
    answer: Callable[[list[dict[str, Any]]], Response]
    fault_answer: Callable[[SandboxConfig, Fault, float], Response]
    # Providers that de-duplicate a request on a client key (LINE's X-Line-Retry-Key): the
    # answer to a repeat of an accepted request, or None (and the key is now remembered).
    replay: Callable[[Request, list[_Candidate]], Response | None] | None = None


async def _batch_request(request: Request, rules: _BatchRules) -> Response:
    """Like `_provider_request`, for a request carrying many messages: a fault hits the whole
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
        return _DropConnection()
    exchange.log("accepted", answer.status_code, to=only)
    return answer


# --------------------------------------------------------------------------------------------
# Infobip (WhatsApp template messages, SMS v3)
# --------------------------------------------------------------------------------------------

_INFOBIP_PENDING = {
    "groupId": 1,
    "groupName": "PENDING",
    "id": 7,
    "name": "PENDING_ENROUTE",
    "description": "Message sent to next instance",
}
_INFOBIP_REJECTED_DESTINATION = {
    "groupId": 5,
    "groupName": "REJECTED",
    "id": 51,
    "name": "REJECTED_DESTINATION",
    "description": "Invalid destination address",
}


def _infobip_exception(
    status: int,
    message_id: str,
    text: str,
    validation: dict[str, list[str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The WhatsApp API's error body: `{"requestError": {"serviceException": {...}}}`."""
    exception: dict[str, Any] = {"messageId": message_id, "text": text}
    if validation:
        exception["validationErrors"] = validation
    return JSONResponse(
        {"requestError": {"serviceException": exception}}, status_code=status, headers=headers
    )


def _infobip_api_error(
    status: int,
    code: str,
    description: str,
    action: str,
    violations: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The SMS v3 API's `ApiError` body."""
    return JSONResponse(
        {
            "errorCode": code,
            "description": description,
            "action": action,
            "violations": violations or [],
            "resources": [],
        },
        status_code=status,
        headers=headers,
    )


def _infobip_authorized(request: Request, config: SandboxConfig) -> bool:
    """`Authorization: App <api key>` (the spec's APIKeyHeader scheme)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    expected = config.infobip_api_key
    return scheme == "App" and bool(key) and hmac.compare_digest(key.strip(), expected)


def _digits_ok(to: Any) -> bool:
    digits = str(to or "").removeprefix("+")
    return isinstance(to, str) and digits.isdigit() and 7 <= len(digits) <= 15


def _parse_infobip_whatsapp(request: Request, raw: bytes) -> Response | list[_Candidate]:
    """Validate a `BulkMessage` of template messages; a wrong template fails the request."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _infobip_exception(400, "BAD_REQUEST", "Bad request")
    items = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        return _infobip_exception(
            400, "BAD_REQUEST", "Bad request", {"messages": ["must not be empty"]}
        )
    candidates = []
    for i, item in enumerate(items):
        where = f"messages[{i}]"
        content = item.get("content") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(content, dict):
            return _infobip_exception(
                400, "BAD_REQUEST", "Bad request", {f"{where}.content": ["must not be null"]}
            )
        missing = [f for f in ("from", "to") if not isinstance(item.get(f), str) or not item[f]]
        if missing:
            return _infobip_exception(
                400,
                "BAD_REQUEST",
                "Bad request",
                {f"{where}.{f}": ["must not be blank"] for f in missing},
            )
        name = content.get("templateName")
        language = content.get("language")
        body = (content.get("templateData") or {}).get("body")
        placeholders = body.get("placeholders") if isinstance(body, dict) else None
        if not isinstance(placeholders, list) or not all(
            isinstance(p, str) and p for p in placeholders
        ):
            return _infobip_exception(
                400,
                "BAD_REQUEST",
                "Bad request",
                {f"{where}.content.templateData.body.placeholders": ["must not be null"]},
            )
        callback_data = item.get("callbackData")
        if callback_data is not None and (
            not isinstance(callback_data, str) or len(callback_data) > _INFOBIP_CALLBACK_DATA_MAX
        ):
            return _infobip_exception(
                400,
                "BAD_REQUEST",
                "Bad request",
                {f"{where}.callbackData": ["size must be between 0 and 4000"]},
            )
        template = _find_template(str(name), str(language))
        if template is None or template["status"] != "APPROVED":
            return _infobip_exception(
                400,
                "BAD_REQUEST",
                "Bad request",
                {
                    f"{where}.content.templateName": [
                        f"template {name} in language {language} does not exist or is not approved"
                    ]
                },
            )
        expected = body_parameter_count(template)
        if len(placeholders) != expected:
            return _infobip_exception(
                400,
                "BAD_REQUEST",
                "Bad request",
                {
                    f"{where}.content.templateData.body.placeholders": [
                        f"template expects {expected} placeholders, got {len(placeholders)}"
                    ]
                },
            )
        candidates.append(
            _Candidate(
                to=item["to"],
                record={
                    "template_name": name,
                    "template_language": language,
                    "parameters": tuple(placeholders),
                    "callback_data": callback_data,
                },
                extra={"message_id": str(item.get("messageId") or ""), "channel": "whatsapp"},
            )
        )
    return candidates


def _parse_infobip_sms(request: Request, raw: bytes) -> Response | list[_Candidate]:
    """Validate an `SmsRequestEnvelope`; each destination of each message is one candidate."""
    return _parse_infobip_text(raw, "sms")


def _parse_infobip_viber(request: Request, raw: bytes) -> Response | list[_Candidate]:
    """Validate a `ViberRequest` of TEXT messages (the sandbox's only Viber content)."""
    return _parse_infobip_text(raw, "viber")


def _parse_infobip_text(raw: bytes, channel: str) -> Response | list[_Candidate]:
    """The SMS v3 and Viber v2 envelopes: `{messages: [{sender, destinations: [{to,
    messageId}], content: {text[, type]}}]}`; Viber's content is typed and 1,000 characters."""

    def bad(prop: str, why: str) -> JSONResponse:
        return _infobip_api_error(
            400,
            "E400",
            "Request cannot be processed.",
            "Check the syntax, violations and adjust the request.",
            [{"property": prop, "violation": why}],
        )

    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return bad("body", "Invalid JSON.")
    items = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        return bad("messages", "must not be empty")
    candidates = []
    for i, item in enumerate(items):
        destinations = item.get("destinations") if isinstance(item, dict) else None
        content = item.get("content") if isinstance(item, dict) else None
        if not isinstance(destinations, list) or not destinations:
            return bad(f"messages[{i}].destinations", "must not be empty")
        if not isinstance(content, dict) or not isinstance(content.get("text"), str):
            return bad(f"messages[{i}].content.text", "must not be null")
        if channel == "viber" and content.get("type") != "TEXT":
            return bad(f"messages[{i}].content.type", "must be TEXT in the sandbox")
        if channel == "viber" and len(content["text"]) > 1000:
            return bad(f"messages[{i}].content.text", "size must be between 0 and 1000")
        webhooks = item.get("webhooks")
        if webhooks is not None and not isinstance(webhooks, dict):
            return bad(f"messages[{i}].webhooks", "must be an object")
        callback_data = (webhooks or {}).get("callbackData")
        if callback_data is not None and (
            not isinstance(callback_data, str) or len(callback_data) > _INFOBIP_CALLBACK_DATA_MAX
        ):
            return bad(f"messages[{i}].webhooks.callbackData", "size must be between 0 and 4000")
        for j, destination in enumerate(destinations):
            if not isinstance(destination, dict) or not isinstance(destination.get("to"), str):
                return bad(f"messages[{i}].destinations[{j}].to", "must not be blank")
            candidates.append(
                _Candidate(
                    to=destination["to"],
                    record={"body": content["text"], "callback_data": callback_data},
                    extra={
                        "message_id": str(destination.get("messageId") or ""),
                        "channel": channel,
                    },
                )
            )
    return candidates


def _refuse_infobip(config: SandboxConfig, candidate: _Candidate) -> dict[str, Any] | None:
    """A destination that is not a number is REJECTED in the 200 answer, as Infobip does."""
    if _digits_ok(candidate.to):
        return None
    return _infobip_entry(candidate, candidate.extra["message_id"] or str(uuid.uuid4()), False)


def _infobip_entry(candidate: _Candidate, message_id: str, accepted: bool) -> dict[str, Any]:
    status = dict(_INFOBIP_PENDING if accepted else _INFOBIP_REJECTED_DESTINATION)
    if candidate.extra["channel"] == "sms":
        return {
            "messageId": message_id,
            "status": status,
            "destination": candidate.to,
            "details": {"messageCount": 1},
        }
    return {"to": candidate.to, "messageCount": 1, "messageId": message_id, "status": status}


def _accept_infobip(
    request: Request, candidate: _Candidate
) -> tuple[SandboxMessage | None, dict[str, Any]]:
    message_id = candidate.extra["message_id"] or str(uuid.uuid4())
    message = SandboxMessage(
        provider="infobip",
        channel=candidate.extra["channel"],
        to="+" + candidate.to.removeprefix("+"),
        provider_message_id=message_id,
        received_at=_now().isoformat(),
        **candidate.record,
    )
    return message, _infobip_entry(candidate, message_id, True)


def _infobip_answer(entries: list[dict[str, Any]]) -> Response:
    body: dict[str, Any] = {"messages": entries}
    if len(entries) > 1:  # "Bulk ID will be received only when you send … more than one"
        body["bulkId"] = str(uuid.uuid4().int % 10**19)
    return JSONResponse(body)


def _infobip_whatsapp_fault(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    if fault == Fault.THROTTLED:
        return _infobip_exception(
            429,
            "TOO_MANY_REQUESTS",
            "Too many requests",
            headers={"Retry-After": _retry_after_header(config.retry_after_s)},
        )
    if draw < 0.5:
        return _infobip_exception(500, "GENERAL_ERROR", "Something went wrong.")
    return _infobip_exception(503, "SERVICE_UNAVAILABLE", "Service temporarily unavailable.")


def _infobip_sms_fault(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    if fault == Fault.THROTTLED:
        return _infobip_api_error(
            429,
            "E429",
            "Too many requests sent.",
            "Check request rate limit specified in the API endpoint documentation resource.",
            headers={"Retry-After": _retry_after_header(config.retry_after_s)},
        )
    status = 500 if draw < 0.5 else 503
    return _infobip_api_error(status, f"E{status}", "Something went wrong.", "Contact the support.")


_INFOBIP_WHATSAPP = _BatchRules(
    name="infobip",
    authorized=_infobip_authorized,
    unauthorized=lambda: _infobip_exception(401, "UNAUTHORIZED", "Invalid login details"),
    parse=_parse_infobip_whatsapp,
    refuse=_refuse_infobip,
    accept=_accept_infobip,
    answer=_infobip_answer,
    fault_answer=_infobip_whatsapp_fault,
)
_INFOBIP_SMS = dataclasses.replace(
    _INFOBIP_WHATSAPP,
    unauthorized=lambda: _infobip_api_error(
        401,
        "E401",
        "The request lacks valid authentication credentials for the requested resource.",
        "Check the resources and adjust authentication credentials.",
    ),
    parse=_parse_infobip_sms,
    fault_answer=_infobip_sms_fault,
)
_INFOBIP_VIBER = dataclasses.replace(_INFOBIP_SMS, parse=_parse_infobip_viber)


async def infobip_whatsapp_template(request: Request) -> Response:
    """`POST /whatsapp/1/message/template`: template messages to many recipients."""
    return await _batch_request(request, _INFOBIP_WHATSAPP)


async def infobip_sms(request: Request) -> Response:
    """`POST /sms/3/messages`: SMS to many destinations."""
    return await _batch_request(request, _INFOBIP_SMS)


async def infobip_viber(request: Request) -> Response:
    """`POST /viber/2/messages`: Viber Business Messages to many destinations."""
    return await _batch_request(request, _INFOBIP_VIBER)


# --------------------------------------------------------------------------------------------
# Vonage Messages API v1
# --------------------------------------------------------------------------------------------

_VONAGE_ERRORS = "https://developer.nexmo.com/api-errors/messages-olympus"


def _vonage_error(
    status: int,
    type_: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Vonage's problem body `{type, title, detail, instance}`."""
    return JSONResponse(
        {"type": type_, "title": title, "detail": detail, "instance": secrets.token_hex(16)},
        status_code=status,
        headers=headers,
    )


def _vonage_authorized(request: Request, config: SandboxConfig) -> bool:
    """HTTP Basic with API key and secret (the sandbox does not issue JWTs)."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded.strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user, config.vonage_api_key) and hmac.compare_digest(
        password, config.vonage_api_secret
    )


def _parse_vonage(request: Request, raw: bytes) -> Response | _Candidate:
    """Validate a `/v1/messages` body like Vonage does (422 with an x-errors code)."""
    try:
        payload = json.loads(raw)
        if not isinstance(payload, dict):
            raise ValueError("not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        return _vonage_error(
            422,
            "https://developer.nexmo.com/api-errors#invalid-json",
            "The request body did not contain valid JSON",
            str(error),
        )
    channel = payload.get("channel")
    if channel not in ("sms", "whatsapp", "viber_service"):
        return _vonage_error(
            422, f"{_VONAGE_ERRORS}#1400", "Unsupported channel", f"channel {channel!r}"
        )
    ref = payload.get("client_ref")
    if ref is not None and (not isinstance(ref, str) or len(ref) > _VONAGE_CLIENT_REF_MAX):
        return _vonage_error(
            422,
            f"{_VONAGE_ERRORS}#1450",
            "Invalid client reference",
            "The client reference can be a string of up to 40 characters.",
        )
    if not isinstance(payload.get("from"), str) or not payload["from"]:
        return _vonage_error(
            422, f"{_VONAGE_ERRORS}#1420", "Invalid sender", "The `from` parameter is invalid."
        )
    to = payload.get("to")
    kind = payload.get("message_type")
    record: dict[str, Any]
    if kind == "text" and isinstance(payload.get("text"), str):
        if channel == "viber_service" and len(payload["text"]) > 1000:
            return _vonage_error(
                422, f"{_VONAGE_ERRORS}#1010", "Invalid params", "text: at most 1000 characters"
            )
        record = {"body": payload["text"]}
    elif kind == "template" and channel == "whatsapp":
        template = payload.get("template")
        options = payload.get("whatsapp")
        if not isinstance(template, dict) or not isinstance(options, dict):
            return _vonage_error(
                422,
                f"{_VONAGE_ERRORS}#1010",
                "Missing params",
                "template and whatsapp{policy, locale} are required",
            )
        name = str(template.get("name", "")).rpartition(":")[2]  # "<namespace>:<name>"
        language = str(options.get("locale", "")).replace("-", "_")
        params = template.get("parameters") or []
        found = _find_template(name, language)
        if (
            found is None
            or found["status"] != "APPROVED"
            or not isinstance(params, list)
            or len(params) != body_parameter_count(found)
        ):
            return _vonage_error(
                422,
                f"{_VONAGE_ERRORS}#1022",
                "Invalid template",
                "Invalid template or template parameters",
            )
        record = {
            "template_name": name,
            "template_language": language,
            "parameters": tuple(str(p) for p in params),
        }
    else:
        return _vonage_error(
            422,
            f"{_VONAGE_ERRORS}#1440",
            "Invalid message type",
            f"message_type {kind!r} is not supported for channel {channel}",
        )
    if not isinstance(to, str):
        to = ""
    channel = "viber" if channel == "viber_service" else channel
    record["callback_data"] = ref
    return _Candidate(to=to, record=record, extra={"channel": channel})


def _refuse_vonage(config: SandboxConfig, candidate: _Candidate) -> Response | None:
    """The `to` is not a number: 422 Invalid recipient (1430), never accepted."""
    if _digits_ok(candidate.to) and not candidate.to.startswith("+"):
        return None
    return _vonage_error(
        422,
        f"{_VONAGE_ERRORS}#1430",
        "Invalid recipient",
        "The `to` parameter is invalid for the given channel.",
    )


def _accept_vonage(request: Request, candidate: _Candidate) -> tuple[SandboxMessage, Response]:
    message_uuid = str(uuid.uuid4())
    message = SandboxMessage(
        provider="vonage",
        channel=candidate.extra["channel"],
        to="+" + candidate.to,
        provider_message_id=message_uuid,
        received_at=_now().isoformat(),
        **candidate.record,
    )
    return message, JSONResponse({"message_uuid": message_uuid}, status_code=202)


def _vonage_fault_answer(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    if fault == Fault.THROTTLED:
        return _vonage_error(
            429,
            f"{_VONAGE_ERRORS}#1000",
            "Rate Limit Hit",
            "Please wait, then retry your request",
            headers={"Retry-After": _retry_after_header(config.retry_after_s)},
        )
    status = 500 if draw < 0.5 else 503
    return _vonage_error(
        status,
        f"{_VONAGE_ERRORS}#1030",
        "Internal error",
        "There was an error processing your request in the Platform.",
    )


_VONAGE = _ProviderRules(
    name="vonage",
    authorized=_vonage_authorized,
    unauthorized=lambda: _vonage_error(
        401,
        "https://developer.nexmo.com/api-errors/#unathorized",
        "Unauthorized",
        "You did not provide correct credentials.",
    ),
    parse=_parse_vonage,
    refuse=_refuse_vonage,
    accept=_accept_vonage,
    fault_answer=_vonage_fault_answer,
)


async def vonage_send_message(request: Request) -> Response:
    """`POST /v1/messages`: one message, 202 `{message_uuid}`."""
    return await _provider_request(request, _VONAGE)


# --------------------------------------------------------------------------------------------
# Generic JSON webhook (the contract in connectors/webhook.py)
# --------------------------------------------------------------------------------------------


def _webhook_authorized(request: Request, config: SandboxConfig) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), config.webhook_token)


def _parse_webhook(request: Request, raw: bytes) -> Response | list[_Candidate]:
    """A JSON array of `{key, to, channel, template | body}`; anything else is a 400."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return JSONResponse({"error": "invalid JSON"}, status_code=400)
    if not isinstance(payload, list) or not payload:
        return JSONResponse({"error": "expected a non-empty JSON array"}, status_code=400)
    candidates = []
    idempotency_key = request.headers.get("idempotency-key", "")
    for i, item in enumerate(payload):
        if not isinstance(item, dict) or not all(
            isinstance(item.get(f), str) and item[f] for f in ("key", "to", "channel")
        ):
            return JSONResponse({"error": f"[{i}] needs key, to and channel"}, status_code=400)
        template = item.get("template")
        record: dict[str, Any]
        if isinstance(template, dict) and isinstance(template.get("name"), str):
            record = {
                "template_name": template["name"],
                "template_language": str(template.get("language") or "") or None,
                "parameters": tuple(str(p) for p in template.get("parameters") or []),
            }
        elif isinstance(item.get("body"), str):
            record = {"body": item["body"]}
        else:
            return JSONResponse({"error": f"[{i}] needs a template or a body"}, status_code=400)
        candidates.append(
            _Candidate(
                to=item["to"],
                record=record,
                extra={
                    "key": item["key"],
                    "channel": item["channel"],
                    "idempotency_key": idempotency_key,
                },
            )
        )
    return candidates


def _refuse_webhook(config: SandboxConfig, candidate: _Candidate) -> dict[str, Any] | None:
    if _E164.match(candidate.to):
        return None
    return {
        "key": candidate.extra["key"],
        "status": "rejected",
        "id": None,
        "error": "invalid_number",
    }


def _accept_webhook(
    request: Request, candidate: _Candidate
) -> tuple[SandboxMessage | None, dict[str, Any]]:
    """Accept once per message key: a repeated key (a retried batch carrying the same
    Idempotency-Key) gets its first id back and is not recorded again."""
    store: MessageStore = request.app.state.store
    key = candidate.extra["key"]
    ident, new = store.first_id("webhook", key, "wh_" + uuid.uuid4().hex)
    entry = {"key": key, "status": "accepted", "id": ident, "error": None}
    if not new:
        return None, entry
    message = SandboxMessage(
        provider="webhook",
        channel=candidate.extra["channel"],
        to=candidate.to,
        provider_message_id=ident,
        received_at=_now().isoformat(),
        idempotency_key=candidate.extra["idempotency_key"] or None,
        **candidate.record,
    )
    return message, entry


def _webhook_fault_answer(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    if fault == Fault.THROTTLED:
        return JSONResponse(
            {"error": "throttled"},
            status_code=429,
            headers={"Retry-After": _retry_after_header(config.retry_after_s)},
        )
    status = 500 if draw < 0.5 else 503
    return JSONResponse({"error": "server error"}, status_code=status)


_WEBHOOK = _BatchRules(
    name="webhook",
    authorized=_webhook_authorized,
    unauthorized=lambda: JSONResponse(
        {"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
    ),
    parse=_parse_webhook,
    refuse=_refuse_webhook,
    accept=_accept_webhook,
    answer=lambda entries: JSONResponse(entries),
    fault_answer=_webhook_fault_answer,
)


async def webhook_messages(request: Request) -> Response:
    """`POST /webhook/messages`: a batch under the generic webhook contract."""
    return await _batch_request(request, _WEBHOOK)


# --------------------------------------------------------------------------------------------
# Braze (API-triggered campaigns, users/track)
# --------------------------------------------------------------------------------------------

# The sandbox's API-triggered campaigns and the channel each one sends on.
BRAZE_CAMPAIGNS: dict[str, str] = {
    "winback_campaign": "whatsapp",
    "order_update_campaign": "whatsapp",
    "sms_winback_campaign": "sms",
}
# The sandbox's API-triggered Canvases and the channel their first step sends on.
BRAZE_CANVASES: dict[str, str] = {"winback_canvas": "whatsapp"}


def _braze_authorized(request: Request, config: SandboxConfig) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), config.braze_api_key)


def _braze_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"message": message}, status_code=status, headers=headers)


def _parse_braze(request: Request, raw: bytes) -> Response | list[_Candidate]:
    """`{campaign_id, recipients: [{external_user_id, trigger_properties, attributes}]}`."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _braze_error(400, "Invalid JSON")
    if not isinstance(payload, dict):
        return _braze_error(400, "Invalid JSON")
    canvas = request.url.path.endswith("/canvas/trigger/send")
    known, what = (BRAZE_CANVASES, "canvas") if canvas else (BRAZE_CAMPAIGNS, "campaign")
    campaign = payload.get(f"{what}_id")
    if campaign not in known:
        return _braze_error(400, f"Invalid {what}_id: {what} {campaign!r} was not found")
    recipients = payload.get("recipients")
    if not isinstance(recipients, list) or not 1 <= len(recipients) <= 50:
        return _braze_error(400, "recipients must be an array of 1 to 50 objects")
    candidates = []
    for i, item in enumerate(recipients):
        user = item.get("external_user_id") if isinstance(item, dict) else None
        if not isinstance(user, str) or not user:
            return _braze_error(400, f"recipients[{i}] must have an external_user_id")
        properties = item.get("canvas_entry_properties" if canvas else "trigger_properties") or {}
        phone = (item.get("attributes") or {}).get("phone")
        candidates.append(
            _Candidate(
                to=phone if isinstance(phone, str) and phone else user,
                record={
                    "template_name": f"canvas:{campaign}" if canvas else campaign,
                    "parameters": tuple(str(v) for v in properties.values()),
                },
                extra={"channel": known[campaign], "user": user},
            )
        )
    return candidates


def _accept_braze(
    request: Request, candidate: _Candidate
) -> tuple[SandboxMessage | None, dict[str, Any]]:
    dispatch = request.state.braze_dispatch
    message = SandboxMessage(
        provider="braze",
        channel=candidate.extra["channel"],
        to=candidate.to,
        provider_message_id=dispatch,
        received_at=_now().isoformat(),
        **candidate.record,
    )
    return message, {"dispatch_id": dispatch}


def _braze_fault_answer(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    if fault == Fault.THROTTLED:
        reset = str(int(time.time() + config.retry_after_s))
        return _braze_error(
            429,
            "Rate limit exceeded",
            headers={
                "Retry-After": _retry_after_header(config.retry_after_s),
                "X-RateLimit-Limit": "250000",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": reset,
            },
        )
    return _braze_error(500 if draw < 0.5 else 503, "Internal Server Error")


_BRAZE = _BatchRules(
    name="braze",
    authorized=_braze_authorized,
    unauthorized=lambda: _braze_error(401, "Invalid API key"),
    parse=_parse_braze,
    refuse=lambda config, candidate: None,  # Braze answers for the batch, never per user
    accept=_accept_braze,
    answer=lambda entries: JSONResponse(
        {"dispatch_id": entries[0]["dispatch_id"], "message": "success"}, status_code=201
    ),
    fault_answer=_braze_fault_answer,
)


async def braze_trigger_send(request: Request) -> Response:
    """`POST /campaigns/trigger/send`: one dispatch id for the whole batch."""
    request.state.braze_dispatch = "dispatch_" + uuid.uuid4().hex
    return await _batch_request(request, _BRAZE)


async def braze_users_track(request: Request) -> Response:
    """`POST /users/track`: up to 75 attribute objects, each with an `external_id`."""
    config: SandboxConfig = request.app.state.config
    await _provider_delay(config)
    if not _braze_authorized(request, config):
        return _braze_error(401, "Invalid API key")
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _braze_error(400, "Invalid JSON")
    attributes = payload.get("attributes") if isinstance(payload, dict) else None
    if not isinstance(attributes, list) or len(attributes) > 75:
        return _braze_error(400, "attributes must be an array of at most 75 objects")
    if not all(isinstance(a, dict) and a.get("external_id") for a in attributes):
        return _braze_error(400, "every attributes object needs an external_id")
    request.app.state.store.track(attributes)
    return JSONResponse(
        {"attributes_processed": len(attributes), "message": "success"}, status_code=201
    )


# --------------------------------------------------------------------------------------------
# LINE Messaging API (multicast, push; X-Line-Retry-Key)
# --------------------------------------------------------------------------------------------

_LINE_USER_ID = re.compile(r"^U[0-9a-f]{32}$")
_LINE_MAX_TEXT = 5000


def _line_error(
    status: int,
    message: str,
    details: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def _line_authorized(request: Request, config: SandboxConfig) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), config.line_token)


def _parse_line(request: Request, raw: bytes) -> Response | list[_Candidate]:
    """`{to, messages}`: `to` one user id (push) or 1-500 of them (multicast); 1-5 text
    messages. Errors the way LINE words them: a message and `details` naming the property."""
    multicast = request.url.path.endswith("/multicast")
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _line_error(400, "The request body has 1 error(s)")
    if not isinstance(payload, dict):
        return _line_error(400, "The request body has 1 error(s)")
    retry_key = request.headers.get("x-line-retry-key")
    if retry_key is not None:
        try:
            uuid.UUID(retry_key)
        except ValueError:
            return _line_error(400, "The retry key is invalid; specify a UUID")
    to = payload.get("to")
    users = to if multicast else [to]
    if not isinstance(users, list) or not 1 <= len(users) <= 500:
        return _line_error(400, "The request body has 1 error(s)", [_line_detail("to")])
    errors = [
        _line_detail(f"to[{i}]" if multicast else "to", "The user ID is invalid")
        for i, user in enumerate(users)
        if not isinstance(user, str) or not _LINE_USER_ID.match(user)
    ]
    messages = payload.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= 5:
        errors.append(_line_detail("messages", "Size must be between 1 and 5"))
        messages = []
    for i, message in enumerate(messages):
        text = message.get("text") if isinstance(message, dict) else None
        if not isinstance(message, dict) or message.get("type") != "text":
            errors.append(_line_detail(f"messages[{i}].type", "Only text in the sandbox"))
        elif not isinstance(text, str) or not 1 <= len(text) <= _LINE_MAX_TEXT:
            errors.append(_line_detail(f"messages[{i}].text", "Length must be 1 to 5000"))
    if errors:
        return _line_error(400, f"The request body has {len(errors)} error(s)", errors)
    body = "\n".join(m["text"] for m in messages)
    return [
        _Candidate(to=user, record={"body": body}, extra={"retry_key": retry_key or ""})
        for user in users
    ]


def _line_detail(prop: str, message: str = "May not be empty") -> dict[str, str]:
    return {"message": message, "property": prop}


def _line_replay(request: Request, candidates: list[_Candidate]) -> Response | None:
    """A retry key already accepted: 409 with the accepted request's id, nothing sent."""
    key = candidates[0].extra["retry_key"]
    if not key:
        return None
    store: MessageStore = request.app.state.store
    accepted, new = store.first_id("line", key, request.state.line_request_id)
    if new:
        return None
    return _line_error(
        409,
        "The retry key is already accepted",
        headers={"x-line-accepted-request-id": accepted, "x-line-request-id": _line_id()},
    )


def _line_id() -> str:
    return str(uuid.uuid4())


def _accept_line(
    request: Request, candidate: _Candidate
) -> tuple[SandboxMessage | None, dict[str, Any]]:
    message = SandboxMessage(
        provider="line",
        channel="line",
        to=candidate.to,
        provider_message_id=request.state.line_request_id,
        received_at=_now().isoformat(),
        idempotency_key=candidate.extra["retry_key"] or None,
        **candidate.record,
    )
    return message, {}


def _line_fault_answer(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    if fault == Fault.THROTTLED:
        return _line_error(
            429,
            "The API rate limit has been exceeded. Try again later.",
            headers={"Retry-After": _retry_after_header(config.retry_after_s)},
        )
    return _line_error(500 if draw < 0.5 else 503, "Internal server error")


def _line_rules(answer: Callable[[list[dict[str, Any]]], Response]) -> _BatchRules:
    return _BatchRules(
        name="line",
        authorized=_line_authorized,
        unauthorized=lambda: _line_error(
            401,
            "Authentication failed due to the following reason: invalid token. Confirm that "
            "the access token in the authorization header is valid.",
        ),
        parse=_parse_line,
        refuse=lambda config, candidate: None,  # LINE answers per request, never per user
        accept=_accept_line,
        answer=answer,
        fault_answer=_line_fault_answer,
        replay=_line_replay,
    )


async def line_multicast(request: Request) -> Response:
    """`POST /v2/bot/message/multicast`: 200 `{}`, the request id in `x-line-request-id`."""
    request.state.line_request_id = ident = _line_id()
    rules = _line_rules(lambda entries: JSONResponse({}, headers={"x-line-request-id": ident}))
    return await _batch_request(request, rules)


async def line_push(request: Request) -> Response:
    """`POST /v2/bot/message/push`: 200 with `sentMessages`, the request id in a header."""
    request.state.line_request_id = ident = _line_id()
    rules = _line_rules(
        lambda entries: JSONResponse(
            {"sentMessages": [{"id": str(uuid.uuid4().int)[:18], "quoteToken": uuid.uuid4().hex}]},
            headers={"x-line-request-id": ident},
        )
    )
    return await _batch_request(request, rules)


def _gone(provider: str, arrived: float) -> SandboxAttempt:
    return SandboxAttempt(
        provider=provider,
        request_hash="",
        attempt=0,
        arrived=arrived,
        answered=time.monotonic(),
        result="client_gone",
        status=None,
    )


async def _provider_delay(
    config: SandboxConfig, provider: str = "", request_hash: str = "", attempt: int = 0
) -> None:
    """Latency before a provider answers: base + deterministic jitter + the occasional slow one
    (drawn per request; routes that are not sends draw with empty parts, which is fine)."""
    delay_ms = config.latency_ms
    if config.latency_jitter_ms > 0:
        jitter = _draw(config, "jitter", provider, request_hash, attempt)
        delay_ms += config.latency_jitter_ms * jitter
    if config.slow_rate > 0 and _draw(config, "slow", provider, request_hash, attempt) < (
        config.slow_rate
    ):
        delay_ms += config.slow_ms
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)


def _retry_after_header(seconds: float) -> str:
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


class _DropConnection(Response):
    """Not an answer: close the client's connection without sending a byte.

    ASGI has no "abort" message, so the transport is reached through the server's `send`
    callable (uvicorn's is a method of an object holding the transport), which
    `_SandboxApp` stores in the scope. When that is not available (another ASGI
    server), the fallback starts a response and never finishes it, which makes the server close
    the connection: the client then holds a truncated answer, equally useless to it.
    """

    def __init__(self) -> None:
        super().__init__(status_code=599)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_send = scope.get(_RAW_SEND)
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


_RAW_SEND = "cdp_sandbox.raw_send"


class _SandboxApp(Starlette):
    """Starlette, keeping the server's own `send` in the scope for `_DropConnection`.

    Starlette's middleware wraps `send` in closures before a route sees it, so the server's
    callable is only visible here, at the very top.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope[_RAW_SEND] = send
        store: MessageStore = self.state.store
        store.arrived()
        try:
            await super().__call__(scope, receive, send)
        finally:
            store.answered()


async def sandbox_messages(request: Request) -> Response:
    return JSONResponse([m.as_dict() for m in request.app.state.store.list()])


async def sandbox_attempts(request: Request) -> Response:
    return JSONResponse([a.as_dict() for a in request.app.state.store.attempts()])


async def sandbox_stats(request: Request) -> Response:
    return JSONResponse(request.app.state.store.stats())


async def sandbox_reset(request: Request) -> Response:
    request.app.state.store.clear()
    request.app.state.template_statuses = {}
    return JSONResponse({"reset": True})


async def sandbox_faults(request: Request) -> Response:
    """`GET`: the behaviour settings in force. `POST` a JSON object of some of them to change
    them while running (the rest stay); a bad name or value is a 400 and changes nothing."""
    config: SandboxConfig = request.app.state.config
    if request.method == "POST":
        try:
            changes = json.loads(await request.body() or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of fault settings")
            config = config.with_faults(changes)
        except (ValueError, TypeError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        request.app.state.config = config
    return JSONResponse(config.faults())


# Meta's template statuses (`message_template_status_update` events a test may play).
TEMPLATE_STATUSES = frozenset(
    {"APPROVED", "PAUSED", "DISABLED", "REJECTED", "PENDING", "REINSTATED", "FLAGGED"}
)


async def sandbox_templates(request: Request) -> Response:
    """`GET`: the WhatsApp catalog as it stands. `POST {name, language, status[, reason]}`:
    change a template's status while running, as Meta does when it pauses a template whose
    quality fell; when status webhooks are on, the receiver is told with Meta's signed
    `message_template_status_update`. 400 for an unknown status, 404 for an unknown template."""
    statuses = _template_statuses(request)
    if request.method == "POST":
        try:
            change = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            change = None
        if not isinstance(change, dict) or not all(
            isinstance(change.get(k), str) for k in ("name", "language", "status")
        ):
            return JSONResponse({"error": "expected {name, language, status}"}, status_code=400)
        status = change["status"].upper()
        if status not in TEMPLATE_STATUSES:
            return JSONResponse(
                {"error": f"status must be one of {', '.join(sorted(TEMPLATE_STATUSES))}"},
                status_code=400,
            )
        if _find_template(change["name"], change["language"]) is None:
            return JSONResponse({"error": "no such template in the catalog"}, status_code=404)
        # REINSTATED and FLAGGED are events, not statuses: the template is APPROVED again.
        kept = "APPROVED" if status in ("REINSTATED", "FLAGGED") else status
        statuses[(change["name"], change["language"])] = kept
        schedule_template_update(request, change["name"], change["language"], status, change)
    return JSONResponse([_with_status(t, statuses) for t in load_catalog()])


async def sandbox_health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(config: SandboxConfig | None = None, store: MessageStore | None = None) -> Starlette:
    """Build the sandbox ASGI app. `app.state.store` holds accepted messages and requests;
    `app.state.config` is the behaviour in force (replaced whole by `POST /_sandbox/faults`)."""
    meta_routes = [
        Route("/{version}/{phone_number_id}/messages", meta_send_message, methods=["POST"]),
        Route("/{version}/{waba_id}/message_templates", meta_list_templates, methods=["GET"]),
    ]
    twilio_routes = [
        Route(
            "/2010-04-01/Accounts/{account_sid}/Messages.json",
            twilio_create_message,
            methods=["POST"],
        ),
        Route("/v1/ContentAndApprovals", twilio_content_and_approvals, methods=["GET"]),
    ]
    infobip_routes = [
        Route("/whatsapp/1/message/template", infobip_whatsapp_template, methods=["POST"]),
        Route("/sms/3/messages", infobip_sms, methods=["POST"]),
        Route("/viber/2/messages", infobip_viber, methods=["POST"]),
    ]
    vonage_routes = [Route("/v1/messages", vonage_send_message, methods=["POST"])]
    webhook_routes = [Route("/messages", webhook_messages, methods=["POST"])]
    braze_routes = [
        Route("/campaigns/trigger/send", braze_trigger_send, methods=["POST"]),
        Route("/canvas/trigger/send", braze_trigger_send, methods=["POST"]),
        Route("/users/track", braze_users_track, methods=["POST"]),
    ]
    line_routes = [
        Route("/v2/bot/message/multicast", line_multicast, methods=["POST"]),
        Route("/v2/bot/message/push", line_push, methods=["POST"]),
    ]
    control_routes = [
        Route("/messages", sandbox_messages, methods=["GET"]),
        Route("/attempts", sandbox_attempts, methods=["GET"]),
        Route("/stats", sandbox_stats, methods=["GET"]),
        Route("/reset", sandbox_reset, methods=["POST"]),
        Route("/faults", sandbox_faults, methods=["GET", "POST"]),
        Route("/templates", sandbox_templates, methods=["GET", "POST"]),
        Route("/health", sandbox_health, methods=["GET"]),
    ]
    app = _SandboxApp(
        routes=[
            Mount("/meta", routes=meta_routes),
            Mount("/twilio", routes=twilio_routes),
            Mount("/infobip", routes=infobip_routes),
            Mount("/vonage", routes=vonage_routes),
            Mount("/webhook", routes=webhook_routes),
            Mount("/braze", routes=braze_routes),
            Mount("/line", routes=line_routes),
            Mount("/_sandbox", routes=control_routes),
        ]
    )
    app.state.config = config or SandboxConfig()
    app.state.store = store if store is not None else MessageStore()
    app.state.template_statuses = {}  # POST /_sandbox/templates
    return app
