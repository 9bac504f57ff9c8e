"""Braze connector: API-triggered campaigns and Canvases, up to 50 recipients a request.

Braze is a customer engagement platform: it holds the channel credentials and the message
content (an API-triggered campaign), and addresses its own users by `external_user_id`. So a
plan's step names the campaign as its template (`template.name` = the campaign id), and each
recipient goes as `{external_user_id: customer_id, trigger_properties: {column: value}}`,
with the number the policy validated set on the profile (`attributes.phone`), since that is
the number consent and suppression were checked for. A template named `canvas:<canvas id>`
enters the users into an API-triggered Canvas instead (`POST /canvas/trigger/send`, the same
recipients with `canvas_entry_properties`).

Request shape from Braze's REST API (`../shared/vendor-specs/braze/`, Postman conversion):
`POST /campaigns/trigger/send` with `Authorization: Bearer <REST API key>` and
`{campaign_id, recipients: [..50]}` (each with `send_to_existing_only`); 201
`{dispatch_id, message}`: one dispatch id for the whole batch (Braze's own dispatch model),
which each recipient's ledger row keeps. The endpoint has no idempotency key (`send_id` only
groups analytics), so a lost answer is UNKNOWN.

Classification: 201 is SENT for every recipient; a recipient we cannot address (no customer id,
no E.164 number) is FAILED before any request; 401/403 stop the activation (credentials);
400/404 naming the campaign stop it (template: the campaign is missing or not API-triggered);
any other 400 fails the batch; 429 and 5xx are RETRY, with the wait from `Retry-After` or
`X-RateLimit-Reset` (epoch seconds), but a gateway's 504 or 524 is UNKNOWN (`gateway_gave_up`).
Handing an audience to a Canvas instead (`/users/track`) is the `braze_audience` connector's
job (`braze_audience.py`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from cdp_activation.connectors import samples
from cdp_activation.connectors.base import (
    Capabilities,
    CredentialsError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateError,
    check_batch_size,
    clip,
    gateway_gave_up,
    retry_after_seconds,
)
from cdp_activation.connectors.http import (
    gateway_unknown,
    json_or_none,
    require_settings,
    transport_failure,
    whole_request_results,
)
from cdp_activation.masking import mask_phones_in, redact_secrets
from cdp_activation.plugins import (
    ConnectorPlugin,
    ConnectorSettings,
    ContractCase,
    Credentials,
    credential,
)
from cdp_activation.sandbox_credentials import (
    SANDBOX_BRAZE_API_KEY,
    SANDBOX_PORT,
)

RECIPIENTS_PER_REQUEST = 50  # /campaigns/trigger/send: "up to 50 specific external_ids"
REQUESTS_PER_HOUR = 250_000  # the endpoint's default rate limit with external ids
CANVAS_PREFIX = "canvas:"  # a template named canvas:<id> enters an API-triggered Canvas
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
INVALID_RECIPIENT = "invalid_recipient"


class BrazeRestApi:
    """What every Braze REST connector shares: the instance's endpoint, the REST API key as a
    Bearer token, and keeping that key (and numbers) out of everything logged or raised."""

    name: ClassVar[str]
    env_prefix: ClassVar[str]  # e.g. "CDP_BRAZE_", named when a setting is missing
    rate_per_second: float | None = None

    def __init__(self, base_url: str, api_key: str) -> None:
        require_settings(self.name, self.env_prefix, base_url=base_url, api_key=api_key)
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def redact(self, text: str) -> str:
        return redact_secrets(text, [self._api_key])

    def _safe(self, text: str) -> str:
        return mask_phones_in(clip(self.redact(text)))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}

    @staticmethod
    def addressable(
        messages: Sequence[OutboundMessage],
    ) -> tuple[list[OutboundMessage], list[SendResult]]:
        """(the messages Braze can address, a FAILED `invalid_recipient` for each other):
        Braze needs the customer id, and the E.164 number the policy checked."""
        sendable: list[OutboundMessage] = []
        refused: list[SendResult] = []
        for message in messages:
            if message.customer_id and _E164.match(message.to):
                sendable.append(message)
            else:
                refused.append(
                    SendResult(
                        message.key,
                        Outcome.FAILED,
                        error_code=INVALID_RECIPIENT,
                        error_message="Braze needs the customer id and an E.164 number",
                    )
                )
        return sendable, refused


class BrazeConnector(BrazeRestApi):
    """Triggers a Braze API campaign for batches of up to 50 users."""

    name: ClassVar[str] = "braze"
    capabilities: ClassVar[Capabilities] = Capabilities(
        # The campaign decides the channel; these are the ones a plan may route to Braze.
        channels=frozenset({"whatsapp", "sms", "email", "push"}),
        max_batch_size=RECIPIENTS_PER_REQUEST,
        # 250,000 requests an hour of 50 recipients each, in recipients per second.
        default_rate_per_second=REQUESTS_PER_HOUR * RECIPIENTS_PER_REQUEST / 3600,
        idempotency=False,
        platform_owns_templates=True,  # the campaign and its WhatsApp template live in Braze
    )
    env_prefix: ClassVar[str] = "CDP_BRAZE_"

    def __init__(self, base_url: str, api_key: str, send_to_existing_only: bool = True) -> None:
        super().__init__(base_url, api_key)
        self.send_to_existing_only = send_to_existing_only
        self._trigger_url = httpx.URL(f"{self.base_url}/campaigns/trigger/send")
        self._canvas_url = httpx.URL(f"{self.base_url}/canvas/trigger/send")

    def recipient(self, message: OutboundMessage) -> dict[str, Any]:
        """One entry of `recipients`: the user, their trigger properties and their number."""
        template = message.template
        properties: dict[str, str] = {}
        if template is not None:
            names = template.parameter_names or tuple(
                str(i) for i in range(1, len(template.parameters) + 1)
            )
            properties = dict(zip(names, template.parameters, strict=True))
        elif message.body is not None:
            properties = {"body": message.body}
        return {
            "external_user_id": message.customer_id,
            "trigger_properties": properties,
            "attributes": {"phone": message.to},
            # Never create a Braze user from here: an unknown id is Braze's to report.
            "send_to_existing_only": self.send_to_existing_only,
        }

    def build_payload(self, messages: Sequence[OutboundMessage]) -> dict[str, Any]:
        """`{campaign_id, recipients}`, or `{canvas_id, recipients}` with each recipient's
        properties as `canvas_entry_properties` for a `canvas:<id>` template."""
        campaigns = {m.template.name for m in messages if m.template is not None}
        if len(campaigns) != 1:
            raise TemplateError(
                "braze sends API-triggered campaigns: every message of a batch needs the same "
                f"campaign id (or canvas:<canvas id>) as its template name, got "
                f"{sorted(campaigns) or 'none'}"
            )
        name = campaigns.pop()
        recipients = [self.recipient(m) for m in messages]
        canvas = name.removeprefix(CANVAS_PREFIX) if name.startswith(CANVAS_PREFIX) else None
        if canvas is None:
            return {"campaign_id": name, "recipients": recipients}
        for recipient in recipients:
            recipient["canvas_entry_properties"] = recipient.pop("trigger_properties")
        return {"canvas_id": canvas, "recipients": recipients}

    async def send_batch(
        self, client: httpx.AsyncClient, messages: Sequence[OutboundMessage]
    ) -> list[SendResult]:
        check_batch_size(self, messages)
        sendable, results = self.addressable(messages)
        if not sendable:
            return results
        payload = self.build_payload(sendable)
        url = self._canvas_url if "canvas_id" in payload else self._trigger_url
        try:
            response = await client.post(url, json=payload, headers=self._headers())
        except httpx.TransportError as exc:
            return results + transport_failure(self.name, exc, sendable, self._safe)
        return results + self.classify(sendable, response)

    def classify(
        self, messages: Sequence[OutboundMessage], response: httpx.Response
    ) -> list[SendResult]:
        status = response.status_code
        data = json_or_none(response)
        detail = self._safe(str(data.get("message", "")) if isinstance(data, dict) else "")
        detail = detail or self._safe(response.text)
        if response.is_success:
            dispatch = data.get("dispatch_id") if isinstance(data, dict) else None
            return whole_request_results(
                messages,
                response,
                accepted=True,
                provider_message_id=dispatch if isinstance(dispatch, str) else None,
                detail=detail,
            )
        if status in (401, 403):
            raise CredentialsError(
                f"Braze refused the REST API key (HTTP {status}): {detail}. Check "
                "CDP_BRAZE_API_KEY and that the key has the campaigns.trigger.send permission."
            )
        if status in (400, 404) and ("campaign" in detail.lower() or "canvas" in detail.lower()):
            raise TemplateError(f"Braze refused the campaign (HTTP {status}): {detail}")
        if gateway_gave_up(status) and not self.capabilities.idempotency:
            return [gateway_unknown(m.key, status, detail) for m in messages]
        wait = retry_after_seconds(response.headers)
        if wait is None and status == 429:
            wait = reset_in(response.headers)
        return whole_request_results(
            messages,
            response,
            accepted=False,
            provider_message_id=None,
            detail=detail,
            retry_after=wait,
        )


def reset_in(headers: httpx.Headers) -> float | None:
    """Seconds until `X-RateLimit-Reset` (an epoch time), Braze's own throttling hint."""
    value = headers.get("x-ratelimit-reset")
    try:
        return max(float(value) - time.time(), 0.0) if value else None
    except ValueError:
        return None


# --- its plugin: settings, contract case ------------------------------------------------------


class BrazeSettings(ConnectorSettings):
    """CDP_BRAZE_*: the instance's REST endpoint and a REST API key."""

    # Real: your instance's REST endpoint, e.g. https://rest.fra-01.braze.eu
    base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/braze"
    api_key: SecretStr | None = credential(SANDBOX_BRAZE_API_KEY)

    def build(self, credentials: Credentials) -> BrazeConnector:
        return BrazeConnector(base_url=self.base_url, api_key=credentials.get("api_key"))


PLUGIN = ConnectorPlugin(
    name="braze",
    title="Braze",
    connector=BrazeConnector,
    settings=BrazeSettings,
    env_prefix="braze",
    docs="API-triggered campaigns and Canvases (`/campaigns/trigger/send`), 50 a request",
    sandbox="/braze",
    contract=ContractCase(
        message=samples.braze,
        bad_recipient=OutboundMessage(
            "bad",
            samples.BAD_NUMBER,
            "whatsapp",
            template=samples.braze(0).template,
            customer_id="x",
        ),
        failure_code=INVALID_RECIPIENT,
        credential="api_key",
    ),
)
