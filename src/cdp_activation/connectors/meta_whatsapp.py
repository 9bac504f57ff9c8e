"""Meta WhatsApp Cloud API connector: one template (or session text) message per request.

Request shapes follow the official spec (`facebook/openapi`, business-messaging-api v23.0):
`POST /{Version}/{Phone-Number-ID}/messages` with schema `TemplateMessage` / `TextMessage`, and
`GET /{Version}/{WABA-ID}/message_templates`. The spec carries no error-code table, so the
classification below follows Meta's published Cloud API error codes:

- throttling / transient (130429, 131056, 131057, 131000, 131016, 4, 80007, HTTP 429/5xx): RETRY;
- template problems (1320xx) stop the activation: every recipient would fail the same way;
- auth (190, HTTP 401/403, permission codes 10/200): stop the activation;
- anything else per recipient (131026 not on WhatsApp, 131047 outside the 24-hour window, …):
  FAILED with the Meta code, never retried.
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
    ConnectorError,
    CredentialsError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateError,
    TemplateInfo,
    clip,
    retry_after_seconds,
    transport_outcome,
)
from cdp_activation.masking import mask_phone, mask_phones_in

if TYPE_CHECKING:
    from cdp_activation.settings import Settings

logger = logging.getLogger(__name__)

RETRY_CODES = frozenset({130429, 131056, 131057, 131000, 131016, 4, 80007})
TEMPLATE_CODES = frozenset({132000, 132001, 132005, 132007, 132012, 132015, 132016})
CREDENTIAL_CODES = frozenset({190, 10, 200})
_PLACEHOLDER = re.compile(r"\{\{\s*(\d+)\s*\}\}")
_USER_AGENT = "cdp-activation/0.1.0"  # the spec's User-Agent pattern wants name/x.y.z


class MetaWhatsAppConnector:
    """Sends WhatsApp messages through Meta's Cloud API (Graph API `/messages`)."""

    name: ClassVar[str] = "meta_whatsapp"
    # Cloud API accepts one recipient per request; 80 msg/s is the default per-number throughput
    # (Meta raises it to 1,000 on request), so the engine paces each sender at 80/s by default.
    capabilities: ClassVar[Capabilities] = Capabilities(
        channels=frozenset({"whatsapp"}),
        max_batch_size=1,
        default_rate_per_second=80.0,
        idempotency=False,  # /messages has no idempotency key: a lost answer means UNKNOWN
    )

    def __init__(
        self,
        base_url: str,
        api_version: str,
        phone_number_id: str,
        waba_id: str,
        access_token: str,
    ) -> None:
        missing = [
            label
            for label, value in (
                ("base_url", base_url),
                ("api_version", api_version),
                ("phone_number_id", phone_number_id),
                ("access_token", access_token),
            )
            if not value
        ]
        if missing:
            raise ConnectorConfigError(
                f"meta_whatsapp connector is missing {', '.join(missing)}: set CDP_META_* "
                "settings (see settings.py)"
            )
        self.base_url = base_url.rstrip("/")
        self.api_version = api_version
        self.phone_number_id = phone_number_id
        self.waba_id = waba_id
        self._access_token = access_token

    @classmethod
    def from_settings(cls, settings: Settings) -> MetaWhatsAppConnector:
        """Build from deployment settings (token from the environment or the sandbox default)."""
        return cls(
            base_url=settings.meta_base_url,
            api_version=settings.meta_api_version,
            phone_number_id=settings.meta_phone_number_id,
            waba_id=settings.meta_waba_id,
            access_token=settings.meta_token(),
        )

    def __repr__(self) -> str:
        return (
            f"MetaWhatsAppConnector(base_url={self.base_url!r}, api_version={self.api_version!r}, "
            f"phone_number_id={self.phone_number_id!r}, waba_id={self.waba_id!r})"
        )

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/{self.api_version}/{self.phone_number_id}/messages"

    @property
    def templates_url(self) -> str:
        return f"{self.base_url}/{self.api_version}/{self.waba_id}/message_templates"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._access_token}", "User-Agent": _USER_AGENT}

    def redact(self, text: str) -> str:
        """Replace the access token wherever it appears (headers, URLs, echoed bodies)."""
        return text.replace(self._access_token, "***") if self._access_token else text

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The `/messages` JSON body: `TemplateMessage`, or `TextMessage` when `body` is set."""
        base: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": message.to,
        }
        if message.body is not None:
            return {**base, "type": "text", "text": {"preview_url": False, "body": message.body}}
        if message.template is None:
            raise ValueError(f"message {message.key} has neither a template nor a body")
        template: dict[str, Any] = {
            "name": message.template.name,
            # The spec's LanguageObject requires `policy`; "deterministic" is its only value.
            "language": {"policy": "deterministic", "code": message.template.language},
        }
        if message.template.parameters:
            template["components"] = [
                {
                    "type": "body",
                    "parameters": [
                        {"type": "text", "text": value} for value in message.template.parameters
                    ],
                }
            ]
        return {**base, "type": "template", "template": template}

    async def send_batch(
        self, client: httpx.AsyncClient, messages: Sequence[OutboundMessage]
    ) -> list[SendResult]:
        """Send each message (the Cloud API takes one recipient per request)."""
        if len(messages) > self.capabilities.max_batch_size:
            raise ValueError(
                f"meta_whatsapp sends at most {self.capabilities.max_batch_size} message per "
                f"batch, got {len(messages)}"
            )
        return [await self._send_one(client, message) for message in messages]

    async def _send_one(self, client: httpx.AsyncClient, message: OutboundMessage) -> SendResult:
        payload = self.build_payload(message)
        try:
            response = await client.post(self.messages_url, json=payload, headers=self._headers())
        except httpx.TransportError as exc:
            outcome = transport_outcome(exc)
            logger.warning(
                "meta_whatsapp: %s sending to %s: %s",
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
        """Turn one `/messages` response into a result, or raise for activation-wide errors."""
        data = _json_or_none(response)
        if response.is_success:
            message_id = _first_message_id(data)
            if message_id:
                return SendResult(message.key, Outcome.SENT, provider_message_id=message_id)
            # 2xx without an id: the message may exist, but we cannot tell which it is.
            return SendResult(
                message.key,
                Outcome.UNKNOWN,
                error_code=f"http_{response.status_code}",
                error_message=self._safe(response.text, message.to),
            )

        code, text = _meta_error(data)
        status = response.status_code
        detail = self._safe(text or response.text, message.to)
        if code in CREDENTIAL_CODES or status in (401, 403):
            raise CredentialsError(
                f"Meta refused the access token (HTTP {status}, code {code}): {detail}. "
                "Check CDP_META_ACCESS_TOKEN and its whatsapp_business_messaging permission."
            )
        if code in TEMPLATE_CODES:
            template = message.template
            which = f"{template.name}/{template.language}" if template else "(none)"
            raise TemplateError(
                f"Meta rejected template {which} (code {code}): {detail}. Check its status, "
                "language and parameter count in WhatsApp Manager."
            )
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
            f"unexpected HTTP {status} from {self.redact(self.messages_url)}; check "
            "CDP_META_BASE_URL"
        )

    async def fetch_templates(
        self, client: httpx.AsyncClient, page_size: int = 100
    ) -> list[TemplateInfo]:
        """All templates of the WABA, following cursor paging until `paging.next` is absent.

        The next page is requested from our own base URL with the `after` cursor rather than by
        following `paging.next` verbatim: Meta's `next` URL can carry an access token, and we
        never send credentials to a host we were not configured with.
        """
        if not self.waba_id:
            raise ConnectorConfigError("meta_whatsapp needs CDP_META_WABA_ID to list templates")
        params: dict[str, str | int] = {
            "fields": "name,language,status,category,id,components",
            "limit": page_size,
        }
        templates: list[TemplateInfo] = []
        while True:
            response = await client.get(self.templates_url, params=params, headers=self._headers())
            data = _json_or_none(response)
            if not response.is_success:
                code, text = _meta_error(data)
                detail = self._safe(text or response.text, "")
                if code in CREDENTIAL_CODES or response.status_code in (401, 403):
                    raise CredentialsError(
                        f"Meta refused the access token listing templates (code {code}): {detail}"
                    )
                raise ConnectorError(
                    f"listing Meta templates failed (HTTP {response.status_code}, code {code}): "
                    f"{detail}"
                )
            if not isinstance(data, dict):
                raise ConnectorError("listing Meta templates returned a body that is not JSON")
            templates.extend(_template_info(item) for item in data.get("data") or [])
            paging = data.get("paging") or {}
            after = (paging.get("cursors") or {}).get("after")
            if not paging.get("next") or not after:
                return templates
            params = {**params, "after": after}

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


def _first_message_id(data: Any) -> str | None:
    if isinstance(data, dict):
        messages = data.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            message_id = messages[0].get("id")
            return message_id if isinstance(message_id, str) and message_id else None
    return None


def _meta_error(data: Any) -> tuple[int | None, str]:
    """(code, message + details) from a Graph API error body, tolerating other bodies."""
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return None, ""
    error = data["error"]
    code = error.get("code")
    text = str(error.get("message", ""))
    details = (
        (error.get("error_data") or {}).get("details")
        if isinstance(error.get("error_data"), dict)
        else None
    )
    if details:
        text = f"{text} ({details})"
    return (code if isinstance(code, int) else None), text


def _template_info(item: dict[str, Any]) -> TemplateInfo:
    """One `message_templates` entry as a `TemplateInfo` (body parameters = highest {{n}})."""
    count = 0
    for component in item.get("components") or []:
        if str(component.get("type", "")).upper() == "BODY":
            numbers = [int(n) for n in _PLACEHOLDER.findall(str(component.get("text", "")))]
            count = max(numbers, default=0)
    extra = {"id": str(item["id"])} if item.get("id") is not None else {}
    return TemplateInfo(
        name=str(item.get("name", "")),
        language=str(item.get("language", "")),
        category=str(item.get("category", "")).upper(),
        status=str(item.get("status", "")).upper(),
        body_parameter_count=count,
        extra=extra,
    )
