"""Infobip (prefix `/infobip`): `POST /whatsapp/1/message/template`, `POST /sms/3/messages`,
`POST /viber/2/messages`, RCS through `POST /messages-api/1/messages` and KakaoTalk AlimTalk
through `POST /kakao-alim/1/messages`, many messages per request, `Authorization: App <key>`."""

from __future__ import annotations

import dataclasses
import hmac
import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cdp_activation.sandbox.catalog import (
    body_parameter_count,
    find_template,
    load_catalog,
    template_statuses_of,
    with_status,
)
from cdp_activation.sandbox.core import Fault, SandboxConfig, SandboxMessage, digits_ok, utc_now
from cdp_activation.sandbox.exchange import BatchRules, Candidate, batch_request, retry_after_header

_INFOBIP_CALLBACK_DATA_MAX = 4000  # callbackData


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


def _parse_infobip_whatsapp(request: Request, raw: bytes) -> Response | list[Candidate]:
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
        template = find_template(str(name), str(language))
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
            Candidate(
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


def _parse_infobip_sms(request: Request, raw: bytes) -> Response | list[Candidate]:
    """Validate an `SmsRequestEnvelope`; each destination of each message is one candidate."""
    return _parse_infobip_text(raw, "sms")


def _parse_infobip_viber(request: Request, raw: bytes) -> Response | list[Candidate]:
    """Validate a `ViberRequest` of TEXT messages (the sandbox's only Viber content)."""
    return _parse_infobip_text(raw, "viber")


def _violation(prop: str, why: str) -> JSONResponse:
    """The SMS v3 / Viber v2 / Messages API / Kakao 400: one `ApiError` violation."""
    return _infobip_api_error(
        400,
        "E400",
        "Request cannot be processed.",
        "Check the syntax, violations and adjust the request.",
        [{"property": prop, "violation": why}],
    )


def _envelope(raw: bytes) -> Response | list[Any]:
    """The request's non-empty `messages` list, or the 400 saying why there is none."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _violation("body", "Invalid JSON.")
    items = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        return _violation("messages", "must not be empty")
    return items


def _callback_data(item: dict[str, Any], where: str) -> Response | str | None:
    """`webhooks.callbackData` (at most 4,000 characters), or the 400 saying it is wrong."""
    webhooks = item.get("webhooks")
    if webhooks is not None and not isinstance(webhooks, dict):
        return _violation(f"{where}.webhooks", "must be an object")
    callback_data = (webhooks or {}).get("callbackData")
    if callback_data is not None and (
        not isinstance(callback_data, str) or len(callback_data) > _INFOBIP_CALLBACK_DATA_MAX
    ):
        return _violation(f"{where}.webhooks.callbackData", "size must be between 0 and 4000")
    return callback_data


def _destinations(
    item: dict[str, Any], where: str, record: dict[str, Any], channel: str
) -> Response | list[Candidate]:
    """One candidate per `destinations[].to` of a message, each with `record`."""
    destinations = item.get("destinations")
    if not isinstance(destinations, list) or not destinations:
        return _violation(f"{where}.destinations", "must not be empty")
    candidates = []
    for j, destination in enumerate(destinations):
        if not isinstance(destination, dict) or not isinstance(destination.get("to"), str):
            return _violation(f"{where}.destinations[{j}].to", "must not be blank")
        message_id = str(destination.get("messageId") or "")
        candidates.append(
            Candidate(
                to=destination["to"],
                record=record,
                extra={"message_id": message_id, "channel": channel},
            )
        )
    return candidates


def _parse_infobip_text(raw: bytes, channel: str) -> Response | list[Candidate]:
    """The SMS v3 and Viber v2 envelopes: `{messages: [{sender, destinations: [{to,
    messageId}], content: {text[, type]}}]}`; Viber's content is typed and 1,000 characters."""
    items = _envelope(raw)
    if isinstance(items, Response):
        return items
    candidates: list[Candidate] = []
    for i, item in enumerate(items):
        where = f"messages[{i}]"
        content = item.get("content") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("destinations"), list):
            return _violation(f"{where}.destinations", "must not be empty")
        if not isinstance(content, dict) or not isinstance(content.get("text"), str):
            return _violation(f"{where}.content.text", "must not be null")
        if channel == "viber" and content.get("type") != "TEXT":
            return _violation(f"{where}.content.type", "must be TEXT in the sandbox")
        if channel == "viber" and len(content["text"]) > 1000:
            return _violation(f"{where}.content.text", "size must be between 0 and 1000")
        callback_data = _callback_data(item, where)
        if isinstance(callback_data, Response):
            return callback_data
        found = _destinations(
            item, where, {"body": content["text"], "callback_data": callback_data}, channel
        )
        if isinstance(found, Response):
            return found
        candidates.extend(found)
    return candidates


def _parse_infobip_messages_api(request: Request, raw: bytes) -> Response | list[Candidate]:
    """Validate a `MessagesApiRequest` of RCS TEXT messages (the channel and content type the
    sandbox emulates on the Messages API); each destination is one candidate."""
    items = _envelope(raw)
    if isinstance(items, Response):
        return items
    candidates: list[Candidate] = []
    for i, item in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            return _violation(where, "must be an object")
        if item.get("channel") != "RCS":
            return _violation(f"{where}.channel", "the sandbox emulates RCS on the Messages API")
        if not isinstance(item.get("sender"), str) or not item["sender"]:
            return _violation(f"{where}.sender", "must not be blank")
        body = (item.get("content") or {}).get("body")
        if not isinstance(body, dict) or body.get("type") != "TEXT":
            return _violation(f"{where}.content.body.type", "must be TEXT in the sandbox")
        text = body.get("text")
        if not isinstance(text, str) or not 1 <= len(text) <= 3072:
            return _violation(f"{where}.content.body.text", "size must be between 1 and 3072")
        callback_data = _callback_data(item, where)
        if isinstance(callback_data, Response):
            return callback_data
        found = _destinations(item, where, {"body": text, "callback_data": callback_data}, "rcs")
        if isinstance(found, Response):
            return found
        candidates.extend(found)
    return candidates


# The sandbox's Kakao-approved AlimTalk templates: code -> the registered text's start (the
# sandbox checks a message's text begins with it, as Kakao checks the text against the template).
KAKAO_TEMPLATES: dict[str, str] = {
    "order_shipped_01": "Hi ",
    "delivery_update_01": "Your delivery ",
}


def _parse_infobip_kakao(request: Request, raw: bytes) -> Response | list[Candidate]:
    """Validate a Kakao Alim request: `{messages: [{sender, destinations: [{to, messageId}],
    content: {templateCode, text, type: TEMPLATE}}]}`; an unknown template code, or a text
    that is not the template's, refuses the request naming `content.templateCode`."""
    items = _envelope(raw)
    if isinstance(items, Response):
        return items
    candidates: list[Candidate] = []
    for i, item in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("sender"), str):
            return _violation(f"{where}.sender", "must not be blank")
        content = item.get("content")
        if not isinstance(content, dict) or content.get("type") != "TEMPLATE":
            return _violation(f"{where}.content.type", "must be TEMPLATE")
        code, text = content.get("templateCode"), content.get("text")
        if not isinstance(text, str) or not 1 <= len(text) <= 1000:
            return _violation(f"{where}.content.text", "size must be between 1 and 1000")
        start = KAKAO_TEMPLATES.get(str(code))
        if start is None or not text.startswith(start):
            return _violation(
                f"{where}.content.templateCode",
                f"template {code} is not approved for this sender, or the text is not its",
            )
        callback_data = _callback_data(item, where)
        if isinstance(callback_data, Response):
            return callback_data
        record = {"template_name": code, "body": text, "callback_data": callback_data}
        found = _destinations(item, where, record, "kakao")
        if isinstance(found, Response):
            return found
        candidates.extend(found)
    return candidates


def _refuse_infobip(config: SandboxConfig, candidate: Candidate) -> dict[str, Any] | None:
    """A destination that is not a number is REJECTED in the 200 answer, as Infobip does."""
    if digits_ok(candidate.to):
        return None
    return _infobip_entry(candidate, candidate.extra["message_id"] or str(uuid.uuid4()), False)


def _infobip_entry(candidate: Candidate, message_id: str, accepted: bool) -> dict[str, Any]:
    status = dict(_INFOBIP_PENDING if accepted else _INFOBIP_REJECTED_DESTINATION)
    if candidate.extra["channel"] in ("sms", "rcs", "kakao"):
        return {
            "messageId": message_id,
            "status": status,
            "destination": candidate.to,
            "details": {"messageCount": 1},
        }
    return {"to": candidate.to, "messageCount": 1, "messageId": message_id, "status": status}


def _accept_infobip(
    request: Request, candidate: Candidate
) -> tuple[SandboxMessage | None, dict[str, Any]]:
    message_id = candidate.extra["message_id"] or str(uuid.uuid4())
    message = SandboxMessage(
        provider="infobip",
        channel=candidate.extra["channel"],
        to="+" + candidate.to.removeprefix("+"),
        provider_message_id=message_id,
        received_at=utc_now().isoformat(),
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
            headers={"Retry-After": retry_after_header(config.retry_after_s)},
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
            headers={"Retry-After": retry_after_header(config.retry_after_s)},
        )
    status = 500 if draw < 0.5 else 503
    return _infobip_api_error(status, f"E{status}", "Something went wrong.", "Contact the support.")


_INFOBIP_WHATSAPP = BatchRules(
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
_INFOBIP_MESSAGES_API = dataclasses.replace(_INFOBIP_SMS, parse=_parse_infobip_messages_api)
_INFOBIP_KAKAO = dataclasses.replace(_INFOBIP_SMS, parse=_parse_infobip_kakao)


async def infobip_whatsapp_template(request: Request) -> Response:
    """`POST /whatsapp/1/message/template`: template messages to many recipients."""
    return await batch_request(request, _INFOBIP_WHATSAPP)


async def infobip_sms(request: Request) -> Response:
    """`POST /sms/3/messages`: SMS to many destinations."""
    return await batch_request(request, _INFOBIP_SMS)


async def infobip_viber(request: Request) -> Response:
    """`POST /viber/2/messages`: Viber Business Messages to many destinations."""
    return await batch_request(request, _INFOBIP_VIBER)


async def infobip_messages_api(request: Request) -> Response:
    """`POST /messages-api/1/messages`: RCS messages to many destinations."""
    return await batch_request(request, _INFOBIP_MESSAGES_API)


async def infobip_whatsapp_templates(request: Request) -> Response:
    """`GET /whatsapp/2/senders/{sender}/templates`: the sandbox catalog in Infobip's shape
    (`TemplatesApiResponse`), with the statuses a test set."""
    config: SandboxConfig = request.app.state.config
    if not _infobip_authorized(request, config):
        return _infobip_exception(401, "UNAUTHORIZED", "Invalid login details")
    statuses = template_statuses_of(request)
    templates = []
    for template in (with_status(t, statuses) for t in load_catalog()):
        body = next(
            (c.get("text", "") for c in template.get("components", []) if c.get("type") == "BODY"),
            "",
        )
        templates.append(
            {
                "id": template["id"],
                "businessAccountId": 222,
                "name": template["name"],
                "language": template["language"],
                # Infobip says FIRST_PAUSED (then SECOND_PAUSED) where Meta says PAUSED.
                "status": "FIRST_PAUSED" if template["status"] == "PAUSED" else template["status"],
                "category": template["category"],
                "structure": {"body": {"text": body}, "type": "TEXT"},
            }
        )
    return JSONResponse({"templates": templates})


async def infobip_kakao(request: Request) -> Response:
    """`POST /kakao-alim/1/messages`: KakaoTalk AlimTalk templates to many destinations."""
    return await batch_request(request, _INFOBIP_KAKAO)


PREFIX = "/infobip"
ROUTES = [
    Route("/whatsapp/1/message/template", infobip_whatsapp_template, methods=["POST"]),
    Route("/sms/3/messages", infobip_sms, methods=["POST"]),
    Route("/viber/2/messages", infobip_viber, methods=["POST"]),
    Route("/messages-api/1/messages", infobip_messages_api, methods=["POST"]),
    Route("/kakao-alim/1/messages", infobip_kakao, methods=["POST"]),
    Route("/whatsapp/2/senders/{sender}/templates", infobip_whatsapp_templates, methods=["GET"]),
]
