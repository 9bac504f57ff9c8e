"""Infobip connector: WhatsApp templates, SMS, Viber, RCS and KakaoTalk AlimTalk, many
recipients per request.

Request shapes follow Infobip's published OpenAPI (`vendor-specs/infobip/`, v3.210.0):

- WhatsApp: `POST /whatsapp/1/message/template`, schema `BulkMessage`
  `{messages: [{from, to, messageId, content: {templateName, templateData: {body:
  {placeholders}}, language}}]}`, answered 200 with `BulkMessageInfo`
  `{messages: [{to, messageId, status: {groupId, groupName, id, name, description}}]}`.
- SMS: `POST /sms/3/messages`, schema `SmsRequestEnvelope` `{messages: [{sender,
  destinations: [{to, messageId}], content: {text}}]}`, answered 200 with `SmsResponseEnvelope`
  `{bulkId, messages: [{messageId, status, destination}]}`.
- Viber: `POST /viber/2/messages`, schema `ViberRequest`, the SMS envelope with typed content
  (`{type: TEXT, text}`, at most 1,000 characters: a longer one fails that message alone,
  `invalid_text`, before the request) and `options.label` PROMOTIONAL for marketing,
  TRANSACTIONAL otherwise (Viber's rule), from the Viber sender `CDP_INFOBIP_VIBER_SENDER`;
  answered like SMS.
- RCS: `POST /messages-api/1/messages` (the Messages API, `infobip-messages-api-openapi.json`),
  schema `MessagesApiMessage` `{channel: RCS, sender, destinations: [{to, messageId}], content:
  {body: {type: TEXT, text}}, webhooks: {callbackData}}` from the RCS agent
  `CDP_INFOBIP_RCS_SENDER`, answered like SMS (`{bulkId, messages: [{messageId, status,
  destination}]}`); its delivery reports (`results[]` with `status`, `error`, `callbackData`)
  come to the same receiver route as the others'. A phone that cannot take RCS ends
  UNDELIVERABLE, which a plan's SMS fallback sends on at once, as for WhatsApp.
- KakaoTalk AlimTalk: `POST /kakao-alim/1/messages` (Infobip's Kakao Alim API; no OpenAPI
  file of it is in vendor-specs, the shape is Infobip's API reference for the endpoint)
  `{messages: [{sender: <Kakao channel sender key>, destinations: [{to, messageId}], content:
  {templateCode, text, type: TEMPLATE}, webhooks: {callbackData}}]}`: the step's
  `template_code` and its registered text filled in (`body`), from `CDP_INFOBIP_KAKAO_SENDER`;
  answered like SMS. Kakao checks the code and text against the approved template; a refusal
  naming the template stops the activation as for WhatsApp. A phone with no KakaoTalk ends
  UNDELIVERABLE, so the SMS fallback follows at once.

The endpoints take different bodies, so a batch holding several channels is split and sent as
one request per channel (WhatsApp first, then Viber, SMS and RCS). Auth is the spec's
`APIKeyHeader` scheme: `Authorization: App <api key>`.

We set each message's `messageId` to an id derived from the ledger's idempotency key, so a
delivery report and the send answer both name the ledger row. When the send carries a reference
(`OutboundMessage.reference`, "cdp-<send id>") it goes in `callbackData`, which Infobip echoes
in the delivery report: on the WhatsApp message itself, under `webhooks.callbackData` for SMS v3
and Viber v2 and the Messages API. Neither spec says Infobip
de-duplicates on `messageId` (or on `bulkId`), so the connector does NOT claim idempotency: an
answer lost after sending leaves the whole request UNKNOWN.

Classification:

- 200: per message, by `status.groupName`: PENDING (or DELIVERED) is SENT with the
  `messageId`; REJECTED / UNDELIVERABLE / EXPIRED fail that recipient with the status `name`
  (e.g. REJECTED_DESTINATION) as error code. Two rejections concern the account, not the
  recipient, and stop the activation: REJECTED_NOT_ENOUGH_CREDITS (`ConnectorError`) and
  REJECTED_SENDER (`ConnectorConfigError`). A message missing from the answer is UNKNOWN.
- 401 / 403: `CredentialsError`.
- 429: every message of the request RETRY, with Retry-After; 5xx: RETRY, but a gateway's 504
  or 524: UNKNOWN (`gateway_gave_up`).
- 400 for the whole request: the body is `requestError.serviceException` (WhatsApp) or
  `ApiError` (SMS). When its validation errors point at the template (`content.template…`,
  `content.language`) the template is wrong for everyone: `TemplateError`. Otherwise the request
  itself was refused, so every message in it is FAILED with the service exception id
  (`BAD_REQUEST`, `E400`) and the validation messages; resending the same body cannot succeed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
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
    Outcome,
    SendResult,
    TemplateError,
    TemplateInfo,
    check_batch_size,
    clip,
    gateway_gave_up,
    retry_after_seconds,
)
from cdp_activation.connectors.http import (
    client_message_id,
    gateway_unknown,
    json_or_none,
    require_settings,
    transport_failure,
)
from cdp_activation.masking import mask_phones_in, redact_secrets
from cdp_activation.plugins import (
    ConnectorPlugin,
    ConnectorSettings,
    ContractCase,
    Credentials,
    StatusWebhook,
    credential,
)
from cdp_activation.sandbox_credentials import (
    SANDBOX_INFOBIP_API_KEY,
    SANDBOX_INFOBIP_WEBHOOK_CREDENTIALS,
    SANDBOX_PORT,
)

logger = logging.getLogger(__name__)

# Fixed namespace: the same ledger key always yields the same client message id.
# Status groups of a message Infobip took (`MessageGeneralStatus`: ACCEPTED, PENDING,
# DELIVERED; the others are UNDELIVERABLE, EXPIRED and REJECTED).
SENT_GROUPS = frozenset({"ACCEPTED", "PENDING", "DELIVERED"})
# Viber's text limit (`ViberOutboundTextContent.text`, maxLength 1000). A longer one is
# refused by Infobip for the whole request (400): it is failed alone, before the request.
VIBER_MAX_TEXT = 1000
_ACCOUNT_STOPS = {"REJECTED_NOT_ENOUGH_CREDITS": ConnectorError}
_CONFIG_STOPS = {"REJECTED_SENDER": ConnectorConfigError}
# callbackData: at most 4,000 characters in every spec (Viber's text message: at least 1).
CALLBACK_DATA_MAX = 4000
_TEMPLATE_FIELDS = ("content.template", "content.language", "templatename", "placeholders")
# Infobip's template statuses in the words the policy uses: a paused template (first or second
# time) is PAUSED; a flagged one (low quality, still sendable) and a reinstated one APPROVED.
_STATUSES = {
    "FIRST_PAUSED": "PAUSED",
    "SECOND_PAUSED": "PAUSED",
    "FLAGGED": "APPROVED",
    "REINSTATED": "APPROVED",
}
_PLACEHOLDER = re.compile(r"\{\{\s*(\d+)\s*\}\}")


def _viber_texts_that_fit(
    messages: list[OutboundMessage],
) -> tuple[list[OutboundMessage], list[SendResult]]:
    """The Viber messages Infobip can take, and a FAILED result for each text too long (one
    customer's long personalised text must not fail the request's other recipients)."""
    fit, failed = [], []
    for message in messages:
        if message.body is not None and len(message.body) > VIBER_MAX_TEXT:
            failed.append(
                SendResult(
                    message.key,
                    Outcome.FAILED,
                    error_code="invalid_text",
                    error_message=f"a Viber text has at most {VIBER_MAX_TEXT} characters",
                )
            )
        else:
            fit.append(message)
    return fit, failed


class InfobipConnector:
    """Sends WhatsApp templates and SMS through Infobip, up to 100 messages per request."""

    rate_per_second: float | None = None  # set from configuration; None: the default
    name: ClassVar[str] = "infobip"
    capabilities: ClassVar[Capabilities] = Capabilities(
        channels=frozenset({"whatsapp", "sms", "viber", "rcs", "kakao"}),
        # Neither `BulkMessage.messages` nor `SmsRequestEnvelope.messages` has a maxItems. 100
        # keeps each request body in the tens of kilobytes, still saves 99% of the requests,
        # and bounds what one bad answer costs: a whole-request 400 fails, and a lost answer
        # leaves UNKNOWN, at most 100 recipients rather than thousands.
        max_batch_size=100,
        # Infobip relays WhatsApp to Meta, whose default per-number throughput is 80 msg/s; the
        # endpoint's own throttle (4,000 requests/s) is far above it. Raise per sender tier.
        default_rate_per_second=80.0,
        idempotency=False,  # the specs document no de-duplication on messageId or bulkId
        # The report's status name when undeliverable, or the network's "unknown subscriber".
        unreachable_codes=frozenset({"UNDELIVERABLE_NOT_DELIVERED", "EC_UNKNOWN_SUBSCRIBER"}),
    )

    def __init__(
        self,
        base_url: str,
        api_key: str,
        whatsapp_from: str,
        sms_sender: str,
        viber_sender: str = "",
        rcs_sender: str = "",
        kakao_sender: str = "",
    ) -> None:
        require_settings(self.name, "CDP_INFOBIP_", base_url=base_url, api_key=api_key)
        self.base_url = base_url.rstrip("/")
        self.whatsapp_from = whatsapp_from
        self.sms_sender = sms_sender
        self.viber_sender = viber_sender
        self.rcs_sender = rcs_sender
        self.kakao_sender = kakao_sender
        self._api_key = api_key

    def __repr__(self) -> str:
        return (
            f"InfobipConnector(base_url={self.base_url!r}, whatsapp_from="
            f"{self.whatsapp_from!r}, sms_sender={self.sms_sender!r})"
        )

    @property
    def whatsapp_url(self) -> str:
        return f"{self.base_url}/whatsapp/1/message/template"

    @property
    def sms_url(self) -> str:
        return f"{self.base_url}/sms/3/messages"

    @property
    def viber_url(self) -> str:
        return f"{self.base_url}/viber/2/messages"

    @property
    def messages_api_url(self) -> str:
        return f"{self.base_url}/messages-api/1/messages"

    @property
    def kakao_url(self) -> str:
        return f"{self.base_url}/kakao-alim/1/messages"

    def redact(self, text: str) -> str:
        """Replace the API key wherever it appears (headers, echoed bodies)."""
        return redact_secrets(text, [self._api_key])

    def _safe(self, text: str) -> str:
        return mask_phones_in(clip(self.redact(text)))

    # ---- request bodies ------------------------------------------------------------------

    def build_whatsapp(self, messages: Sequence[OutboundMessage]) -> dict[str, Any]:
        """`BulkMessage`: one template message per recipient."""
        items = []
        for message in messages:
            if message.template is None:
                raise TemplateError(
                    "infobip sends WhatsApp templates only (the template endpoint); message "
                    f"{message.key} has no template"
                )
            item: dict[str, Any] = {
                "from": self.whatsapp_from,
                "to": message.to.removeprefix("+"),
                "messageId": client_message_id(message.key),
                "content": {
                    "templateName": message.template.name,
                    "templateData": {"body": {"placeholders": list(message.template.parameters)}},
                    "language": message.template.language,
                },
            }
            if message.reference is not None:
                item["callbackData"] = _callback_data(message)
            items.append(item)
        return {"messages": items}

    def build_sms(self, messages: Sequence[OutboundMessage]) -> dict[str, Any]:
        """`SmsRequestEnvelope`: one message per recipient (texts differ per customer)."""
        return {"messages": [self._text_item(m, self.sms_sender, "SMS") for m in messages]}

    def build_viber(self, messages: Sequence[OutboundMessage]) -> dict[str, Any]:
        """`ViberRequest`: one TEXT message per recipient, labelled by its purpose."""
        items = []
        for message in messages:
            item = self._text_item(message, self.viber_sender, "Viber")
            item["content"]["type"] = "TEXT"
            label = "PROMOTIONAL" if message.purpose == "marketing" else "TRANSACTIONAL"
            item["options"] = {"label": label}
            items.append(item)
        return {"messages": items}

    def build_rcs(self, messages: Sequence[OutboundMessage]) -> dict[str, Any]:
        """`MessagesApiRequest`: one RCS TEXT message per recipient (the Messages API)."""
        items = []
        for message in messages:
            item = self._text_item(message, self.rcs_sender, "RCS")
            item["channel"] = "RCS"
            item["content"] = {"body": {"type": "TEXT", "text": item["content"]["text"]}}
            items.append(item)
        return {"messages": items}

    def build_kakao(self, messages: Sequence[OutboundMessage]) -> dict[str, Any]:
        """Kakao Alim: the template code and its registered text, filled in, per recipient."""
        items = []
        for message in messages:
            if message.template is None or message.body is None:
                raise TemplateError(
                    "infobip KakaoTalk sends AlimTalk templates: the step needs its "
                    f"template_code and registered text (message {message.key} lacks one)"
                )
            item = self._text_item(message, self.kakao_sender, "KakaoTalk")
            item["content"] = {
                "templateCode": message.template.name,
                "text": message.body,
                "type": "TEMPLATE",
            }
            items.append(item)
        return {"messages": items}

    def _text_item(self, message: OutboundMessage, sender: str, what: str) -> dict[str, Any]:
        if message.body is None:
            raise TemplateError(
                f"infobip {what} has no provider templates here: render the text and send it "
                f"as the body (message {message.key} has none)"
            )
        item: dict[str, Any] = {
            "sender": sender,
            "destinations": [
                {"to": message.to.removeprefix("+"), "messageId": client_message_id(message.key)}
            ],
            "content": {"text": message.body},
        }
        if message.reference is not None:
            # SMS v3, Viber v2 and the Messages API take it under the message's `webhooks`.
            item["webhooks"] = {"callbackData": _callback_data(message)}
        return item

    # ---- the WhatsApp template catalog ---------------------------------------------------

    async def fetch_templates(self, client: httpx.AsyncClient) -> list[TemplateInfo]:
        """The WhatsApp sender's templates: `GET /whatsapp/2/senders/{sender}/templates`
        (`TemplatesApiResponse`: name, language, category, status, `structure.body.text`)."""
        response = await client.get(
            f"{self.base_url}/whatsapp/2/senders/{self.whatsapp_from}/templates",
            headers={"Authorization": f"App {self._api_key}", "Accept": "application/json"},
        )
        data = json_or_none(response)
        if response.status_code in (401, 403):
            raise CredentialsError(
                f"Infobip refused the API key listing templates (HTTP {response.status_code}). "
                "Check CDP_INFOBIP_API_KEY and its whatsapp:manage scope."
            )
        templates = data.get("templates") if isinstance(data, dict) else None
        if not response.is_success or not isinstance(templates, list):
            code, text = _infobip_error(data)
            raise ConnectorError(
                f"Infobip did not list the WhatsApp templates of {self.whatsapp_from} "
                f"(HTTP {response.status_code}, {code}): {self._safe(text or response.text)}"
            )
        catalog = []
        for item in templates:
            if not isinstance(item, dict):
                continue
            body = ((item.get("structure") or {}).get("body") or {}).get("text") or ""
            numbers = [int(n) for n in _PLACEHOLDER.findall(str(body))]
            catalog.append(
                TemplateInfo(
                    name=str(item.get("name", "")),
                    language=str(item.get("language", "")),
                    category=str(item.get("category", "")).upper(),
                    status=_STATUSES.get(str(item.get("status", "")).upper(), "")
                    or str(item.get("status", "")).upper(),
                    body_parameter_count=max(numbers, default=0),
                )
            )
        return catalog

    # ---- sending -------------------------------------------------------------------------

    async def send_batch(
        self, client: httpx.AsyncClient, messages: Sequence[OutboundMessage]
    ) -> list[SendResult]:
        """Send the batch as one request per channel present in it."""
        check_batch_size(self, messages)
        by_channel: dict[str, list[OutboundMessage]] = {}
        for message in messages:
            if message.channel not in self.capabilities.channels:
                raise ConnectorConfigError(
                    f"infobip cannot send channel {message.channel!r}; it sends "
                    f"{', '.join(sorted(self.capabilities.channels))}"
                )
            by_channel.setdefault(message.channel, []).append(message)
        results: list[SendResult] = []
        if "viber" in by_channel:
            by_channel["viber"], results = _viber_texts_that_fit(by_channel["viber"])
            if not by_channel["viber"]:
                del by_channel["viber"]
        # Every request built before the first is sent: one that cannot be built (a template
        # problem) stops the batch before anything went, not after a channel was answered.
        requests = []
        for channel in sorted(by_channel, reverse=True):  # whatsapp, viber, sms, rcs, kakao
            group = by_channel[channel]
            if channel == "whatsapp":
                url, body = self.whatsapp_url, self.build_whatsapp(group)
            elif channel == "viber":
                url, body = self.viber_url, self.build_viber(group)
            elif channel == "rcs":
                url, body = self.messages_api_url, self.build_rcs(group)
            elif channel == "kakao":
                url, body = self.kakao_url, self.build_kakao(group)
            else:
                url, body = self.sms_url, self.build_sms(group)
            requests.append((url, body, group))
        for url, body, group in requests:
            try:
                results.extend(await self._post(client, url, body, group))
            except ConnectorError as err:
                # The channels' requests before this one were answered: say so, or their
                # accepted messages would be taken for unsent and sent again.
                err.after(results)
                raise
        return results

    async def _post(
        self,
        client: httpx.AsyncClient,
        url: str,
        body: dict[str, Any],
        messages: Sequence[OutboundMessage],
    ) -> list[SendResult]:
        try:
            response = await client.post(
                url,
                json=body,
                headers={"Authorization": f"App {self._api_key}", "Accept": "application/json"},
            )
        except httpx.TransportError as exc:
            return transport_failure(self.name, exc, messages, self._safe)
        return self.classify(messages, response)

    def classify(
        self, messages: Sequence[OutboundMessage], response: httpx.Response
    ) -> list[SendResult]:
        """One result per message of the request, or raise for activation-wide errors."""
        data = json_or_none(response)
        status = response.status_code
        if response.is_success:
            return self._per_message(messages, data, status, response)
        code, text = _infobip_error(data)
        detail = self._safe(text or response.text)
        if status in (401, 403):
            raise CredentialsError(
                f"Infobip refused the API key (HTTP {status}, {code}): {detail}. Check "
                "CDP_INFOBIP_API_KEY and its message:send scope."
            )
        error_code = code or f"http_{status}"
        if gateway_gave_up(status) and not self.capabilities.idempotency:
            return [gateway_unknown(m.key, status, detail) for m in messages]
        if status == 429 or status >= 500:
            retry_after = retry_after_seconds(response.headers)
            return [
                SendResult(
                    m.key,
                    Outcome.RETRY,
                    error_code=error_code,
                    error_message=detail,
                    retry_after=retry_after,
                )
                for m in messages
            ]
        if 400 <= status < 500:
            if _mentions_template(text):
                names = sorted(
                    {f"{m.template.name}/{m.template.language}" for m in messages if m.template}
                )
                raise TemplateError(
                    f"Infobip rejected template {', '.join(names) or '(none)'} ({error_code}): "
                    f"{detail}. Check the template name, language and placeholder count."
                )
            return [
                SendResult(m.key, Outcome.FAILED, error_code=error_code, error_message=detail)
                for m in messages
            ]
        raise ConnectorConfigError(
            f"unexpected HTTP {status} from {self.redact(self.base_url)}; check "
            "CDP_INFOBIP_BASE_URL"
        )

    def _per_message(
        self,
        messages: Sequence[OutboundMessage],
        data: Any,
        status: int,
        response: httpx.Response,
    ) -> list[SendResult]:
        items = data.get("messages") if isinstance(data, dict) else None
        by_id: dict[str, dict[str, Any]] = {}
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and isinstance(item.get("messageId"), str):
                by_id[item["messageId"]] = item
        results: list[SendResult] = []
        stop: ConnectorError | None = None  # an account or sender refusal among the answers
        for message in messages:
            item = by_id.get(client_message_id(message.key))
            if item is None:
                # 2xx without this message: it may exist, but we cannot tell.
                results.append(
                    SendResult(
                        message.key,
                        Outcome.UNKNOWN,
                        error_code=f"http_{status}",
                        error_message=self._safe(response.text),
                    )
                )
                continue
            reported = item.get("status")
            state: dict[str, Any] = reported if isinstance(reported, dict) else {}
            group = str(state.get("groupName", "")).upper()
            name = str(state.get("name", "")) or group or "UNKNOWN_STATUS"
            description = self._safe(str(state.get("description", "")))
            if group in SENT_GROUPS:
                results.append(
                    SendResult(message.key, Outcome.SENT, provider_message_id=item["messageId"])
                )
                continue
            if name in _ACCOUNT_STOPS:
                # Not sent, and none after it will be: the message stays due (unanswered),
                # and the others of this answer are still read, some may have gone.
                stop = stop or _ACCOUNT_STOPS[name](
                    f"Infobip refused the send for the whole account ({name}): {description}. "
                    "Top up the Infobip account balance before resuming."
                )
                continue
            if name in _CONFIG_STOPS:
                stop = stop or _CONFIG_STOPS[name](
                    f"Infobip refused the sender ({name}): {description}. Check "
                    "CDP_INFOBIP_WHATSAPP_FROM / _SMS_SENDER / _VIBER_SENDER / _RCS_SENDER / "
                    "_KAKAO_SENDER."
                )
                continue
            results.append(
                SendResult(message.key, Outcome.FAILED, error_code=name, error_message=description)
            )
        if stop is not None:
            stop.answered = tuple(results)
            raise stop
        return results


def _callback_data(message: OutboundMessage) -> str:
    """The send's reference as `callbackData`, which Infobip returns in the delivery report."""
    reference = message.reference or ""
    if not 1 <= len(reference) <= CALLBACK_DATA_MAX:
        raise ValueError(
            f"message {message.key}: a reference must be 1 to {CALLBACK_DATA_MAX} characters "
            "(Infobip's callbackData)"
        )
    return reference


def _infobip_error(data: Any) -> tuple[str | None, str]:
    """(error id, text + validation errors) of either Infobip error shape."""
    if not isinstance(data, dict):
        return None, ""
    request_error = data.get("requestError")
    if isinstance(request_error, dict):
        exception = request_error.get("serviceException") or request_error.get("policyException")
        if isinstance(exception, dict):
            text = str(exception.get("text", ""))
            errors = exception.get("validationErrors")
            if isinstance(errors, dict) and errors:
                text += " " + "; ".join(f"{field}: {why}" for field, why in errors.items())
            message_id = exception.get("messageId")
            return (str(message_id) if message_id else None), text.strip()
    if "errorCode" in data:  # ApiError (SMS v3)
        text = str(data.get("description", ""))
        violations = data.get("violations")
        if isinstance(violations, list) and violations:
            text += " " + "; ".join(
                f"{v.get('property')}: {v.get('violation')}"
                for v in violations
                if isinstance(v, dict)
            )
        return str(data["errorCode"]), text.strip()
    return None, ""


def _mentions_template(text: str) -> bool:
    lowered = text.lower()
    return any(field in lowered for field in _TEMPLATE_FIELDS)


# --- its plugin: settings, status webhooks, contract case -------------------------------------


class InfobipSettings(ConnectorSettings):
    """CDP_INFOBIP_*: the API key, the senders per channel, and the Basic credentials its
    delivery reports' notify URL carries."""

    base_url: str = (
        f"http://127.0.0.1:{SANDBOX_PORT}/infobip"  # real: https://<you>.api.infobip.com
    )
    api_key: SecretStr | None = credential(SANDBOX_INFOBIP_API_KEY)
    whatsapp_from: str = "441134960000"  # registered WhatsApp sender number
    sms_sender: str = "InfoSMS"  # alphanumeric or numeric SMS sender id
    viber_sender: str = "DemoCompany"  # the Viber Business Messages sender
    rcs_sender: str = "DemoCompanyRCS"  # the RCS agent (Messages API `sender`)
    kakao_sender: str = "demo-kakao-sender-key"  # the Kakao channel's sender (profile) key
    # "user:password" in the notify URL of delivery reports (Infobip signs nothing else).
    webhook_credentials: SecretStr | None = credential(
        SANDBOX_INFOBIP_WEBHOOK_CREDENTIALS, receiver=True
    )

    def build(self, credentials: Credentials) -> InfobipConnector:
        return InfobipConnector(
            base_url=self.base_url,
            api_key=credentials.get("api_key"),
            whatsapp_from=self.whatsapp_from,
            sms_sender=self.sms_sender,
            viber_sender=self.viber_sender,
            rcs_sender=self.rcs_sender,
            kakao_sender=self.kakao_sender,
        )


PLUGIN = ConnectorPlugin(
    name="infobip",
    title="Infobip",
    connector=InfobipConnector,
    settings=InfobipSettings,
    env_prefix="infobip",
    docs="WhatsApp templates, SMS (`/sms/3/messages`), Viber, RCS (the Messages API) and "
    "KakaoTalk AlimTalk, many messages per request",
    status_webhook=StatusWebhook(
        route="infobip",
        secret="webhook_credentials",
        verify=lambda secret, request: signatures.basic_valid(
            secret, request.headers.get("authorization")
        ),
        parse=lambda request: status_parsers.parse_infobip(request.body, request.received),
        inbound=lambda request: status_parsers.parse_infobip_inbound(
            request.body, request.received
        ),
        checked_with="HTTP Basic credentials in the notify URL",
    ),
    sandbox="/infobip",
    contract=ContractCase(
        message=samples.infobip_channels,
        bad_recipient=OutboundMessage(
            "bad", samples.BAD_NUMBER, "whatsapp", template=samples.whatsapp(0).template
        ),
        failure_code="REJECTED_DESTINATION",
        credential="api_key",
    ),
)
