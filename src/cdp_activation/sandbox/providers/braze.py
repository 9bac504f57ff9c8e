"""Braze (prefix `/braze`): API-triggered campaigns and Canvases (`/campaigns/trigger/send`,
`/canvas/trigger/send`) and `POST /users/track`, `Authorization: Bearer`."""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cdp_activation.sandbox.core import Fault, SandboxConfig, SandboxMessage, utc_now
from cdp_activation.sandbox.exchange import (
    BatchRules,
    Candidate,
    batch_request,
    retry_after_header,
)

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


def _parse_braze(request: Request, raw: bytes) -> Response | list[Candidate]:
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
            Candidate(
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
    request: Request, candidate: Candidate
) -> tuple[SandboxMessage | None, dict[str, Any]]:
    dispatch = request.state.braze_dispatch
    message = SandboxMessage(
        provider="braze",
        channel=candidate.extra["channel"],
        to=candidate.to,
        provider_message_id=dispatch,
        received_at=utc_now().isoformat(),
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
                "Retry-After": retry_after_header(config.retry_after_s),
                "X-RateLimit-Limit": "250000",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": reset,
            },
        )
    return _braze_error(500 if draw < 0.5 else 503, "Internal Server Error")


_BRAZE = BatchRules(
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
    return await batch_request(request, _BRAZE)


# The sandbox's subscription groups and their channel; another id is refused per user.
BRAZE_SUBSCRIPTION_GROUPS: dict[str, str] = {
    "winback_whatsapp_group": "whatsapp",
    "winback_sms_group": "sms",
    "contract_group": "whatsapp",
}
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


def _parse_track(request: Request, raw: bytes) -> Response | list[Candidate]:
    """`{attributes: [..75 objects, each with an external_id]}`; a malformed object is a
    non-fatal error of its own (`refuse`), as Braze reports them, not a refused request."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _braze_error(400, "Invalid JSON")
    attributes = payload.get("attributes") if isinstance(payload, dict) else None
    if not isinstance(attributes, list) or not 1 <= len(attributes) <= 75:
        return _braze_error(400, "attributes must be an array of 1 to 75 objects")
    candidates = []
    for index, item in enumerate(attributes):
        if not isinstance(item, dict) or not item.get("external_id"):
            return _braze_error(400, f"attributes[{index}] needs an external_id")
        phone = item.get("phone")
        candidates.append(
            Candidate(
                to=phone if isinstance(phone, str) and phone else str(item["external_id"]),
                record={"item": item},
                extra={"index": str(index)},
            )
        )
    return candidates


def _track_problem(item: dict[str, Any]) -> str | None:
    """Why Braze would not apply this attributes object, or None."""
    phone = item.get("phone")
    if phone is not None and not (isinstance(phone, str) and _E164.match(phone)):
        return "'phone' must be an E.164 phone number"
    groups = item.get("subscription_groups", [])
    if not isinstance(groups, list):
        return "'subscription_groups' must be an array"
    for group in groups:
        if not isinstance(group, dict) or group.get("subscription_group_id") not in (
            BRAZE_SUBSCRIPTION_GROUPS
        ):
            return "'subscription_group_id' is not a valid subscription group"
        if group.get("subscription_state") not in ("subscribed", "unsubscribed"):
            return "'subscription_state' must be subscribed or unsubscribed"
    return None


def _refuse_track(config: SandboxConfig, candidate: Candidate) -> dict[str, Any] | None:
    problem = _track_problem(candidate.record["item"])
    if problem is None:
        return None
    index = int(candidate.extra["index"])
    return {"error": {"type": problem, "input_array": "attributes", "index": index}}


def _accept_track(
    request: Request, candidate: Candidate
) -> tuple[SandboxMessage | None, dict[str, Any]]:
    """Merge the object into the user's profile; a push that changed it is recorded as a
    message of the `braze_audience` provider (no status report follows: Braze's Canvas sends),
    one that changed nothing (a retry) is not, as Braze would trigger nothing for it."""
    item = candidate.record["item"]
    store = request.app.state.store
    if not store.track([item]):
        return None, {"processed": True}  # the profile already held all of it: no new push
    groups = item.get("subscription_groups") or [{}]
    channel = BRAZE_SUBSCRIPTION_GROUPS.get(groups[0].get("subscription_group_id"), "audience")
    values = {k: v for k, v in item.items() if k not in _NOT_PROPERTIES}
    message = SandboxMessage(
        provider="braze_audience",
        channel=channel,
        to=candidate.to,
        provider_message_id=str(item["external_id"]),
        received_at=utc_now().isoformat(),
        template_name=",".join(sorted(values)),
        parameters=tuple(str(values[k]) for k in sorted(values)),
    )
    return message, {"processed": True}


_NOT_PROPERTIES = frozenset(
    {"external_id", "phone", "subscription_groups", "_update_existing_only"}
)


def _track_answer(entries: list[dict[str, Any]]) -> Response:
    errors = [e["error"] for e in entries if "error" in e]
    body: dict[str, Any] = {
        "message": "success",
        "attributes_processed": len(entries) - len(errors),
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=201)


_TRACK = BatchRules(
    name="braze_audience",
    authorized=_braze_authorized,
    unauthorized=lambda: _braze_error(401, "Invalid API key"),
    parse=_parse_track,
    refuse=_refuse_track,
    accept=_accept_track,
    answer=_track_answer,
    fault_answer=_braze_fault_answer,
)


async def braze_users_track(request: Request) -> Response:
    """`POST /users/track`: up to 75 attribute objects, each with an `external_id`; faults
    (throttling, 5xx, timeouts, a dropped answer) as on the campaign routes."""
    return await batch_request(request, _TRACK)


PREFIX = "/braze"
ROUTES = [
    Route("/campaigns/trigger/send", braze_trigger_send, methods=["POST"]),
    Route("/canvas/trigger/send", braze_trigger_send, methods=["POST"]),
    Route("/users/track", braze_users_track, methods=["POST"]),
]
