"""Meta WhatsApp Cloud API (prefix `/meta`): `POST /{version}/{phone_number_id}/messages` and
`GET /{version}/{waba_id}/message_templates` (cursor paging), Graph API error bodies
`{"error": {"message", "type", "code", "error_data", "fbtrace_id"}}`."""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import secrets
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cdp_activation.sandbox.catalog import (
    _NOT_APPROVED,
    body_parameter_count,
    find_template,
    load_catalog,
    page_cursor,
    page_index,
    template_statuses_of,
    with_status,
)
from cdp_activation.sandbox.core import (
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

_META_CALLBACK_DATA_MAX = 512  # biz_opaque_callback_data


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


def _parse_meta(request: Request, raw: bytes) -> Response | Candidate:
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
        template = find_template(name, language, template_statuses_of(request))
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
            "template_category": str(template.get("category") or "").lower() or None,
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
    return Candidate(to=to, record={**record, "callback_data": callback_data})


def _parse_meta_marketing(request: Request, raw: bytes) -> Response | Candidate:
    """A Marketing Messages API body (`MarketingMessageRequestPayload`): a marketing template
    only, and none of the fields the spec does not list (no `biz_opaque_callback_data`)."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        payload = None
    if isinstance(payload, dict):
        allowed = {
            "messaging_product",
            "recipient_type",
            "to",
            "type",
            "template",
            "product_policy",
            "message_activity_sharing",
        }
        unknown = sorted(set(payload) - allowed)
        if unknown:
            return _meta_error(400, 100, f"(#100) Param {unknown[0]} is not a valid parameter")
        if payload.get("type") != "template":
            return _meta_error(400, 100, "(#100) Marketing messages must be templates")
        tpl = payload.get("template") or {}
        template = find_template(
            str(tpl.get("name")), str((tpl.get("language") or {}).get("code", "")), {}
        )
        if template is not None and str(template.get("category", "")).upper() != "MARKETING":
            return _meta_error(
                400, 100, "(#100) The Marketing Messages API sends marketing templates only"
            )
    candidate = _parse_meta(request, raw)
    if isinstance(candidate, Candidate):
        return Candidate(
            to=candidate.to, record={**candidate.record, "endpoint": "marketing_messages"}
        )
    return candidate


def _refuse_meta(config: SandboxConfig, candidate: Candidate) -> Response | None:
    """Meta's per-recipient refusal: the number has no WhatsApp account (rule or fault rate)."""
    digits = candidate.to.removeprefix("+")
    rate = config.rate_not_on_whatsapp
    if is_not_on_whatsapp(digits) or (
        rate and fault_draw(config, "not_on_whatsapp", digits) < rate
    ):
        return _meta_error(
            400,
            131026,
            "(#131026) Message undeliverable",
            details="Message Undeliverable.",
        )
    return None


def _accept_meta(request: Request, candidate: Candidate) -> tuple[SandboxMessage, Response]:
    wamid = "wamid." + base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    message = SandboxMessage(
        provider="meta_whatsapp",
        channel="whatsapp",
        to=candidate.to,
        provider_message_id=wamid,
        received_at=utc_now().isoformat(),
        idempotency_key=request.headers.get("idempotency-key"),
        **candidate.record,
    )
    config: SandboxConfig = request.app.state.config
    status = "accepted"
    held = config.meta_held_rate
    if "template_name" in candidate.record and held and fault_draw(config, "held", wamid) < held:
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
            headers={"Retry-After": retry_after_header(config.retry_after_s)},
        )
    if draw < 0.5:
        return _meta_error(500, 131000, "(#131000) Something went wrong")
    return _meta_error(503, 2, "(#2) Service temporarily unavailable")


async def meta_send_message(request: Request) -> Response:
    """`POST /{version}/{phone_number_id}/messages`: template or text message to one user."""
    return await provider_request(request, _META)


async def meta_marketing_messages(request: Request) -> Response:
    """`POST /{version}/{phone_number_id}/marketing_messages`: one marketing template message
    through the Marketing Messages API (same answers as `/messages`)."""
    return await provider_request(request, _META_MARKETING)


async def meta_list_templates(request: Request) -> Response:
    """`GET /{version}/{waba_id}/message_templates` with `limit`/`after` cursor paging."""
    config: SandboxConfig = request.app.state.config
    await provider_delay(config)
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
        index = page_index(after)
        if index is None:
            return _meta_error(400, 100, "(#100) Invalid cursor", details="after")
        start = index + 1
    statuses = template_statuses_of(request)
    templates = [
        t
        for t in (with_status(t, statuses) for t in load_catalog())
        if (not query.get("name") or t["name"] == query["name"])
        and (not query.get("status") or t["status"] == query["status"].upper())
    ]
    page = templates[start : start + limit]
    body: dict[str, Any] = {"data": list(page)}
    if page:
        last = start + len(page) - 1
        body["paging"] = {"cursors": {"before": page_cursor(start), "after": page_cursor(last)}}
        if last + 1 < len(templates):
            next_url = request.url.remove_query_params("access_token").include_query_params(
                limit=limit, after=page_cursor(last)
            )
            body["paging"]["next"] = str(next_url)
    return JSONResponse(body)


_META = ProviderRules(
    name="meta_whatsapp",
    authorized=_meta_authorized,
    unauthorized=_meta_unauthorized,
    parse=_parse_meta,
    refuse=_refuse_meta,
    accept=_accept_meta,
    fault_answer=_meta_fault_answer,
)
_META_MARKETING = dataclasses.replace(_META, parse=_parse_meta_marketing)


PREFIX = "/meta"
ROUTES = [
    Route("/{version}/{phone_number_id}/messages", meta_send_message, methods=["POST"]),
    Route(
        "/{version}/{phone_number_id}/marketing_messages",
        meta_marketing_messages,
        methods=["POST"],
    ),
    Route("/{version}/{waba_id}/message_templates", meta_list_templates, methods=["GET"]),
]
