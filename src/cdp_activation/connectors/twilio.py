"""Twilio Programmable Messaging connector (SMS): one form-encoded request per message.

Request shape from the official spec (`twilio/twilio-oai`, twilio_api_v2010.json):
`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, `application/x-www-form-urlencoded`,
HTTP Basic auth AccountSid:AuthToken, 201 with a Message resource. The Messages endpoint has no
idempotency parameter, so a request whose answer is lost ends UNKNOWN, never resent blindly.

Error classification follows Twilio's error dictionary: 429 / 20429 / 5xx retry; 63027 (template
not found for the content) stops the activation; 20003 / 401 stops it on credentials; other 4xx
(21211 invalid To, 21610 opted out, 21614 not mobile, 21408 region disabled, 63016 outside the
WhatsApp window, …) fail that recipient only.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from cdp_activation.connectors.base import (
    Capabilities,
    ConnectorConfigError,
    CredentialsError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateError,
    clip,
    retry_after_seconds,
    transport_outcome,
)
from cdp_activation.masking import mask_phone, mask_phones_in

if TYPE_CHECKING:
    from cdp_activation.settings import Settings

logger = logging.getLogger(__name__)

RETRY_CODES = frozenset({20429})
TEMPLATE_CODES = frozenset({63027})
CREDENTIAL_CODES = frozenset({20003})
_CONTENT_SID = re.compile(r"^HX[0-9a-fA-F]{32}$")
_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")


class TwilioConnector:
    """Sends SMS through Twilio's Messages resource (API version 2010-04-01)."""

    name: ClassVar[str] = "twilio"
    capabilities: ClassVar[Capabilities] = Capabilities(
        channels=frozenset({"sms"}),
        max_batch_size=1,  # one To per Message resource
        # Twilio's API accepts requests far faster than a sender transmits and queues the rest
        # per sender (1 segment/s on a US long code, ~100/s on a short code, up to 4 hours of
        # backlog before error 30001). 100 req/s matches short-code throughput and stays under
        # an account's default API concurrency; lower it for long-code senders so messages are
        # not left queueing (and expiring) at Twilio.
        default_rate_per_second=100.0,
        idempotency=False,  # no IdempotencyKey on Messages: a lost answer means UNKNOWN
    )

    def __init__(self, base_url: str, account_sid: str, auth_token: str, from_number: str) -> None:
        missing = [
            label
            for label, value in (
                ("base_url", base_url),
                ("account_sid", account_sid),
                ("auth_token", auth_token),
                ("from_number", from_number),
            )
            if not value
        ]
        if missing:
            raise ConnectorConfigError(
                f"twilio connector is missing {', '.join(missing)}: set CDP_TWILIO_* settings "
                "(see settings.py)"
            )
        self.base_url = base_url.rstrip("/")
        self.account_sid = account_sid
        self.from_number = from_number
        self._auth_token = auth_token

    @classmethod
    def from_settings(cls, settings: Settings) -> TwilioConnector:
        """Build from deployment settings (token from the environment or the sandbox default)."""
        return cls(
            base_url=settings.twilio_base_url,
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_token(),
            from_number=settings.twilio_from,
        )

    def __repr__(self) -> str:
        return (
            f"TwilioConnector(base_url={self.base_url!r}, account_sid={self.account_sid!r}, "
            f"from_number={self.from_number!r})"
        )

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/2010-04-01/Accounts/{self.account_sid}/Messages.json"

    def redact(self, text: str) -> str:
        """Replace the auth token wherever it appears."""
        return text.replace(self._auth_token, "***") if self._auth_token else text

    def build_form(self, message: OutboundMessage) -> dict[str, str]:
        """Form fields of `CreateMessageRequest`: a Body, or ContentSid + ContentVariables.

        A template on SMS means a Twilio Content template: its name must be the Content SID
        (`HX…`) and the positional parameters become ContentVariables {"1": …, "2": …}.
        """
        form: dict[str, str] = {"To": message.to}
        if _SERVICE_SID.match(self.from_number):
            form["MessagingServiceSid"] = self.from_number
        else:
            form["From"] = self.from_number
        if message.body is not None:
            form["Body"] = message.body
        elif message.template is not None:
            if not _CONTENT_SID.match(message.template.name):
                raise TemplateError(
                    f"twilio needs a Content SID (HX + 32 hex) as template name, got "
                    f"{message.template.name!r}; or render the text and send it as the body"
                )
            form["ContentSid"] = message.template.name
            variables = {str(i): v for i, v in enumerate(message.template.parameters, start=1)}
            form["ContentVariables"] = json.dumps(variables, ensure_ascii=False)
        else:
            raise ValueError(f"message {message.key} has neither a template nor a body")
        return form

    async def send_batch(
        self, client: httpx.AsyncClient, messages: Sequence[OutboundMessage]
    ) -> list[SendResult]:
        """Send each message (one Message resource per recipient)."""
        if len(messages) > self.capabilities.max_batch_size:
            raise ValueError(
                f"twilio sends at most {self.capabilities.max_batch_size} message per batch, "
                f"got {len(messages)}"
            )
        return [await self._send_one(client, message) for message in messages]

    async def _send_one(self, client: httpx.AsyncClient, message: OutboundMessage) -> SendResult:
        form = self.build_form(message)
        try:
            response = await client.post(
                self.messages_url,
                data=form,
                auth=(self.account_sid, self._auth_token),
                headers={"Accept": "application/json"},
            )
        except httpx.TransportError as exc:
            outcome = transport_outcome(exc)
            logger.warning(
                "twilio: %s sending to %s: %s",
                type(exc).__name__,
                mask_phone(message.to),
                outcome.value,
            )
            return SendResult(
                key=message.key,
                outcome=outcome,
                error_code=type(exc).__name__,
                error_message=self._safe(str(exc), message.to),
            )
        return self.classify(message, response)

    def classify(self, message: OutboundMessage, response: httpx.Response) -> SendResult:
        """Turn one Messages response into a result, or raise for activation-wide errors."""
        data = _json_or_none(response)
        if response.is_success:
            sid = data.get("sid") if isinstance(data, dict) else None
            if isinstance(sid, str) and sid:
                return SendResult(message.key, Outcome.SENT, provider_message_id=sid)
            return SendResult(
                message.key,
                Outcome.UNKNOWN,
                error_code=f"http_{response.status_code}",
                error_message=self._safe(response.text, message.to),
            )
        status = response.status_code
        code = data.get("code") if isinstance(data, dict) else None
        code = code if isinstance(code, int) else None
        text = str(data.get("message", "")) if isinstance(data, dict) else response.text
        detail = self._safe(text or response.text, message.to)
        if code in CREDENTIAL_CODES or status in (401, 403):
            raise CredentialsError(
                f"Twilio refused the credentials for account {self.account_sid} (HTTP {status}, "
                f"code {code}): {detail}. Check CDP_TWILIO_ACCOUNT_SID and CDP_TWILIO_AUTH_TOKEN."
            )
        if code in TEMPLATE_CODES:
            raise TemplateError(f"Twilio rejected the content template (code {code}): {detail}")
        error_code = str(code) if code is not None else f"http_{status}"
        if code in RETRY_CODES or status == 429 or status >= 500:
            return SendResult(
                message.key,
                Outcome.RETRY,
                error_code=error_code,
                error_message=detail,
                retry_after=retry_after_seconds(response.headers),
            )
        if 400 <= status < 500:
            return SendResult(
                message.key, Outcome.FAILED, error_code=error_code, error_message=detail
            )
        raise ConnectorConfigError(
            f"unexpected HTTP {status} from {self.messages_url}; check CDP_TWILIO_BASE_URL"
        )

    def _safe(self, text: str, to: str) -> str:
        """Provider text made fit for logs: clipped, token removed, phone numbers masked."""
        text = self.redact(clip(text))
        if to:
            text = text.replace(to, mask_phone(to))
        return mask_phones_in(text)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
