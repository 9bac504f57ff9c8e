"""KakaoTalk AlimTalk through Infobip: a Kakao-approved template code with its registered text
filled in per customer, through the whole run against the sandbox, and the rules that make an
AlimTalk step valid."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from cdp_activation.cli.runner import run_activation
from cdp_activation.connectors import connector_from_settings
from cdp_activation.connectors.base import OutboundMessage, TemplateError, TemplateRef
from cdp_activation.settings import Settings
from cdp_activation.spec import ChannelPlanSpec
from test_activation_e2e import (  # env and warehouse: fixtures this module uses
    TODAY,
    custom_definitions,
    env,  # noqa: F401
    ledger_rows,
    warehouse,  # noqa: F401
)
from test_connector_contract import send

pytestmark = pytest.mark.e2e

KAKAO_STEP = {
    "channel": "kakao",
    "connector": "infobip",
    "template_code": "order_shipped_01",
    "body": "Hi {first_name}, your order {order_ref} has shipped.",
}
# Korean mobiles (+82 10 ...) for some demo customers, who accept transactional KakaoTalk.
KOREAN_AUDIENCE = """
SELECT
    customer_id,
    first_name,
    '+8210' || lpad(CAST(customer_id % 100000000 AS VARCHAR), 8, '0') AS phone,
    'KR' AS country,
    'Asia/Seoul' AS timezone,
    TRUE AS kakao_transactional_consent,
    TRUE AS sms_transactional_consent,
    'A' || CAST(customer_id AS VARCHAR) AS order_ref
FROM customers
ORDER BY customer_id
LIMIT 30
"""


def kakao_attributes() -> dict[str, Any]:
    return {
        "description": "Shipping updates on KakaoTalk, SMS where it does not land.",
        "audience": {"sql": "sql/audiences/kakao_shipped.sql"},
        "channel_plan": {
            "purpose": "transactional",
            "steps": [
                KAKAO_STEP,
                {"channel": "sms", "connector": "infobip", "body": "x {order_ref}"},
            ],
            "fallback": {"channel": "sms", "not_delivered_within_minutes": 15},
        },
        "partitions_start_date": "2026-11-01",
    }


def test_an_alimtalk_step_sends_its_template_code_with_the_text_filled_in(
    env: SimpleNamespace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CDP_INFOBIP_BASE_URL", f"{env.sandbox.url}/infobip")
    monkeypatch.delenv("CDP_INFOBIP_API_KEY", raising=False)
    definitions = custom_definitions(env.tmp, "kakao_shipped", kakao_attributes(), KOREAN_AUDIENCE)
    summary = run_activation(
        "kakao_shipped",
        TODAY.isoformat(),
        definitions=definitions,
        send_window=("00:00", "23:59"),
    )
    assert summary.success, summary.error
    assert summary.sent == 30
    messages = env.sandbox.messages()
    assert {(m.provider, m.channel, m.template_name) for m in messages} == {
        ("infobip", "kakao", "order_shipped_01")
    }
    assert all(m.to.startswith("+8210") for m in messages)
    first = min(messages, key=lambda m: m.to)
    assert first.body is not None and first.body.startswith("Hi ")
    assert "has shipped." in first.body and "{" not in first.body
    rows = ledger_rows(env, "kakao_shipped")
    stored = json.loads(rows["message"][0])
    assert stored["template"] == "order_shipped_01" and stored["body"].startswith("Hi ")


def test_a_template_kakao_does_not_know_stops_the_send(sandbox_settings: Settings) -> None:
    connector = connector_from_settings("infobip", sandbox_settings)
    unknown = OutboundMessage(
        "k1", "+821012345678", "kakao", template=TemplateRef("no_such_code", "ko"), body="Hi"
    )
    with pytest.raises(TemplateError, match="templateCode"):
        send(connector, [unknown])


def test_an_alimtalk_step_needs_its_code_its_text_and_an_informational_purpose() -> None:
    with pytest.raises(ValidationError, match="give its `template_code` and its registered"):
        ChannelPlanSpec.model_validate(
            {"purpose": "transactional", "steps": [{**KAKAO_STEP, "template_code": None}]}
        )
    with pytest.raises(ValidationError, match="carries information only"):
        ChannelPlanSpec.model_validate({"purpose": "marketing", "steps": [KAKAO_STEP]})
    with pytest.raises(ValidationError, match="`template_code` is for KakaoTalk AlimTalk only"):
        ChannelPlanSpec.model_validate(
            {
                "purpose": "transactional",
                "steps": [
                    {"channel": "sms", "connector": "infobip", "body": "x", "template_code": "c"}
                ],
            }
        )


def test_an_infobip_whatsapp_template_is_checked_against_infobip_s_catalog_and_sent(
    env: SimpleNamespace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Infobip lists its WhatsApp templates: an approved one passes template_approved and is
    sent through Infobip (it was excluded as not approved when Infobip listed nothing), a
    pending one is blocked before anything is sent."""
    from test_activation_e2e import winback_attributes

    monkeypatch.setenv("CDP_INFOBIP_BASE_URL", f"{env.sandbox.url}/infobip")
    monkeypatch.delenv("CDP_INFOBIP_API_KEY", raising=False)
    attributes = winback_attributes()
    steps = attributes["channel_plan"]["steps"]
    attributes["channel_plan"] = {
        **attributes["channel_plan"],
        "steps": [{**steps[0], "connector": "infobip"}, {**steps[1], "connector": "infobip"}],
    }
    definitions = custom_definitions(env.tmp, "winback_infobip", attributes)
    summary = run_activation(
        "winback_infobip", TODAY.isoformat(), definitions=definitions, max_recipients=50
    )
    assert summary.success, summary.error
    whatsapp = [m for m in env.sandbox.messages() if m.channel == "whatsapp"]
    assert whatsapp and {(m.provider, m.template_name) for m in whatsapp} == {
        ("infobip", "winback_offer")
    }
    assert "whatsapp_template_not_approved" not in str(summary.excluded)

    pending = {**steps[0], "connector": "infobip"}
    pending["template"] = {**pending["template"], "name": "spring_sale", "variables": ["a", "b"]}
    attributes["channel_plan"] = {"purpose": "marketing", "steps": [pending]}
    blocked = run_activation(
        "winback_pending",
        TODAY.isoformat(),
        definitions=custom_definitions(
            env.tmp,
            "winback_pending",
            attributes,
            "SELECT customer_id, phone, country, TRUE AS whatsapp_marketing_consent, "
            "'x' AS a, 'y' AS b FROM customers LIMIT 5",
        ),
    )
    assert not blocked.success
    assert "template_approved" in str(blocked.failed_checks)
    assert len(env.sandbox.messages()) == summary.sent  # the blocked run sent nothing
