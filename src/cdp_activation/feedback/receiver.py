"""The status webhook receiver: `POST /webhooks/{provider}`, signature first, durable before 200.

Order for every request: read the raw body; check the provider's signature (`signatures.py`),
401 and nothing written when it is missing or wrong (or when no secret is configured for that
provider: an unverifiable webhook is never trusted); parse it (`parsers.py`), 400 when it is
not the provider's shape; hand its status events to the group-commit writer and wait until
they are committed to the ledger (`Ledger.record_statuses`: events stored once, statuses moved
forward); only then answer 200. A Meta webhook may also carry template status changes
(`message_template_status_update`: PAUSED, DISABLED, APPROVED…), kept in `template_states`
before the 200 as well: the delivery engine stops sending a paused template on that word.
A crash before the commit means no 200, so the provider sends the webhook again: an accepted
event is never lost. Requests arriving while a write is under way are written together by the
next one, so a burst of webhooks costs a few transactions; the customers' replies on the same
routes (an opt-out among them) have a writer of their own, committed the same way before the
200.

Each route is a connector plugin's (`StatusWebhook`): its check and parser live with the
connector. `GET /webhooks/<route>` answers a subscription check (Meta's `hub.mode=subscribe`,
`hub.verify_token`, `hub.challenge`). `GET /healthz` (liveness) and `GET /readyz` (the ledger
answers) are for load balancers; `GET /metrics` answers Prometheus (`metrics.py`): requests and
events by provider, signature refusals, and, with `CDP_METRICS_DIR`, every sending process's
figures too. Signature refusals are also counted in the ledger per route and minute, for the
alert on them (`alerts/`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from datetime import UTC, datetime

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cdp_activation import heap, metrics
from cdp_activation.connectors import signatures
from cdp_activation.contracts import InboundMessage, StatusEvent
from cdp_activation.group_commit import GroupCommit
from cdp_activation.ledger import Ledger
from cdp_activation.ledger.templates import record_states
from cdp_activation.logs import MaskPhones, json_formatter, log_format
from cdp_activation.masking import mask_phones_in
from cdp_activation.plugins import WebhookRequest, WebhookSecrets, status_routes
from cdp_activation.policy import opt_out
from cdp_activation.serving import BackgroundServer

log = logging.getLogger(__name__)
# How long /readyz waits for the ledger to answer.
READY_TIMEOUT_S = 3.0

MAX_BODY_BYTES = 1 << 20  # a status webhook is a few KB; Meta batches stay well under


class BodyTooLarge(Exception):
    """The request's body is larger than the receiver takes."""


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, read as a stream and given up on past `limit` bytes (a declared
    Content-Length above it is refused before anything is read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:  # the ASGI messages themselves: `request.stream()`'s generator cost more
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def create_app(
    ledger: Ledger,
    secrets: WebhookSecrets,
    max_body_bytes: int = MAX_BODY_BYTES,
    opt_out_keywords: frozenset[str] = opt_out.OPT_OUT_KEYWORDS,
    opt_in_keywords: frozenset[str] = opt_out.OPT_IN_KEYWORDS,
    serve_metrics: bool = True,
) -> Starlette:
    """The receiver for `ledger`. `app.state.writer.transactions` (statuses) and
    `app.state.replies.transactions` count commits (bench, tests).
    Bodies above `max_body_bytes` are refused (413) before they are read whole.
    `serve_metrics=False`: no `/metrics` here (it has a port of its own)."""
    heap.tune_for_serving()  # the receiver's process lives to take reports (heap.py)
    writer: GroupCommit[StatusEvent] = GroupCommit(
        ledger.record_statuses, "storing statuses", isolate=_not_the_database_itself
    )
    # Replies too: a campaign's answers arrive in bursts, and one transaction each (matching
    # the sender, an opt-out cancelling planned sends) held the receiver to a few hundred a
    # second. `record_inbound` orders a batch by the messages' own times (STOP, then START).
    replies: GroupCommit[InboundMessage] = GroupCommit(
        ledger.record_inbound, "storing replies", isolate=_not_the_database_itself
    )
    # Refusals are counted in memory and added to the ledger off the request's path, one
    # write at a time: a burst of forged webhooks costs a counter, never a queue that grows
    # while the ledger is slow, and a refusal is answered without waiting for the write.
    refused: Counter[str] = Counter()
    flushing: list[asyncio.Task[None]] = []
    warned: set[str] = set()

    async def flush_refusals() -> None:
        while refused:
            counts = dict(refused)
            refused.clear()
            try:
                await asyncio.to_thread(ledger.record_refusals, counts)
            except Exception as err:  # counted in /metrics all the same
                refused.update(counts)  # kept for the next refusal's write: none is lost
                log.warning(
                    "could not count %d signature refusal(s) in the ledger yet: %s",
                    sum(refused.values()),
                    type(err).__name__,
                )
                return

    routes = status_routes()

    def refuse(route: str, error: str) -> Response:
        metrics.SIGNATURE_REFUSALS.labels(route).inc()
        refused[route] += 1
        if not flushing or flushing[0].done():
            flushing[:] = [asyncio.create_task(flush_refusals())]
        return JSONResponse({"error": error}, status_code=401)

    async def receive(request: Request) -> Response:
        route = request.path_params["provider"]
        response = await handle(request, route)
        known = route if route in routes else "unknown"  # no label per made-up path
        metrics.WEBHOOK_REQUESTS.labels(known, str(response.status_code)).inc()
        return response

    async def handle(request: Request, route: str) -> Response:
        found = routes.get(route)
        if found is None or found.status_webhook is None:
            return JSONResponse(
                {"error": f"unknown provider {route!r}; one of {', '.join(sorted(routes))}"},
                status_code=404,
            )
        hook = found.status_webhook
        try:
            body = await read_capped(request, max_body_bytes)
        except BodyTooLarge:
            return JSONResponse(
                {"error": f"body larger than {max_body_bytes:,} bytes"}, status_code=413
            )
        secret = secrets.secret_for(route)
        if secret is None:
            if route not in warned:
                warned.add(route)
                log.warning(
                    "refusing %s webhooks: no secret configured to check their signature "
                    "(%s; see .env.example)",
                    route,
                    found.env_name(hook.secret),
                )
            return refuse(route, "signature not verifiable")
        call = WebhookRequest(
            body=body,
            headers=request.headers,  # Starlette's: looked up in any case
            received=datetime.now(UTC),
            called_url=lambda: _called_url(request, secrets.public_url),
            query_params=lambda: dict(request.query_params),
        )
        if not hook.verify(secret, call):
            return refuse(route, "bad or missing signature")
        try:
            events = hook.parse(call)
            templates = hook.template_updates(call) if hook.template_updates else []
            inbound = [
                _kept(opt_out.classify(m, opt_out_keywords, opt_in_keywords))
                for m in (hook.inbound(call) if hook.inbound else [])
            ]
        except ValueError as err:
            return JSONResponse({"error": f"not a {route} status webhook: {err}"}, status_code=400)
        except Exception as err:  # signed, but a shape no parser expects: still bad input
            log.warning(
                "refused a signed %s webhook of an unexpected shape (%s)",
                route,
                type(err).__name__,
            )
            return JSONResponse(
                {"error": f"not a {route} status webhook: unexpected shape"}, status_code=400
            )
        try:
            if events:
                await writer.submit(events)
            if templates:  # rare (a template changed status): no group commit needed
                await asyncio.to_thread(record_states, ledger.engine, templates)
            if inbound:  # replies: an opt-out takes effect before the provider hears 200
                await replies.submit(inbound)
        except sa.exc.DataError:  # signed, but a value the ledger cannot hold: never will
            log.warning("refused a signed %s webhook: a value in it does not fit the ledger", route)
            return JSONResponse(
                {"error": f"not stored: a value in this {route} webhook is too long or malformed"},
                status_code=400,
            )
        except Exception:
            return JSONResponse({"error": "not stored; send it again"}, status_code=500)
        for status, count in Counter(event.status for event in events).items():
            metrics.WEBHOOK_EVENTS.labels(route, status).inc(count)
        if templates:
            metrics.WEBHOOK_EVENTS.labels(route, "template").inc(len(templates))
        if inbound:
            metrics.WEBHOOK_EVENTS.labels(route, "reply").inc(len(inbound))
        return JSONResponse({"received": len(events) + len(templates) + len(inbound)})

    async def subscribe(request: Request) -> Response:
        """A provider's subscription check (Meta: `hub.mode=subscribe`, `hub.verify_token`,
        answered with `hub.challenge`)."""
        route = request.path_params["provider"]
        query = request.query_params
        token = secrets.subscribe_token(route)
        if (
            query.get("hub.mode") == "subscribe"
            and token
            and signatures.same(query.get("hub.verify_token", ""), token)
        ):
            return PlainTextResponse(query.get("hub.challenge", ""))
        return PlainTextResponse("verification failed", status_code=403)

    async def health(request: Request) -> Response:
        """Liveness: the process serves requests (a load balancer's restart signal)."""
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        """Readiness: the ledger answers, with its tables (where a report is stored before
        its 200); 503 with the reason, masked, when it does not (take it out of rotation:
        providers retry a webhook that was not answered 200)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(ledger.ping), timeout=READY_TIMEOUT_S)
        except Exception as err:
            text = str(getattr(err, "orig", None) or err).strip().splitlines() or [""]
            reason = mask_phones_in(text[0][:200])
            return JSONResponse(
                {"status": "not ready", "ledger": f"unavailable: {reason or type(err).__name__}"},
                status_code=503,
            )
        return JSONResponse({"status": "ready", "ledger": "ok"})

    async def scrape(request: Request) -> Response:
        body, content_type = await asyncio.to_thread(metrics.exposition)
        return Response(body, media_type=content_type)

    app = Starlette(
        routes=[
            Route("/webhooks/{provider}", subscribe, methods=["GET"]),
            Route("/webhooks/{provider}", receive, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
            Route("/health", health, methods=["GET"]),  # the earlier name, kept
            Route("/readyz", ready, methods=["GET"]),
            *([Route("/metrics", scrape, methods=["GET"])] if serve_metrics else []),
        ]
    )
    app.state.writer = writer
    app.state.replies = replies
    return app


def _not_the_database_itself(error: Exception) -> bool:
    """Whether a shared write that failed with `error` is worth making again caller by
    caller: yes, unless the database itself failed (unreachable, locked past its timeout, a
    dropped connection), which every caller would only meet again."""
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return False
    return not isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError)


def _kept(message: InboundMessage) -> InboundMessage:
    """The message as it is stored: classified, its text reduced to a summary."""
    return dataclasses.replace(message, summary=opt_out.summary(message), text="")


def _called_url(request: Request, public_url: str | None) -> str:
    """The URL the provider called: behind a proxy, the public base URL and this path."""
    if not public_url:
        return str(request.url)
    url = public_url.rstrip("/") + request.url.path
    return url + ("?" + request.url.query if request.url.query else "")


class WithoutQueryStrings(logging.Filter):
    """Strips query strings from uvicorn's access log lines: a verify token, a `ref` or
    anything else a caller put in a URL stays out of the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def access_log_config() -> dict:
    """uvicorn's logging configuration with `WithoutQueryStrings` on its access log."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["without_query_strings"] = {"()": WithoutQueryStrings}
    config["handlers"]["access"]["filters"] = ["without_query_strings"]
    if log_format() == "json":  # CDP_LOG_FORMAT=json: uvicorn's lines are JSON too
        config["filters"]["mask_phones"] = {"()": MaskPhones}
        for name in ("default", "access"):
            config["formatters"][name] = {"()": json_formatter}
            config["handlers"][name]["filters"] = [
                *config["handlers"][name].get("filters", []),
                "mask_phones",
            ]
    return config


class WebhookServer(BackgroundServer):
    """The receiver for `ledger` on 127.0.0.1 in a daemon thread (tests, demo, bench)."""

    name = "webhook receiver"

    def __init__(
        self,
        ledger: Ledger,
        secrets: WebhookSecrets,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        super().__init__(create_app(ledger, secrets, max_body_bytes), host, port, "/health")
