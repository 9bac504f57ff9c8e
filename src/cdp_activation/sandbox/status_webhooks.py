"""The sandbox's status webhooks: what happened to each accepted message, told back like the
provider tells it, to a receiver (`cdp-activation webhooks serve`, or a test's).

Each report echoes what the send asked to have echoed, where the provider puts it: Meta's
`biz_opaque_callback_data` in the status object, Infobip's `callbackData` in the delivery report
(not in a seen report), Vonage's `client_ref`; a Twilio message sent with a `StatusCallback` has
its reports posted (and signed) to exactly that URL, query string included, instead of
`<status_webhooks_url>/webhooks/twilio` (while status webhooks are on at all).

Per accepted message the outcome is drawn once from the seed and the recipient (so a re-run
behaves the same): `sent` then `delivered` (and maybe `read`), or `sent` then `failed` with the
provider's own code for "this number cannot get it" (Meta 131026, Twilio 30003, Infobip
UNDELIVERABLE_NOT_DELIVERED, Vonage 1340), or `sent` only (never delivered). Each report goes to
`<status_webhooks_url>/webhooks/<provider>` in that provider's shape, signed with the sandbox's
published webhook secret for it (`settings.SANDBOX_*`), `status_delay_ms` after the previous
one; some are sent twice or in reverse order, and an unanswered one is sent again, as real
providers do. Meta batches webhook updates ("event notifications are aggregated and sent in a
batch", up to 1,000): with `status_batch_max` above 1 the Meta reports due within
`BATCH_WINDOW_S` of each other go out together, as one signed webhook whose `statuses` holds
them all (the demo's setting: 17,000 messages report back in a few hundred requests).

Braze and LINE give no per-message receipts, so nothing is sent for them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx

from cdp_activation.delivery.transport import make_client
from cdp_activation.sandbox import signing
from cdp_activation.sandbox.draws import draw
from cdp_activation.sandbox_credentials import (
    SANDBOX_INFOBIP_WEBHOOK_CREDENTIALS,
    SANDBOX_META_APP_SECRET,
    SANDBOX_STATUS_SECRET,
    SANDBOX_TWILIO_AUTH_TOKEN,
    SANDBOX_VONAGE_SIGNATURE_SECRET,
)

if TYPE_CHECKING:
    from starlette.requests import Request

    from cdp_activation.sandbox.core import SandboxConfig, SandboxMessage

log = logging.getLogger(__name__)

RETRIES = 5  # attempts per webhook (real providers go on for hours or days)
BATCH_WINDOW_S = 0.02  # how long a batched Meta report waits for others to go with it
# Where the receiver takes each emulated connector's status reports (its `/webhooks/<route>`).
ROUTES = {
    "meta_whatsapp": "meta",
    "twilio": "twilio",
    "infobip": "infobip",
    "vonage": "vonage",
    "webhook": "sandbox",
}
# Each route's code of a permanent delivery failure.
FAILURE_CODES = {
    "meta": "131026",
    "twilio": "30003",
    "infobip": "UNDELIVERABLE_NOT_DELIVERED",
    "vonage": "1340",
    "sandbox": "undeliverable",
}


def outcome(config: SandboxConfig, message: SandboxMessage) -> list[str]:
    """The statuses this message will report, in order (fixed by the seed and recipient)."""
    drawn = draw(config.seed, "status", message.provider, message.to)
    if drawn < config.status_delivered_rate:
        read = draw(config.seed, "read", message.provider, message.to) < config.status_read_rate
        return ["sent", "delivered", "read"] if read else ["sent", "delivered"]
    if drawn < config.status_delivered_rate + config.status_failed_rate:
        return ["sent", "failed"]
    return ["sent"]


def report_url(config: SandboxConfig, message: SandboxMessage) -> str | None:
    """Where `message`'s status reports go; None when nowhere: status webhooks are off (no
    `status_webhooks_url`: the sandbox never calls out unasked) or the provider reports no
    deliveries. A Twilio message sent with a StatusCallback gets its reports at exactly that
    URL, as Twilio does; every other report goes to `<status_webhooks_url>/webhooks/<route>`."""
    route = ROUTES.get(message.provider)
    if route is None or not config.status_webhooks_url:
        return None
    if route == "twilio" and message.status_callback:
        return message.status_callback
    return f"{config.status_webhooks_url.rstrip('/')}/webhooks/{route}"


def schedule_statuses(request: Request, message: SandboxMessage) -> None:
    """Queue `message`'s status webhooks when the sandbox is told where to send them."""
    config: SandboxConfig = request.app.state.config
    route = ROUTES.get(message.provider)
    url = report_url(config, message)
    if url is None or route is None:
        return
    _track(request.app, _send_all(request.app, config, message, route, url))


def schedule_template_update(
    request: Request, name: str, language: str, event: str, change: dict[str, Any]
) -> None:
    """Tell the receiver that a WhatsApp template changed status, as Meta does: a signed
    `message_template_status_update` to `<status_webhooks_url>/webhooks/meta` (when status
    webhooks are on)."""
    config: SandboxConfig = request.app.state.config
    if not config.status_webhooks_url:
        return
    url = f"{config.status_webhooks_url.rstrip('/')}/webhooks/meta"
    value: dict[str, Any] = {
        "event": event,
        "message_template_id": int.from_bytes(f"{name}|{language}".encode()[:6], "big"),
        "message_template_name": name,
        "message_template_language": language,
        "reason": str(change.get("reason") or "NONE"),
    }
    if event == "DISABLED":
        value["disable_info"] = {"disable_date": int(time.time())}
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "200000000000002",
                "time": int(time.time()),
                "changes": [{"field": "message_template_status_update", "value": value}],
            }
        ],
    }
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": signing.meta_header(SANDBOX_META_APP_SECRET, body),
    }
    _track(request.app, _post_with_retries(_client(request.app), url, body, headers))


def _track(app: Any, work: Any) -> None:
    """Run `work` in the server's loop, held by a strong reference until it is done."""
    tasks: set[asyncio.Task[None]] | None = getattr(app.state, "status_tasks", None)
    if tasks is None:
        tasks = app.state.status_tasks = set()
    task = asyncio.get_running_loop().create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _client(app: Any) -> httpx.AsyncClient:
    client: httpx.AsyncClient | None = getattr(app.state, "status_client", None)
    if client is None:
        # httpx's API over aiohttp, as the delivery engine uses: plain httpx queues hundreds
        # of waiting requests on its pool in quadratic time.
        client = app.state.status_client = make_client(timeout=10, max_in_flight=64)
        app.state.status_loop = asyncio.get_running_loop()
    return client


async def _send_all(
    app: Any, config: SandboxConfig, message: SandboxMessage, route: str, url: str
) -> None:
    statuses = outcome(config, message)
    if draw(config.seed, "reorder", message.provider, message.to) < config.status_reorder_rate:
        statuses = list(reversed(statuses))
    twice = (
        draw(config.seed, "duplicate", message.provider, message.to) < config.status_duplicate_rate
    )
    if twice:
        statuses = statuses + statuses[-1:]
    client = _client(app)
    started = time.time()
    batched = route == "meta" and config.status_batch_max > 1
    for step, status in enumerate(statuses):
        await asyncio.sleep(config.status_delay_ms / 1000)
        stamp = started + step  # providers' own times: a second apart, in the true order
        if batched:
            batcher = _batcher(app, url, int(config.status_batch_max))
            await batcher.send(_meta_status(message, status, stamp))
            continue
        body, headers = _signed(route, message, status, stamp, url)
        await _post_with_retries(client, url, body, headers)
    replies = route in ("meta", "twilio") and "delivered" in statuses
    if replies and draw(config.seed, "reply", message.provider, message.to) < config.reply_rate:
        stop = draw(config.seed, "stop", message.provider, message.to) < config.reply_stop_rate
        await asyncio.sleep(config.status_delay_ms / 1000)
        inbound = f"{config.status_webhooks_url.rstrip('/')}/webhooks/{route}"
        body, headers = _reply(route, message, stop, started + len(statuses), inbound)
        await _post_with_retries(client, inbound, body, headers)


class _MetaBatch:
    """Meta status reports to one URL, gathered into webhooks of up to `size` statuses: a
    report waits at most `BATCH_WINDOW_S` for others; `send` returns once the webhook that
    carried it was answered (or given up on), so a message's next status follows it."""

    def __init__(self, app: Any, url: str, size: int) -> None:
        self.app, self.url, self.size = app, url, size
        self.waiting: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.posts = 0  # webhooks sent (tests)

    async def send(self, status: dict[str, Any]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((status, done))
        if len(self.waiting) >= self.size:
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(BATCH_WINDOW_S, self.flush)
        await done

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.waiting:
            batch, self.waiting = self.waiting[: self.size], self.waiting[self.size :]
            self.posts += 1
            _track(self.app, self._post(batch))

    async def _post(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        body, headers = _meta_body([status for status, _ in batch])
        try:
            await _post_with_retries(_client(self.app), self.url, body, headers)
        finally:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)


def _batcher(app: Any, url: str, size: int) -> _MetaBatch:
    batches: dict[str, _MetaBatch] | None = getattr(app.state, "status_batches", None)
    if batches is None:
        batches = app.state.status_batches = {}
    batch = batches.get(url)
    if batch is None or batch.size != size:
        batch = batches[url] = _MetaBatch(app, url, size)
    return batch


def status_posts(app: Any) -> int:
    """Batched Meta status webhooks sent so far (tests)."""
    batches: dict[str, _MetaBatch] = getattr(app.state, "status_batches", None) or {}
    return sum(b.posts for b in batches.values())


async def _post_with_retries(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
) -> None:
    """Like a provider: a webhook not answered 2xx is sent again, a few times, then dropped."""
    for attempt in range(RETRIES):
        try:
            response = await client.post(url, content=body, headers=headers)
            if response.is_success or 400 <= response.status_code < 500:
                return  # taken, or refused for good (a bad signature is not retried)
        except httpx.TransportError as err:
            log.info("sandbox: status webhook to %s: %s", url, type(err).__name__)
        await asyncio.sleep(0.05 * 2**attempt)
    log.warning("sandbox: status webhook to %s given up after %d attempts", url, RETRIES)


def _signed(
    route: str, message: SandboxMessage, status: str, stamp: float, url: str
) -> tuple[bytes, dict[str, str]]:
    failed = status == "failed"
    code = FAILURE_CODES[route] if failed else None
    ident = message.provider_message_id
    when = datetime.fromtimestamp(stamp, UTC)
    if route == "meta":
        return _meta_body([_meta_status(message, status, stamp)])
    if route == "twilio":
        form = {
            "MessageSid": ident,
            "MessageStatus": "undelivered" if failed else status,
            "To": message.to,
        }
        if code:
            form["ErrorCode"] = code
        body = urlencode(form).encode()
        signature = signing.twilio_header(SANDBOX_TWILIO_AUTH_TOKEN, url, form)
        return body, {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature,
        }
    if route == "infobip":
        stamp_text = when.strftime("%Y-%m-%dT%H:%M:%S.000+0000")
        if status == "read":
            result: dict[str, Any] = {"messageId": ident, "to": message.to, "seenAt": stamp_text}
        else:
            group = {"sent": "PENDING", "delivered": "DELIVERED", "failed": "UNDELIVERABLE"}
            result = {
                "messageId": ident,
                "to": message.to.removeprefix("+"),
                "doneAt": stamp_text,
                "status": {"groupName": group[status], "name": code or group[status]},
                "error": {"id": 0, "name": "NO_ERROR"},
                # What the message was charged (Infobip's delivery reports say it).
                "price": {
                    "pricePerMessage": SANDBOX_PRICES.get(message.channel, 0.01),
                    "currency": "EUR",
                },
            }
            if message.callback_data is not None:  # delivery reports carry it; seen ones do not
                result["callbackData"] = message.callback_data
        body = json.dumps({"results": [result]}).encode()
        basic = base64.b64encode(SANDBOX_INFOBIP_WEBHOOK_CREDENTIALS.encode()).decode()
        return body, {"Content-Type": "application/json", "Authorization": f"Basic {basic}"}
    if route == "vonage":
        vonage = {"sent": "submitted", "delivered": "delivered", "read": "read"}
        data: dict[str, Any] = {
            "message_uuid": ident,
            "to": message.to.removeprefix("+"),
            "timestamp": when.isoformat(),
            "status": "undeliverable" if failed else vonage[status],
            "channel": message.channel,
        }
        if message.callback_data is not None:
            data["client_ref"] = message.callback_data
        if failed:
            data["error"] = {"type": f"https://developer.nexmo.com/api-errors#{code}"}
        elif status == "delivered":  # Vonage's `usage`: the charge, on the delivery report
            data["usage"] = {
                "currency": "EUR",
                "price": f"{SANDBOX_PRICES.get(message.channel, 0.01):.4f}",
            }
        body = json.dumps(data).encode()
        token = signing.vonage_bearer(SANDBOX_VONAGE_SIGNATURE_SECRET, body, int(time.time()))
        return body, {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    status_entry = {
        "id": ident,
        "status": status,
        "timestamp": when.isoformat(),
        "error_code": code,
    }
    body = json.dumps({"statuses": [status_entry]}).encode()
    return body, {"X-Sandbox-Signature": signing.sandbox_header(SANDBOX_STATUS_SECRET, body)}


def _meta_status(message: SandboxMessage, status: str, stamp: float) -> dict[str, Any]:
    """One status object of a Meta `messages` webhook."""
    entry: dict[str, Any] = {
        "id": message.provider_message_id,
        "status": status,
        "timestamp": str(int(stamp)),
        "recipient_id": message.to.removeprefix("+"),
    }
    if status == "failed":
        entry["errors"] = [{"code": int(FAILURE_CODES["meta"]), "title": "Message undeliverable"}]
    else:
        entry["pricing"] = _meta_pricing(message)
    if message.callback_data is not None:
        entry["biz_opaque_callback_data"] = message.callback_data
    return entry


# What the sandbox's Infobip and Vonage charge a message, by channel (EUR): list-price-like.
SANDBOX_PRICES = {
    "sms": 0.0450,
    "whatsapp": 0.0600,
    "viber": 0.0150,
    "rcs": 0.0200,
    "kakao": 0.0130,
}


def _meta_pricing(message: SandboxMessage) -> dict[str, Any]:
    """Meta's `pricing` of a delivered message (per-message pricing, PMP): a template is billed
    under its catalog category; a free-form reply inside the customer-care window is free
    (`service`)."""
    if message.template_name is None:
        return {
            "billable": False,
            "pricing_model": "PMP",
            "category": "service",
            "type": "free_customer_service",
        }
    category = message.template_category or "marketing"
    return {"billable": True, "pricing_model": "PMP", "category": category, "type": "regular"}


def _meta_body(statuses: list[dict[str, Any]]) -> tuple[bytes, dict[str, str]]:
    """A signed Meta `messages` webhook carrying `statuses`."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"phone_number_id": "100000000000001"},
        "statuses": statuses,
    }
    payload = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "200000000000002", "changes": [{"field": "messages", "value": value}]}],
    }
    body = json.dumps(payload).encode()
    return body, {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": signing.meta_header(SANDBOX_META_APP_SECRET, body),
    }


def _reply(
    route: str, message: SandboxMessage, stop: bool, stamp: float, url: str
) -> tuple[bytes, dict[str, str]]:
    """The customer's answer to `message`, as the provider posts it: a Meta `messages`
    webhook (a button reply or a text), or a Twilio incoming-message form."""
    ident = f"in-{message.provider_message_id}"
    if route == "meta":
        reply: dict[str, Any] = {
            "from": message.to.removeprefix("+"),
            "id": f"wamid.{ident}",
            "timestamp": str(int(stamp)),
            "context": {"from": "15550783881", "id": message.provider_message_id},
        }
        if stop:
            reply |= {"type": "button", "button": {"payload": "STOP", "text": "Stop promotions"}}
        else:
            reply |= {"type": "text", "text": {"body": "Thanks, looking now"}}
        value = {
            "messaging_product": "whatsapp",
            "metadata": {"phone_number_id": "100000000000001"},
            "contacts": [{"wa_id": message.to.removeprefix("+")}],
            "messages": [reply],
        }
        payload = {
            "object": "whatsapp_business_account",
            "entry": [
                {"id": "200000000000002", "changes": [{"field": "messages", "value": value}]}
            ],
        }
        body = json.dumps(payload).encode()
        return body, {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": signing.meta_header(SANDBOX_META_APP_SECRET, body),
        }
    sender = f"whatsapp:{message.to}" if message.channel == "whatsapp" else message.to
    form = {
        "MessageSid": f"SM{ident[-32:]}",
        "SmsStatus": "received",
        "From": sender,
        "To": "+15005550006",
        "Body": "STOP" if stop else "Thanks",
        "NumMedia": "0",
    }
    body = urlencode(form).encode()
    return body, {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": signing.twilio_header(SANDBOX_TWILIO_AUTH_TOKEN, url, form),
    }


def close_client(app: Any) -> None:
    """Cancel the reports still to send and close their client, in the server's loop (called
    from another thread, before the server stops)."""
    client = getattr(app.state, "status_client", None)
    loop = getattr(app.state, "status_loop", None)
    if client is None or loop is None or loop.is_closed():
        return
    app.state.status_client = None

    async def shutdown() -> None:
        tasks = list(getattr(app.state, "status_tasks", ()))
        for task in tasks:  # reports still waiting are dropped, as when a provider stops
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()

    try:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=5)
    except Exception:  # the loop is already going down: nothing left to close cleanly
        log.debug("sandbox: status webhook client not closed cleanly", exc_info=True)
