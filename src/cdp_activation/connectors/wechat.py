"""WeChat Official Account connector: template messages to followers, one per request.

A WeChat Official Account (服务号) may message a follower outside a conversation only with one
of its templates (service notices: an order shipped, a booking; WeChat forbids marketing in
them). The follower is addressed by the openid WeChat gave them for the account (28
characters, the audience's `wechat_openid`), not by phone.

API (WeChat's Official Account documentation; WeChat publishes no OpenAPI file, so none is in
vendor-specs and the sandbox plays the documented behaviour):

- `POST /cgi-bin/stable_token` `{grant_type: client_credential, appid, secret}` →
  `{access_token, expires_in: 7200}`: the token every call carries as `?access_token=`. It is
  fetched once, kept until a minute before it expires, and fetched again when WeChat answers
  40001/40014/42001 (invalid or expired), once per request.
- `GET /cgi-bin/template/get_all_private_template` → `{template_list: [{template_id, title,
  content: "…{{thing1.DATA}}…"}]}`: the catalog (every listed template is usable, category
  UTILITY, language `zh_CN`; its keywords, in order, take the step's variables by position).
- `POST /cgi-bin/message/template/send` `{touser, template_id, data: {<keyword>: {value}},
  client_msg_id}` → `{errcode: 0, errmsg: "ok", msgid}`. `client_msg_id` (a UUID5 of the
  ledger key) makes WeChat drop a repeat for 10 minutes only, so the connector does not claim
  idempotency: a lost answer stays `unknown`.

WeChat answers errors with HTTP 200 and an `errcode`: 40013/40125/41002/41004 (app id or
secret) stop the activation, as do 40037 (no such template) and 47003 (data does not fill the
template); -1 (system busy) is RETRY, 45011 (minute quota) RETRY after 60 s and 45009 (daily
quota) RETRY at the next midnight in Beijing, when the quota resets; 43004 (the user unfollowed the
account) and 43101 (the user refuses the account's messages) fail that follower and are
opt-outs of every purpose (`opt_out_codes`); 40003 (not an openid) and others fail the follower.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timedelta
from datetime import time as dtime
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import httpx
from pydantic import SecretStr

from cdp_activation.connectors import samples
from cdp_activation.connectors.base import (
    Capabilities,
    ConnectorError,
    CredentialsError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateError,
    TemplateInfo,
)
from cdp_activation.connectors.http import (
    OneRecipientHttpConnector,
    client_message_id,
    json_or_none,
    require_settings,
)
from cdp_activation.plugins import ConnectorPlugin, ConnectorSettings, ContractCase, Credentials
from cdp_activation.plugins import credential as credential_field
from cdp_activation.sandbox_credentials import (
    SANDBOX_PORT,
    SANDBOX_WECHAT_APP_ID,
    SANDBOX_WECHAT_APP_SECRET,
)

TOKEN_CODES = frozenset({40001, 40014, 42001})  # the access token is invalid or expired
CREDENTIAL_CODES = frozenset({40013, 40125, 41002, 41004})  # the app id or secret is wrong
TEMPLATE_CODES = frozenset({40037, 47003})
MINUTE_QUOTA = 45011  # "api minute-quota reach limit, must slower, retry next minute"
DAILY_QUOTA = 45009  # "reach max api daily quota limit": resets at midnight, Beijing time
RETRY_CODES = frozenset({-1, MINUTE_QUOTA, DAILY_QUOTA})
_KEYWORD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\.DATA\s*\}\}")


class WeChatConnector(OneRecipientHttpConnector):
    """Sends WeChat Official Account template messages, one follower per request."""

    name: ClassVar[str] = "wechat"
    capabilities: ClassVar[Capabilities] = Capabilities(
        channels=frozenset({"wechat"}),
        max_batch_size=1,
        # The template send API's default is 100,000 calls a day per account, and WeChat
        # throttles bursts; 50 a second keeps a large audience within a day's quota.
        default_rate_per_second=50.0,
        idempotency=False,  # client_msg_id de-duplicates for 10 minutes only
        unreachable_codes=frozenset({"43004", "43101"}),
        opt_out_codes=(("43004", "all"), ("43101", "all")),
    )
    retry_codes: ClassVar[frozenset[int]] = RETRY_CODES
    template_codes: ClassVar[frozenset[int]] = TEMPLATE_CODES
    credential_codes: ClassVar[frozenset[int]] = CREDENTIAL_CODES
    base_url_setting: ClassVar[str] = "CDP_WECHAT_BASE_URL"

    def __init__(self, base_url: str, app_id: str, app_secret: str) -> None:
        require_settings(
            self.name, "CDP_WECHAT_", base_url=base_url, app_id=app_id, app_secret=app_secret
        )
        self.base_url = base_url.rstrip("/")
        self.app_id = app_id
        self._app_secret = app_secret
        self._token: str | None = None
        self._token_until = 0.0
        self._keywords: dict[str, tuple[str, ...]] = {}
        self._locks: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Lock] = {}

    def _lock(self, what: str) -> asyncio.Lock:
        """One `what` ("token", "catalog") fetch at a time in this event loop: the 32 requests
        a worker starts at once must not each ask WeChat for a token (each renewal with
        force_refresh would cut the others' token short) or for the catalog."""
        key = (asyncio.get_running_loop(), what)
        if key not in self._locks:
            # A connector can outlive one asyncio.run: locks of a finished loop are dropped.
            self._locks = {k: v for k, v in self._locks.items() if k[0] is key[0]}
            self._locks[key] = asyncio.Lock()
        return self._locks[key]

    def __repr__(self) -> str:
        return f"WeChatConnector(base_url={self.base_url!r}, app_id={self.app_id!r})"

    def _secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self._app_secret, self._token) if s)

    def _endpoint(self) -> str:
        return f"{self.base_url}/cgi-bin/message/template/send"

    # ---- the access token --------------------------------------------------------------------

    async def _access_token(
        self, client: httpx.AsyncClient, renew: bool = False, stale: str | None = None
    ) -> str:
        """The token, fetched when there is none, it expires, or WeChat refused `stale` (a
        renewal another request already made is used, not made again)."""
        async with self._lock("token"):
            fresh = self._token and time.monotonic() < self._token_until
            if fresh and (not renew or self._token != stale):
                return self._token  # type: ignore[return-value]
            return await self._fetch_token(client, renew)

    async def _fetch_token(self, client: httpx.AsyncClient, renew: bool) -> str:
        response = await client.post(
            f"{self.base_url}/cgi-bin/stable_token",
            json={
                "grant_type": "client_credential",
                "appid": self.app_id,
                "secret": self._app_secret,
                "force_refresh": renew,
            },
        )
        data = json_or_none(response)
        token = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            code, text = self._error(data, response)
            raise CredentialsError(
                f"WeChat refused the app id or secret (errcode {code}): "
                f"{self.redact(text or response.text)}. Check CDP_WECHAT_APP_ID and "
                "CDP_WECHAT_APP_SECRET, and that this server's IP is on the account's allowlist."
            )
        expires = data.get("expires_in", 7200) if isinstance(data, dict) else 7200
        self._token = token
        self._token_until = time.monotonic() + max(float(expires) - 60, 0)
        return token

    # ---- the catalog -------------------------------------------------------------------------

    async def fetch_templates(self, client: httpx.AsyncClient) -> list[TemplateInfo]:
        """The account's templates: every one listed is usable; its keywords, in order."""
        token = None
        for renew in (False, True):
            token = await self._access_token(client, renew=renew, stale=token)
            response = await client.get(
                f"{self.base_url}/cgi-bin/template/get_all_private_template",
                params={"access_token": token},
            )
            data = json_or_none(response)
            if isinstance(data, dict) and data.get("errcode") in TOKEN_CODES and not renew:
                continue
            break
        listed = data.get("template_list") if isinstance(data, dict) else None
        if not isinstance(listed, list):
            code, text = self._error(data, response)
            # Only a refused credential stops for good; "system busy" or a 5xx is the
            # provider's moment, said as such (the run fails and a later one tries again).
            error = (
                CredentialsError
                if code in self.credential_codes or code in TOKEN_CODES
                else ConnectorError
            )
            raise error(
                f"WeChat did not list the account's templates (errcode {code}): "
                f"{self.safe(text, '')}"
            )
        catalog = []
        for item in listed:
            template_id = str(item.get("template_id", ""))
            keywords = tuple(_KEYWORD.findall(str(item.get("content", ""))))
            self._keywords[template_id] = keywords
            catalog.append(
                TemplateInfo(
                    name=template_id,
                    language="zh_CN",
                    category="UTILITY",
                    status="APPROVED",
                    body_parameter_count=len(keywords),
                    extra={"title": str(item.get("title", ""))},
                )
            )
        return catalog

    # ---- one message -------------------------------------------------------------------------

    def payload(self, message: OutboundMessage, keywords: tuple[str, ...]) -> dict[str, Any]:
        if message.template is None:
            raise TemplateError(
                "wechat sends Official Account template messages: the step needs a template "
                f"(message {message.key} has none)"
            )
        values = message.template.parameters
        if len(values) != len(keywords):
            raise TemplateError(
                f"WeChat template {message.template.name} takes {len(keywords)} keyword(s) "
                f"({', '.join(keywords) or 'none'}); the plan maps {len(values)}"
            )
        return {
            "touser": message.to,
            "template_id": message.template.name,
            "data": {k: {"value": v} for k, v in zip(keywords, values, strict=True)},
            "client_msg_id": client_message_id(message.key),
        }

    async def _request(self, client: httpx.AsyncClient, message: OutboundMessage) -> httpx.Response:
        template = message.template.name if message.template else ""
        if template not in self._keywords:
            async with self._lock("catalog"):
                if template not in self._keywords:  # another request may have fetched it
                    await self.fetch_templates(client)
        if template not in self._keywords:
            raise TemplateError(f"WeChat template {template!r} is not in the account's templates")
        body = self.payload(message, self._keywords[template])
        token = None
        for renew in (False, True):
            token = await self._access_token(client, renew=renew, stale=token)
            response = await client.post(
                self.endpoint_url, params={"access_token": token}, json=body
            )
            data = json_or_none(response)
            if not (isinstance(data, dict) and data.get("errcode") in TOKEN_CODES) or renew:
                return response
        raise AssertionError("unreachable")

    def _accepted_id(self, data: Any) -> str | None:
        if isinstance(data, dict) and data.get("errcode", 0) == 0 and data.get("msgid"):
            return str(data["msgid"])
        return None

    def _error(self, data: Any, response: httpx.Response) -> tuple[int | None, str]:
        if isinstance(data, dict) and "errcode" in data:
            try:
                return int(data["errcode"]), str(data.get("errmsg", ""))
            except (TypeError, ValueError):
                pass
        return None, response.text

    def _credentials_error(self, status: int, code: int | None, detail: str) -> CredentialsError:
        return CredentialsError(
            f"WeChat refused the credentials (errcode {code}): {detail}. Check "
            "CDP_WECHAT_APP_ID and CDP_WECHAT_APP_SECRET."
        )

    def _template_error(
        self, message: OutboundMessage, code: int | None, detail: str
    ) -> TemplateError:
        name = message.template.name if message.template else "(none)"
        return TemplateError(
            f"WeChat refused template {name} (errcode {code}): {detail}. Check the template id "
            "and that the plan's variables fill its keywords in order."
        )

    def classify(self, message: OutboundMessage, response: httpx.Response) -> SendResult:
        """WeChat answers 200 with an `errcode`: judge that, as the base judges HTTP codes."""
        data = json_or_none(response)
        if response.is_success and isinstance(data, dict) and data.get("errcode", 0) != 0:
            code, text = self._error(data, response)
            detail = self.safe(text, message.to)
            if code in self.credential_codes or code in TOKEN_CODES:
                raise self._credentials_error(response.status_code, code, detail)
            if code in self.template_codes:
                raise self._template_error(message, code, detail)
            outcome = Outcome.RETRY if code in self.retry_codes else Outcome.FAILED
            return SendResult(
                message.key,
                outcome,
                error_code=str(code),
                error_message=detail,
                retry_after=_quota_wait(code),
            )
        return super().classify(message, response)


def _quota_wait(code: int | None) -> float | None:
    """Seconds until WeChat's quota allows sending again, for its two quota codes."""
    if code == MINUTE_QUOTA:
        return 60.0
    if code == DAILY_QUOTA:
        now = datetime.now(_BEIJING)
        midnight = datetime.combine(now.date() + timedelta(days=1), dtime.min, tzinfo=_BEIJING)
        return (midnight - now).total_seconds()
    return None


_BEIJING = ZoneInfo("Asia/Shanghai")


# --- its plugin: settings, contract case ------------------------------------------------------


class WeChatSettings(ConnectorSettings):
    """CDP_WECHAT_*: the Official Account's app id and app secret."""

    base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/wechat"  # real: https://api.weixin.qq.com
    app_id: str = SANDBOX_WECHAT_APP_ID
    app_secret: SecretStr | None = credential_field(SANDBOX_WECHAT_APP_SECRET)

    def build(self, credentials: Credentials) -> WeChatConnector:
        return WeChatConnector(
            base_url=self.base_url,
            app_id=self.app_id,
            app_secret=credentials.get("app_secret"),
        )


PLUGIN = ConnectorPlugin(
    name="wechat",
    title="WeChat Official Account",
    connector=WeChatConnector,
    settings=WeChatSettings,
    env_prefix="wechat",
    docs="Template messages to an Official Account's followers (by openid), one per request",
    sandbox="/wechat",
    contract=ContractCase(
        message=samples.wechat,
        bad_recipient=OutboundMessage(
            "bad", "not-an-openid", "wechat", template=samples.wechat(0).template
        ),
        failure_code="40003",
        credential="app_secret",
        throttle_retry_after=60.0,  # WeChat sends no Retry-After: its minute quota says 60 s
    ),
)
