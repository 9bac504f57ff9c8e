"""LINE Messaging API connector: multicast to up to 500 users, made idempotent by a retry key.

Request shapes from LINE's OpenAPI spec (`../shared/vendor-specs/line/messaging-api.yml`):
`POST /v2/bot/message/multicast` with `{to: [1..500 user ids], messages: [1..5]}` sends the
*same* messages to every user; `POST /v2/bot/message/push` with `{to, messages}` sends to one.
Both take `Authorization: Bearer <channel access token>` and the optional `X-Line-Retry-Key`
(a UUID): LINE processes a key once and answers a repeat with 409 and the
`x-line-accepted-request-id` of the request that was processed.

A batch's messages are grouped by their text: each group of two or more users is one
multicast, a user whose text is their own (a personalised body) one push, all of a batch's
requests in parallel. Every request's retry key is a UUID5 of its messages' ledger keys, so
the same recipients always carry the same key: a request whose answer was lost (timeout,
dropped connection, a run killed mid-request) is sent again safely, and LINE answers 409
instead of messaging anyone twice. That is why the connector declares `idempotency=True`; the
delivery engine keeps an interrupted request's recipients together so the key is the same.
LINE remembers a key for 24 hours: resend within a day.

Classification: 200 is SENT under the request's `x-line-request-id`; 409 is SENT under the
`x-line-accepted-request-id` of the request that was processed; a recipient that is not a
LINE user id (`U` + 32 hex digits) or a message that is not text of 1-5,000 characters is
FAILED before any request; 401/403 stop the activation (credentials, or a plan without the
API); 429 with "monthly limit" stops it (the channel's message quota is spent until next
month); any other 429 and 5xx are RETRY (with Retry-After); any other 4xx fails the request's
recipients. LINE multicasts have no per-user result: a user who blocked the account is
accepted and silently not delivered.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from cdp_activation.connectors import samples, signatures, status_parsers
from cdp_activation.connectors.base import (
    Capabilities,
    ConnectorError,
    CredentialsError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateError,
    check_batch_size,
    clip,
    retry_after_seconds,
)
from cdp_activation.connectors.http import (
    json_or_none,
    require_settings,
    transport_failure,
    whole_request_results,
)
from cdp_activation.masking import redact_secrets
from cdp_activation.plugins import (
    ConnectorPlugin,
    ConnectorSettings,
    ContractCase,
    Credentials,
    StatusWebhook,
    credential,
)
from cdp_activation.sandbox_credentials import (
    SANDBOX_LINE_CHANNEL_SECRET,
    SANDBOX_LINE_TOKEN,
    SANDBOX_PORT,
)
from cdp_activation.vocabulary import ADDRESS_PATTERNS

USERS_PER_MULTICAST = 500
MAX_TEXT = 5000  # characters of a text message
# UUID5 namespace of the retry keys: any fixed UUID, so a key depends only on the ledger keys.
RETRY_KEY_NAMESPACE = uuid.UUID("6f1d5e3a-9c41-4c8e-bd2f-3a0c7e5b9d21")
_USER_ID = re.compile(ADDRESS_PATTERNS["line"])


def retry_key(messages: Sequence[OutboundMessage]) -> str:
    """The `X-Line-Retry-Key` of a request: the same recipients always get the same key."""
    return str(uuid.uuid5(RETRY_KEY_NAMESPACE, "\n".join(sorted(m.key for m in messages))))


class LineConnector:
    """Sends LINE text messages: a multicast per distinct text, a push for a text of one."""

    name: ClassVar[str] = "line"
    capabilities: ClassVar[Capabilities] = Capabilities(
        channels=frozenset({"line"}),
        max_batch_size=USERS_PER_MULTICAST,
        # Push allows 2,000 requests/s and multicast 200; counting messages at 2,000/s keeps
        # both under their limits whatever the mix.
        default_rate_per_second=2000.0,
        idempotency=True,  # X-Line-Retry-Key: a repeated key is answered 409, not sent again
    )
    rate_per_second: float | None = None

    def __init__(self, base_url: str, channel_access_token: str) -> None:
        require_settings(
            self.name,
            "CDP_LINE_",
            base_url=base_url,
            channel_access_token=channel_access_token,
        )
        self.base_url = base_url.rstrip("/")
        self._token = channel_access_token
        self._multicast_url = httpx.URL(f"{self.base_url}/v2/bot/message/multicast")
        self._push_url = httpx.URL(f"{self.base_url}/v2/bot/message/push")

    def __repr__(self) -> str:
        return f"LineConnector(base_url={self.base_url!r})"

    def redact(self, text: str) -> str:
        return redact_secrets(text, [self._token])

    def _safe(self, text: str) -> str:
        return clip(self.redact(text))

    def requests(self, messages: Sequence[OutboundMessage]) -> list[list[OutboundMessage]]:
        """The messages grouped into requests: one per distinct text, in first-seen order."""
        groups: dict[str, list[OutboundMessage]] = {}
        for message in messages:
            groups.setdefault(message.body or "", []).append(message)
        return list(groups.values())

    def payload(self, group: Sequence[OutboundMessage]) -> dict[str, Any]:
        text = {"type": "text", "text": group[0].body}
        if len(group) == 1:
            return {"to": group[0].to, "messages": [text]}
        return {"to": [m.to for m in group], "messages": [text]}

    async def send_batch(
        self, client: httpx.AsyncClient, messages: Sequence[OutboundMessage]
    ) -> list[SendResult]:
        check_batch_size(self, messages)
        results: list[SendResult] = []
        sendable: list[OutboundMessage] = []
        for message in messages:
            problem = self._problem(message)
            if problem is None:
                sendable.append(message)
            else:
                code, text = problem
                results.append(
                    SendResult(message.key, Outcome.FAILED, error_code=code, error_message=text)
                )
        answers = await asyncio.gather(
            *(self._send(client, group) for group in self.requests(sendable)),
            return_exceptions=True,
        )
        refused: ConnectorError | None = None
        for answer in answers:
            if isinstance(answer, ConnectorError):
                refused = refused or answer
            elif isinstance(answer, BaseException):
                raise answer
            else:
                results += answer
        if refused is not None:
            # The requests answered beside the refused one (a quota used up half-way) were
            # taken: said so, they are recorded sent, never sent again under another key.
            raise refused.after(results)
        return results

    def _problem(self, message: OutboundMessage) -> tuple[str, str] | None:
        if message.template is not None:
            raise TemplateError(
                "LINE has no provider templates: give the LINE step a `body` instead"
            )
        if not _USER_ID.match(message.to):
            return "invalid_recipient", "not a LINE user id (U and 32 hex digits)"
        if not message.body or len(message.body) > MAX_TEXT:
            return "invalid_text", f"a LINE text message has 1 to {MAX_TEXT} characters"
        return None

    async def _send(
        self, client: httpx.AsyncClient, group: Sequence[OutboundMessage]
    ) -> list[SendResult]:
        url = self._push_url if len(group) == 1 else self._multicast_url
        headers = {
            "Authorization": f"Bearer {self._token}",
            "X-Line-Retry-Key": retry_key(group),
        }
        try:
            response = await client.post(url, json=self.payload(group), headers=headers)
        except httpx.TransportError as exc:
            return transport_failure(self.name, exc, group, self._safe)
        return self.classify(group, response)

    def classify(
        self, group: Sequence[OutboundMessage], response: httpx.Response
    ) -> list[SendResult]:
        """One answer for every message of one request (LINE answers per request)."""
        status = response.status_code
        data = json_or_none(response)
        detail = self._safe(str(data.get("message", "")) if isinstance(data, dict) else "")
        detail = detail or self._safe(response.text)
        if status == 200 or status == 409:
            # The request id names the send in LINE's logs, for a push as for a multicast,
            # and a repeat's 409 gives the same one back: the ledger keeps one id either way.
            ident = response.headers.get(
                "x-line-accepted-request-id" if status == 409 else "x-line-request-id"
            ) or (_sent_message_id(data) if status == 200 else None)
            return whole_request_results(
                group, response, accepted=True, provider_message_id=ident, detail=detail
            )
        if status in (401, 403):
            raise CredentialsError(
                f"LINE refused the channel access token (HTTP {status}): {detail}. Check "
                "CDP_LINE_CHANNEL_ACCESS_TOKEN, and that the channel may use this API."
            )
        if status == 429 and "monthly limit" in detail.lower():
            raise ConnectorError(
                f"LINE: the channel's monthly message quota is used up ({detail}); nothing more "
                "can be sent this month unless the plan's limit is raised"
            )
        return whole_request_results(
            group,
            response,
            accepted=False,
            provider_message_id=None,
            detail=detail,
            retry_after=retry_after_seconds(response.headers),
        )


def _sent_message_id(data: Any) -> str | None:
    """The id of a push's first sent message (`sentMessages[0].id`), when LINE gives one."""
    if not isinstance(data, dict):
        return None
    sent = data.get("sentMessages")
    if isinstance(sent, list) and sent and isinstance(sent[0], dict):
        ident = sent[0].get("id")
        return str(ident) if ident else None
    return None


# --- its plugin: settings, status webhooks, contract case -------------------------------------


class LineSettings(ConnectorSettings):
    """CDP_LINE_*: the channel access token, and the channel secret its webhooks are signed
    with."""

    base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/line"  # real: https://api.line.me
    channel_access_token: SecretStr | None = credential(SANDBOX_LINE_TOKEN)
    channel_secret: SecretStr | None = credential(SANDBOX_LINE_CHANNEL_SECRET, receiver=True)

    def build(self, credentials: Credentials) -> LineConnector:
        return LineConnector(
            base_url=self.base_url, channel_access_token=credentials.get("channel_access_token")
        )


PLUGIN = ConnectorPlugin(
    name="line",
    title="LINE Messaging API",
    connector=LineConnector,
    settings=LineSettings,
    env_prefix="line",
    docs="LINE text messages by multicast (up to 500 user ids) and push, with X-Line-Retry-Key",
    status_webhook=StatusWebhook(
        route="line",
        secret="channel_secret",
        verify=lambda secret, request: signatures.line_valid(
            secret, request.body, request.headers.get("x-line-signature")
        ),
        parse=lambda request: status_parsers.parse_line(request.body, request.received),
        inbound=lambda request: status_parsers.parse_line_inbound(request.body, request.received),
        checked_with="`X-Line-Signature` (HMAC-SHA256 of the body)",
    ),
    sandbox="/line",
    contract=ContractCase(
        message=samples.line,
        bad_recipient=OutboundMessage("bad", samples.BAD_NUMBER, "line", body="hi"),
        failure_code="invalid_recipient",
        credential="channel_access_token",
    ),
)
