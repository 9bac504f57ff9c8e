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
  `GET health`, `GET pending` (status webhooks still to send), and `GET`/`POST faults` to
  read or change fault injection while running.
- Alerts (`alert_inbox.py`): Slack's `POST /slack/api/chat.postMessage` and a generic
  `POST /alerts/webhook`, listed by `GET /_sandbox/alerts`.

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

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from cdp_activation.sandbox import alert_inbox
from cdp_activation.sandbox.catalog import (
    find_template,
    load_catalog,
    template_statuses_of,
    with_status,
)
from cdp_activation.sandbox.core import MessageStore, SandboxConfig
from cdp_activation.sandbox.exchange import RAW_SEND
from cdp_activation.sandbox.providers import (
    braze,
    infobip,
    line,
    meta,
    twilio,
    vonage,
    webhook,
    wechat,
)
from cdp_activation.sandbox.status_webhooks import schedule_template_update

# Each provider's module holds its PREFIX and ROUTES.
PROVIDERS = (meta, twilio, infobip, vonage, webhook, braze, line, wechat)


class SandboxApp(Starlette):
    """Starlette, keeping the server's own `send` in the scope for `DropConnection`.

    Starlette's middleware wraps `send` in closures before a route sees it, so the server's
    callable is only visible here, at the very top.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope[RAW_SEND] = send
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


async def sandbox_pending(request: Request) -> Response:
    """`{"status_webhooks": n}`: the status reports, replies and template updates the sandbox
    has still to send (or send again) to the receiver."""
    pending = len(getattr(request.app.state, "status_tasks", None) or ())
    return JSONResponse({"status_webhooks": pending})


async def sandbox_reset(request: Request) -> Response:
    request.app.state.store.clear()
    request.app.state.template_statuses = {}
    request.app.state.alerts.clear()
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
    statuses = template_statuses_of(request)
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
        if find_template(change["name"], change["language"]) is None:
            return JSONResponse({"error": "no such template in the catalog"}, status_code=404)
        # REINSTATED and FLAGGED are events, not statuses: the template is APPROVED again.
        kept = "APPROVED" if status in ("REINSTATED", "FLAGGED") else status
        statuses[(change["name"], change["language"])] = kept
        schedule_template_update(request, change["name"], change["language"], status, change)
    return JSONResponse([with_status(t, statuses) for t in load_catalog()])


async def sandbox_health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(config: SandboxConfig | None = None, store: MessageStore | None = None) -> Starlette:
    """Build the sandbox ASGI app. `app.state.store` holds accepted messages and requests;
    `app.state.config` is the behaviour in force (replaced whole by `POST /_sandbox/faults`)."""
    control_routes = [
        Route("/messages", sandbox_messages, methods=["GET"]),
        Route("/attempts", sandbox_attempts, methods=["GET"]),
        Route("/stats", sandbox_stats, methods=["GET"]),
        Route("/pending", sandbox_pending, methods=["GET"]),
        Route("/reset", sandbox_reset, methods=["POST"]),
        Route("/faults", sandbox_faults, methods=["GET", "POST"]),
        Route("/templates", sandbox_templates, methods=["GET", "POST"]),
        Route("/health", sandbox_health, methods=["GET"]),
        Route("/alerts", alert_inbox.list_alerts, methods=["GET"]),
    ]
    app = SandboxApp(
        routes=[
            *(Mount(p.PREFIX, routes=p.ROUTES) for p in PROVIDERS),
            Mount("/_sandbox", routes=control_routes),
            Mount("/slack", routes=alert_inbox.SLACK_ROUTES),
            Mount("/alerts", routes=alert_inbox.WEBHOOK_ROUTES),
        ]
    )
    app.state.config = config or SandboxConfig()
    app.state.store = store if store is not None else MessageStore()
    app.state.template_statuses = {}  # POST /_sandbox/templates
    app.state.alerts = []  # alert_inbox.py
    return app
