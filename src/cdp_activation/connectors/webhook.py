"""Generic JSON webhook connector: hand batches to any HTTP endpoint that keeps this contract.

For the systems that are not a messaging provider we speak to directly (an in-house gateway, a
CEP's ingestion endpoint, a queue behind an HTTP bridge), the contract is ours and small:

Request: `POST <CDP_WEBHOOK_URL>`, `Content-Type: application/json`, the configured extra
headers (e.g. `Authorization`), and `Idempotency-Key: <64 hex>`; the body is a JSON array of
at most `batch_size` messages::

    [{"key": "<ledger idempotency key>", "to": "+447911123456", "channel": "whatsapp",
      "template": {"name": "winback_offer", "language": "en", "parameters": ["Ana"]} | null,
      "body": "text" | null}]

Answer: any 2xx with a JSON array holding one result per message, in any order::

    [{"key": "<key>", "status": "accepted", "id": "<receiver's id>", "error": null},
     {"key": "<key>", "status": "rejected", "id": null, "error": "invalid_number"}]

Receiver duties: `Idempotency-Key` is the SHA-256 of the batch's message keys, so a retried
batch carries the same header; the receiver MUST answer a repeated key with its first answer
without delivering again, and SHOULD also de-duplicate on each message's `key`, which never
changes across retries or re-runs. That is why the connector declares `idempotency=True`.

Classification: `accepted` with an id is SENT; `rejected` is FAILED with `error` as the error
code (never retried); a message missing from the answer (or a 2xx that is not such an array)
is UNKNOWN; 401/403 raise `CredentialsError`; 408, 409 (same key still in progress), 425, 429
and 5xx are RETRY (with Retry-After), a 409 or 5xx batch going out again whole under the same
key (the receiver may hold it); any other 4xx fails every message of the batch with
`http_<status>`; a closed port is RETRY and an answer that never comes is UNKNOWN.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from cdp_activation.connectors import samples, signatures, status_parsers
from cdp_activation.connectors.base import (
    Capabilities,
    ConnectorConfigError,
    CredentialsError,
    OutboundMessage,
    Outcome,
    SendResult,
    check_batch_size,
    clip,
    retry_after_seconds,
)
from cdp_activation.connectors.http import json_or_none, require_settings, transport_failure
from cdp_activation.masking import mask_phones_in, redact_secrets
from cdp_activation.plugins import (
    ConnectorPlugin,
    ConnectorSettings,
    ContractCase,
    Credentials,
    PositiveCount,
    StatusWebhook,
    credential,
)
from cdp_activation.sandbox_credentials import (
    SANDBOX_PORT,
    SANDBOX_STATUS_SECRET,
    SANDBOX_WEBHOOK_TOKEN,
)

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 200
_RETRY_STATUSES = frozenset({408, 409, 425, 429})


def batch_idempotency_key(messages: Sequence[OutboundMessage]) -> str:
    """SHA-256 of the batch's sorted message keys: the same batch always gets the same key."""
    digest = hashlib.sha256()
    for key in sorted(m.key for m in messages):
        digest.update(key.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def message_json(message: OutboundMessage) -> dict[str, Any]:
    """One message of the request array (see the module docstring)."""
    template = message.template
    return {
        "key": message.key,
        "to": message.to,
        "channel": message.channel,
        "template": None
        if template is None
        else {
            "name": template.name,
            "language": template.language,
            "parameters": list(template.parameters),
        },
        "body": message.body,
    }


class WebhookConnector:
    """POSTs batches of messages as JSON to a configurable URL (contract above)."""

    rate_per_second: float | None = None  # set from configuration; None: the default
    name: ClassVar[str] = "webhook"
    # The class default; an instance carries its own with the configured batch size, which is
    # what the delivery engine reads (`connector.capabilities`).
    capabilities: ClassVar[Capabilities] = Capabilities(
        channels=frozenset({"whatsapp", "sms", "viber", "line", "kakao", "rcs", "email", "push"}),
        max_batch_size=DEFAULT_BATCH_SIZE,
        # Our own receiver sets the pace: 500 msg/s is a safe start; configure it per receiver.
        default_rate_per_second=500.0,
        idempotency=True,  # the contract obliges the receiver to honour Idempotency-Key
        # The contract's status report code for "this recipient cannot be reached here".
        unreachable_codes=frozenset({"undeliverable", "invalid_number"}),
    )

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        require_settings(self.name, "CDP_WEBHOOK_", url=url)
        if batch_size < 1:
            raise ConnectorConfigError(
                f"CDP_WEBHOOK_BATCH_SIZE must be at least 1, got {batch_size}"
            )
        self.url = url
        self._headers = dict(headers or {})
        self.capabilities = Capabilities(  # type: ignore[misc]  # per-instance batch size
            channels=WebhookConnector.capabilities.channels,
            max_batch_size=batch_size,
            default_rate_per_second=WebhookConnector.capabilities.default_rate_per_second,
            idempotency=True,
            unreachable_codes=WebhookConnector.capabilities.unreachable_codes,
        )

    def __repr__(self) -> str:
        return (
            f"WebhookConnector(url={self.url!r}, headers={sorted(self._headers)!r}, "
            f"batch_size={self.capabilities.max_batch_size})"
        )

    def redact(self, text: str) -> str:
        """Replace every configured header value, and any token after a scheme word in it."""
        secrets = []
        for value in self._headers.values():
            _, _, token = value.partition(" ")
            # "Bearer <token>": the bare token can be echoed too; "Basic <b64>": its pair.
            secrets += [value, token if len(token) >= 8 else ""]
            if value.lower().startswith("basic ") and len(token) >= 8:
                with contextlib.suppress(ValueError):
                    secrets.append(base64.b64decode(token, validate=True).decode())
        return redact_secrets(text, secrets)

    def _safe(self, text: str) -> str:
        return mask_phones_in(clip(self.redact(text)))

    async def send_batch(
        self, client: httpx.AsyncClient, messages: Sequence[OutboundMessage]
    ) -> list[SendResult]:
        """POST the batch as one JSON array; one result per message."""
        check_batch_size(self, messages)
        if not messages:
            return []
        headers = {
            **self._headers,
            "Idempotency-Key": batch_idempotency_key(messages),
            "Accept": "application/json",
        }
        try:
            response = await client.post(
                self.url, json=[message_json(m) for m in messages], headers=headers
            )
        except httpx.TransportError as exc:
            return transport_failure(self.name, exc, messages, self._safe)
        return self.classify(messages, response)

    def classify(
        self, messages: Sequence[OutboundMessage], response: httpx.Response
    ) -> list[SendResult]:
        """One result per message, or raise `CredentialsError` (see the module docstring)."""
        status = response.status_code
        if response.is_success:
            return self._per_message(messages, json_or_none(response), response)
        detail = self._safe(response.text)
        if status in (401, 403):
            raise CredentialsError(
                f"the webhook receiver refused our credentials (HTTP {status}): {detail}. "
                "Check CDP_WEBHOOK_HEADERS."
            )
        outcome = (
            Outcome.RETRY
            if status in _RETRY_STATUSES or status >= 500
            else Outcome.FAILED
            if 400 <= status < 500
            else None
        )
        if outcome is None:
            raise ConnectorConfigError(
                f"unexpected HTTP {status} from {self.redact(self.url)}; check CDP_WEBHOOK_URL"
            )
        retry_after = retry_after_seconds(response.headers) if outcome is Outcome.RETRY else None
        # 409 (the same key still in progress: the receiver has the batch) and a 5xx (it may
        # have taken it first): the batch goes out again whole, under the same key.
        taken = outcome is Outcome.RETRY and (status == 409 or status >= 500)
        return [
            SendResult(
                m.key,
                outcome,
                error_code=f"http_{status}",
                error_message=detail,
                retry_after=retry_after,
                may_be_taken=taken,
            )
            for m in messages
        ]

    def _per_message(
        self, messages: Sequence[OutboundMessage], data: Any, response: httpx.Response
    ) -> list[SendResult]:
        by_key: dict[str, dict[str, Any]] = {}
        for item in data if isinstance(data, list) else []:
            if isinstance(item, dict) and isinstance(item.get("key"), str):
                by_key[item["key"]] = item
        results = []
        for message in messages:
            item = by_key.get(message.key)
            status = str(item.get("status", "")).lower() if item else ""
            ident = item.get("id") if item else None
            if status == "accepted" and isinstance(ident, str) and ident:
                results.append(SendResult(message.key, Outcome.SENT, provider_message_id=ident))
            elif status == "rejected" and item is not None:
                error = str(item.get("error") or "rejected")
                results.append(
                    SendResult(
                        message.key,
                        Outcome.FAILED,
                        error_code=clip(error, 64),
                        error_message=self._safe(error),
                    )
                )
            else:
                results.append(
                    SendResult(
                        message.key,
                        Outcome.UNKNOWN,
                        error_code=f"http_{response.status_code}",
                        error_message=self._safe(response.text),
                    )
                )
        return results


# --- its plugin: settings, status webhooks, contract case -------------------------------------


class WebhookSettings(ConnectorSettings):
    """CDP_WEBHOOK_*: the receiver's URL, the headers it wants (values are secrets), the batch
    size, and the secret its status reports are signed with."""

    url: str = f"http://127.0.0.1:{SANDBOX_PORT}/webhook/messages"
    # Extra request headers as JSON, e.g. {"Authorization": "Bearer …"}; values are secrets.
    headers: dict[str, SecretStr] | None = credential(None)
    batch_size: PositiveCount = DEFAULT_BATCH_SIZE
    # The key of the `X-Sandbox-Signature` HMAC on its status reports (POST /webhooks/sandbox).
    status_secret: SecretStr | None = credential(SANDBOX_STATUS_SECRET, receiver=True)

    def build(self, credentials: Credentials) -> WebhookConnector:
        return WebhookConnector(
            url=self.url,
            headers=webhook_headers_or_sandbox(self.headers, credentials.sandbox),
            batch_size=self.batch_size,
        )


def webhook_headers_or_sandbox(
    headers: Mapping[str, SecretStr] | None, sandbox: bool
) -> dict[str, str]:
    """Configured headers as plain strings; in sandbox mode, the sandbox's token when none.

    A receiver need not want any header, so nothing set outside sandbox mode is not an
    error (unlike a provider credential): the request simply carries no extra headers.
    """
    if headers:
        return {name: value.get_secret_value() for name, value in headers.items()}
    if sandbox:
        return {"Authorization": f"Bearer {SANDBOX_WEBHOOK_TOKEN}"}
    return {}


PLUGIN = ConnectorPlugin(
    name="webhook",
    title="JSON webhook",
    connector=WebhookConnector,
    settings=WebhookSettings,
    env_prefix="webhook",
    docs="any channel, as JSON batches to your own endpoint, with an Idempotency-Key",
    status_webhook=StatusWebhook(
        route="sandbox",
        secret="status_secret",
        verify=lambda secret, request: signatures.sandbox_valid(
            secret, request.body, request.headers.get("x-sandbox-signature")
        ),
        parse=lambda request: status_parsers.parse_sandbox(request.body, request.received),
        checked_with="`X-Sandbox-Signature` (HMAC-SHA256 of the body)",
    ),
    sandbox="/webhook/messages",
    contract=ContractCase(
        message=samples.whatsapp_or_sms,
        bad_recipient=OutboundMessage("bad", samples.BAD_NUMBER, "sms", body="hi"),
        failure_code="invalid_number",
        credential="headers",
    ),
)
