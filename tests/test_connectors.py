"""Connectors against the live sandbox over real HTTP on 127.0.0.1 (no mocks).

Classification of answers the sandbox cannot yet produce (429, 5xx) is checked on real
`httpx.Response` objects passed to `classify`, the same code path a live answer takes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from cdp_activation.connectors import (
    CONNECTORS,
    MetaWhatsAppConnector,
    TwilioConnector,
    connector_class,
    connector_from_settings,
)
from cdp_activation.connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    CredentialsError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateError,
    TemplateRef,
)
from cdp_activation.masking import mask_phone
from cdp_activation.sandbox import SandboxServer, load_catalog
from cdp_activation.settings import SANDBOX_META_TOKEN, SANDBOX_TWILIO_AUTH_TOKEN, Settings

pytestmark = pytest.mark.integration

UK = "+447911123456"
NOT_ON_WHATSAPP = "+447911123413"  # digits end in 13: the sandbox's "not on WhatsApp" rule
WINBACK = TemplateRef("winback_offer", "en", ("Ana", "45", "COMEBACK20"))


def send(connector: Connector, message: OutboundMessage, timeout: float = 5.0) -> SendResult:
    """One message through `send_batch` with a fresh client, as the delivery engine would."""

    async def go() -> list[SendResult]:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await connector.send_batch(client, [message])

    [result] = asyncio.run(go())
    assert result.key == message.key
    return result


def meta(settings: Settings, token: str | None = None) -> MetaWhatsAppConnector:
    connector = connector_from_settings("meta_whatsapp", settings)
    assert isinstance(connector, MetaWhatsAppConnector)
    if token is None:
        return connector
    return MetaWhatsAppConnector(
        connector.base_url,
        settings.meta_api_version,
        settings.meta_phone_number_id,
        settings.meta_waba_id,
        token,
    )


def twilio(settings: Settings, token: str | None = None) -> TwilioConnector:
    connector = connector_from_settings("twilio", settings)
    assert isinstance(connector, TwilioConnector)
    if token is None:
        return connector
    return TwilioConnector(
        connector.base_url, settings.twilio_account_sid, token, settings.twilio_from
    )


def wa(to: str = UK, template: TemplateRef | None = WINBACK, body: str | None = None):
    return OutboundMessage(key="k1", to=to, channel="whatsapp", template=template, body=body)


def sms(to: str = UK, body: str | None = "Hi Ana, we miss you!"):
    return OutboundMessage(key="k1", to=to, channel="sms", body=body)


# --- happy paths ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HappyCase:
    id: str
    build: Callable[[Settings], Connector]
    message: OutboundMessage
    expect: dict[str, object]
    id_prefix: str


HAPPY = [
    HappyCase(
        "meta-template",
        meta,
        wa(),
        {
            "provider": "meta_whatsapp",
            "channel": "whatsapp",
            "template_name": "winback_offer",
            "template_language": "en",
            "parameters": ("Ana", "45", "COMEBACK20"),
            "body": None,
        },
        "wamid.",
    ),
    HappyCase(
        "meta-template-pt_BR",
        meta,
        wa(template=TemplateRef("winback_offer", "pt_BR", ("Ana", "45", "VOLTA20"))),
        {"template_language": "pt_BR", "parameters": ("Ana", "45", "VOLTA20")},
        "wamid.",
    ),
    HappyCase(
        "meta-text",
        meta,
        wa(template=None, body="Thanks for your reply!"),
        {"body": "Thanks for your reply!", "template_name": None},
        "wamid.",
    ),
    HappyCase(
        "twilio-sms",
        twilio,
        sms(),
        {"provider": "twilio", "channel": "sms", "body": "Hi Ana, we miss you!"},
        "SM",
    ),
    HappyCase(
        "twilio-sms-not-on-whatsapp-is-fine",
        twilio,
        sms(to=NOT_ON_WHATSAPP),
        {"to": NOT_ON_WHATSAPP},
        "SM",
    ),
]


@pytest.mark.parametrize("case", HAPPY, ids=[c.id for c in HAPPY])
def test_happy_path_is_recorded_once(
    case: HappyCase, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    result = send(case.build(sandbox_settings), case.message)

    assert result.outcome is Outcome.SENT
    assert result.provider_message_id and result.provider_message_id.startswith(case.id_prefix)
    [recorded] = sandbox.messages()
    assert recorded.provider_message_id == result.provider_message_id
    assert recorded.to == case.message.to
    for attr, value in case.expect.items():
        assert getattr(recorded, attr) == value, attr


def test_twilio_sid_shape(sandbox: SandboxServer, sandbox_settings: Settings) -> None:
    result = send(twilio(sandbox_settings), sms())
    sid = result.provider_message_id or ""
    assert len(sid) == 34 and sid.startswith("SM") and int(sid[2:], 16) >= 0


# --- per-recipient failures -------------------------------------------------------------------


FAILURES = [
    ("meta-not-on-whatsapp", meta, wa(to=NOT_ON_WHATSAPP), "131026", NOT_ON_WHATSAPP),
    ("twilio-invalid-to", twilio, sms(to="12345"), "21211", "12345"),
    ("twilio-invalid-to-letters", twilio, sms(to="+44 7911 CALL"), "21211", "CALL"),
]


@pytest.mark.parametrize(
    ("build", "message", "code", "pii"),
    [f[1:] for f in FAILURES],
    ids=[f[0] for f in FAILURES],
)
def test_recipient_failure_is_failed_with_provider_code(
    build: Callable[[Settings], Connector],
    message: OutboundMessage,
    code: str,
    pii: str,
    sandbox: SandboxServer,
    sandbox_settings: Settings,
) -> None:
    result = send(build(sandbox_settings), message)

    assert result.outcome is Outcome.FAILED
    assert result.error_code == code
    assert pii not in (result.error_message or ""), "the number must be masked"
    assert sandbox.messages() == []


# --- activation-wide errors -------------------------------------------------------------------


TEMPLATE_ERRORS = [
    ("unknown-name", TemplateRef("no_such_template", "en", ()), "132001"),
    ("unknown-language", TemplateRef("winback_offer", "fr", ("a", "b", "c")), "132001"),
    ("pending", TemplateRef("spring_sale", "en", ("a", "b")), "132001"),
    ("rejected", TemplateRef("old_promo", "en", ("a", "b")), "132001"),
    ("paused", TemplateRef("paused_promo", "en", ("a", "b")), "132015"),
    ("disabled", TemplateRef("retired_promo", "en", ("a",)), "132016"),
    ("too-few-parameters", TemplateRef("winback_offer", "en", ("Ana",)), "132000"),
]


@pytest.mark.parametrize(
    ("template", "code"), [t[1:] for t in TEMPLATE_ERRORS], ids=[t[0] for t in TEMPLATE_ERRORS]
)
def test_meta_template_problem_stops_the_activation(
    template: TemplateRef, code: str, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    with pytest.raises(TemplateError, match=code) as raised:
        send(meta(sandbox_settings), wa(template=template))
    assert UK not in str(raised.value)
    assert sandbox.messages() == []


def test_twilio_template_without_content_sid_is_a_template_error(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    message = OutboundMessage("k1", UK, "sms", template=WINBACK)
    with pytest.raises(TemplateError, match="Content SID"):
        send(twilio(sandbox_settings), message)
    assert sandbox.messages() == []


BAD_TOKEN = "not-the-right-token-0123456789"  # a deliberately wrong credential


@pytest.mark.parametrize(
    ("build", "message", "real_token"),
    [(meta, wa(), SANDBOX_META_TOKEN), (twilio, sms(), SANDBOX_TWILIO_AUTH_TOKEN)],
    ids=["meta", "twilio"],
)
def test_bad_token_raises_credentials_error_without_the_token(
    build: Callable[[Settings, str], Connector],
    message: OutboundMessage,
    real_token: str,
    sandbox: SandboxServer,
    sandbox_settings: Settings,
) -> None:
    connector = build(sandbox_settings, BAD_TOKEN)
    with pytest.raises(CredentialsError) as raised:
        send(connector, message)
    text = f"{raised.value!s} {raised.value!r} {connector!r}"
    assert BAD_TOKEN not in text
    assert real_token not in text
    assert sandbox.messages() == []


@pytest.mark.parametrize("build", [meta, twilio], ids=["meta", "twilio"])
def test_redact_and_repr_hide_the_token(
    build: Callable[[Settings, str], Connector], sandbox_settings: Settings
) -> None:
    connector = build(sandbox_settings, BAD_TOKEN)
    assert BAD_TOKEN not in connector.redact(f"Authorization: Bearer {BAD_TOKEN}&x=1")
    assert BAD_TOKEN not in repr(connector)


# --- transport errors -------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    """A port that was free a moment ago and has nothing listening: connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections but never answers.

    The kernel completes the handshake for sockets in the listen backlog, so the request is
    written and the client then waits for an answer that never comes.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def _at(url: str) -> list[tuple[str, Connector, OutboundMessage]]:
    return [
        ("meta", MetaWhatsAppConnector(f"{url}/meta", "v23.0", "1", "2", "tok"), wa()),
        ("twilio", TwilioConnector(f"{url}/twilio", "AC" + "0" * 32, "tok", "+15005550006"), sms()),
    ]


def test_connection_refused_is_retry(closed_port: int) -> None:
    for label, connector, message in _at(f"http://127.0.0.1:{closed_port}"):
        result = send(connector, message)
        assert result.outcome is Outcome.RETRY, label
        assert result.error_code == "ConnectError", label


def test_no_answer_within_timeout_is_unknown(silent_server: str) -> None:
    for label, connector, message in _at(silent_server):
        result = send(connector, message, timeout=0.3)
        assert result.outcome is Outcome.UNKNOWN, label
        assert result.error_code == "ReadTimeout", label


# --- classification of answers the sandbox does not produce yet -------------------------------


GATEWAY_PAGE = "<html><head><title>504 Gateway Time-out</title></head><body>nginx</body></html>"


def _meta_body(code: int) -> dict[str, object]:
    return {
        "error": {
            "message": f"(#{code}) x",
            "type": "OAuthException",
            "code": code,
            "fbtrace_id": "Axyz",
        }
    }


def _twilio_body(code: int, status: int) -> dict[str, object]:
    return {"code": code, "message": "x", "more_info": "https://x", "status": status}


CLASSIFY = [
    (
        "meta-429-retry-after",
        meta,
        httpx.Response(429, json=_meta_body(130429), headers={"Retry-After": "7"}),
        Outcome.RETRY,
        "130429",
        7.0,
    ),
    (
        "meta-400-130429",
        meta,
        httpx.Response(400, json=_meta_body(130429)),
        Outcome.RETRY,
        "130429",
        None,
    ),
    (
        "meta-131056-pair-rate",
        meta,
        httpx.Response(400, json=_meta_body(131056)),
        Outcome.RETRY,
        "131056",
        None,
    ),
    (
        "meta-503",
        meta,
        httpx.Response(503, text="<html>down</html>"),
        Outcome.RETRY,
        "http_503",
        None,
    ),
    (
        "meta-500-131000",
        meta,
        httpx.Response(500, json=_meta_body(131000)),
        Outcome.RETRY,
        "131000",
        None,
    ),
    (
        "meta-24h-window",
        meta,
        httpx.Response(400, json=_meta_body(131047)),
        Outcome.FAILED,
        "131047",
        None,
    ),
    (
        "meta-opted-out",
        meta,
        httpx.Response(400, json=_meta_body(131050)),
        Outcome.FAILED,
        "131050",
        None,
    ),
    (
        "meta-2xx-without-id",
        meta,
        httpx.Response(200, json={"messages": []}),
        Outcome.UNKNOWN,
        "http_200",
        None,
    ),
    (
        "twilio-429",
        twilio,
        httpx.Response(429, json=_twilio_body(20429, 429), headers={"Retry-After": "2"}),
        Outcome.RETRY,
        "20429",
        2.0,
    ),
    ("twilio-500", twilio, httpx.Response(500, text="oops"), Outcome.RETRY, "http_500", None),
    (
        "twilio-opted-out",
        twilio,
        httpx.Response(400, json=_twilio_body(21610, 400)),
        Outcome.FAILED,
        "21610",
        None,
    ),
    (
        "twilio-not-mobile",
        twilio,
        httpx.Response(400, json=_twilio_body(21614, 400)),
        Outcome.FAILED,
        "21614",
        None,
    ),
    (
        "meta-throttled-waits-as-its-usage-header-says",  # Meta sends no Retry-After
        meta,
        httpx.Response(
            400,
            json=_meta_body(80007),
            headers={
                "X-Business-Use-Case-Usage": '{"102290129340398":[{"type":"whatsapp",'
                '"call_count":100,"total_cputime":1,"total_time":1,'
                '"estimated_time_to_regain_access":5}]}'
            },
        ),
        Outcome.RETRY,
        "80007",
        300.0,
    ),
    (
        "meta-17-user-request-limit",
        meta,
        httpx.Response(400, json=_meta_body(17)),
        Outcome.RETRY,
        "17",
        None,
    ),
    (
        "meta-is-transient",  # an error Meta says is temporary, whatever its code
        meta,
        httpx.Response(400, json={"error": {**_meta_body(2)["error"], "is_transient": True}}),
        Outcome.RETRY,
        "2",
        None,
    ),
    (
        "meta-not-transient",
        meta,
        httpx.Response(400, json={"error": {**_meta_body(2)["error"], "is_transient": False}}),
        Outcome.FAILED,
        "2",
        None,
    ),
    (
        "twilio-sender-queue-full",
        twilio,
        httpx.Response(400, json=_twilio_body(21611, 400)),
        Outcome.RETRY,
        "21611",
        None,
    ),
    (
        "twilio-rate-limit",
        twilio,
        httpx.Response(400, json=_twilio_body(14107, 400)),
        Outcome.RETRY,
        "14107",
        None,
    ),
    (
        "twilio-21606-depends-on-the-destination",  # a short code abroad: this recipient only
        twilio,
        httpx.Response(400, json=_twilio_body(21606, 400)),
        Outcome.FAILED,
        "21606",
        None,
    ),
    (
        "twilio-region",
        twilio,
        httpx.Response(400, json=_twilio_body(21408, 400)),
        Outcome.FAILED,
        "21408",
        None,
    ),
    (
        "twilio-window",
        twilio,
        httpx.Response(400, json=_twilio_body(63016, 400)),
        Outcome.FAILED,
        "63016",
        None,
    ),
    # A gateway that gave up waiting (504, Cloudflare's 524), whoever wrote the body: the
    # provider may have taken the message, and neither API de-duplicates. A 502 (a load
    # balancer while the provider is down) and the provider's own 500 are retried.
    (
        "meta-504-gateway-page",
        meta,
        httpx.Response(504, text=GATEWAY_PAGE),
        Outcome.UNKNOWN,
        "http_504",
        None,
    ),
    (
        "meta-504-own-words",
        meta,
        httpx.Response(504, json=_meta_body(2)),
        Outcome.UNKNOWN,
        "http_504",
        None,
    ),
    (
        "twilio-524",
        twilio,
        httpx.Response(524, text="A timeout occurred"),
        Outcome.UNKNOWN,
        "http_524",
        None,
    ),
    (
        "twilio-504-json",
        twilio,
        httpx.Response(504, json={"message": "Endpoint request timed out"}),
        Outcome.UNKNOWN,
        "http_504",
        None,
    ),
    (
        "meta-502-gateway-page",
        meta,
        httpx.Response(502, text=GATEWAY_PAGE),
        Outcome.RETRY,
        "http_502",
        None,
    ),
    (
        "twilio-502-gateway-page",
        twilio,
        httpx.Response(502, text=GATEWAY_PAGE),
        Outcome.RETRY,
        "http_502",
        None,
    ),
    (
        "twilio-500-own-words",
        twilio,
        httpx.Response(500, json=_twilio_body(20500, 500)),
        Outcome.RETRY,
        "20500",
        None,
    ),
]


@pytest.mark.parametrize(
    ("build", "response", "outcome", "code", "retry_after"),
    [c[1:] for c in CLASSIFY],
    ids=[c[0] for c in CLASSIFY],
)
def test_classify(
    build: Callable[[Settings], MetaWhatsAppConnector | TwilioConnector],
    response: httpx.Response,
    outcome: Outcome,
    code: str,
    retry_after: float | None,
    sandbox_settings: Settings,
) -> None:
    result = build(sandbox_settings).classify(wa(), response)
    assert (result.outcome, result.error_code, result.retry_after) == (outcome, code, retry_after)


@pytest.mark.parametrize("name", ["braze", "infobip"])
@pytest.mark.parametrize(
    ("response", "outcome"),
    [
        (httpx.Response(504, text=GATEWAY_PAGE), Outcome.UNKNOWN),
        # A gateway's JSON (AWS API Gateway, Kong) reads like the provider's own error.
        (httpx.Response(504, json={"message": "Endpoint request timed out"}), Outcome.UNKNOWN),
        (httpx.Response(524, text="A timeout occurred"), Outcome.UNKNOWN),
        (httpx.Response(502, text=GATEWAY_PAGE), Outcome.RETRY),
    ],
    ids=["504-page", "504-json", "524", "502-page"],
)
def test_a_gateway_timeout_is_unknown_for_whole_request_providers(
    name: str, response: httpx.Response, outcome: Outcome, sandbox_settings: Settings
) -> None:
    """Braze's and Infobip's answers cover every message of a request alike."""
    connector = connector_from_settings(name, sandbox_settings)
    messages = [sms(f"+44790000000{i}") for i in range(2)]
    results = connector.classify(messages, response)  # type: ignore[attr-defined]
    assert {r.outcome for r in results} == {outcome} and len(results) == 2


RAISES = [
    ("meta-190", meta, httpx.Response(400, json=_meta_body(190)), CredentialsError),
    ("meta-403", meta, httpx.Response(403, json=_meta_body(200)), CredentialsError),
    ("meta-132012", meta, httpx.Response(400, json=_meta_body(132012)), TemplateError),
    ("twilio-20003", twilio, httpx.Response(401, json=_twilio_body(20003, 401)), CredentialsError),
    ("twilio-63027", twilio, httpx.Response(400, json=_twilio_body(63027, 400)), TemplateError),
    # The account or the sender refused as a whole: the activation stops, nobody is failed.
    ("meta-131031", meta, httpx.Response(400, json=_meta_body(131031)), ConnectorError),
    # Meta limits the sending number for spam reports: every message after it is refused.
    ("meta-spam-limit", meta, httpx.Response(400, json=_meta_body(131048)), ConnectorError),
    ("meta-133010", meta, httpx.Response(400, json=_meta_body(133010)), ConnectorConfigError),
    ("meta-131005", meta, httpx.Response(403, json=_meta_body(131005)), CredentialsError),
    (
        "twilio-21212",
        twilio,
        httpx.Response(400, json=_twilio_body(21212, 400)),
        ConnectorConfigError,
    ),
    (
        "twilio-63007",
        twilio,
        httpx.Response(400, json=_twilio_body(63007, 400)),
        ConnectorConfigError,
    ),
]


@pytest.mark.parametrize(
    ("build", "response", "error"), [r[1:] for r in RAISES], ids=[r[0] for r in RAISES]
)
def test_classify_raises(
    build: Callable[[Settings], MetaWhatsAppConnector | TwilioConnector],
    response: httpx.Response,
    error: type[Exception],
    sandbox_settings: Settings,
) -> None:
    with pytest.raises(error):
        build(sandbox_settings).classify(wa(), response)


def test_provider_error_body_is_clipped_and_redacted(sandbox_settings: Settings) -> None:
    connector = meta(sandbox_settings, BAD_TOKEN)
    body = f"<html>{'x' * 5000} token={BAD_TOKEN} to {UK}</html>"
    result = connector.classify(wa(), httpx.Response(502, text=body))
    assert result.outcome is Outcome.RETRY
    assert len(result.error_message or "") <= 300
    long_tail = f"{'y' * 250} {BAD_TOKEN} {UK}"
    result = connector.classify(wa(), httpx.Response(400, text=long_tail))
    assert BAD_TOKEN not in (result.error_message or "")
    assert UK not in (result.error_message or "")


# --- template catalog -------------------------------------------------------------------------


def test_fetch_templates_follows_cursor_paging(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    requests: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        requests.append(request)

    async def go() -> list:
        async with httpx.AsyncClient(timeout=5, event_hooks={"request": [record]}) as client:
            return await meta(sandbox_settings).fetch_templates(client, page_size=2)

    templates = asyncio.run(go())

    catalog = load_catalog()
    assert len(templates) == len(catalog)
    assert len(requests) == -(-len(catalog) // 2)  # ceil: one request per page
    assert [r.url.params.get("after") is None for r in requests].count(True) == 1
    by_key = {(t.name, t.language): t for t in templates}
    assert {lang for name, lang in by_key if name == "winback_offer"} == {"en", "de", "es", "pt_BR"}
    winback = by_key[("winback_offer", "en")]
    assert (winback.category, winback.status, winback.body_parameter_count) == (
        "MARKETING",
        "APPROVED",
        3,
    )
    assert by_key[("spring_sale", "en")].status == "PENDING"
    assert by_key[("old_promo", "en")].status == "REJECTED"
    assert by_key[("paused_promo", "en")].status == "PAUSED"
    order = by_key[("order_update", "en")]
    assert (order.category, order.status, order.body_parameter_count) == ("UTILITY", "APPROVED", 2)


def test_fetch_templates_bad_token(sandbox_settings: Settings) -> None:
    async def go() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            await meta(sandbox_settings, BAD_TOKEN).fetch_templates(client)

    with pytest.raises(CredentialsError) as raised:
        asyncio.run(go())
    assert BAD_TOKEN not in str(raised.value)


# --- registry and masking ---------------------------------------------------------------------


def test_registry() -> None:
    assert CONNECTORS["meta_whatsapp"] is MetaWhatsAppConnector
    assert CONNECTORS["twilio"] is TwilioConnector
    with pytest.raises(ValueError, match="meta_whatsapp, twilio"):
        connector_class("carrier_pigeon")
    # Clashing registrations are refused when the plugins load: tests/test_plugins.py.


def test_connectors_satisfy_the_protocol(sandbox_settings: Settings) -> None:
    for name in CONNECTORS:
        assert isinstance(connector_from_settings(name, sandbox_settings), Connector)
    # Meta and Twilio take one recipient per request and de-duplicate nothing; the batching
    # connectors' capabilities are checked in test_connector_contract.py.
    for name in ("meta_whatsapp", "twilio"):
        capabilities = connector_from_settings(name, sandbox_settings).capabilities
        assert capabilities.max_batch_size == 1
        assert capabilities.idempotency is False


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+447911123456", "+44********56"),
        ("+15005550006", "+1********06"),
        ("+4915112345678", "+49*********78"),
        ("+8613800138000", "+86*********00"),
        ("bogus", "***us"),
    ],
)
def test_mask_phone(number: str, masked: str) -> None:
    assert mask_phone(number) == masked


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("Invalid 'To' number +52 5514 403693 for SMS", "5514 403693"),
        ("recipient +1 (415) 555-0100 unsubscribed", "555-0100"),
        ("number +44.7911.123456 is not on WhatsApp", "7911.123456"),
        ("to=+447911123456&x=1", "7911123456"),
        ("user 447911123456 blocked", "7911123456"),
        # Two numbers side by side: read as one run of 24 digits, both were left whole.
        ("Undeliverable to +44 7911 123456 (447911123456)", "7911 123456"),
        ("from +52 55 1440 3693 - +44 20 7946 0958", "20 7946 0958"),
        ("from +52 55 1440 3693 - +44 20 7946 0958", "1440 3693"),
        # … where the second has no '+' of its own: its digits must not show either.
        ("+1 415 555 0100 (1 415 555 0101)", "555 0101"),
        ("+91 98765 43210 98765 43210", "98765"),
        # Written in pairs, two numbers are more groups than any one number has.
        ("+33 6 12 34 56 78 06 12 34 56 78", "34 56"),
        ("+33 6 12 34 56 78 06 12 34 56 78 and more", "34 56"),
        ("+1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8", "5 6 7"),
    ],
)
def test_numbers_in_provider_text_are_masked_however_written(text: str, hidden: str) -> None:
    from cdp_activation.masking import mask_phones_in

    masked = mask_phones_in(text)
    assert hidden not in masked, masked
    assert "*" in masked


@pytest.mark.parametrize(
    "text",
    ["at 2026-12-04 10:00:00 UTC", "code 131026", "retry in 30 s", "price 0.0135 USD", "+5 more"],
)
def test_dates_codes_and_amounts_are_left_alone(text: str) -> None:
    from cdp_activation.masking import mask_phones_in

    assert mask_phones_in(text) == text
