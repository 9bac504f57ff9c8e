"""What one-recipient-per-request HTTP connectors share: sending, error classification, redaction.

Meta's Cloud API and Twilio's Messages resource both take one recipient per request and answer
with a provider error code; they differ only in the request they build and where the id and the
error code sit in the answer. Those differences are the hooks a subclass fills in; the rules
(what retries, what fails one recipient, what stops the activation) live here once.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import httpx

from cdp_activation import json_codec
from cdp_activation.connectors.base import (
    Capabilities,
    ConnectorConfigError,
    ConnectorError,
    CredentialsError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateError,
    check_batch_size,
    clip,
    gateway_gave_up,
    retry_after_seconds,
    transport_outcome,
)
from cdp_activation.masking import mask_phone, mask_phones_in, redact_secrets

logger = logging.getLogger(__name__)


def require_settings(connector: str, env_prefix: str, **values: str | None) -> None:
    """Raise one `ConnectorConfigError` naming every missing setting of a connector."""
    missing = [label for label, value in values.items() if not value]
    if missing:
        raise ConnectorConfigError(
            f"{connector} connector is missing {', '.join(missing)}: set the {env_prefix}* "
            "settings (see .env.example)"
        )


def transport_failure(
    name: str,
    exc: httpx.TransportError,
    messages: Sequence[OutboundMessage],
    safe: Callable[[str], str],
) -> list[SendResult]:
    """The same outcome for every message of a request that failed in transport: RETRY when it
    surely never left, UNKNOWN when it may have been accepted (see `transport_outcome`)."""
    outcome = transport_outcome(exc)
    logger.warning(
        "%s: %s sending %d message(s): %s", name, type(exc).__name__, len(messages), outcome.value
    )
    detail = safe(str(exc))
    return [
        SendResult(m.key, outcome, error_code=type(exc).__name__, error_message=detail)
        for m in messages
    ]


def whole_request_results(
    messages: Sequence[OutboundMessage],
    response: httpx.Response,
    *,
    accepted: bool,
    provider_message_id: str | None,
    detail: str,
    retry_after: float | None = None,
) -> list[SendResult]:
    """The one result every message of a request gets from a provider that answers the request
    as a whole (Braze, LINE), once the caller has raised for activation-wide errors.

    Accepted with an id: SENT under it; accepted without one: UNKNOWN (it may exist, we cannot
    tell which it is); 429 and 5xx: RETRY (with `retry_after`; a 5xx `may_be_taken`); any
    other answer: FAILED.
    """
    status = response.status_code
    code = f"http_{status}"
    if accepted:
        if provider_message_id:
            return [
                SendResult(m.key, Outcome.SENT, provider_message_id=provider_message_id)
                for m in messages
            ]
        return [SendResult(m.key, Outcome.UNKNOWN, error_code=code) for m in messages]
    if status == 429 or status >= 500:
        # A 5xx may come after the provider took the request (LINE says so of its API).
        return [
            SendResult(
                m.key,
                Outcome.RETRY,
                error_code=code,
                error_message=detail,
                retry_after=retry_after,
                may_be_taken=status >= 500,
            )
            for m in messages
        ]
    return [
        SendResult(m.key, Outcome.FAILED, error_code=code, error_message=detail) for m in messages
    ]


def gateway_unknown(key: str, status: int, detail: str) -> SendResult:
    """UNKNOWN for a message a gateway's timeout answered for (`gateway_gave_up`)."""
    return SendResult(
        key,
        Outcome.UNKNOWN,
        error_code=f"http_{status}",
        error_message=clip(
            f"a gateway answered {status} for the provider, which may have taken the message: "
            f"not sent again. {detail}"
        ),
    )


def json_or_none(response: httpx.Response) -> Any:
    """The answer's JSON as `response.json()` reads it (`json.loads` of its bytes), through
    orjson where that reads it the same (`json_codec`), else None."""
    try:
        return json_codec.loads(response.content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


class OneRecipientHttpConnector:
    """Base of connectors whose API takes one recipient per HTTP request."""

    rate_per_second: float | None = None  # set from configuration; None: the default
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    retry_codes: ClassVar[frozenset[int]] = frozenset()
    template_codes: ClassVar[frozenset[int]] = frozenset()
    credential_codes: ClassVar[frozenset[int]] = frozenset()
    # Codes that refuse every recipient alike (the account barred or out of credit, the sender
    # unknown): the activation stops with (this error, what to do), and its unsent rows stay
    # planned, instead of each customer left being failed for good.
    stop_codes: ClassVar[Mapping[int, tuple[type[ConnectorError], str]]] = {}
    base_url_setting: ClassVar[str]  # named in the error for an unexpected answer

    # ---- hooks -------------------------------------------------------------------------------

    def _secrets(self) -> tuple[str, ...]:
        """Credential strings that must never appear in a log, result or exception."""
        raise NotImplementedError

    async def _request(self, client: httpx.AsyncClient, message: OutboundMessage) -> httpx.Response:
        raise NotImplementedError

    def _accepted_id(self, data: Any) -> str | None:
        """The provider's message id in a success body, or None."""
        raise NotImplementedError

    def _accepted_status(self, data: Any) -> str | None:
        """The provider's word on an accepted message (Meta's `message_status`), if any."""
        return None

    def _error(self, data: Any, response: httpx.Response) -> tuple[int | None, str]:
        """(provider error code, provider message) of an error answer."""
        raise NotImplementedError

    def _retry_hint(self, headers: httpx.Headers) -> float | None:
        """Seconds to wait before asking again, from a provider's own header where it has no
        Retry-After (Meta's usage header); None: no word."""
        return None

    def _transient(self, data: Any) -> bool:
        """Whether an error answer says of itself that it is temporary (Meta's
        `is_transient`): retried whatever its code."""
        return False

    def _credentials_error(self, status: int, code: int | None, detail: str) -> CredentialsError:
        raise NotImplementedError

    def _template_error(
        self, message: OutboundMessage, code: int | None, detail: str
    ) -> TemplateError:
        raise NotImplementedError

    def _endpoint(self) -> str:
        raise NotImplementedError

    # ---- shared behaviour --------------------------------------------------------------------

    @functools.cached_property
    def endpoint_url(self) -> httpx.URL:
        """`_endpoint()` parsed once: httpx re-parses a URL string on every request (~17 µs)."""
        return httpx.URL(self._endpoint())

    def redact(self, text: str) -> str:
        """Replace every credential, in every encoding, wherever it appears (headers, URLs,
        echoed bodies)."""
        return redact_secrets(text, self._secrets())

    def safe(self, text: str, to: str) -> str:
        """Provider text made fit for logs: clipped, credentials removed, numbers masked."""
        text = clip(self.redact(text))
        if to:
            text = text.replace(to, mask_phone(to))
        return mask_phones_in(text)

    async def send_batch(
        self, client: httpx.AsyncClient, messages: Sequence[OutboundMessage]
    ) -> list[SendResult]:
        """Send each message with its own request (the API takes one recipient per request)."""
        check_batch_size(self, messages)
        results: list[SendResult] = []
        for message in messages:
            try:
                results.append(await self._send_one(client, message))
            except ConnectorError as err:  # those before it were answered (see ConnectorError)
                err.after(results)
                raise
        return results

    async def _send_one(self, client: httpx.AsyncClient, message: OutboundMessage) -> SendResult:
        try:
            response = await self._request(client, message)
        except httpx.TransportError as exc:
            return transport_failure(self.name, exc, [message], lambda t: self.safe(t, message.to))[
                0
            ]
        return self.classify(message, response)

    def classify(self, message: OutboundMessage, response: httpx.Response) -> SendResult:
        """Turn one response into a result, or raise for activation-wide errors.

        Credentials and template problems raise (every recipient would fail the same way);
        provider throttling, 429 and 5xx are RETRY, but a gateway's timeout (504, 524) is UNKNOWN
        through a provider that does not de-duplicate; other 4xx fail this recipient only.
        """
        data = json_or_none(response)
        status = response.status_code
        if response.is_success:
            message_id = self._accepted_id(data)
            if message_id:
                return SendResult(
                    message.key,
                    Outcome.SENT,
                    provider_message_id=message_id,
                    provider_status=self._accepted_status(data),
                )
            # 2xx without an id: the message may exist, but we cannot tell which it is.
            return SendResult(
                message.key,
                Outcome.UNKNOWN,
                error_code=f"http_{status}",
                error_message=self.safe(response.text, message.to),
            )
        code, text = self._error(data, response)
        detail = self.safe(text or response.text, message.to)
        if code in self.credential_codes or status in (401, 403):
            raise self._credentials_error(status, code, detail)
        if code in self.template_codes:
            raise self._template_error(message, code, detail)
        if code is not None and code in self.stop_codes:
            kind, remedy = self.stop_codes[code]
            raise kind(
                f"{self.name} refused the send for every recipient ({code}): {detail}. {remedy}"
            )
        error_code = str(code) if code is not None else f"http_{status}"
        if gateway_gave_up(status) and not self.capabilities.idempotency:
            return gateway_unknown(message.key, status, detail)
        if code in self.retry_codes or status == 429 or status >= 500 or self._transient(data):
            wait = retry_after_seconds(response.headers)
            return SendResult(
                message.key,
                Outcome.RETRY,
                error_code=error_code,
                error_message=detail,
                retry_after=self._retry_hint(response.headers) if wait is None else wait,
                may_be_taken=status >= 500,
            )
        if 400 <= status < 500:
            return SendResult(
                message.key, Outcome.FAILED, error_code=error_code, error_message=detail
            )
        raise ConnectorConfigError(
            f"unexpected HTTP {status} from {self.redact(self._endpoint())}; check "
            f"{self.base_url_setting}"
        )


_MESSAGE_ID_NAMESPACE = uuid.UUID("6f1c2a4e-8d3b-5b7e-9a0f-3c5d7e9b1a20")


def client_message_id(key: str) -> str:
    """A stable id (UUID5, 36 characters) for a ledger idempotency key.

    The key itself may exceed a provider's field limit (Infobip `messageId` ≤ 200, Vonage
    `client_ref` ≤ 40) and carries the activation and customer id, which a provider has no need
    to see; the UUID5 is short, opaque and the same on every retry.
    """
    return str(uuid.uuid5(_MESSAGE_ID_NAMESPACE, key))
