"""Where the sandbox takes alerts (alerts/destinations.py) so tests and `make dev` see them:

- Slack (prefix `/slack`): `POST /api/chat.postMessage`, the Web API's shape (JSON or form,
  `Authorization: Bearer <bot token>`; answered 200 `{"ok": true, "channel", "ts"}`, or
  `{"ok": false, "error": "invalid_auth" | "channel_not_found" | "no_text"}` as Slack does);
- a generic JSON webhook (prefix `/alerts`): `POST /webhook`, any JSON object, 200.

`GET /_sandbox/alerts` lists what arrived: `{"destination": "slack" | "webhook", "body"}`.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cdp_activation.sandbox_credentials import SANDBOX_SLACK_TOKEN


def _inbox(request: Request) -> list[dict[str, Any]]:
    inbox: list[dict[str, Any]] = request.app.state.alerts
    return inbox


async def slack_post_message(request: Request) -> Response:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
    else:
        body = dict(await request.form())
        token = token or str(body.pop("token", ""))
    if not isinstance(body, dict):
        return JSONResponse({"ok": False, "error": "invalid_json"})
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), SANDBOX_SLACK_TOKEN):
        return JSONResponse({"ok": False, "error": "invalid_auth"})
    if not str(body.get("channel", "")).strip():
        return JSONResponse({"ok": False, "error": "channel_not_found"})
    if not str(body.get("text", "")).strip() and not body.get("blocks"):
        return JSONResponse({"ok": False, "error": "no_text"})
    _inbox(request).append({"destination": "slack", "body": body})
    ts = f"{time.time():.6f}"
    return JSONResponse({"ok": True, "channel": body["channel"], "ts": ts, "message": body})


async def webhook_alert(request: Request) -> Response:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        return JSONResponse({"error": "expected a JSON object"}, status_code=400)
    _inbox(request).append({"destination": "webhook", "body": body})
    return JSONResponse({"received": True})


async def list_alerts(request: Request) -> Response:
    return JSONResponse(_inbox(request))


SLACK_ROUTES = [Route("/api/chat.postMessage", slack_post_message, methods=["POST"])]
WEBHOOK_ROUTES = [Route("/webhook", webhook_alert, methods=["POST"])]
