"""Twilio Programmable Messaging connector (SMS and WhatsApp): one form-encoded request a message.

Request shape from the official spec (`twilio/twilio-oai`, twilio_api_v2010.json):
`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, `application/x-www-form-urlencoded`,
HTTP Basic auth AccountSid:AuthToken, 201 with a Message resource. The Messages endpoint has no
idempotency parameter, so a request whose answer is lost ends UNKNOWN, never resent blindly.
When `CDP_TWILIO_STATUS_CALLBACK_URL` (the public URL of our `/webhooks/twilio`) is set, a send
carrying a reference ("cdp-<send id>") asks for its statuses at that URL plus `?ref=cdp-<id>`
(`StatusCallback`), so a status report names the ledger row even when the answer was lost.

WhatsApp goes through the same resource with both addresses prefixed `whatsapp:` (`To` =
`whatsapp:+E164`, `From` = `whatsapp:` + the WhatsApp sender, `CDP_TWILIO_WHATSAPP_FROM`, or
a Messaging Service holding it); a template is a Content template (`ContentSid` +
`ContentVariables`), a free-form `Body` is a session message, which Twilio refuses outside the
24-hour window with 63016.

Error classification follows Twilio's error dictionary: 429 / 20429 / 5xx retry
(a gateway's 504 or 524: UNKNOWN, `gateway_gave_up`); 63027 (template
not found for the content) stops the activation; 20003 / 401 stops it on credentials; other 4xx
(21211 invalid To, 21610 opted out, 21614 not mobile, 21408 region disabled, 63016 outside the
WhatsApp window, 63003 not a WhatsApp number, …) fail that recipient only.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from pydantic import SecretStr

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
from cdp_activation.contracts import Pricing, StatusEvent
from cdp_activation.plugins import (
    ConnectorPlugin,
    ConnectorSettings,
    ContractCase,
    Credentials,
    StatusWebhook,
    WebhookRequest,
    credential,
    setting,
)
from cdp_activation.sandbox_credentials import (
    SANDBOX_PORT,
    SANDBOX_TWILIO_ACCOUNT_SID,
    SANDBOX_TWILIO_AUTH_TOKEN,
)

# Not sent, try later: too many requests (20429), the sender's queue of messages full
# (21611), its message rate exceeded (14107). As final failures, a long send's backlog
# behind a slow sender would fail every customer left.
RETRY_CODES = frozenset({20429, 21611, 14107})
TEMPLATE_CODES = frozenset({63027})
CREDENTIAL_CODES = frozenset({20003})
_SENDER = "Check CDP_TWILIO_FROM (SMS) and CDP_TWILIO_WHATSAPP_FROM (WhatsApp)."
# The sender refused as a whole (an invalid From number, no WhatsApp sender there): every
# recipient would be refused alike. Not 21606 or 21659, which depend on the destination too
# (a short code's own country): those fail that recipient only.
STOP_CODES: dict[int, tuple[type[ConnectorError], str]] = {
    21212: (ConnectorConfigError, _SENDER),
    63007: (ConnectorConfigError, _SENDER),
}
_CONTENT_SID = re.compile(r"^HX[0-9a-fA-F]{32}$")
_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")


class TwilioConnector(OneRecipientHttpConnector):
    """Sends SMS and WhatsApp through Twilio's Messages resource (API version 2010-04-01)."""

    name: ClassVar[str] = "twilio"
    retry_codes: ClassVar[frozenset[int]] = RETRY_CODES
    template_codes: ClassVar[frozenset[int]] = TEMPLATE_CODES
    credential_codes: ClassVar[frozenset[int]] = CREDENTIAL_CODES
    stop_codes: ClassVar[Mapping[int, tuple[type[ConnectorError], str]]] = STOP_CODES
    base_url_setting: ClassVar[str] = "CDP_TWILIO_BASE_URL"
    capabilities: ClassVar[Capabilities] = Capabilities(
        channels=frozenset({"sms", "whatsapp"}),
        max_batch_size=1,  # one To per Message resource
        # Twilio's API accepts requests far faster than a sender transmits and queues the rest
        # per sender (1 segment/s on a US long code, ~100/s on a short code, up to 4 hours of
        # backlog before error 30001). 100 req/s matches short-code throughput and stays under
        # an account's default API concurrency; lower it for long-code senders so messages are
        # not left queueing (and expiring) at Twilio.
        default_rate_per_second=100.0,
        idempotency=False,  # no IdempotencyKey on Messages: a lost answer means UNKNOWN
        # WhatsApp 63003 (To is not on the channel), 63024 (invalid recipient); SMS 30003
        # (unreachable handset), 30005 (unknown handset), 30006 (landline or unreachable
        # carrier).
        unreachable_codes=frozenset({"63003", "63024", "30003", "30005", "30006"}),
        opt_out_codes=(("21610", "all"),),
    )

    def __init__(
        self,
        base_url: str,
        account_sid: str,
        auth_token: str,
        from_number: str,
        content_base_url: str | None = None,
        whatsapp_from: str | None = None,
        status_callback_url: str | None = None,
    ) -> None:
        require_settings(
            self.name,
            "CDP_TWILIO_",
            base_url=base_url,
            account_sid=account_sid,
            auth_token=auth_token,
            from_number=from_number,
        )
        self.base_url = base_url.rstrip("/")
        # The Content API lives on its own host (content.twilio.com); the sandbox serves both.
        self.content_base_url = (content_base_url or base_url).rstrip("/")
        self.account_sid = account_sid
        self.from_number = from_number
        # The WhatsApp sender (a number, or a Messaging Service SID); None: `from_number`.
        self.whatsapp_from = whatsapp_from or from_number
        # The public URL of our Twilio status webhook (`…/webhooks/twilio`); None: no
        # StatusCallback is sent (the Messaging Service's or account's own callback applies).
        self.status_callback_url = _checked_callback_base(status_callback_url or None)
        self._auth_token = auth_token

    def __repr__(self) -> str:
        return (
            f"TwilioConnector(base_url={self.base_url!r}, account_sid={self.account_sid!r}, "
            f"from_number={self.from_number!r})"
        )

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/2010-04-01/Accounts/{self.account_sid}/Messages.json"

    @property
    def content_url(self) -> str:
        return f"{self.content_base_url}/v1/ContentAndApprovals"

    async def fetch_templates(
        self, client: httpx.AsyncClient, page_size: int = 100
    ) -> list[TemplateInfo]:
        """Every Content template with its WhatsApp approval (`GET /v1/ContentAndApprovals`),
        following `meta.next_page_url`'s page token against our own Content base URL.

        A template is named by its Content SID (`HX…`), the name a plan's step sends; its
        WhatsApp approval gives the status and category, its `variables` the parameters.
        """
        params: dict[str, str | int] = {"PageSize": page_size}
        templates: list[TemplateInfo] = []
        while True:
            response = await client.get(
                self.content_url,
                params=params,
                auth=(self.account_sid, self._auth_token),
                headers={"Accept": "application/json"},
            )
            data = json_or_none(response)
            if not response.is_success:
                code, detail = self._error(data, response)
                detail = self.safe(detail, "")
                if code in CREDENTIAL_CODES or response.status_code in (401, 403):
                    raise self._credentials_error(response.status_code, code, detail)
                raise ConnectorError(
                    f"Twilio's Content API answered HTTP {response.status_code} (code {code}) "
                    f"listing templates: {detail}"
                )
            contents = data.get("contents") if isinstance(data, dict) else None
            templates.extend(_content_info(c) for c in contents or [] if isinstance(c, dict))
            next_url = ((data.get("meta") or {}) if isinstance(data, dict) else {}).get(
                "next_page_url"
            )
            token = parse_qs(urlsplit(str(next_url)).query).get("PageToken") if next_url else None
            if not token:
                return templates
            params = {"PageSize": page_size, "PageToken": token[0]}

    async def fetch_prices(
        self, client: httpx.AsyncClient, message_ids: Sequence[str], concurrency: int = 8
    ) -> dict[str, Pricing]:
        """What Twilio charged each message (`GET …/Messages/{Sid}.json`: `price`, negative,
        and `price_unit`), for those it has priced; its status callbacks carry no price. A
        message it does not know (404) or has not priced yet is left out; a 429 or a server
        error stops early with what was read (the next reconcile asks again)."""
        found: dict[str, Pricing] = {}
        stop = asyncio.Event()
        limit = asyncio.Semaphore(concurrency)

        async def one(sid: str) -> None:
            if stop.is_set():
                return
            async with limit:
                if stop.is_set():
                    return
                response = await client.get(
                    f"{self.base_url}/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
                    auth=(self.account_sid, self._auth_token),
                    headers={"Accept": "application/json"},
                )
            data = json_or_none(response)
            if response.status_code in (401, 403):
                code, detail = self._error(data, response)
                raise self._credentials_error(response.status_code, code, self.safe(detail, ""))
            if response.status_code == 429 or response.status_code >= 500:
                stop.set()
                return
            if response.is_success and isinstance(data, dict):
                pricing = Pricing.of(price=data.get("price"), currency=data.get("price_unit"))
                if pricing is not None:
                    found[sid] = pricing

        await asyncio.gather(*(one(sid) for sid in message_ids))
        return found

    def _secrets(self) -> tuple[str, ...]:
        # The Basic header (AccountSid:AuthToken, base64) is reversible to the token.
        return (self._auth_token, f"{self.account_sid}:{self._auth_token}")

    def _endpoint(self) -> str:
        return self.messages_url

    def build_form(self, message: OutboundMessage) -> dict[str, str]:
        """Form fields of `CreateMessageRequest`: a Body, or ContentSid + ContentVariables.

        A template means a Twilio Content template: its name must be the Content SID (`HX…`)
        and the positional parameters become ContentVariables {"1": …, "2": …}. On WhatsApp
        both addresses carry the `whatsapp:` prefix.
        """
        whatsapp = message.channel == "whatsapp"
        sender = self.whatsapp_from if whatsapp else self.from_number
        prefix = "whatsapp:" if whatsapp else ""
        form: dict[str, str] = {"To": prefix + message.to}
        if _SERVICE_SID.match(sender):
            form["MessagingServiceSid"] = sender
        else:
            form["From"] = prefix + sender.removeprefix("whatsapp:")
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
        if message.reference is not None and self.status_callback_url:
            form["StatusCallback"] = status_callback(self.status_callback_url, message.reference)
        return form

    async def _request(self, client: httpx.AsyncClient, message: OutboundMessage) -> httpx.Response:
        return await client.post(
            self.endpoint_url,
            data=self.build_form(message),
            auth=(self.account_sid, self._auth_token),
            headers={"Accept": "application/json"},
        )

    def _accepted_id(self, data: Any) -> str | None:
        sid = data.get("sid") if isinstance(data, dict) else None
        return sid if isinstance(sid, str) and sid else None

    def _error(self, data: Any, response: httpx.Response) -> tuple[int | None, str]:
        if not isinstance(data, dict):
            return None, response.text
        code = data.get("code")
        return (code if isinstance(code, int) else None), str(data.get("message", ""))

    def _credentials_error(self, status: int, code: int | None, detail: str) -> CredentialsError:
        return CredentialsError(
            f"Twilio refused the credentials for account {self.account_sid} (HTTP {status}, "
            f"code {code}): {detail}. Check CDP_TWILIO_ACCOUNT_SID and CDP_TWILIO_AUTH_TOKEN."
        )

    def _template_error(
        self, message: OutboundMessage, code: int | None, detail: str
    ) -> TemplateError:
        return TemplateError(f"Twilio rejected the content template (code {code}): {detail}")


def status_callback(base_url: str, reference: str) -> str:
    """The StatusCallback URL of one send: `base_url` with `ref=<reference>` added to its query
    (percent-encoded; an existing query is kept as it is). Twilio posts every status of the
    message to exactly this URL and signs it, query string included."""
    parts = urlsplit(base_url)
    ref = urlencode({"ref": reference})
    query = f"{parts.query}&{ref}" if parts.query else ref
    return urlunsplit(parts._replace(query=query))


def _checked_callback_base(url: str | None) -> str | None:
    """Refuse a status-callback base Twilio would reject or we could not read back."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or "_" in parts.hostname:
        raise ConnectorConfigError(
            f"CDP_TWILIO_STATUS_CALLBACK_URL must be an http(s) URL with a valid host name "
            f"(Twilio refuses underscores), got {url!r}"
        )
    if parts.fragment or "ref" in parse_qs(parts.query):
        raise ConnectorConfigError(
            "CDP_TWILIO_STATUS_CALLBACK_URL must not carry a fragment or its own `ref` "
            f"parameter (each send's reference is added as ref=…), got {url!r}"
        )
    return url


def _content_info(content: dict[str, Any]) -> TemplateInfo:
    """One `ContentAndApprovals` entry as a `TemplateInfo`.

    The WhatsApp approval sits in `approval_requests` (flat, or under a `whatsapp` key as in
    the fetch-approval resource); without one the template is not approved for WhatsApp.
    """
    approvals = content.get("approval_requests") or {}
    whatsapp = approvals.get("whatsapp", approvals) if isinstance(approvals, dict) else {}
    variables = content.get("variables") or {}
    names = tuple(sorted(variables, key=_parameter_order)) if isinstance(variables, dict) else ()
    return TemplateInfo(
        name=str(content.get("sid", "")),
        language=str(content.get("language", "")),
        category=str(whatsapp.get("category") or "").upper(),
        status=str(whatsapp.get("status") or "unsubmitted").upper(),
        body_parameter_count=len(names),
        parameter_names=names,
        extra={"friendly_name": str(content.get("friendly_name") or "")},
    )


def _parameter_order(name: str) -> tuple[int, str]:
    """Numbered variables in numeric order ("2" before "10"), named ones after, by name."""
    return (int(name), "") if name.isdigit() else (1 << 30, name)


# --- its plugin: settings, status webhooks, contract case -------------------------------------


class TwilioSettings(ConnectorSettings):
    """CDP_TWILIO_*: the account, its auth token (which also signs status callbacks), the
    senders, and where Twilio posts status callbacks."""

    base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/twilio"  # real: https://api.twilio.com
    # Content API (templates and their WhatsApp approvals). Real: https://content.twilio.com
    content_base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/twilio"
    account_sid: str = SANDBOX_TWILIO_ACCOUNT_SID
    auth_token: SecretStr | None = credential(SANDBOX_TWILIO_AUTH_TOKEN)
    from_number: str = setting("+15005550006", env="CDP_TWILIO_FROM", doc="the SMS sender")
    # The WhatsApp sender: a WhatsApp-enabled number or a Messaging Service SID (MG…).
    whatsapp_from: str = "+14155238886"
    # The public URL of our Twilio status webhook, e.g. https://hooks.example.com/webhooks/twilio:
    # each message's StatusCallback is this plus ?ref=cdp-<send id>; empty: none sent.
    status_callback_url: str = ""

    def build(self, credentials: Credentials) -> TwilioConnector:
        return TwilioConnector(
            base_url=self.base_url,
            account_sid=self.account_sid,
            auth_token=credentials.get("auth_token"),
            from_number=self.from_number,
            content_base_url=self.content_base_url,
            whatsapp_from=self.whatsapp_from,
            status_callback_url=self.status_callback_url,
        )


def _form(request: WebhookRequest) -> list[tuple[str, str]]:
    try:
        return parse_qsl(request.body.decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        return []


def _twilio_signed(secret: str, request: WebhookRequest) -> bool:
    """Twilio signs the full URL it called (the StatusCallback, query string included) and
    the form's parameters."""
    header = request.headers.get("x-twilio-signature")
    return signatures.twilio_valid(secret, request.url, _form(request), header)


def _twilio_statuses(request: WebhookRequest) -> list[StatusEvent]:
    # The StatusCallback URL we gave Twilio carries the send's `ref`.
    return status_parsers.parse_twilio(dict(_form(request)), request.received, request.query)


PLUGIN = ConnectorPlugin(
    name="twilio",
    title="Twilio Programmable Messaging",
    connector=TwilioConnector,
    settings=TwilioSettings,
    env_prefix="twilio",
    docs="SMS and WhatsApp (Content API templates) through `Accounts/{sid}/Messages.json`",
    status_webhook=StatusWebhook(
        route="twilio",
        secret="auth_token",
        verify=_twilio_signed,
        parse=_twilio_statuses,
        inbound=lambda request: status_parsers.parse_twilio_inbound(
            dict(_form(request)), request.received
        ),
        checked_with="`X-Twilio-Signature` (HMAC-SHA1 of the URL and the sorted form)",
    ),
    sandbox="/twilio",
    contract=ContractCase(
        message=samples.sms,
        bad_recipient=OutboundMessage("bad", samples.BAD_NUMBER, "sms", body="hi"),
        failure_code="21211",
        credential="auth_token",
    ),
)
