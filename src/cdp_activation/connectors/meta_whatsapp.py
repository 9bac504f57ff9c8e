"""Meta WhatsApp Cloud API connector: one template (or session text) message per request.

Request shapes follow the official spec (`facebook/openapi`, business-messaging-api v23.0):
`POST /{Version}/{Phone-Number-ID}/messages` with schema `TemplateMessage` / `TextMessage`, and
`GET /{Version}/{WABA-ID}/message_templates`. The spec carries no error-code table, so the
classification below follows Meta's published Cloud API error codes:

- throttling / transient (130429, 131056, 131057, 131000, 131016, 4, 80007, HTTP 429/5xx): RETRY;
  a gateway's 504 or 524: UNKNOWN (`gateway_gave_up`);
- template problems (1320xx) stop the activation: every recipient would fail the same way;
- auth (190, HTTP 401/403, permission codes 10/200): stop the activation;
- anything else per recipient (131026 not on WhatsApp, 131047 outside the 24-hour window, …):
  FAILED with the Meta code, never retried.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from cdp_activation import json_codec
from cdp_activation.connectors import samples, signatures, status_parsers
from cdp_activation.connectors.base import (
    Capabilities,
    ConnectorConfigError,
    ConnectorError,
    CredentialsError,
    OutboundMessage,
    TemplateError,
    TemplateInfo,
)
from cdp_activation.connectors.http import (
    OneRecipientHttpConnector,
    json_or_none,
    require_settings,
)
from cdp_activation.contracts import TemplateState
from cdp_activation.plugins import (
    ConnectorPlugin,
    ConnectorSettings,
    ContractCase,
    Credentials,
    StatusWebhook,
    WebhookRequest,
    credential,
)
from cdp_activation.sandbox_credentials import (
    SANDBOX_META_APP_SECRET,
    SANDBOX_META_TOKEN,
    SANDBOX_META_VERIFY_TOKEN,
    SANDBOX_PORT,
)

# Throttled or down for now (Graph API rate limits 4, 17, 613 and 80007 among them); any
# other error Meta marks `is_transient` is retried too (`_transient`).
RETRY_CODES = frozenset({130429, 131056, 131057, 131000, 131016, 4, 17, 613, 80007})
TEMPLATE_CODES = frozenset({132000, 132001, 132005, 132007, 132012, 132015, 132016})
CREDENTIAL_CODES = frozenset({190, 10, 200, 131005})
# The business account or its number refused as a whole: every recipient would be refused alike.
STOP_CODES: dict[int, tuple[type[ConnectorError], str]] = {
    131031: (ConnectorError, "The WhatsApp Business account is locked: see WhatsApp Manager."),
    131042: (ConnectorError, "A payment problem on the WhatsApp Business account: fix it there."),
    131048: (
        ConnectorError,
        "Meta limits the number for messages reported as spam: check its quality rating in "
        "WhatsApp Manager before resuming.",
    ),
    368: (ConnectorError, "The account is blocked for a policy violation for now."),
    133010: (
        ConnectorConfigError,
        "The sending number is not registered with the Cloud API: check CDP_META_PHONE_NUMBER_ID.",
    ),
}
_ANY_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
_USER_AGENT = "cdp-activation/0.1.0"  # the spec's User-Agent pattern wants name/x.y.z
META_CALLBACK_DATA_MAX = 512  # biz_opaque_callback_data's documented maximum length


class MetaWhatsAppConnector(OneRecipientHttpConnector):
    """Sends WhatsApp messages through Meta's Cloud API (Graph API `/messages`)."""

    name: ClassVar[str] = "meta_whatsapp"
    retry_codes: ClassVar[frozenset[int]] = RETRY_CODES
    template_codes: ClassVar[frozenset[int]] = TEMPLATE_CODES
    credential_codes: ClassVar[frozenset[int]] = CREDENTIAL_CODES
    stop_codes: ClassVar[Mapping[int, tuple[type[ConnectorError], str]]] = STOP_CODES
    base_url_setting: ClassVar[str] = "CDP_META_BASE_URL"
    # Cloud API accepts one recipient per request; 80 msg/s is the default per-number throughput
    # (Meta raises it to 1,000 on request), so the engine paces each sender at 80/s by default.
    capabilities: ClassVar[Capabilities] = Capabilities(
        channels=frozenset({"whatsapp"}),
        max_batch_size=1,
        default_rate_per_second=80.0,
        idempotency=False,  # /messages has no idempotency key: a lost answer means UNKNOWN
        # 131026 "Message undeliverable": not a WhatsApp user, an outdated app, or terms not
        # accepted: the plan's fallback goes at once.
        unreachable_codes=frozenset({"131026"}),
        # 131049 "not delivered to maintain healthy ecosystem engagement": Meta's per-user
        # marketing limit. Not a reason to text everyone it hit at once: the policy backs off
        # that customer's WhatsApp marketing for a while (and the plan's fallback waits for
        # its window as for any message not delivered).
        backoff_codes=frozenset({"131049"}),
        opt_out_codes=(("131050", "marketing"),),
    )

    def __init__(
        self,
        base_url: str,
        api_version: str,
        phone_number_id: str,
        waba_id: str,
        access_token: str,
        marketing_messages: bool = False,
    ) -> None:
        require_settings(
            self.name,
            "CDP_META_",
            base_url=base_url,
            api_version=api_version,
            phone_number_id=phone_number_id,
            access_token=access_token,
        )
        self.base_url = base_url.rstrip("/")
        self.api_version = api_version
        self.phone_number_id = phone_number_id
        self.waba_id = waba_id
        self._access_token = access_token
        # Marketing templates through the Marketing Messages API (`/marketing_messages`).
        self.marketing_messages = marketing_messages
        self._marketing_url = httpx.URL(
            f"{self.base_url}/{self.api_version}/{self.phone_number_id}/marketing_messages"
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

    def _secrets(self) -> tuple[str, ...]:
        return (self._access_token,)

    def _endpoint(self) -> str:
        return self.messages_url

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The `/messages` JSON body: `TemplateMessage`, or `TextMessage` when `body` is set.

        The send's reference goes in `biz_opaque_callback_data` (at most 512 characters),
        which Meta returns in the `statuses` objects of the message's status webhooks.
        """
        base: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": message.to,
        }
        if message.reference is not None:
            if len(message.reference) > META_CALLBACK_DATA_MAX:
                raise ValueError(
                    f"message {message.key}: reference longer than Meta's "
                    f"{META_CALLBACK_DATA_MAX}-character biz_opaque_callback_data"
                )
            base["biz_opaque_callback_data"] = message.reference
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

    async def _request(self, client: httpx.AsyncClient, message: OutboundMessage) -> httpx.Response:
        if self.uses_marketing_api(message):
            payload = self.build_payload(message)
            # `MarketingMessageRequestPayload` has no `biz_opaque_callback_data`: such a send
            # is matched to its reports by the message id alone.
            payload.pop("biz_opaque_callback_data", None)
            return await client.post(self._marketing_url, json=payload, headers=self._headers())
        return await client.post(
            self.endpoint_url, json=self.build_payload(message), headers=self._headers()
        )

    def uses_marketing_api(self, message: OutboundMessage) -> bool:
        """A marketing template, with the Marketing Messages API turned on."""
        return (
            self.marketing_messages
            and message.template is not None
            and message.purpose == "marketing"
        )

    def _accepted_id(self, data: Any) -> str | None:
        return _first_message_id(data)

    def _accepted_status(self, data: Any) -> str | None:
        """`messages[0].message_status` (spec `MessageStatus`): accepted,
        held_for_quality_assessment (Meta holds a marketing message while it judges the
        template's quality) or paused (its delivery is paused). Accepted all the same: the
        status webhooks say what became of it."""
        messages = data.get("messages") if isinstance(data, dict) else None
        first = messages[0] if isinstance(messages, list) and messages else None
        status = first.get("message_status") if isinstance(first, dict) else None
        return status[:40] if isinstance(status, str) and status else None

    def _error(self, data: Any, response: httpx.Response) -> tuple[int | None, str]:
        return _meta_error(data)

    def _transient(self, data: Any) -> bool:
        return _meta_transient(data)

    def _retry_hint(self, headers: httpx.Headers) -> float | None:
        return _regain_access_seconds(headers)

    def _credentials_error(self, status: int, code: int | None, detail: str) -> CredentialsError:
        return CredentialsError(
            f"Meta refused the access token (HTTP {status}, code {code}): {detail}. "
            "Check CDP_META_ACCESS_TOKEN and its whatsapp_business_messaging permission."
        )

    def _template_error(
        self, message: OutboundMessage, code: int | None, detail: str
    ) -> TemplateError:
        template = message.template
        which = f"{template.name}/{template.language}" if template else "(none)"
        return TemplateError(
            f"Meta rejected template {which} (code {code}): {detail}. Check its status, "
            "language and parameter count in WhatsApp Manager."
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
            data = json_or_none(response)
            if not response.is_success:
                code, text = _meta_error(data)
                detail = self.safe(text or response.text, "")
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


def _first_message_id(data: Any) -> str | None:
    if isinstance(data, dict):
        messages = data.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            message_id = messages[0].get("id")
            return message_id if isinstance(message_id, str) and message_id else None
    return None


def _regain_access_seconds(headers: httpx.Headers) -> float | None:
    """When a throttled business may call again: the longest `estimated_time_to_regain_access`
    (minutes) of `X-Business-Use-Case-Usage`, in seconds. Meta sends no Retry-After; without
    a wait, each throttled answer counted as a failure and enough of them stopped the step as
    an outage. None when the header is absent, unreadable or says 0."""
    raw = headers.get("x-business-use-case-usage")
    if not raw:
        return None
    try:
        usage = json_codec.loads(raw)
    except ValueError:
        return None
    minutes = [
        entry.get("estimated_time_to_regain_access")
        for entries in (usage.values() if isinstance(usage, dict) else ())
        if isinstance(entries, list)
        for entry in entries
        if isinstance(entry, dict)
    ]
    longest = max((m for m in minutes if isinstance(m, int | float) and m > 0), default=None)
    return None if longest is None else float(longest) * 60


def _meta_transient(data: Any) -> bool:
    """Whether a Graph API error says it is temporary (`error.is_transient`: "the request
    should be retried")."""
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and error.get("is_transient") is True


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
    """One `message_templates` entry as a `TemplateInfo`: body parameters {{1}}…{{n}}
    (positional), or the distinct names of a NAMED template's {{first_name}} placeholders."""
    names: tuple[str, ...] = ()
    for component in item.get("components") or []:
        if str(component.get("type", "")).upper() == "BODY":
            found = _ANY_PLACEHOLDER.findall(str(component.get("text", "")))
            if found and all(n.isdigit() for n in found):
                names = tuple(str(i) for i in range(1, max(int(n) for n in found) + 1))
            else:
                names = tuple(dict.fromkeys(found))
    extra = {"id": str(item["id"])} if item.get("id") is not None else {}
    return TemplateInfo(
        name=str(item.get("name", "")),
        language=str(item.get("language", "")),
        category=str(item.get("category", "")).upper(),
        status=str(item.get("status", "")).upper(),
        body_parameter_count=len(names),
        parameter_names=names,
        extra=extra,
    )


# --- its plugin: settings, status webhooks, contract case -------------------------------------


class MetaWhatsAppSettings(ConnectorSettings):
    """CDP_META_*: the WhatsApp Business phone number and account, the system user's token,
    and the app secret its status webhooks are signed with."""

    base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/meta"  # real: https://graph.facebook.com
    api_version: str = "v23.0"
    phone_number_id: str = "100000000000001"
    waba_id: str = "200000000000002"
    access_token: SecretStr | None = credential(SANDBOX_META_TOKEN)
    app_secret: SecretStr | None = credential(SANDBOX_META_APP_SECRET, receiver=True)
    verify_token: SecretStr | None = credential(SANDBOX_META_VERIFY_TOKEN, receiver=True)
    # Marketing templates through Meta's Marketing Messages API (`/marketing_messages`);
    # utility and authentication templates and free-form text keep using `/messages`.
    marketing_messages_api: bool = False

    def build(self, credentials: Credentials) -> MetaWhatsAppConnector:
        return MetaWhatsAppConnector(
            base_url=self.base_url,
            api_version=self.api_version,
            phone_number_id=self.phone_number_id,
            waba_id=self.waba_id,
            access_token=credentials.get("access_token"),
            marketing_messages=self.marketing_messages_api,
        )


def _meta_signed(secret: str, request: WebhookRequest) -> bool:
    return signatures.meta_valid(secret, request.body, request.headers.get("x-hub-signature-256"))


def _meta_template_updates(request: WebhookRequest) -> list[TemplateState]:
    return status_parsers.parse_meta_template_updates(request.body, request.received)


PLUGIN = ConnectorPlugin(
    name="meta_whatsapp",
    title="Meta WhatsApp Cloud API",
    connector=MetaWhatsAppConnector,
    settings=MetaWhatsAppSettings,
    env_prefix="meta",
    docs="WhatsApp templates and text through the Graph API `/{phone_number_id}/messages`",
    status_webhook=StatusWebhook(
        route="meta",
        secret="app_secret",
        verify=_meta_signed,
        parse=lambda request: status_parsers.parse_meta(request.body, request.received),
        template_updates=_meta_template_updates,
        inbound=lambda request: status_parsers.parse_meta_inbound(request.body, request.received),
        subscribe_token="verify_token",
        checked_with="`X-Hub-Signature-256` (HMAC-SHA256 of the body)",
    ),
    sandbox="/meta",
    contract=ContractCase(
        message=samples.whatsapp,
        bad_recipient=OutboundMessage(
            "bad", samples.BAD_NUMBER, "whatsapp", template=samples.whatsapp(0).template
        ),
        failure_code="100",
        credential="access_token",
    ),
)
