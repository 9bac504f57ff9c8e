"""LINE Messaging API (prefix `/line`): `POST /v2/bot/message/multicast` and
`POST /v2/bot/message/push`; a repeated `X-Line-Retry-Key` is answered 409."""

from __future__ import annotations

import hmac
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cdp_activation.sandbox.core import Fault, MessageStore, SandboxConfig, SandboxMessage, utc_now
from cdp_activation.sandbox.exchange import BatchRules, Candidate, batch_request, retry_after_header

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


def _parse_line(request: Request, raw: bytes) -> Response | list[Candidate]:
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
        Candidate(to=user, record={"body": body}, extra={"retry_key": retry_key or ""})
        for user in users
    ]


def _line_detail(prop: str, message: str = "May not be empty") -> dict[str, str]:
    return {"message": message, "property": prop}


def _line_replay(request: Request, candidates: list[Candidate]) -> Response | None:
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


def _line_quota(
    request: Request, config: SandboxConfig, candidates: list[Candidate]
) -> Response | None:
    """A new request taking more messages than the month has left: 429, nothing sent. A repeat
    of an accepted key is not counted again (it is answered 409 after this)."""
    if not config.line_monthly_quota:
        return None
    store: MessageStore = request.app.state.store
    key = candidates[0].extra["retry_key"]
    if key and store.knows("line", key):
        return None
    if store.accepted_count("line") + len(candidates) <= config.line_monthly_quota:
        return None
    return _line_error(429, "You have reached your monthly limit.")


def _line_id() -> str:
    return str(uuid.uuid4())


def _accept_line(
    request: Request, candidate: Candidate
) -> tuple[SandboxMessage | None, dict[str, Any]]:
    message = SandboxMessage(
        provider="line",
        channel="line",
        to=candidate.to,
        provider_message_id=request.state.line_request_id,
        received_at=utc_now().isoformat(),
        idempotency_key=candidate.extra["retry_key"] or None,
        **candidate.record,
    )
    return message, {}


def _line_fault_answer(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    if fault == Fault.THROTTLED:
        return _line_error(
            429,
            "The API rate limit has been exceeded. Try again later.",
            headers={"Retry-After": retry_after_header(config.retry_after_s)},
        )
    return _line_error(500 if draw < 0.5 else 503, "Internal server error")


def _line_rules(answer: Callable[[list[dict[str, Any]]], Response]) -> BatchRules:
    return BatchRules(
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
        refuse_request=_line_quota,
    )


async def line_multicast(request: Request) -> Response:
    """`POST /v2/bot/message/multicast`: 200 `{}`, the request id in `x-line-request-id`."""
    request.state.line_request_id = ident = _line_id()
    rules = _line_rules(lambda entries: JSONResponse({}, headers={"x-line-request-id": ident}))
    return await batch_request(request, rules)


async def line_push(request: Request) -> Response:
    """`POST /v2/bot/message/push`: 200 with `sentMessages`, the request id in a header."""
    request.state.line_request_id = ident = _line_id()
    rules = _line_rules(
        lambda entries: JSONResponse(
            {"sentMessages": [{"id": str(uuid.uuid4().int)[:18], "quoteToken": uuid.uuid4().hex}]},
            headers={"x-line-request-id": ident},
        )
    )
    return await batch_request(request, rules)


PREFIX = "/line"
ROUTES = [
    Route("/v2/bot/message/multicast", line_multicast, methods=["POST"]),
    Route("/v2/bot/message/push", line_push, methods=["POST"]),
]
