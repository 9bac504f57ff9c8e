"""Vonage Messages API v1 connector: WhatsApp templates (or text), SMS and Viber, one a request.

Request shape from the spec (`vendor-specs/vonage/messages-olympus.yml`): `POST /v1/messages`
with a JSON body `{channel, message_type, to, from, client_ref, …}`: `message_type: text` with
`text` for SMS (and WhatsApp session text), `message_type: template` with `template{name,
parameters}` and `whatsapp{policy: deterministic, locale}` for WhatsApp templates, and
`channel: viber_service` text (at most 1,000 characters) from the Viber Business sender id,
with `viber_service.category` `promotion` for a marketing message (Viber's rule) and
`transaction` otherwise. Numbers go
without the leading `+`. Auth: the spec allows `bearerAuth` (JWT) or `basicAuth`; we use HTTP
Basic with the API key and secret, which needs no application key pair.

`client_ref` (≤ 40 characters) carries the send's reference (`OutboundMessage.reference`,
"cdp-<send id>"), or without one an id derived from the ledger key, so status webhooks name the
ledger row even when the send's answer was lost. The spec only says the reference is echoed
in every status, not that Vonage de-duplicates on it, so no idempotency is claimed: a lost
answer means UNKNOWN.

Classification (the spec's responses and its `x-errors` code table; the code is the fragment of
the error `type` URL, e.g. `…/messages-olympus#1022`):

- 202 `{message_uuid}`: SENT.
- 401 (or 403): `CredentialsError`.
- 402 low balance: `ConnectorError`: every further request would be refused the same way.
- 422 with code 1022 (invalid template or template parameters): `TemplateError`.
- the account or the sender refused as a whole (1060, 1070, 1080, 1400, 1420, 1440):
  `ConnectorError` / `ConnectorConfigError` (`STOP_CODES`), nobody failed for it.
- 429, 5xx, or code 1000, 1241, 1331 (throttled, busy): RETRY with Retry-After where given;
  a gateway's 504 or 524: UNKNOWN (`gateway_gave_up`).
- any other 4xx (1430 invalid recipient, 1050 number barred, 1340 outside the window, …):
  FAILED with the code and the error title.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from cdp_activation.connectors import samples, signatures, status_parsers
from cdp_activation.connectors.base import (
    Capabilities,
    ConnectorConfigError,
    ConnectorError,
    CredentialsError,
    OutboundMessage,
    SendResult,
    TemplateError,
)
from cdp_activation.connectors.http import (
    OneRecipientHttpConnector,
    client_message_id,
    json_or_none,
    require_settings,
)
from cdp_activation.plugins import (
    ConnectorPlugin,
    ConnectorSettings,
    ContractCase,
    Credentials,
    StatusWebhook,
    credential,
)
from cdp_activation.sandbox_credentials import (
    SANDBOX_PORT,
    SANDBOX_VONAGE_API_KEY,
    SANDBOX_VONAGE_API_SECRET,
    SANDBOX_VONAGE_SIGNATURE_SECRET,
)

CLIENT_REF_MAX = 40  # the spec: "Client reference of up to 40 characters"
# Throttled (1000), too many send requests (1241), the provider not answering for now (1331).
RETRY_CODES = frozenset({1000, 1241, 1331})
TEMPLATE_CODES = frozenset({1022})
_SENDER = "Check CDP_VONAGE_WHATSAPP_FROM, CDP_VONAGE_SMS_FROM or CDP_VONAGE_VIBER_FROM."
# The account or the sender refused as a whole: every recipient would be refused alike. Not
# 1120 (the sender id illegal in the recipient's country): that fails the recipient only.
STOP_CODES: dict[int, tuple[type[ConnectorError], str]] = {
    1060: (ConnectorError, "The Vonage account is barred from sending: contact Vonage."),
    1070: (ConnectorError, "The pre-paid balance is used up: top up the account."),
    1080: (ConnectorConfigError, "The account is not provisioned for this API."),
    1400: (ConnectorConfigError, _SENDER),
    1420: (ConnectorConfigError, _SENDER),
    1440: (ConnectorConfigError, _SENDER),
}
_CODE_IN_TYPE = re.compile(r"#(\d+)$")


def client_reference(message: OutboundMessage) -> str:
    """`client_ref`: the send's reference ("cdp-<send id>") when it has one, else an id derived
    from the ledger key. Vonage puts it in every status of the message; it must fit 40
    characters, so a longer reference is refused here rather than by Vonage (422, code 1450)."""
    if message.reference is None:
        return client_message_id(message.key)
    if not 1 <= len(message.reference) <= CLIENT_REF_MAX:
        raise ValueError(
            f"message {message.key}: a reference must be 1 to {CLIENT_REF_MAX} characters "
            "(Vonage's client_ref)"
        )
    return message.reference


class VonageConnector(OneRecipientHttpConnector):
    """Sends WhatsApp and SMS through the Vonage Messages API v1."""

    name: ClassVar[str] = "vonage"
    retry_codes: ClassVar[frozenset[int]] = RETRY_CODES
    template_codes: ClassVar[frozenset[int]] = TEMPLATE_CODES
    credential_codes: ClassVar[frozenset[int]] = frozenset()
    stop_codes: ClassVar[Mapping[int, tuple[type[ConnectorError], str]]] = STOP_CODES
    base_url_setting: ClassVar[str] = "CDP_VONAGE_BASE_URL"
    capabilities: ClassVar[Capabilities] = Capabilities(
        channels=frozenset({"whatsapp", "sms", "viber"}),
        max_batch_size=1,  # one `to` per request
        # The spec states no rate. 30 requests/s is Vonage's documented default account
        # throughput for outbound messages; a 429 (code 1000) slows us down beyond that.
        default_rate_per_second=30.0,
        idempotency=False,  # client_ref is echoed in statuses, not used to de-duplicate
        # 1430 invalid recipient, 1050 number barred on the channel.
        unreachable_codes=frozenset({"1430", "1050"}),
    )

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str,
        whatsapp_from: str,
        sms_from: str,
        whatsapp_namespace: str = "",
        viber_from: str = "",
    ) -> None:
        require_settings(
            self.name,
            "CDP_VONAGE_",
            base_url=base_url,
            api_key=api_key,
            api_secret=api_secret,
        )
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.whatsapp_from = whatsapp_from
        self.sms_from = sms_from
        self.whatsapp_namespace = whatsapp_namespace
        self.viber_from = viber_from
        self._api_secret = api_secret
        # The Basic header (base64 of this pair) is reversible to the secret.
        self._basic_pair = f"{api_key}:{api_secret}"

    def __repr__(self) -> str:
        return (
            f"VonageConnector(base_url={self.base_url!r}, api_key={self.api_key!r}, "
            f"whatsapp_from={self.whatsapp_from!r}, sms_from={self.sms_from!r})"
        )

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/v1/messages"

    def _secrets(self) -> tuple[str, ...]:
        return (self._api_secret, self._basic_pair)

    def _endpoint(self) -> str:
        return self.messages_url

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The `/v1/messages` body for one message (see the module docstring)."""
        to = message.to.removeprefix("+")
        ref = client_reference(message)
        if message.channel == "sms":
            if message.body is None:
                raise TemplateError(
                    "vonage SMS has no provider templates: render the text and send it as the "
                    f"body (message {message.key} has none)"
                )
            return {
                "channel": "sms",
                "message_type": "text",
                "to": to,
                "from": self.sms_from,
                "text": message.body,
                "client_ref": ref,
            }
        if message.channel == "viber":
            if message.body is None:
                raise TemplateError(
                    "vonage Viber takes text: give the Viber step a `body` "
                    f"(message {message.key} has none)"
                )
            category = "promotion" if message.purpose == "marketing" else "transaction"
            return {
                "channel": "viber_service",
                "message_type": "text",
                "to": to,
                "from": self.viber_from,
                "text": message.body,
                "client_ref": ref,
                "viber_service": {"category": category},
            }
        if message.channel != "whatsapp":
            raise ValueError(f"vonage cannot send channel {message.channel!r}")
        base = {"channel": "whatsapp", "to": to, "from": self.whatsapp_from, "client_ref": ref}
        if message.body is not None:
            return {**base, "message_type": "text", "text": message.body}
        if message.template is None:
            raise ValueError(f"message {message.key} has neither a template nor a body")
        name = message.template.name
        if self.whatsapp_namespace:
            name = f"{self.whatsapp_namespace}:{name}"
        return {
            **base,
            "message_type": "template",
            "template": {"name": name, "parameters": list(message.template.parameters)},
            # Vonage wants BCP 47 (en-GB) and maps it to WhatsApp's en_GB itself.
            "whatsapp": {
                "policy": "deterministic",
                "locale": message.template.language.replace("_", "-"),
            },
        }

    async def _request(self, client: httpx.AsyncClient, message: OutboundMessage) -> httpx.Response:
        return await client.post(
            self.endpoint_url,
            json=self.build_payload(message),
            auth=(self.api_key, self._api_secret),
            headers={"Accept": "application/json"},
        )

    def classify(self, message: OutboundMessage, response: httpx.Response) -> SendResult:
        """As the shared rules, plus 402 (low balance), which stops the activation."""
        if response.status_code == 402:
            _, text = self._error(json_or_none(response), response)
            raise ConnectorError(
                f"Vonage refused the send: account balance too low (HTTP 402): "
                f"{self.safe(text, message.to)}. Top up the account before resuming."
            )
        return super().classify(message, response)

    def _accepted_id(self, data: Any) -> str | None:
        uuid_ = data.get("message_uuid") if isinstance(data, dict) else None
        return uuid_ if isinstance(uuid_, str) and uuid_ else None

    def _error(self, data: Any, response: httpx.Response) -> tuple[int | None, str]:
        """(x-errors code from the `type` URL, "title: detail") of a problem+json body."""
        if not isinstance(data, dict):
            return None, response.text
        match = _CODE_IN_TYPE.search(str(data.get("type", "")))
        title = str(data.get("title", ""))
        detail = str(data.get("detail", "") or data.get("details", ""))
        text = f"{title}: {detail}" if detail else title
        return (int(match.group(1)) if match else None), text

    def _credentials_error(self, status: int, code: int | None, detail: str) -> CredentialsError:
        return CredentialsError(
            f"Vonage refused the credentials for API key {self.api_key} (HTTP {status}): "
            f"{detail}. Check CDP_VONAGE_API_KEY and CDP_VONAGE_API_SECRET."
        )

    def _template_error(
        self, message: OutboundMessage, code: int | None, detail: str
    ) -> TemplateError:
        template = message.template
        which = f"{template.name}/{template.language}" if template else "(none)"
        return TemplateError(
            f"Vonage rejected template {which} (code {code}): {detail}. Check the template "
            "name, namespace, locale and parameter count."
        )


# --- its plugin: settings, status webhooks, contract case -------------------------------------


class VonageSettings(ConnectorSettings):
    """CDP_VONAGE_*: the account's key and secret (HTTP Basic), the senders, and the
    signature secret its status webhooks' JWTs are signed with."""

    base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/vonage"  # real: https://api.nexmo.com
    api_key: str = SANDBOX_VONAGE_API_KEY  # an account id, not a secret
    api_secret: SecretStr | None = credential(SANDBOX_VONAGE_API_SECRET)
    whatsapp_from: str = "447700900001"
    sms_from: str = "447700900002"
    viber_from: str = "cdpdemo"  # the Viber Business Messages service id
    whatsapp_namespace: str = ""  # "<namespace>:" is prefixed to template names when set
    signature_secret: SecretStr | None = credential(SANDBOX_VONAGE_SIGNATURE_SECRET, receiver=True)

    def build(self, credentials: Credentials) -> VonageConnector:
        return VonageConnector(
            base_url=self.base_url,
            api_key=self.api_key,
            api_secret=credentials.get("api_secret"),
            whatsapp_from=self.whatsapp_from,
            sms_from=self.sms_from,
            whatsapp_namespace=self.whatsapp_namespace,
            viber_from=self.viber_from,
        )


def _vonage_secret_forms(secret: str) -> tuple[str, ...]:
    """The secret alone, and inside the Basic pair it travels in."""
    basic = base64.b64encode(f"{SANDBOX_VONAGE_API_KEY}:{secret}".encode()).decode()
    return (secret, basic)


PLUGIN = ConnectorPlugin(
    name="vonage",
    title="Vonage Messages API",
    connector=VonageConnector,
    settings=VonageSettings,
    env_prefix="vonage",
    docs="WhatsApp, SMS and Viber through `/v1/messages`, one message per request",
    status_webhook=StatusWebhook(
        route="vonage",
        secret="signature_secret",
        verify=lambda secret, request: signatures.vonage_valid(
            secret, request.body, request.headers.get("authorization")
        ),
        parse=lambda request: status_parsers.parse_vonage(request.body, request.received),
        inbound=lambda request: status_parsers.parse_vonage_inbound(request.body, request.received),
        checked_with="signed JWT (HS256) with `payload_hash`",
    ),
    sandbox="/vonage",
    contract=ContractCase(
        message=samples.whatsapp_sms_viber,
        bad_recipient=OutboundMessage("bad", samples.BAD_NUMBER, "sms", body="hi"),
        failure_code="1430",
        credential="api_secret",
        secret_forms=_vonage_secret_forms,
    ),
)
