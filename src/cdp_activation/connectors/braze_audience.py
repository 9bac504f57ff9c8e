"""Braze audience handoff: the warehouse picks the customers, a Braze Canvas messages them.

A plan step with a `handoff` (`spec.HandoffSpec`) does not message anyone from here: each
customer the policy cleared for the step's channel (consent, suppression, opt-outs, caps, quiet
hours) is written to their Braze profile with `POST /users/track`, 75 attribute objects a
request (Braze's limit), as

    {"external_id": <customer id>, "<attribute>": "<time they joined, ISO 8601>",
     "phone": "<the E.164 number the policy checked>", "<property>": <value>, …,
     "subscription_groups": [{"subscription_group_id": <group>, "subscription_state":
     "subscribed"}],            # only when the handoff names a group
     "_update_existing_only": true}

and a Canvas whose entry is "custom attribute `<attribute>` changed" (or a segment on it)
sends. The ledger keeps one row per customer, partition and step as for a message, so a
customer is pushed once per partition, and a push whose answer was lost is simply pushed again:
`/users/track` sets values, and the value (the decision's time, planned once into the row) is
the same on every retry, so a retry changes nothing in Braze. Hence `idempotency=True`.

Classification: 201/200 `"message": "success"` is SENT for every object, except those its
`errors` list names by `index` (Braze's non-fatal errors: a malformed phone, a blocked
external id), which fail with `braze_attributes_rejected`; a customer with no id or no E.164
number fails `invalid_recipient` before any request; 401/403 stop the activation
(credentials: the key needs the `users.track` permission); 429 and 5xx are RETRY (wait from
`Retry-After`, else `X-RateLimit-Reset`); a transport failure is RETRY before the request left
and UNKNOWN after, which the engine pushes again (the push is idempotent); any other 4xx fails
the batch with `braze_request_rejected`.

Request shape from Braze's REST API (`../shared/vendor-specs/braze/braze-user-data-api-
openapi.yml`, `/users/track`); the `subscription_groups` object of a user attributes object is
from Braze's user attributes object documentation.
"""

from __future__ import annotations

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
    retry_after_seconds,
)
from cdp_activation.connectors.braze import INVALID_RECIPIENT, BrazeRestApi, reset_in
from cdp_activation.connectors.http import json_or_none, transport_failure
from cdp_activation.plugins import (
    ConnectorPlugin,
    ConnectorSettings,
    ContractCase,
    Credentials,
    credential,
    setting,
)
from cdp_activation.sandbox_credentials import SANDBOX_BRAZE_API_KEY, SANDBOX_PORT
from cdp_activation.spec import HandoffSpec

ATTRIBUTES_PER_REQUEST = 75  # /users/track: "up to 75 … attribute updates" a request
REQUESTS_PER_MINUTE = 50_000  # its base speed limit
REJECTED = "braze_attributes_rejected"  # Braze named this object in its non-fatal `errors`
REQUEST_REJECTED = "braze_request_rejected"  # a 4xx other than credentials or throttling


class BrazeAudienceConnector(BrazeRestApi):
    """Writes handed-off customers to Braze profiles, 75 a request."""

    name: ClassVar[str] = "braze_audience"
    capabilities: ClassVar[Capabilities] = Capabilities(
        # The channel a Braze Canvas sends on; the policy checks consent for it.
        channels=frozenset({"whatsapp", "sms", "rcs", "line"}),
        max_batch_size=ATTRIBUTES_PER_REQUEST,
        default_rate_per_second=REQUESTS_PER_MINUTE * ATTRIBUTES_PER_REQUEST / 60,
        idempotency=True,  # setting the same values again changes nothing
        platform_owns_templates=True,  # the Canvas and its messages live in Braze
        handoff=True,
    )
    env_prefix: ClassVar[str] = "CDP_BRAZE_AUDIENCE_"

    def __init__(self, base_url: str, api_key: str, update_existing_only: bool = True) -> None:
        super().__init__(base_url, api_key)
        self.update_existing_only = update_existing_only
        self._track_url = httpx.URL(f"{self.base_url}/users/track")

    def _headers(self) -> dict[str, str]:
        # X-Braze-Bulk: Braze routes batch backfills apart from live traffic.
        return {**super()._headers(), "X-Braze-Bulk": "true"}

    def attributes(self, message: OutboundMessage) -> dict[str, Any]:
        """The user attributes object of one handed-off customer."""
        template = message.template
        handoff = HandoffSpec.from_message_name(template.name) if template else None
        if template is None or handoff is None:
            raise TemplateError(
                "braze_audience takes handoffs: give the plan step a `handoff` (attribute, "
                "subscription_group, properties), not a template or body"
            )
        item: dict[str, Any] = {"external_id": message.customer_id}
        item.update(zip(template.parameter_names, template.parameters, strict=False))
        item[handoff.attribute] = template.language  # the decision's time, planned once
        item["phone"] = message.to
        if handoff.subscription_group:
            item["subscription_groups"] = [
                {
                    "subscription_group_id": handoff.subscription_group,
                    "subscription_state": "subscribed",
                }
            ]
        # Never create a Braze user from the warehouse unless told to.
        item["_update_existing_only"] = self.update_existing_only
        return item

    async def send_batch(
        self, client: httpx.AsyncClient, messages: Sequence[OutboundMessage]
    ) -> list[SendResult]:
        check_batch_size(self, messages)
        sendable, results = self.addressable(messages)
        if not sendable:
            return results
        payload = {"attributes": [self.attributes(m) for m in sendable]}
        try:
            response = await client.post(self._track_url, json=payload, headers=self._headers())
        except httpx.TransportError as exc:
            # UNKNOWN when it may have arrived: the engine pushes it again (idempotency=True).
            return results + transport_failure(self.name, exc, sendable, self._safe)
        return results + self.classify(sendable, response)

    def classify(
        self, messages: Sequence[OutboundMessage], response: httpx.Response
    ) -> list[SendResult]:
        status = response.status_code
        data = json_or_none(response)
        body = data if isinstance(data, dict) else {}
        detail = self._safe(str(body.get("message") or "") or response.text)
        if response.is_success and body.get("message") == "success":
            refused = _refused_indexes(body.get("errors"))
            return [
                SendResult(m.key, Outcome.FAILED, error_code=REJECTED, error_message=refused[i])
                if i in refused
                # The profile written is the "message" Braze now holds.
                else SendResult(m.key, Outcome.SENT, provider_message_id=m.customer_id)
                for i, m in enumerate(messages)
            ]
        if status in (401, 403):
            raise CredentialsError(
                f"Braze refused the REST API key (HTTP {status}): {detail}. Check "
                "CDP_BRAZE_AUDIENCE_API_KEY and that the key has the users.track permission."
            )
        if status == 429 or status >= 500 or response.is_success:
            # A 2xx without "success" is not an acceptance we can trust: push again.
            wait = retry_after_seconds(response.headers)
            if wait is None and status == 429:
                wait = reset_in(response.headers)
            return [
                SendResult(
                    m.key,
                    Outcome.RETRY,
                    error_code=f"http_{status}",
                    error_message=detail,
                    retry_after=wait,
                )
                for m in messages
            ]
        return [
            SendResult(
                m.key,
                Outcome.FAILED,
                error_code=REQUEST_REJECTED,
                error_message=f"HTTP {status}: {detail}",
            )
            for m in messages
        ]


def _refused_indexes(errors: Any) -> dict[int, str]:
    """Braze's non-fatal `errors` that name an attributes object: index -> its `type`."""
    refused: dict[int, str] = {}
    for error in errors if isinstance(errors, list) else ():
        if not isinstance(error, dict) or error.get("input_array", "attributes") != "attributes":
            continue
        index = error.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            refused[index] = clip(str(error.get("type") or "refused by Braze"))
    return refused


# --- its plugin: settings, contract case ------------------------------------------------------


class BrazeAudienceSettings(ConnectorSettings):
    """CDP_BRAZE_AUDIENCE_*: the instance's REST endpoint and a key with users.track."""

    # Real: your instance's REST endpoint, e.g. https://rest.fra-01.braze.eu
    base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/braze"
    api_key: SecretStr | None = credential(SANDBOX_BRAZE_API_KEY)
    update_existing_only: bool = setting(
        True,
        doc="Only update Braze users that exist (false: create a profile for a "
        "customer Braze does not know yet).",
    )

    def build(self, credentials: Credentials) -> BrazeAudienceConnector:
        return BrazeAudienceConnector(
            base_url=self.base_url,
            api_key=credentials.get("api_key"),
            update_existing_only=self.update_existing_only,
        )


PLUGIN = ConnectorPlugin(
    name="braze_audience",
    title="Braze (audience handoff)",
    connector=BrazeAudienceConnector,
    settings=BrazeAudienceSettings,
    env_prefix="braze_audience",
    docs="Hands customers to a Braze Canvas: attributes and subscription state through "
    "`/users/track`, 75 a request; Braze sends",
    sandbox="/braze",
    contract=ContractCase(
        message=samples.braze_handoff,
        bad_recipient=OutboundMessage(
            "bad",
            samples.BAD_NUMBER,
            "whatsapp",
            template=samples.braze_handoff(0).template,
            customer_id="x",
        ),
        failure_code=INVALID_RECIPIENT,
        credential="api_key",
    ),
)
