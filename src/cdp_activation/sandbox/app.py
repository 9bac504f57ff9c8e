"""The sandbox provider: a local ASGI app that answers like Meta's Cloud API and Twilio.

Why emulate instead of mocking: the connectors, the delivery engine, the demo and the tests all
talk real HTTP to it, so timeouts, connection reuse, status codes and error bodies are exercised
exactly as in production. Status codes, ids and error bodies follow the vendor specs in
`shared/vendor-specs/` and the providers' published error-code tables:

- Meta (prefix `/meta`): `POST /{version}/{phone_number_id}/messages` and
  `GET /{version}/{waba_id}/message_templates` (cursor paging), Graph API error bodies
  `{"error": {"message", "type", "code", "error_data", "fbtrace_id"}}`.
- Twilio (prefix `/twilio`): `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`,
  form-encoded, HTTP Basic auth, `{"code", "message", "more_info", "status"}` error bodies.
- Control (prefix `/_sandbox`): `GET messages`, `POST reset`, `GET health`.

Deterministic rules make outcomes reproducible: a WhatsApp number whose digits end in `13`
(about 1% of numbers) is "not on WhatsApp" (Meta code 131026).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import secrets
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from cdp_activation.settings import (
    SANDBOX_META_TOKEN,
    SANDBOX_TWILIO_ACCOUNT_SID,
    SANDBOX_TWILIO_AUTH_TOKEN,
)

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_PLACEHOLDER = re.compile(r"\{\{\s*(\d+)\s*\}\}")
_TWILIO_BODY_LIMIT = 1600  # characters; Twilio error 21617 beyond it
_NOT_APPROVED = {"PENDING", "REJECTED", "IN_APPEAL", "PENDING_DELETION", "DELETED"}


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox behaves. Defaults are the published sandbox credentials in settings.

    `latency_ms` delays every provider answer (not control routes) so throughput and timeouts
    can be studied locally. Fault injection (error rates, dropped connections) is meant to join
    this dataclass as further fields, applied in `_provider_delay`'s place.
    """

    meta_token: str = SANDBOX_META_TOKEN
    twilio_account_sid: str = SANDBOX_TWILIO_ACCOUNT_SID
    twilio_auth_token: str = SANDBOX_TWILIO_AUTH_TOKEN
    latency_ms: float = 0.0


@dataclass(frozen=True)
class SandboxMessage:
    """One message the sandbox accepted, as a test or the demo wants to inspect it."""

    provider: str  # "meta_whatsapp" | "twilio"
    channel: str  # "whatsapp" | "sms"
    to: str
    provider_message_id: str
    received_at: str  # ISO 8601, UTC
    template_name: str | None = None
    template_language: str | None = None
    parameters: tuple[str, ...] = ()
    body: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        data = asdict(self)
        data["parameters"] = list(self.parameters)
        return data


@dataclass
class MessageStore:
    """Thread-safe in-memory record of accepted messages.

    uvicorn serves from its own thread while tests read from the main one, hence the lock.
    """

    _messages: list[SandboxMessage] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, message: SandboxMessage) -> None:
        with self._lock:
            self._messages.append(message)

    def list(self) -> list[SandboxMessage]:
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()


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


def _find_template(name: str, language: str) -> dict[str, Any] | None:
    for template in load_catalog():
        if template["name"] == name and template["language"] == language:
            return template
    return None


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


async def meta_send_message(request: Request) -> Response:
    """`POST /{version}/{phone_number_id}/messages`: template or text message to one user."""
    config: SandboxConfig = request.app.state.config
    await _provider_delay(config)
    if not _meta_authorized(request, config):
        return _meta_unauthorized()
    try:
        payload = json.loads(await request.body())
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

    kind = payload.get("type", "text")
    record: dict[str, Any]
    if kind == "template":
        tpl = payload.get("template")
        if not isinstance(tpl, dict) or not isinstance(tpl.get("name"), str):
            return _meta_error(400, 100, "(#100) The parameter template['name'] is required.")
        name = tpl["name"]
        language = (tpl.get("language") or {}).get("code", "")
        template = _find_template(name, language)
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

    if _not_on_whatsapp(digits):
        return _meta_error(
            400,
            131026,
            "(#131026) Message undeliverable",
            details="Message Undeliverable.",
        )
    wamid = "wamid." + base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    request.app.state.store.add(
        SandboxMessage(
            provider="meta_whatsapp",
            channel="whatsapp",
            to=to,
            provider_message_id=wamid,
            received_at=_now().isoformat(),
            **record,
        )
    )
    return JSONResponse(
        {
            "messaging_product": "whatsapp",
            "contacts": [{"input": to, "wa_id": digits}],
            "messages": [{"id": wamid, "message_status": "accepted"}],
        }
    )


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
    templates = [
        t
        for t in load_catalog()
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


async def twilio_create_message(request: Request) -> Response:
    """`POST /2010-04-01/Accounts/{AccountSid}/Messages.json` (form-encoded), 201 on success."""
    config: SandboxConfig = request.app.state.config
    await _provider_delay(config)
    account_sid = request.path_params["account_sid"]
    if not _twilio_authorized(request, account_sid, config):
        return _twilio_error(401, 20003, "Authenticate")
    try:
        form = {
            k: v[-1]
            for k, v in parse_qs((await request.body()).decode(), keep_blank_values=True).items()
        }
    except UnicodeDecodeError:
        return _twilio_error(400, 21602, "Message body is required.")
    to = form.get("To", "")
    if not to:
        return _twilio_error(400, 21604, "A 'To' phone number is required.")
    if not _E164.match(to):
        return _twilio_error(400, 21211, f"Invalid 'To' Phone Number: {to}")
    sender = form.get("From", "")
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
    variables: dict[str, Any] = {}
    if content_sid:
        try:
            variables = json.loads(form.get("ContentVariables") or "{}")
            if not isinstance(variables, dict):
                raise ValueError("not an object")
        except ValueError:
            return _twilio_error(400, 21656, "The ContentVariables Parameter is invalid.")

    sid = "SM" + uuid.uuid4().hex
    created = format_datetime(_now())
    request.app.state.store.add(
        SandboxMessage(
            provider="twilio",
            channel="sms",
            to=to,
            provider_message_id=sid,
            received_at=_now().isoformat(),
            template_name=content_sid or None,
            parameters=tuple(str(variables[k]) for k in sorted(variables, key=_numeric_key)),
            body=body or None,
        )
    )
    uri = f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}"
    return JSONResponse(
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
            "to": to,
            "uri": f"{uri}.json",
        },
        status_code=201,
    )


def _numeric_key(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 30, key)


# --------------------------------------------------------------------------------------------
# Control routes and the app
# --------------------------------------------------------------------------------------------


async def _provider_delay(config: SandboxConfig) -> None:
    """Apply configured latency before a provider answers (the hook for later fault injection)."""
    if config.latency_ms > 0:
        await asyncio.sleep(config.latency_ms / 1000)


async def sandbox_messages(request: Request) -> Response:
    return JSONResponse([m.as_dict() for m in request.app.state.store.list()])


async def sandbox_reset(request: Request) -> Response:
    request.app.state.store.clear()
    return JSONResponse({"reset": True})


async def sandbox_health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(config: SandboxConfig | None = None, store: MessageStore | None = None) -> Starlette:
    """Build the sandbox ASGI app. `app.state.store` holds accepted messages."""
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
    ]
    control_routes = [
        Route("/messages", sandbox_messages, methods=["GET"]),
        Route("/reset", sandbox_reset, methods=["POST"]),
        Route("/health", sandbox_health, methods=["GET"]),
    ]
    app = Starlette(
        routes=[
            Mount("/meta", routes=meta_routes),
            Mount("/twilio", routes=twilio_routes),
            Mount("/_sandbox", routes=control_routes),
        ]
    )
    app.state.config = config or SandboxConfig()
    app.state.store = store if store is not None else MessageStore()
    return app
