"""Vonage Messages API v1 (prefix `/vonage`): `POST /v1/messages`, HTTP Basic, 202
`{message_uuid}`, 422 problem bodies whose `type` ends in the x-errors code."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cdp_activation.sandbox.catalog import body_parameter_count, find_template
from cdp_activation.sandbox.core import Fault, SandboxConfig, SandboxMessage, digits_ok, utc_now
from cdp_activation.sandbox.exchange import (
    Candidate,
    ProviderRules,
    provider_request,
    retry_after_header,
)

_VONAGE_CLIENT_REF_MAX = 40  # client_ref


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


def _parse_vonage(request: Request, raw: bytes) -> Response | Candidate:
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
        found = find_template(name, language)
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
    return Candidate(to=to, record=record, extra={"channel": channel})


def _refuse_vonage(config: SandboxConfig, candidate: Candidate) -> Response | None:
    """The `to` is not a number: 422 Invalid recipient (1430), never accepted."""
    if digits_ok(candidate.to) and not candidate.to.startswith("+"):
        return None
    return _vonage_error(
        422,
        f"{_VONAGE_ERRORS}#1430",
        "Invalid recipient",
        "The `to` parameter is invalid for the given channel.",
    )


def _accept_vonage(request: Request, candidate: Candidate) -> tuple[SandboxMessage, Response]:
    message_uuid = str(uuid.uuid4())
    message = SandboxMessage(
        provider="vonage",
        channel=candidate.extra["channel"],
        to="+" + candidate.to,
        provider_message_id=message_uuid,
        received_at=utc_now().isoformat(),
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
            headers={"Retry-After": retry_after_header(config.retry_after_s)},
        )
    status = 500 if draw < 0.5 else 503
    return _vonage_error(
        status,
        f"{_VONAGE_ERRORS}#1030",
        "Internal error",
        "There was an error processing your request in the Platform.",
    )


_VONAGE = ProviderRules(
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
    return await provider_request(request, _VONAGE)


PREFIX = "/vonage"
ROUTES = [Route("/v1/messages", vonage_send_message, methods=["POST"])]
