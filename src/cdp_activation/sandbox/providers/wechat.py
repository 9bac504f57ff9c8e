"""WeChat Official Account (prefix `/wechat`): `POST /cgi-bin/stable_token` (an access token
for the app id and secret), `GET /cgi-bin/template/get_all_private_template` (the account's
templates) and `POST /cgi-bin/message/template/send` (one template message to one follower).

As WeChat does, every answer is HTTP 200 with `errcode` (0: ok) and `errmsg`: 40001 for a
token that is not (or no longer) valid, 40003 for an openid that is not one, 40037 for an
unknown template, 47003 for data that does not fill the template's keywords, 43004 for a user
who no longer follows the account. Faults (429/5xx are not WeChat's way: throttling is
`errcode` 45011, "retry next minute", a server error -1 "system busy"), timeouts and dropped
answers as for the other providers.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cdp_activation.sandbox.core import Fault, SandboxConfig, SandboxMessage, utc_now
from cdp_activation.sandbox.exchange import Candidate, ProviderRules, provider_request

TOKEN_SECONDS = 7200
_OPENID = re.compile(r"^[A-Za-z0-9_-]{28}$")
# The account's private templates: id -> (title, keywords in order).
WECHAT_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "order_shipped_tmpl_001": ("Order shipped", ("thing1", "character_string2")),
    "cart_reminder_tmpl_002": ("Items in your cart", ("thing1", "thing2")),
}


_BAD_TOKEN = (40001, "invalid credential, access_token is invalid or not latest")


def _answer(errcode: int, errmsg: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"errcode": errcode, "errmsg": errmsg, **extra})


def _tokens(request: Request) -> dict[str, float]:
    """Issued access tokens and their expiry (monotonic), kept on the app."""
    state = request.app.state
    if not hasattr(state, "wechat_tokens"):
        state.wechat_tokens = {}
    tokens: dict[str, float] = state.wechat_tokens
    return tokens


async def stable_token(request: Request) -> Response:
    """`POST /cgi-bin/stable_token {grant_type: client_credential, appid, secret}`."""
    config: SandboxConfig = request.app.state.config
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _answer(47001, "data format error")
    if not isinstance(payload, dict) or payload.get("grant_type") != "client_credential":
        return _answer(40002, "invalid grant_type")
    if not hmac.compare_digest(str(payload.get("appid", "")), config.wechat_app_id):
        return _answer(40013, "invalid appid")
    if not hmac.compare_digest(str(payload.get("secret", "")), config.wechat_app_secret):
        return _answer(40125, "invalid appsecret")
    token = secrets.token_urlsafe(48)
    _tokens(request)[token] = time.monotonic() + TOKEN_SECONDS
    return JSONResponse({"access_token": token, "expires_in": TOKEN_SECONDS})


def _token_ok(request: Request) -> bool:
    expiry = _tokens(request).get(request.query_params.get("access_token", ""))
    return expiry is not None and expiry > time.monotonic()


async def private_templates(request: Request) -> Response:
    """`GET /cgi-bin/template/get_all_private_template?access_token=…`."""
    if not _token_ok(request):
        return _answer(*_BAD_TOKEN)
    templates = [
        {
            "template_id": template_id,
            "title": title,
            "primary_industry": "IT科技",
            "deputy_industry": "互联网|电子商务",
            "content": "".join(f"{k}:{{{{{k}.DATA}}}}\n" for k in keywords),
            "example": "",
        }
        for template_id, (title, keywords) in WECHAT_TEMPLATES.items()
    ]
    return JSONResponse({"template_list": templates})


def _parse(request: Request, raw: bytes) -> Response | Candidate:
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _answer(47001, "data format error")
    if not isinstance(payload, dict):
        return _answer(47001, "data format error")
    openid = payload.get("touser")
    if not isinstance(openid, str) or not _OPENID.match(openid):
        return _answer(40003, "invalid openid")
    template_id = str(payload.get("template_id"))
    template = WECHAT_TEMPLATES.get(template_id)
    if template is None:
        return _answer(40037, "invalid template_id")
    data = payload.get("data")
    keywords = template[1]
    if not isinstance(data, dict) or set(data) != set(keywords):
        return _answer(47003, "argument invalid! data.keyword invalid")
    values = []
    for keyword in keywords:
        entry = data[keyword]
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), str):
            return _answer(47003, f"argument invalid! data.{keyword}.value invalid")
        values.append(entry["value"])
    return Candidate(
        to=openid,
        record={"template_name": template_id, "parameters": tuple(values)},
        extra={"client_msg_id": str(payload.get("client_msg_id") or "")},
    )


def _refuse(config: SandboxConfig, candidate: Candidate) -> Response | None:
    """A user who unfollowed the account (openids ending in `13`, the sandbox's rule)."""
    if candidate.to.endswith("13"):
        return _answer(43004, "require subscribe")
    return None


def _accept(request: Request, candidate: Candidate) -> tuple[SandboxMessage, Response]:
    msgid = str(int(time.time() * 1000) * 1000 + secrets.randbelow(1000))
    message = SandboxMessage(
        provider="wechat",
        channel="wechat",
        to=candidate.to,
        provider_message_id=msgid,
        received_at=utc_now().isoformat(),
        idempotency_key=candidate.extra["client_msg_id"] or None,
        **candidate.record,
    )
    return message, _answer(0, "ok", msgid=int(msgid))


def _fault_answer(config: SandboxConfig, fault: Fault, draw: float) -> Response:
    if fault == Fault.THROTTLED:
        return _answer(45011, "api minute-quota reach limit, must slower, retry next minute")
    return _answer(-1, "system error")


_RULES = ProviderRules(
    name="wechat",
    authorized=lambda request, config: _token_ok(request),
    unauthorized=lambda: _answer(
        40001, "invalid credential, access_token is invalid or not latest"
    ),
    parse=_parse,
    refuse=_refuse,
    accept=_accept,
    fault_answer=_fault_answer,
)


async def template_send(request: Request) -> Response:
    """`POST /cgi-bin/message/template/send?access_token=…`: one template message."""
    return await provider_request(request, _RULES)


PREFIX = "/wechat"
ROUTES = [
    Route("/cgi-bin/stable_token", stable_token, methods=["POST"]),
    Route("/cgi-bin/template/get_all_private_template", private_templates, methods=["GET"]),
    Route("/cgi-bin/message/template/send", template_send, methods=["POST"]),
]
