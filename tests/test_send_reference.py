"""The send's reference ("cdp-<send id>") goes where each provider echoes it in status reports,
and comes back out of them: connectors -> sandbox over HTTP -> signed status webhook ->
receiver -> `StatusEvent.reference`, even when the send's own answer was lost.

Field per provider: Meta `biz_opaque_callback_data`, Infobip `callbackData` (WhatsApp) and
`webhooks.callbackData` (SMS v3, Viber v2), Vonage `client_ref`, Twilio a `StatusCallback` URL
ending in `?ref=cdp-<id>` (only with `CDP_TWILIO_STATUS_CALLBACK_URL` set).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from cdp_activation.connectors import (
    InfobipConnector,
    MetaWhatsAppConnector,
    TwilioConnector,
    VonageConnector,
    connector_from_settings,
)
from cdp_activation.connectors.base import (
    ConnectorConfigError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateRef,
    send_id_of,
    send_reference,
)
from cdp_activation.connectors.twilio import status_callback
from cdp_activation.feedback.receiver import WebhookServer
from cdp_activation.sandbox import SandboxMessage, SandboxServer, twilio_content_sid
from cdp_activation.settings import (
    SANDBOX_META_TOKEN,
    SANDBOX_TWILIO_ACCOUNT_SID,
    SANDBOX_TWILIO_AUTH_TOKEN,
    Settings,
)
from conftest import RecordingLedger

pytestmark = pytest.mark.integration

UK = "+447911123456"
WINBACK = TemplateRef("winback_offer", "en", ("Ana", "45", "COMEBACK20"))
HOOK = "https://hooks.example.com/webhooks/twilio"


def wa(i: int, reference: str | None = None) -> OutboundMessage:
    return OutboundMessage(
        f"ref|{i}", f"+4479111234{i:02d}", "whatsapp", template=WINBACK, reference=reference
    )


def sms(i: int, reference: str | None = None) -> OutboundMessage:
    return OutboundMessage(
        f"ref|{i}", f"+4479111234{i:02d}", "sms", body=f"Hi {i}", reference=reference
    )


def viber(i: int, reference: str | None = None) -> OutboundMessage:
    return OutboundMessage(
        f"ref|{i}",
        f"+3805012345{i:02d}",
        "viber",
        body=f"Hi {i}",
        purpose="marketing",
        reference=reference,
    )


def send(connector: Any, messages: Sequence[OutboundMessage]) -> list[SendResult]:
    async def go() -> list[SendResult]:
        async with httpx.AsyncClient(timeout=5) as client:
            results: list[SendResult] = []
            # One request per message for one-recipient connectors, one batch otherwise.
            size = connector.capabilities.max_batch_size
            for start in range(0, len(messages), size):
                results += await connector.send_batch(client, messages[start : start + size])
            return results

    return asyncio.run(go())


def with_callback(settings: Settings, url: str = HOOK) -> Settings:
    return settings.model_copy(update={"twilio_status_callback_url": url})


# --- each connector sends it -----------------------------------------------------------------

SENDS = {
    "meta-whatsapp": ("meta_whatsapp", wa(1, "cdp-11")),
    "twilio-sms": ("twilio", sms(2, "cdp-12")),
    "twilio-whatsapp": (
        "twilio",
        OutboundMessage(
            "ref|3",
            UK,
            "whatsapp",
            template=TemplateRef(twilio_content_sid("order_update", "en"), "en", ("A", "1")),
            reference="cdp-13",
        ),
    ),
    "infobip-whatsapp": ("infobip", wa(4, "cdp-14")),
    "infobip-sms": ("infobip", sms(5, "cdp-15")),
    "infobip-viber": ("infobip", viber(6, "cdp-16")),
    "vonage-whatsapp": ("vonage", wa(7, "cdp-17")),
    "vonage-sms": ("vonage", sms(8, "cdp-18")),
    "vonage-viber": ("vonage", viber(9, "cdp-19")),
}


@pytest.mark.parametrize(("name", "message"), SENDS.values(), ids=SENDS.keys())
def test_each_connector_sends_the_reference_where_its_provider_echoes_it(
    name: str, message: OutboundMessage, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    connector = connector_from_settings(name, with_callback(sandbox_settings))
    [result] = send(connector, [message])
    assert result.outcome is Outcome.SENT, result
    [accepted] = sandbox.messages()
    if name == "twilio":
        assert accepted.status_callback == f"{HOOK}?ref={message.reference}"
        assert accepted.callback_data is None
    else:
        assert accepted.callback_data == message.reference
        assert accepted.status_callback is None


def test_without_a_reference_nothing_new_is_sent(sandbox_settings: Settings) -> None:
    """Sends that carry no reference build exactly the requests they built before."""
    meta = connector_from_settings("meta_whatsapp", sandbox_settings)
    assert isinstance(meta, MetaWhatsAppConnector)
    assert "biz_opaque_callback_data" not in meta.build_payload(wa(1))
    infobip = connector_from_settings("infobip", sandbox_settings)
    assert isinstance(infobip, InfobipConnector)
    [item] = infobip.build_whatsapp([wa(1)])["messages"]
    assert "callbackData" not in item
    for build, message in ((infobip.build_sms, sms(2)), (infobip.build_viber, viber(3))):
        [item] = build([message])["messages"]
        assert "webhooks" not in item
    twilio = connector_from_settings("twilio", with_callback(sandbox_settings))
    assert isinstance(twilio, TwilioConnector)
    assert "StatusCallback" not in twilio.build_form(sms(4))
    vonage = connector_from_settings("vonage", sandbox_settings)
    assert isinstance(vonage, VonageConnector)
    assert len(vonage.build_payload(sms(5))["client_ref"]) == 36  # the key's UUID5, as before


def test_twilio_sends_no_status_callback_unless_a_public_url_is_configured(
    sandbox_settings: Settings,
) -> None:
    assert sandbox_settings.twilio_status_callback_url == ""
    twilio = connector_from_settings("twilio", sandbox_settings)
    assert isinstance(twilio, TwilioConnector)
    assert "StatusCallback" not in twilio.build_form(sms(1, "cdp-1"))


def test_twilio_status_callback_url_is_encoded_and_keeps_the_base_query() -> None:
    assert status_callback(HOOK, "cdp-5") == f"{HOOK}?ref=cdp-5"
    assert (
        status_callback("https://h.example/t?tenant=a%20b&x=1", "cdp-5")
        == "https://h.example/t?tenant=a%20b&x=1&ref=cdp-5"
    )
    assert (
        status_callback("https://h.example/t", "a b&c=d") == "https://h.example/t?ref=a+b%26c%3Dd"
    )


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example.com/webhooks/twilio",
        "hooks.example.com/webhooks/twilio",
        "https://bad_host.example.com/webhooks/twilio",
        "https://hooks.example.com/webhooks/twilio?ref=fixed",
        "https://hooks.example.com/webhooks/twilio#frag",
    ],
)
def test_a_status_callback_url_twilio_would_refuse_stops_at_configuration(
    url: str, sandbox_settings: Settings
) -> None:
    with pytest.raises(ConnectorConfigError, match="CDP_TWILIO_STATUS_CALLBACK_URL"):
        connector_from_settings("twilio", with_callback(sandbox_settings, url))


def test_a_reference_over_a_provider_limit_is_refused_before_sending(
    sandbox_settings: Settings,
) -> None:
    """`cdp-<int>` is at most 24 characters, so this cannot happen with the engine's
    references; a longer one is refused here rather than truncated (a cut reference would
    name another row) or sent to be refused by Vonage (422, code 1450)."""
    vonage = connector_from_settings("vonage", sandbox_settings)
    assert isinstance(vonage, VonageConnector)
    with pytest.raises(ValueError, match="client_ref"):
        vonage.build_payload(sms(1, "cdp-" + "9" * 37))
    assert vonage.build_payload(sms(1, "cdp-" + "9" * 36))["client_ref"] == "cdp-" + "9" * 36


def test_the_sandbox_refuses_what_the_providers_refuse(sandbox: SandboxServer) -> None:
    """An over-long `biz_opaque_callback_data` (Meta: at most 512) is error 100; a StatusCallback
    that is not an http(s) URL is Twilio's 21609; nothing is accepted."""
    meta = httpx.post(
        f"{sandbox.url}/meta/v23.0/100000000000001/messages",
        json={
            "messaging_product": "whatsapp",
            "to": UK,
            "type": "text",
            "text": {"body": "hi"},
            "biz_opaque_callback_data": "x" * 513,
        },
        headers={"Authorization": f"Bearer {SANDBOX_META_TOKEN}"},
    )
    assert (meta.status_code, meta.json()["error"]["code"]) == (400, 100)
    twilio = httpx.post(
        f"{sandbox.url}/twilio/2010-04-01/Accounts/{SANDBOX_TWILIO_ACCOUNT_SID}/Messages.json",
        data={"To": UK, "From": "+15005550006", "Body": "hi", "StatusCallback": "not a url"},
        auth=(SANDBOX_TWILIO_ACCOUNT_SID, SANDBOX_TWILIO_AUTH_TOKEN),
    )
    assert (twilio.status_code, twilio.json()["code"]) == (400, 21609)
    assert sandbox.messages() == []


# --- and the status reports bring it back ----------------------------------------------------


@pytest.fixture
def recording_receiver(
    tmp_path: Path, sandbox_settings: Settings
) -> Iterator[tuple[WebhookServer, RecordingLedger]]:
    ledger = RecordingLedger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        with WebhookServer(ledger, sandbox_settings.webhook_secrets()) as receiver:
            yield receiver, ledger
    finally:
        ledger.dispose()


def test_a_lost_answer_s_status_reports_still_name_the_send(
    sandbox: SandboxServer,
    sandbox_settings: Settings,
    recording_receiver: tuple[WebhookServer, RecordingLedger],
) -> None:
    """Every provider accepts the message, then drops the connection before answering: each
    send is UNKNOWN with no provider id. The sandbox's signed status webhooks (Twilio's to the
    StatusCallback URL the send carried) still bring each send's reference back, so the
    report names the ledger row. Sends without a reference get reports without one."""
    receiver, ledger = recording_receiver
    sandbox.configure(
        status_webhooks_url=receiver.url, status_delay_ms=1, rate_drop_after_accept=1.0
    )
    settings = with_callback(sandbox_settings, f"{receiver.url}/webhooks/twilio")
    plan: dict[str, list[OutboundMessage]] = {
        "meta_whatsapp": [wa(1, send_reference(101)), wa(2)],
        "twilio": [sms(3, send_reference(103)), sms(4)],
        "infobip": [wa(5, send_reference(105)), sms(6, send_reference(106)), viber(7, "cdp-107")],
        "vonage": [wa(8, send_reference(108)), sms(9)],
    }
    for name, messages in plan.items():
        results = send(connector_from_settings(name, settings), messages)
        assert {(r.outcome, r.provider_message_id) for r in results} == {(Outcome.UNKNOWN, None)}
    accepted = sandbox.messages()
    assert len(accepted) == 9
    expected = {m.provider_message_id: _echoed(m) for m in accepted}
    assert sorted(filter(None, expected.values())) == [
        "cdp-101",
        "cdp-103",
        "cdp-105",
        "cdp-106",
        "cdp-107",
        "cdp-108",
    ]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        delivered = {e.provider_message_id for e in ledger.events if e.status == "delivered"}
        if delivered >= set(expected):
            break
        time.sleep(0.05)
    by_message: dict[str, set[str | None]] = {}
    for event in ledger.events:
        by_message.setdefault(event.provider_message_id, set()).add(event.reference)
    # Every message's every report (sent, delivered) carries its send's reference, or none.
    assert by_message == {pid: {reference} for pid, reference in expected.items()}
    # The reports are the providers' own shapes: the echoed field is where each puts it.
    payloads = {e.provider: json.loads(e.payload or "{}") for e in ledger.events if e.reference}
    assert payloads["meta"]["biz_opaque_callback_data"] == "cdp-101"
    assert payloads["infobip"]["callbackData"] in {"cdp-105", "cdp-106", "cdp-107"}
    assert payloads["vonage"]["client_ref"] == "cdp-108"
    assert "ref" not in payloads["twilio"]  # Twilio's comes from the URL, not the form


def _echoed(message: SandboxMessage) -> str | None:
    """The send reference a message's reports should carry, from what the sandbox accepted."""
    if message.status_callback:
        return parse_qs(urlsplit(message.status_callback).query)["ref"][0]
    # A Vonage send without a reference still has a client_ref (the key's UUID5): not ours.
    return message.callback_data if send_id_of(message.callback_data) is not None else None
