"""Each policy rule on hand-built audiences, with the decision we expect for every customer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from cdp_activation.connectors.base import TemplateInfo
from cdp_activation.policy import decide
from cdp_activation.policy.phones import normalise
from cdp_activation.policy.suppression import normalise_suppressions
from cdp_activation.specs import ChannelPlanSpec

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
GB_A = "+447123456701"
GB_B = "+447123456702"
GB_C = "+447123456703"
DE_A = "+4915112345678"

WINBACK = {
    "name": "winback_offer",
    "language": "en",
    "category": "marketing",
    "variables": ["first_name", "offer_code"],
}
TEMPLATE_PLAN = ChannelPlanSpec.model_validate(
    {
        "purpose": "marketing",
        "steps": [
            {"channel": "whatsapp", "connector": "meta_whatsapp", "template": WINBACK},
            {"channel": "sms", "connector": "twilio", "body": "Hi {first_name}, use {offer_code}"},
        ],
    }
)
SESSION_PLAN = ChannelPlanSpec.model_validate(
    {
        "purpose": "marketing",
        "steps": [
            {"channel": "whatsapp", "connector": "meta_whatsapp", "body": "Hi {first_name}!"},
        ],
    }
)
APPROVED = {"meta_whatsapp": [TemplateInfo("winback_offer", "en", "MARKETING", "APPROVED", 2)]}
NO_SUPPRESSIONS = pl.DataFrame(schema={"phone_e164": pl.String, "channel": pl.String})


def customer(customer_id: int, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "customer_id": customer_id,
        "phone": f"+4471234567{customer_id:02d}",
        "country": "GB",
        "first_name": f"Ann{customer_id}",
        "offer_code": f"CODE{customer_id}",
        "whatsapp_marketing_consent": True,
        "sms_marketing_consent": True,
        "whatsapp_last_inbound_at": None,
    }
    row.update(overrides)
    return row


def run(
    rows: list[dict[str, Any]],
    plan: ChannelPlanSpec = TEMPLATE_PLAN,
    catalogs: dict[str, list[TemplateInfo]] | None = None,
    suppressions: pl.DataFrame = NO_SUPPRESSIONS,
    **kwargs: Any,
) -> dict[int, tuple[str | None, str | None]]:
    schema = {
        "customer_id": pl.Int64,
        "phone": pl.String,
        "country": pl.String,
        "first_name": pl.String,
        "offer_code": pl.String,
        "whatsapp_marketing_consent": pl.Boolean,
        "sms_marketing_consent": pl.Boolean,
        "whatsapp_last_inbound_at": pl.Datetime("us", "UTC"),
    }
    audience = pl.DataFrame(rows, schema=schema)
    result = decide(
        audience,
        plan,
        now=NOW,
        suppressions=suppressions,
        catalogs=APPROVED if catalogs is None else catalogs,
        **kwargs,
    )
    return {
        r["customer_id"]: (r["channel"], r["reason"]) for r in result.frame.iter_rows(named=True)
    }


def test_first_lawful_channel_wins_and_sms_needs_its_own_consent() -> None:
    decisions = run(
        [
            customer(1),
            customer(2, whatsapp_marketing_consent=False),
            customer(3, whatsapp_marketing_consent=None, sms_marketing_consent=None),
            customer(4, whatsapp_marketing_consent=False, sms_marketing_consent=False),
        ]
    )
    assert decisions == {
        1: ("whatsapp", None),
        2: ("sms", None),
        3: (None, "whatsapp_no_consent+sms_no_consent"),
        4: (None, "whatsapp_no_consent+sms_no_consent"),
    }


def test_phone_numbers_are_normalised_with_the_customer_country() -> None:
    decisions = run(
        [
            customer(1, phone="07123 456701"),  # national format, GB
            customer(2, phone="0151 12345678", country="DE"),
            customer(3, phone="12345"),
            customer(4, phone=None),
            customer(5, phone="   "),
            customer(6, phone="n/a"),
        ]
    )
    assert decisions[1] == ("whatsapp", None)
    assert decisions[2] == ("whatsapp", None)
    assert decisions[3] == (None, "invalid_phone")
    assert decisions[4] == (None, "missing_phone")
    assert decisions[5] == (None, "missing_phone")
    assert decisions[6] == (None, "invalid_phone")
    assert normalise("0151 12345678", "DE") == (DE_A, "ok")


def test_suppression_matches_numbers_stored_in_another_format() -> None:
    suppressions = normalise_suppressions(
        pl.DataFrame(
            {
                "phone": ["07123 456701", "0044 7123 456702", "+44 7123 456703"],
                "channel": [None, "whatsapp", "sms"],
            }
        ),
        regions=["GB"],
    )
    decisions = run(
        [
            customer(1),  # suppressed everywhere
            customer(2),  # suppressed on WhatsApp only -> SMS
            customer(3),  # suppressed on SMS only -> WhatsApp still fine
            customer(4, whatsapp_marketing_consent=False),  # SMS wanted, but...
        ],
        suppressions=suppressions,
    )
    assert decisions[1] == (None, "suppressed")
    assert decisions[2] == ("sms", None)
    assert decisions[3] == ("whatsapp", None)
    assert decisions[4] == ("sms", None)


def test_one_message_per_phone_number_lowest_customer_id_wins() -> None:
    decisions = run(
        [
            customer(7, phone=GB_A),
            customer(3, phone="07123 456701"),  # the same number, national format
            customer(5, phone=GB_A, whatsapp_marketing_consent=False, sms_marketing_consent=False),
        ]
    )
    assert decisions[3] == ("whatsapp", None)
    assert decisions[7] == (None, "duplicate_phone")
    # A customer who could not be messaged anyway does not take the number from anyone.
    assert decisions[5] == (None, "whatsapp_no_consent+sms_no_consent")


@pytest.mark.parametrize(
    ("status", "category", "count", "language"),
    [
        ("PENDING", "MARKETING", 2, "en"),
        ("REJECTED", "MARKETING", 2, "en"),
        ("PAUSED", "MARKETING", 2, "en"),
        ("APPROVED", "UTILITY", 2, "en"),  # a marketing message must not ride a utility template
        ("APPROVED", "MARKETING", 3, "en"),  # parameter count differs from the plan
        ("APPROVED", "MARKETING", 2, "de"),  # not in the plan's language
    ],
)
def test_template_must_be_approved_of_the_right_category_and_shape(
    status: str, category: str, count: int, language: str
) -> None:
    catalogs = {"meta_whatsapp": [TemplateInfo("winback_offer", language, category, status, count)]}
    decisions = run([customer(1), customer(2, sms_marketing_consent=False)], catalogs=catalogs)
    assert decisions[1] == ("sms", None)
    assert decisions[2] == (None, "whatsapp_template_not_approved+sms_no_consent")


@pytest.mark.parametrize(
    ("last_inbound", "channel"),
    [
        (NOW - timedelta(hours=23, minutes=59, seconds=59), "whatsapp"),
        (NOW - timedelta(seconds=1), "whatsapp"),
        (NOW, "whatsapp"),
        (NOW - timedelta(hours=24), None),  # exactly 24 h 00 min 00 s: the window has closed
        (NOW - timedelta(days=3), None),
        (NOW + timedelta(minutes=5), None),  # in the future: bad data, not "inside"
        (None, None),  # never wrote to us
    ],
)
def test_free_form_whatsapp_only_inside_the_24_hour_window(
    last_inbound: datetime | None, channel: str | None
) -> None:
    decisions = run([customer(1, whatsapp_last_inbound_at=last_inbound)], plan=SESSION_PLAN)
    expected_reason = None if channel else "whatsapp_outside_window"
    assert decisions[1] == (channel, expected_reason)


def test_an_approved_template_may_go_outside_the_window() -> None:
    decisions = run([customer(1, whatsapp_last_inbound_at=NOW - timedelta(days=30))])
    assert decisions[1] == ("whatsapp", None)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("Ann", True),
        ("Ann    Lee", True),  # four spaces are allowed
        ("Ann     Lee", False),  # five are not
        ("Ann\nLee", False),
        ("Ann\tLee", False),
        ("", False),
        ("   ", False),
        (None, False),
        ("x" * 1025, False),
    ],
)
def test_template_variables_follow_whatsapp_rules(value: str | None, ok: bool) -> None:
    decisions = run([customer(1, first_name=value, sms_marketing_consent=False)])
    expected = ("whatsapp", None) if ok else (None, "whatsapp_invalid_variables+sms_no_consent")
    assert decisions[1] == expected


def test_sms_body_is_rendered_per_recipient() -> None:
    audience = pl.DataFrame(
        [customer(1, whatsapp_marketing_consent=False)],
        schema_overrides={"whatsapp_last_inbound_at": pl.Datetime("us", "UTC")},
    )
    result = decide(
        audience, TEMPLATE_PLAN, now=NOW, suppressions=NO_SUPPRESSIONS, catalogs=APPROVED
    )
    row = result.frame.row(0, named=True)
    assert row["channel"] == "sms"
    assert row["connector"] == "twilio"
    assert row["body"] == "Hi Ann1, use CODE1"
    assert row["phone_e164"] == GB_A
    assert row["template_name"] is None


def test_whatsapp_template_carries_its_rendered_variables() -> None:
    audience = pl.DataFrame(
        [customer(1)], schema_overrides={"whatsapp_last_inbound_at": pl.Datetime("us", "UTC")}
    )
    result = decide(
        audience, TEMPLATE_PLAN, now=NOW, suppressions=NO_SUPPRESSIONS, catalogs=APPROVED
    )
    row = result.frame.row(0, named=True)
    assert (row["template_name"], row["template_language"]) == ("winback_offer", "en")
    assert row["variables"] == ["Ann1", "CODE1"]
    assert result.eligible_by_channel() == {"whatsapp": 1}


def test_recipient_cap_is_deterministic_and_exact() -> None:
    rows = [customer(i, phone=f"+4471234{i:05d}") for i in range(1, 61)]
    first = run(rows, max_recipients=25, salt="winback")
    second = run(list(reversed(rows)), max_recipients=25, salt="winback")
    chosen = {cid for cid, (channel, _) in first.items() if channel}
    assert len(chosen) == 25
    assert chosen == {cid for cid, (channel, _) in second.items() if channel}
    capped = [cid for cid, (_, reason) in first.items() if reason == "over_recipient_cap"]
    assert len(capped) == 35
