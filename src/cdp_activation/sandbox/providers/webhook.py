"""The generic JSON webhook (prefix `/webhook`): `POST /messages` under the contract of
`connectors/webhook.py`, bearer token; each message `key` is accepted once."""

from __future__ import annotations

import hmac
import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cdp_activation.sandbox.core import (
    E164,
    Fault,
    MessageStore,
    SandboxConfig,
    SandboxMessage,
    utc_now,
)
from cdp_activation.sandbox.exchange import BatchRules, Candidate, batch_request, retry_after_header


def _webhook_authorized(request: Request, config: SandboxConfig) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), config.webhook_token)


def _parse_webhook(request: Request, raw: bytes) -> Response | list[Candidate]:
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
            Candidate(
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


def _refuse_webhook(config: SandboxConfig, candidate: Candidate) -> dict[str, Any] | None:
    if E164.match(candidate.to):
        return None
    return {
        "key": candidate.extra["key"],
        "status": "rejected",
        "id": None,
        "error": "invalid_number",
    }


def _accept_webhook(
    request: Request, candidate: Candidate
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
        received_at=utc_now().isoformat(),
        idempotency_key=candidate.extra["idempotency_key"] or None,
        **candidate.record,
    )
    return message, entry


def _webhook_fault_answer(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    if fault == Fault.THROTTLED:
        return JSONResponse(
            {"error": "throttled"},
            status_code=429,
            headers={"Retry-After": retry_after_header(config.retry_after_s)},
        )
    status = 500 if draw < 0.5 else 503
    return JSONResponse({"error": "server error"}, status_code=status)


_WEBHOOK = BatchRules(
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
    return await batch_request(request, _WEBHOOK)


PREFIX = "/webhook"
ROUTES = [Route("/messages", webhook_messages, methods=["POST"])]
