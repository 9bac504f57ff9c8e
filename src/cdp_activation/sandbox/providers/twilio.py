"""Twilio Programmable Messaging (prefix `/twilio`): `POST /2010-04-01/Accounts/{AccountSid}/
Messages.json`, form-encoded, HTTP Basic auth, `{"code", "message", "more_info", "status"}`
error bodies; the Content API's `GET /v1/ContentAndApprovals`."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from email.utils import format_datetime
from functools import cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cdp_activation.sandbox.catalog import (
    body_parameter_count,
    load_catalog,
    page_cursor,
    page_index,
)
from cdp_activation.sandbox.core import (
    E164,
    Fault,
    SandboxConfig,
    SandboxMessage,
    fault_draw,
    is_not_on_whatsapp,
    utc_now,
)
from cdp_activation.sandbox.exchange import (
    Candidate,
    ProviderRules,
    provider_delay,
    provider_request,
    retry_after_header,
)
from cdp_activation.sandbox_credentials import (
    SANDBOX_TWILIO_ACCOUNT_SID,
)

_TWILIO_BODY_LIMIT = 1600  # characters; Twilio error 21617 beyond it


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
    await provider_delay(config)
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
        index = page_index(token)
        if index is None:
            return _twilio_error(400, 20001, "Invalid PageToken")
        start = index + 1
    contents = twilio_contents()
    page = contents[start : start + size]
    url = "https://content.twilio.com/v1/ContentAndApprovals"
    next_url = None
    if page and start + len(page) < len(contents):
        next_url = f"{url}?PageSize={size}&PageToken={page_cursor(start + len(page) - 1)}"
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


def _parse_twilio(request: Request, raw: bytes) -> Response | Candidate:
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
    if not E164.match(to):
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
    return Candidate(to=to, record=record, extra=extra)


def _callback_url_ok(url: str) -> bool:
    """Twilio's rule for a StatusCallback: an http(s) URL with a host name, no underscores."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and "_" not in (host or "")


def _refuse_twilio(config: SandboxConfig, candidate: Candidate) -> Response | None:
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
    if candidate.extra["channel"] == "whatsapp" and is_not_on_whatsapp(candidate.to[1:]):
        return _twilio_error(400, 63003, "Channel could not find To address")
    rate = config.rate_opted_out
    if rate and fault_draw(config, "opted_out", candidate.to) < rate:
        return _twilio_error(400, 21610, "Attempt to send to unsubscribed recipient")
    return None


def _accept_twilio(request: Request, candidate: Candidate) -> tuple[SandboxMessage, Response]:
    account_sid = request.path_params["account_sid"]
    sid = "SM" + uuid.uuid4().hex
    created = format_datetime(utc_now())
    message = SandboxMessage(
        provider="twilio",
        channel=candidate.extra["channel"],
        to=candidate.to,
        provider_message_id=sid,
        received_at=utc_now().isoformat(),
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
        answer.headers["Retry-After"] = retry_after_header(config.retry_after_s)
        return answer
    if draw < 0.5:
        return _twilio_error(500, 20500, "Internal Server Error")
    return _twilio_error(503, 20503, "Service Unavailable")


async def twilio_create_message(request: Request) -> Response:
    """`POST /2010-04-01/Accounts/{AccountSid}/Messages.json` (form-encoded), 201 on success."""
    return await provider_request(request, _TWILIO)


# What the sandbox's Twilio charges a message (USD), as the Message resource's `price` says it
# (negative: a charge), by channel.
TWILIO_PRICES = {"sms": "-0.00790", "whatsapp": "-0.00500"}


async def twilio_fetch_message(request: Request) -> Response:
    """`GET /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json`: the Message resource,
    with the `price` Twilio fills in once the message is sent (404, code 20404: unknown)."""
    config: SandboxConfig = request.app.state.config
    await provider_delay(config)
    account_sid = request.path_params["account_sid"]
    if not _twilio_authorized(request, account_sid, config):
        return _twilio_error(401, 20003, "Authenticate")
    sid = request.path_params["sid"]
    if config.rate_429 and fault_draw(config, "twilio_fetch", sid) < config.rate_429:
        throttled = _twilio_error(429, 20429, "Too Many Requests")
        throttled.headers["Retry-After"] = retry_after_header(config.retry_after_s)
        return throttled
    message = request.app.state.store.find("twilio", sid)
    if message is None:
        return _twilio_error(404, 20404, f"The requested resource {request.url.path} was not found")
    return JSONResponse(
        {
            "account_sid": account_sid,
            "sid": sid,
            "status": "delivered",
            "to": ("whatsapp:" if message.channel == "whatsapp" else "") + message.to,
            "price": TWILIO_PRICES.get(message.channel, "-0.01000"),
            "price_unit": "USD",
            "uri": f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json",
        }
    )


def _numeric_key(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 30, key)


def _twilio_request_authorized(request: Request, config: SandboxConfig) -> bool:
    return _twilio_authorized(request, request.path_params["account_sid"], config)


_TWILIO = ProviderRules(
    name="twilio",
    authorized=_twilio_request_authorized,
    unauthorized=lambda: _twilio_error(401, 20003, "Authenticate"),
    parse=_parse_twilio,
    refuse=_refuse_twilio,
    accept=_accept_twilio,
    fault_answer=_twilio_fault_answer,
)


PREFIX = "/twilio"
ROUTES = [
    Route(
        "/2010-04-01/Accounts/{account_sid}/Messages.json",
        twilio_create_message,
        methods=["POST"],
    ),
    Route(
        "/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json",
        twilio_fetch_message,
        methods=["GET"],
    ),
    Route("/v1/ContentAndApprovals", twilio_content_and_approvals, methods=["GET"]),
]
