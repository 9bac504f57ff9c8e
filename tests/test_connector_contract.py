"""One contract every registered connector keeps, checked against the live sandbox over HTTP.

Each case below is parametrised over EVERY installed connector plugin, from the `ContractCase`
it declares (a plugin without one fails `test_every_registered_connector_has_a_contract_case`),
so the promises of DESIGN §5 hold for all of them the same way: batch limits respected, each
accepted message recorded once with the provider's id returned, per-recipient failures
FAILED, throttling and server errors RETRY (with Retry-After), bad credentials stop the
activation without leaking the secret, a refused connection is RETRY and a silent server
UNKNOWN, and `redact()` hides secrets.

Faults come from the sandbox's own fault injection (a module-scoped server of our own, so
changing its faults cannot disturb other tests), never from mocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from cdp_activation.connectors import (
    CONNECTORS,
    BrazeConnector,
    InfobipConnector,
    LineConnector,
    TwilioConnector,
    VonageConnector,
    WebhookConnector,
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
from cdp_activation.connectors.samples import (
    braze,
    braze_handoff,
    line,
    sms,
    viber,
    whatsapp,
    whatsapp_or_sms,
)
from cdp_activation.plugins import ConnectorPlugin, plugins
from cdp_activation.sandbox import SandboxConfig, SandboxServer
from cdp_activation.settings import (
    SANDBOX_WEBHOOK_TOKEN,
    Settings,
)
from cdp_activation.spec import HandoffSpec
from conftest import settings_for_sandbox

pytestmark = pytest.mark.integration

BAD_SECRET = "not-the-right-secret-0123456789"


@dataclass(frozen=True)
class Case:
    """What the contract needs to know about one connector, from its plugin's `ContractCase`."""

    url_field: str  # Settings field holding its base URL
    url_suffix: str  # path under the sandbox URL
    bad_credentials: dict[str, Any]  # Settings update that makes the provider refuse us
    real_secrets: tuple[str, ...]  # the sandbox's own credentials, which must not leak either
    message: Callable[[int], OutboundMessage]
    bad_recipient: OutboundMessage
    failure_code: str
    secret_forms: Callable[[str], tuple[str, ...]]


def case_of(plugin: ConnectorPlugin) -> Case:
    contract = plugin.contract
    assert contract is not None, f"{plugin.name} declares no ContractCase"
    url = "base_url" if "base_url" in plugin.settings.model_fields else "url"
    credential = contract.credential
    if "dict" in str(plugin.settings.model_fields[credential].annotation):  # request headers
        bad: Any = {"Authorization": SecretStr(f"Bearer {BAD_SECRET}")}
        real = (SANDBOX_WEBHOOK_TOKEN,)
    else:
        bad = SecretStr(BAD_SECRET)
        real = (plugin.sandbox_value(credential) or "",)
    return Case(
        plugin.flat_name(url),
        plugin.sandbox,
        {plugin.flat_name(credential): bad},
        real,
        contract.message,
        contract.bad_recipient,
        contract.failure_code,
        contract.secret_forms,
    )


CASES: dict[str, Case] = {
    name: case_of(plugin) for name, plugin in plugins().items() if plugin.contract
}
NAMES = sorted(CONNECTORS)


def build(name: str, settings: Settings, **update: Any) -> Connector:
    return connector_from_settings(name, settings.model_copy(update=update))


def send(
    connector: Connector, messages: Sequence[OutboundMessage], timeout: float = 5.0
) -> list[SendResult]:
    """Messages through `send_batch` in batches of the connector's size, one fresh client."""
    size = connector.capabilities.max_batch_size

    async def go() -> list[SendResult]:
        results: list[SendResult] = []
        async with httpx.AsyncClient(timeout=timeout) as client:
            for start in range(0, len(messages), size):
                results.extend(await connector.send_batch(client, messages[start : start + size]))
        return results

    results = asyncio.run(go())
    assert sorted(r.key for r in results) == sorted(m.key for m in messages)
    return results


def full_batch(name: str, connector: Connector) -> list[OutboundMessage]:
    """At least one full batch, and three messages for one-recipient connectors."""
    n = max(connector.capabilities.max_batch_size, 3)
    return [CASES[name].message(i) for i in range(n)]


@pytest.fixture(scope="module")
def faulty() -> Iterator[SandboxServer]:
    with SandboxServer() as server:
        yield server


@pytest.fixture
def faulty_sandbox(faulty: SandboxServer) -> Iterator[SandboxServer]:
    faulty.reset()
    faulty.config = SandboxConfig()
    yield faulty
    faulty.config = SandboxConfig()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# --- the contract ------------------------------------------------------------------------------


def test_every_registered_connector_has_a_contract_case() -> None:
    assert set(CONNECTORS) == set(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_are_sane(name: str, sandbox_settings: Settings) -> None:
    connector = connector_from_settings(name, sandbox_settings)
    assert isinstance(connector, Connector)
    capabilities = connector.capabilities
    assert capabilities.max_batch_size >= 1
    assert capabilities.default_rate_per_second > 0
    assert capabilities.channels
    assert CASES[name].message(0).channel in capabilities.channels


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_over_the_limit_is_refused_before_any_request(
    name: str, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    connector = connector_from_settings(name, sandbox_settings)
    too_many = [CASES[name].message(i) for i in range(connector.capabilities.max_batch_size + 1)]

    async def go() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            await connector.send_batch(client, too_many)

    with pytest.raises(ValueError, match="at most"):
        asyncio.run(go())
    assert sandbox.attempts() == []


@pytest.mark.parametrize("name", NAMES)
def test_full_batches_are_recorded_once_with_the_provider_id(
    name: str, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    connector = connector_from_settings(name, sandbox_settings)
    messages = full_batch(name, connector)
    results = send(connector, messages)

    assert {r.outcome for r in results} == {Outcome.SENT}
    recorded = sandbox.messages()
    assert len(recorded) == len(messages)
    assert Counter(m.to for m in recorded) == Counter(m.to for m in messages)
    assert {m.provider_message_id for m in recorded} == {r.provider_message_id for r in results}
    assert sandbox.duplicates() == {}
    by_to = {m.to: m for m in recorded}
    handoff = connector.capabilities.handoff
    for message in messages:
        seen = by_to[message.to]
        assert seen.channel == message.channel
        if handoff:  # a profile written, not a message: its attributes are what Braze keeps
            assert message.template is not None and message.customer_id is not None
            spec = HandoffSpec.from_message_name(message.template.name)
            assert spec is not None
            profile = sandbox.profiles()[message.customer_id]
            assert profile[spec.attribute] == message.template.language
            assert profile["phone"] == message.to
            for column, value in zip(
                message.template.parameter_names, message.template.parameters, strict=True
            ):
                assert profile[column] == value
            assert profile["subscription_groups"] == [
                {
                    "subscription_group_id": spec.subscription_group,
                    "subscription_state": "subscribed",
                }
            ]
        elif message.template is not None:
            assert seen.template_name == message.template.name
            assert seen.parameters == message.template.parameters
        else:
            assert seen.body == message.body


@pytest.mark.parametrize("name", NAMES)
def test_a_permanent_recipient_failure_is_failed(
    name: str, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    case = CASES[name]
    connector = connector_from_settings(name, sandbox_settings)
    good = case.message(0)
    results = {r.key: r for r in send(connector, [good, case.bad_recipient])}

    assert results[good.key].outcome is Outcome.SENT
    bad = results["bad"]
    assert (bad.outcome, bad.error_code) == (Outcome.FAILED, case.failure_code)
    assert [m.to for m in sandbox.messages()] == [good.to]


@pytest.mark.parametrize("name", NAMES)
def test_throttling_is_retry_with_retry_after(name: str, faulty_sandbox: SandboxServer) -> None:
    faulty_sandbox.configure(rate_429=1.0, retry_after_s=2)
    connector = connector_from_settings(name, settings_for_sandbox(faulty_sandbox))
    results = send(connector, [CASES[name].message(i) for i in range(2)])

    wait = plugins()[name].contract.throttle_retry_after or 2.0  # type: ignore[union-attr]
    assert {(r.outcome, r.retry_after) for r in results} == {(Outcome.RETRY, wait)}
    assert faulty_sandbox.messages() == []


@pytest.mark.parametrize("name", NAMES)
def test_server_errors_are_retry(name: str, faulty_sandbox: SandboxServer) -> None:
    faulty_sandbox.configure(rate_5xx=1.0)
    connector = connector_from_settings(name, settings_for_sandbox(faulty_sandbox))
    results = send(connector, [CASES[name].message(i) for i in range(2)])

    assert {r.outcome for r in results} == {Outcome.RETRY}
    assert faulty_sandbox.messages() == []


@pytest.mark.parametrize("name", NAMES)
def test_bad_credentials_stop_without_leaking_a_secret(
    name: str, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    case = CASES[name]
    connector = build(name, sandbox_settings, **case.bad_credentials)
    with pytest.raises(CredentialsError) as raised:
        send(connector, [case.message(0)])
    shown = f"{raised.value!s} {raised.value!r} {connector!r}"
    for secret in (*case.secret_forms(BAD_SECRET), *case.real_secrets):
        assert secret not in shown
    assert sandbox.messages() == []


@pytest.mark.parametrize("name", NAMES)
def test_a_refused_connection_is_retry(
    name: str, closed_port: int, sandbox_settings: Settings
) -> None:
    case = CASES[name]
    url = f"http://127.0.0.1:{closed_port}{case.url_suffix}"
    results = send(build(name, sandbox_settings, **{case.url_field: url}), [case.message(0)])
    assert [(r.outcome, r.error_code) for r in results] == [(Outcome.RETRY, "ConnectError")]


@pytest.mark.parametrize("name", NAMES)
def test_a_silent_server_is_unknown(
    name: str, silent_server: str, sandbox_settings: Settings
) -> None:
    case = CASES[name]
    connector = build(name, sandbox_settings, **{case.url_field: silent_server + case.url_suffix})
    results = send(connector, [case.message(0)], timeout=0.3)
    assert [(r.outcome, r.error_code) for r in results] == [(Outcome.UNKNOWN, "ReadTimeout")]


@pytest.mark.parametrize("name", NAMES)
def test_redact_hides_every_secret(name: str, sandbox_settings: Settings) -> None:
    case = CASES[name]
    connector = build(name, sandbox_settings, **case.bad_credentials)
    for secret in case.secret_forms(BAD_SECRET):
        text = f"Authorization: something {secret}&x=1 echoed {secret}"
        assert secret not in connector.redact(text)
        assert secret not in repr(connector)
    sandbox_connector = connector_from_settings(name, sandbox_settings)
    for secret in case.real_secrets:
        assert secret not in sandbox_connector.redact(f"token={secret}")


@pytest.mark.parametrize(
    "name", [n for n in NAMES if CONNECTORS[n].capabilities.idempotency] or ["(none)"]
)
def test_idempotent_connectors_survive_a_lost_answer(
    name: str, faulty_sandbox: SandboxServer
) -> None:
    """`idempotency=True` is a promise: resending a batch whose answer was lost after the
    provider accepted it must not message anyone twice."""
    if name == "(none)":
        pytest.skip("no registered connector declares idempotency")
    connector = connector_from_settings(name, settings_for_sandbox(faulty_sandbox))
    messages = [CASES[name].message(i) for i in range(3)]
    faulty_sandbox.configure(rate_drop_after_accept=1.0)
    lost = send(connector, messages, timeout=2)
    assert {r.outcome for r in lost} == {Outcome.UNKNOWN}
    first_ids = {m.provider_message_id for m in faulty_sandbox.messages()}

    faulty_sandbox.configure(rate_drop_after_accept=0.0)
    resent = send(connector, messages)

    assert {r.outcome for r in resent} == {Outcome.SENT}
    assert {r.provider_message_id for r in resent} == first_ids
    assert len(faulty_sandbox.messages()) == len(messages)
    assert faulty_sandbox.duplicates() == {}


@pytest.mark.parametrize(
    "name", [n for n in NAMES if CONNECTORS[n].capabilities.idempotency] or ["(none)"]
)
def test_idempotent_connectors_survive_a_5xx_after_the_provider_took_the_request(
    name: str, faulty_sandbox: SandboxServer
) -> None:
    """A 5xx may come after the provider took the request (LINE says so of its API; a gateway
    in front of a webhook receiver does it too): the answer says so (`may_be_taken`), so the
    engine asks again with the same key, which must not message anyone twice."""
    if name == "(none)":
        pytest.skip("no registered connector declares idempotency")
    connector = connector_from_settings(name, settings_for_sandbox(faulty_sandbox))
    messages = [CASES[name].message(i) for i in range(3)]
    faulty_sandbox.configure(rate_5xx_after_accept=1.0)
    failed = send(connector, messages)
    # (Braze's attribute push is idempotent by its values, not by a key: it need not say so.)
    assert {(r.outcome, r.may_be_taken or name == "braze_audience") for r in failed} == {
        (Outcome.RETRY, True)
    }
    taken = len(faulty_sandbox.messages())
    assert taken == len(messages)  # the provider did take them

    faulty_sandbox.configure(rate_5xx_after_accept=0.0)
    resent = send(connector, messages)

    assert {r.outcome for r in resent} == {Outcome.SENT}
    assert len(faulty_sandbox.messages()) == taken
    assert faulty_sandbox.duplicates() == {}


@pytest.mark.parametrize("name", NAMES)
def test_a_gateway_timeout_after_the_provider_took_the_request_never_messages_anyone_twice(
    name: str, faulty_sandbox: SandboxServer
) -> None:
    """The provider took the request, then a gateway in front of it gave up waiting and
    answered 504 with its own HTML page. Through a provider that does not de-duplicate, the
    message ends UNKNOWN and is never sent again (as after our own read timeout); through one
    that does, it is asked again under the same key, which the provider answers as taken."""
    connector = connector_from_settings(name, settings_for_sandbox(faulty_sandbox))
    messages = [CASES[name].message(i) for i in range(3)]
    faulty_sandbox.configure(rate_504_after_accept=1.0)
    answered = send(connector, messages)
    taken = len(faulty_sandbox.messages())
    assert taken == len(messages)  # the provider did take them
    results = Counter(a.result for a in faulty_sandbox.attempts())
    assert results["gateway_timeout_after_accept"] >= 1
    if not connector.capabilities.idempotency:
        assert {(r.outcome, r.error_code) for r in answered} == {(Outcome.UNKNOWN, "http_504")}
        assert all("not sent again" in (r.error_message or "") for r in answered)
        return
    assert {r.outcome for r in answered} == {Outcome.RETRY}
    faulty_sandbox.configure(rate_504_after_accept=0.0)
    resent = send(connector, messages)
    assert {r.outcome for r in resent} == {Outcome.SENT}
    assert len(faulty_sandbox.messages()) == taken
    assert faulty_sandbox.duplicates() == {}


@pytest.mark.parametrize("name", NAMES)
def test_a_throttled_request_was_surely_not_taken(name: str, faulty_sandbox: SandboxServer) -> None:
    """A 429 means the provider took nothing: the rows may go out in any request."""
    faulty_sandbox.configure(rate_429=1.0, retry_after_s=1)
    connector = connector_from_settings(name, settings_for_sandbox(faulty_sandbox))
    results = send(connector, [CASES[name].message(i) for i in range(2)])
    assert {(r.outcome, r.may_be_taken) for r in results} == {(Outcome.RETRY, False)}


# --- connector-specific classification ---------------------------------------------------------


def infobip(settings: Settings) -> InfobipConnector:
    connector = connector_from_settings("infobip", settings)
    assert isinstance(connector, InfobipConnector)
    return connector


def vonage(settings: Settings) -> VonageConnector:
    connector = connector_from_settings("vonage", settings)
    assert isinstance(connector, VonageConnector)
    return connector


def test_infobip_splits_a_mixed_batch_into_one_request_per_channel(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    send(infobip(sandbox_settings), [whatsapp_or_sms(i) for i in range(10)])
    attempts = sandbox.attempts()
    assert [a.result for a in attempts] == ["accepted", "accepted"]
    assert Counter(m.channel for m in sandbox.messages()) == {"whatsapp": 5, "sms": 5}


def test_infobip_fails_a_viber_text_over_1000_characters_alone(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    """Infobip refuses a Viber text over 1,000 characters for the whole request (the sandbox
    answers 400 as the spec's schema does): that one customer fails, the others go."""
    long = dataclasses.replace(viber(1), body="x" * 1001)
    results = send(infobip(sandbox_settings), [viber(0), long, viber(2)])
    outcomes = {r.key: (r.outcome, r.error_code) for r in results}
    assert outcomes[long.key] == (Outcome.FAILED, "invalid_text")
    assert {outcomes[viber(i).key][0] for i in (0, 2)} == {Outcome.SENT}
    assert len(sandbox.messages()) == 2


def test_infobip_builds_every_channel_s_request_before_it_sends_any(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    """An SMS of a mixed batch that cannot be built (no text) stops the batch before the
    WhatsApp request goes: nothing was taken, so nothing can be taken for unsent and sent
    again."""
    batch = [whatsapp_or_sms(i) for i in range(4)]
    batch[1] = dataclasses.replace(batch[1], body=None)  # an SMS without its text
    with pytest.raises(TemplateError, match="has no provider templates"):
        send(infobip(sandbox_settings), batch)
    assert sandbox.messages() == [] and sandbox.attempts() == []


@pytest.mark.parametrize(
    "template",
    [
        TemplateRef("no_such_template", "en", ()),
        TemplateRef("paused_promo", "en", ("a", "b")),
        TemplateRef("winback_offer", "en", ("Ana",)),
    ],
    ids=["unknown", "paused", "placeholder-count"],
)
@pytest.mark.parametrize("name", ["infobip", "vonage"])
def test_a_wrong_template_stops_the_activation(
    name: str, template: TemplateRef, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    message = OutboundMessage("k1", "+447911123450", "whatsapp", template=template)
    with pytest.raises(TemplateError) as raised:
        send(connector_from_settings(name, sandbox_settings), [message])
    assert "+447911123450" not in str(raised.value)
    assert sandbox.messages() == []


def _infobip_status(group: str, name: str) -> dict[str, object]:
    return {"groupId": 5, "groupName": group, "id": 12, "name": name, "description": "x"}


def test_infobip_classification(sandbox_settings: Settings) -> None:
    connector = infobip(sandbox_settings)
    messages = [whatsapp(0), whatsapp(1)]
    from cdp_activation.connectors.http import client_message_id

    ids = [client_message_id(m.key) for m in messages]
    answer = httpx.Response(
        200,
        json={
            "messages": [
                {"messageId": ids[0], "status": _infobip_status("PENDING", "PENDING_ENROUTE")},
                # the second message is missing from the answer: UNKNOWN
            ]
        },
    )
    outcomes = [r.outcome for r in connector.classify(messages, answer)]
    assert outcomes == [Outcome.SENT, Outcome.UNKNOWN]

    bad_request = httpx.Response(
        400,
        json={"requestError": {"serviceException": {"messageId": "BAD_REQUEST", "text": "Bad"}}},
    )
    results = connector.classify(messages, bad_request)
    assert {(r.outcome, r.error_code) for r in results} == {(Outcome.FAILED, "BAD_REQUEST")}

    throttled = httpx.Response(
        429,
        json={"errorCode": "E429", "description": "Too many requests sent."},
        headers={"Retry-After": "3"},
    )
    results = connector.classify(messages, throttled)
    assert {(r.outcome, r.error_code, r.retry_after) for r in results} == {
        (Outcome.RETRY, "E429", 3.0)
    }

    no_credit = httpx.Response(
        200,
        json={
            "messages": [
                {
                    "messageId": ids[0],
                    "status": _infobip_status("REJECTED", "REJECTED_NOT_ENOUGH_CREDITS"),
                }
            ]
        },
    )
    with pytest.raises(ConnectorError, match="NOT_ENOUGH_CREDITS"):
        connector.classify(messages[:1], no_credit)
    # Out of credit half-way through a request: the one taken before is said to be taken
    # (`answered`: recorded sent, never sent again); the refused one stays due.
    half = httpx.Response(
        200,
        json={
            "messages": [
                {"messageId": ids[0], "status": _infobip_status("ACCEPTED", "MESSAGE_ACCEPTED")},
                {
                    "messageId": ids[1],
                    "status": _infobip_status("REJECTED", "REJECTED_NOT_ENOUGH_CREDITS"),
                },
            ]
        },
    )
    with pytest.raises(ConnectorError, match="NOT_ENOUGH_CREDITS") as raised:
        connector.classify(messages, half)
    assert [(r.key, r.outcome) for r in raised.value.answered] == [(messages[0].key, Outcome.SENT)]
    with pytest.raises(CredentialsError):
        connector.classify(messages, httpx.Response(403, json={}))


def _vonage_body(code: int, title: str) -> dict[str, str]:
    return {
        "type": f"https://developer.nexmo.com/api-errors/messages-olympus#{code}",
        "title": title,
        "detail": "x",
        "instance": "abc",
    }


def test_vonage_classification(sandbox_settings: Settings) -> None:
    connector = vonage(sandbox_settings)
    message = whatsapp(0)
    with pytest.raises(ConnectorError, match="balance"):
        connector.classify(message, httpx.Response(402, json=_vonage_body(1070, "Low balance")))
    with pytest.raises(TemplateError):
        connector.classify(message, httpx.Response(422, json=_vonage_body(1022, "Invalid")))
    # The account or the sender refused as a whole: the activation stops, nobody is failed.
    with pytest.raises(ConnectorConfigError, match=r"\(1420\).*CDP_VONAGE_WHATSAPP_FROM"):
        connector.classify(message, httpx.Response(422, json=_vonage_body(1420, "Invalid sender")))
    with pytest.raises(ConnectorError, match="barred from sending"):
        connector.classify(message, httpx.Response(422, json=_vonage_body(1060, "Barred")))
    busy = connector.classify(message, httpx.Response(429, json=_vonage_body(1241, "Too many")))
    assert busy.outcome == Outcome.RETRY
    barred = connector.classify(message, httpx.Response(422, json=_vonage_body(1050, "Barred")))
    assert (barred.outcome, barred.error_code) == (Outcome.FAILED, "1050")
    assert "Barred" in (barred.error_message or "")
    throttled = connector.classify(
        message,
        httpx.Response(429, json=_vonage_body(1000, "Rate"), headers={"Retry-After": "1"}),
    )
    assert (throttled.outcome, throttled.retry_after) == (Outcome.RETRY, 1.0)


def test_webhook_batch_size_and_headers_come_from_settings(sandbox_settings: Settings) -> None:
    connector = build(
        "webhook",
        sandbox_settings,
        webhook_batch_size=7,
        webhook_headers={"X-Api-Key": SecretStr(BAD_SECRET)},
    )
    assert isinstance(connector, WebhookConnector)
    assert connector.capabilities.max_batch_size == 7
    assert connector.capabilities.idempotency is True
    assert BAD_SECRET not in repr(connector)
    assert WebhookConnector.capabilities.max_batch_size == 200


def test_every_connector_secret_reaches_dagster_as_an_env_var(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resources are derived from the plugins: every credential of every connector is a
    `dg.EnvVar` when set (resolved at run time, never shown), the receiver's signing secrets
    stay out of them, and their other settings are plain config."""
    import dagster as dg

    from cdp_activation.defs.resources import resources

    values: dict[tuple[str, str], str] = {}
    for name, plugin in plugins().items():
        for field_name in plugin.settings.model_fields:
            if plugin.is_secret(field_name):
                value = f"{name}-{field_name}-secret"
                if "dict" in str(plugin.settings.model_fields[field_name].annotation):
                    value = json.dumps({"Authorization": f"Bearer {value}"})
                monkeypatch.setenv(plugin.env_name(field_name), value)
                values[(name, field_name)] = value
    configured = resources().resources
    assert {name for name, _ in values} <= set(configured)
    for name, field_name in values:
        plugin = plugins()[name]
        if plugin.for_receiver_only(field_name):
            assert field_name not in type(configured[name]).model_fields
        else:
            assert isinstance(getattr(configured[name], field_name), dg.EnvVar)
    shown = repr(configured)
    assert not [v for v in values.values() if v in shown]


def test_new_connector_resources_default_to_the_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    from cdp_activation.defs.resources import resources

    for name in ("CDP_INFOBIP_API_KEY", "CDP_VONAGE_API_SECRET", "CDP_WEBHOOK_HEADERS"):
        monkeypatch.delenv(name, raising=False)
    configured = resources().resources
    for key in ("infobip", "vonage", "webhook"):
        connector = configured[key].connector()
        assert connector.name == key
        assert "127.0.0.1" in repr(connector)


# --- Braze -------------------------------------------------------------------------------------


def test_braze_sends_trigger_properties_by_name_and_the_validated_number(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    connector = connector_from_settings("braze", sandbox_settings)
    assert isinstance(connector, BrazeConnector)
    payload = connector.build_payload([braze(1), braze(2)])
    assert payload["campaign_id"] == "winback_campaign"
    assert payload["recipients"][0] == {
        "external_user_id": "customer-1",
        "trigger_properties": {"first_name": "Ana", "days": "45", "code": "C1"},
        "attributes": {"phone": braze(1).to},
        "send_to_existing_only": True,
    }
    results = send(connector, [braze(i) for i in range(3)])
    # Braze answers one dispatch id for the whole batch; every recipient's row keeps it.
    assert len({r.provider_message_id for r in results}) == 1


def test_braze_unknown_campaign_stops_the_activation(sandbox_settings: Settings) -> None:
    message = dataclasses.replace(braze(0), template=TemplateRef("no_such_campaign", "en"))
    with pytest.raises(TemplateError, match="campaign"):
        send(connector_from_settings("braze", sandbox_settings), [message])


def test_braze_audience_writes_each_profile_once_75_a_request(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    connector = connector_from_settings("braze_audience", sandbox_settings)
    messages = [braze_handoff(i) for i in range(160)]
    results = send(connector, messages)

    assert {r.outcome for r in results} == {Outcome.SENT}
    assert [a.result for a in sandbox.attempts()] == ["accepted"] * 3  # 75 + 75 + 10
    profiles = sandbox.profiles()
    assert len(profiles) == 160
    assert profiles["customer-7"]["cdp_contract_at"] == "2026-12-05T10:00:00Z"
    assert profiles["customer-7"]["_update_existing_only"] is True


def test_braze_audience_fails_only_the_profiles_braze_names_in_its_errors(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    """Braze answers 201 "success" with non-fatal `errors` naming objects by index: those
    customers fail with the connector's own code, the others are written."""
    connector = connector_from_settings("braze_audience", sandbox_settings)
    unknown_group = TemplateRef("audience:cdp_contract_at:no_such_group", "2026-12-05T10:00:00Z")
    messages = [
        braze_handoff(0),
        dataclasses.replace(braze_handoff(1), template=unknown_group),
        braze_handoff(2),
    ]
    results = {r.key: r for r in send(connector, messages)}

    refused = results[messages[1].key]
    assert (refused.outcome, refused.error_code) == (Outcome.FAILED, "braze_attributes_rejected")
    assert refused.error_message and "subscription_group_id" in refused.error_message
    assert {results[m.key].outcome for m in (messages[0], messages[2])} == {Outcome.SENT}
    assert set(sandbox.profiles()) == {"customer-0", "customer-2"}


def test_braze_audience_refuses_a_template_step(sandbox_settings: Settings) -> None:
    with pytest.raises(TemplateError, match="handoff"):
        send(connector_from_settings("braze_audience", sandbox_settings), [braze(0)])


# --- LINE --------------------------------------------------------------------------------------


def test_line_groups_a_batch_by_text_one_multicast_per_shared_text(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    connector = connector_from_settings("line", sandbox_settings)
    shared = [line(i) for i in range(300)]
    personal = [dataclasses.replace(line(i), body=f"Hi {i}!") for i in range(300, 302)]
    results = send(connector, [*shared, *personal])

    assert {r.outcome for r in results} == {Outcome.SENT}
    attempts = sandbox.attempts()
    assert len(attempts) == 3  # one multicast of 300, two pushes
    by_id = Counter(r.provider_message_id for r in results)
    assert sorted(by_id.values()) == [1, 1, 300]
    assert Counter(m.body for m in sandbox.messages())[line(0).body] == 300


def test_line_repeated_request_is_answered_409_and_sends_nothing(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    """The retry key depends only on the ledger keys: the same recipients, asked again (a run
    after a crash), are not messaged twice, and keep the first request's id."""
    connector = connector_from_settings("line", sandbox_settings)
    batch = [line(i) for i in range(5)]
    first = send(connector, batch)
    again = send(connector, list(reversed(batch)))

    assert {r.outcome for r in again} == {Outcome.SENT}
    assert {r.provider_message_id for r in again} == {r.provider_message_id for r in first}
    assert [a.result for a in sandbox.attempts()] == ["accepted", "replayed"]
    assert len(sandbox.messages()) == 5


def test_line_classification(sandbox_settings: Settings) -> None:
    connector = connector_from_settings("line", sandbox_settings)
    assert isinstance(connector, LineConnector)
    group = [line(0), line(1)]
    quota = httpx.Response(429, json={"message": "You have reached your monthly limit."})
    with pytest.raises(ConnectorError, match="monthly message quota"):
        connector.classify(group, quota)
    throttled = httpx.Response(
        429, json={"message": "The API rate limit has been exceeded."}, headers={"Retry-After": "3"}
    )
    assert {(r.outcome, r.retry_after) for r in connector.classify(group, throttled)} == {
        (Outcome.RETRY, 3.0)
    }
    bad = httpx.Response(400, json={"message": "The request body has 1 error(s)"})
    assert {(r.outcome, r.error_code) for r in connector.classify(group, bad)} == {
        (Outcome.FAILED, "http_400")
    }
    with pytest.raises(CredentialsError):
        connector.classify(group, httpx.Response(403, json={"message": "Not authorized"}))
    # A 200 that names no request cannot be matched to a send: UNKNOWN, never SENT.
    assert {r.outcome for r in connector.classify(group, httpx.Response(200, json={}))} == {
        Outcome.UNKNOWN
    }
    with pytest.raises(TemplateError):
        send(connector, [dataclasses.replace(line(0), body=None, template=TemplateRef("x", "ja"))])


# --- Twilio WhatsApp ---------------------------------------------------------------------------


def test_twilio_sends_whatsapp_with_prefixed_addresses_and_content_templates(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    from cdp_activation.sandbox import twilio_content_sid

    connector = connector_from_settings("twilio", sandbox_settings)
    assert isinstance(connector, TwilioConnector)
    sid = twilio_content_sid("order_update", "en")
    template = OutboundMessage(
        "k1", "+447911123450", "whatsapp", template=TemplateRef(sid, "en", ("Ana", "A-1"))
    )
    form = connector.build_form(template)
    assert (form["To"], form["From"]) == ("whatsapp:+447911123450", "whatsapp:+14155238886")
    assert (form["ContentSid"], form["ContentVariables"]) == (sid, '{"1": "Ana", "2": "A-1"}')
    assert connector.build_form(sms(1))["From"] == "+15005550006"  # SMS keeps its own sender

    not_on_whatsapp = OutboundMessage("k2", "+447911123413", "whatsapp", body="Thanks!")
    results = {r.key: r for r in send(connector, [template, not_on_whatsapp, sms(1)])}
    assert results["k1"].outcome is Outcome.SENT
    assert (results["k2"].outcome, results["k2"].error_code) == (Outcome.FAILED, "63003")
    assert {(m.channel, m.to) for m in sandbox.messages()} == {
        ("whatsapp", "+447911123450"),
        ("sms", sms(1).to),
    }


def test_vonage_tags_viber_messages_by_purpose(sandbox_settings: Settings) -> None:
    connector = vonage(sandbox_settings)
    marketing = connector.build_payload(viber(1))
    assert (marketing["channel"], marketing["from"]) == ("viber_service", "cdpdemo")
    assert marketing["viber_service"] == {"category": "promotion"}
    service = connector.build_payload(dataclasses.replace(viber(1), purpose="transactional"))
    assert service["viber_service"] == {"category": "transaction"}


def test_braze_canvas_template_enters_users_into_the_canvas(
    sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    connector = connector_from_settings("braze", sandbox_settings)
    assert isinstance(connector, BrazeConnector)
    canvas = [
        dataclasses.replace(
            braze(i), template=dataclasses.replace(braze(i).template, name="canvas:winback_canvas")
        )
        for i in range(3)
    ]
    payload = connector.build_payload(canvas)
    assert payload["canvas_id"] == "winback_canvas" and "campaign_id" not in payload
    assert payload["recipients"][0]["canvas_entry_properties"] == {
        "first_name": "Ana",
        "days": "45",
        "code": "C0",
    }
    assert "trigger_properties" not in payload["recipients"][0]
    results = send(connector, canvas)
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert {m.template_name for m in sandbox.messages()} == {"canvas:winback_canvas"}
    unknown = dataclasses.replace(
        canvas[0], template=dataclasses.replace(canvas[0].template, name="canvas:nope")
    )
    with pytest.raises(TemplateError, match="canvas"):
        send(connector, [unknown])


# An upstream that echoes what it was sent (a debugging proxy, a misconfigured gateway, an
# error page quoting the request): every credential must be redacted in every encoding.
TRICKY_SECRET = "Sx/9+k=Tok:en%41-0123456789"


def _echo_app() -> Any:
    from urllib.parse import quote

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def echo(request: Request) -> Any:
        if request.url.path == "/health":
            return PlainTextResponse("ok")
        body = (await request.body()).decode(errors="replace")
        auth = request.headers.get("authorization", "")
        others = [f"{k}={v}" for k, v in request.headers.items() if k != "authorization"]
        # The credential first, so no clipping of the error text hides the leak.
        echoed = f"auth={auth} quoted={quote(auth, safe='')} {' '.join(others)} body={body}"
        payload = {
            "error": {"message": echoed, "code": 1, "type": echoed},
            "message": echoed,
            "errors": [{"title": echoed, "code": 1, "detail": echoed}],
            "detail": echoed,
            "title": echoed,
        }
        return JSONResponse(payload, status_code=request.app.state.status)

    app = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])
    app.state.status = 400
    return app


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[Any]:
    from cdp_activation.serving import BackgroundServer

    with BackgroundServer(_echo_app()) as server:
        yield server


def _secret_settings(name: str, settings: Settings) -> dict[str, Any]:
    """The connector's credential set to TRICKY_SECRET (as `bad_credentials` names it)."""
    update: dict[str, Any] = {}
    for field_name, value in CASES[name].bad_credentials.items():
        if isinstance(value, dict):  # webhook headers
            update[field_name] = {"Authorization": SecretStr(f"Bearer {TRICKY_SECRET}")}
        else:
            update[field_name] = SecretStr(TRICKY_SECRET)
    return update


@pytest.mark.parametrize("status", [400, 401, 500])
@pytest.mark.parametrize("name", NAMES)
def test_an_echoing_upstream_never_sees_a_credential_leak_through(
    name: str, status: int, echo_upstream: Any, sandbox_settings: Settings
) -> None:
    from cdp_activation.masking import secret_forms

    case = CASES[name]
    echo_upstream.app.state.status = status
    connector = build(
        name,
        sandbox_settings,
        **{case.url_field: echo_upstream.url + case.url_suffix},
        **_secret_settings(name, sandbox_settings),
    )
    shown: list[str] = []
    try:
        results = send(connector, [case.message(0)])
        shown += [f"{r.error_code} {r.error_message}" for r in results]
    except ConnectorError as err:
        shown += [str(err), repr(err)]
    text = "\n".join(shown)
    assert "auth=" in text, text  # the echo (credential first) reached what users see
    user = getattr(connector, "account_sid", None) or getattr(connector, "api_key", None)
    secrets = [TRICKY_SECRET] + ([f"{user}:{TRICKY_SECRET}"] if user else [])
    for secret in secrets:
        for form in secret_forms(secret):
            assert form not in text, (name, status, form, text)
