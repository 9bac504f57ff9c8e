"""Each policy rule on hand-built audiences, with the decision we expect for every customer."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from cdp_activation.connectors.base import TemplateInfo
from cdp_activation.policy import decide
from cdp_activation.policy.engine import rendered, variables_as_lists, with_bodies
from cdp_activation.policy.phones import normalise
from cdp_activation.policy.suppression import normalise_suppressions
from cdp_activation.policy.templates import template_problem
from cdp_activation.spec import ChannelPlanSpec

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


SESSION_THEN_SMS = ChannelPlanSpec.model_validate(
    {
        "purpose": "marketing",
        "steps": [
            {"channel": "whatsapp", "connector": "meta_whatsapp", "body": "Hi {first_name}!"},
            {"channel": "sms", "connector": "twilio", "body": "Hi {first_name}"},
        ],
    }
)


@pytest.mark.parametrize(
    ("wrote_hours_ago", "channel"),
    [
        (10, "whatsapp"),  # the window closes at 12:00 tomorrow, after 09:00: it may wait
        (14, "sms"),  # it closes at 08:00 tomorrow, before quiet hours end: not by WhatsApp
    ],
)
def test_a_free_form_message_waiting_for_quiet_hours_must_still_be_inside_the_window(
    wrote_hours_ago: int, channel: str
) -> None:
    # 22:00 in London: quiet until 09:00. The customer wrote at 12:00 or at 08:00 today.
    now = datetime(2026, 11, 23, 22, 0, tzinfo=UTC)
    last = now - timedelta(hours=wrote_hours_ago)
    result = decide(
        frame_of(
            [customer(1, whatsapp_last_inbound_at=last, timezone="Europe/London")],
            timezone=pl.String,
        ),
        SESSION_THEN_SMS,
        now=now,
        suppressions=NO_SUPPRESSIONS,
        catalogs=APPROVED,
        policy=PolicySpec(whatsapp_marketing_blocked_countries=[]),
    )
    row = result.frame.row(0, named=True)
    assert (row["channel"], row["decision"]) == (channel, "defer")
    assert row["not_before"] == datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    # The plan carries when the window closes, for the claim to check (a long send, a retry).
    closes = last + timedelta(hours=24) if channel == "whatsapp" else None
    assert row["window_until"] == closes
    if channel == "sms":
        assert row["whatsapp_reason"] == "whatsapp_outside_window"


def test_only_free_form_whatsapp_messages_carry_a_window() -> None:
    frame = decide_frame(
        [customer(1, whatsapp_last_inbound_at=NOW - timedelta(hours=1))],
        PolicySpec.model_validate({"quiet_hours": {"enabled": False}}),
    )
    assert frame.row(0, named=True)["channel"] == "whatsapp"  # a template: no window
    assert frame["window_until"].to_list() == [None]


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
        ("\u00a0\u2003", False),  # Unicode whitespace only, as `str.strip` counts it
        (" \u00e9 ", True),
        (None, False),
        ("x" * 1025, False),
    ],
)
def test_template_variables_follow_whatsapp_rules(value: str | None, ok: bool) -> None:
    decisions = run([customer(1, first_name=value, sms_marketing_consent=False)])
    expected = ("whatsapp", None) if ok else (None, "whatsapp_invalid_variables+sms_no_consent")
    assert decisions[1] == expected


@pytest.mark.parametrize(
    ("dtype", "value", "text"),
    [
        (pl.Int32, 42, "42"),
        (pl.Float64, 0.5, "0.5"),
        (pl.Boolean, False, "false"),
        (pl.Date, date(2026, 11, 23), "2026-11-23"),
    ],
)
def test_variables_of_numbers_dates_and_flags_need_only_a_value(
    dtype: pl.DataType, value: object, text: str
) -> None:
    """A template variable held as a number, a date or a flag is sent as its text; only a
    missing one excludes the customer (no text is built to check it)."""
    plan = ChannelPlanSpec.model_validate(
        {
            "purpose": "marketing",
            "steps": [
                {
                    "channel": "whatsapp",
                    "connector": "meta_whatsapp",
                    "template": {**WINBACK, "variables": ["first_name", "points"]},
                }
            ],
        }
    )
    audience = pl.DataFrame(
        [customer(1), customer(2)],
        schema_overrides={"whatsapp_last_inbound_at": pl.Datetime("us", "UTC")},
    ).with_columns(pl.Series("points", [value, None], dtype=dtype))
    result = decide(audience, plan, now=NOW, suppressions=NO_SUPPRESSIONS, catalogs=APPROVED)
    rows = {r["customer_id"]: r for r in result.frame.iter_rows(named=True)}
    assert rows[1]["variables"] == {"1": "Ann1", "2": text}
    assert (rows[2]["decision"], rows[2]["reason"]) == ("exclude", "whatsapp_invalid_variables")


def test_sms_body_is_rendered_per_recipient() -> None:
    audience = pl.DataFrame(
        [customer(1, whatsapp_marketing_consent=False)],
        schema_overrides={"whatsapp_last_inbound_at": pl.Datetime("us", "UTC")},
    )
    result = decide(
        audience, TEMPLATE_PLAN, now=NOW, suppressions=NO_SUPPRESSIONS, catalogs=APPROVED
    )
    row = rendered(result.frame, TEMPLATE_PLAN).row(0, named=True)
    assert row["channel"] == "sms"
    assert row["connector"] == "twilio"
    assert row["variables"] == ["Ann1", "CODE1"]  # the body's fields, in order
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
    assert row["variables"] == {"1": "Ann1", "2": "CODE1"}  # {{1}}, {{2}}
    assert variables_as_lists(result.frame)["variables"].to_list() == [["Ann1", "CODE1"]]
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


# ---------------------------------------------------------------- policy rules of issue 4

from cdp_activation.spec import PolicySpec  # noqa: E402


def frame_of(rows: list[dict[str, Any]], **columns: Any) -> pl.DataFrame:
    schema = {
        "customer_id": pl.Int64,
        "phone": pl.String,
        "country": pl.String,
        "first_name": pl.String,
        "offer_code": pl.String,
        "whatsapp_marketing_consent": pl.Boolean,
        "sms_marketing_consent": pl.Boolean,
        "whatsapp_last_inbound_at": pl.Datetime("us", "UTC"),
        **columns,
    }
    return pl.DataFrame(rows, schema=schema)


def decide_frame(
    rows: list[dict[str, Any]], policy: PolicySpec, now: datetime = NOW, **kwargs: Any
) -> pl.DataFrame:
    extra = {"timezone": pl.String} if any("timezone" in r for r in rows) else {}
    result = decide(
        frame_of(rows, **extra),
        TEMPLATE_PLAN,
        now=now,
        suppressions=NO_SUPPRESSIONS,
        catalogs=APPROVED,
        policy=policy,
        **kwargs,
    )
    return result.frame.sort("customer_id")


def sends(*rows: tuple[str, str, str, datetime]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "customer_id": pl.String,
            "channel": pl.String,
            "purpose": pl.String,
            "sent_at": pl.Datetime("us", "UTC"),
        },
        orient="row",
    )


NO_QUIET = PolicySpec.model_validate({"quiet_hours": {"enabled": False}})


def test_frequency_caps_count_recent_sends_across_activations() -> None:
    recent = sends(
        ("1", "sms", "marketing", NOW - timedelta(days=2)),  # capped: 1 marketing / 7 days
        ("2", "whatsapp", "marketing", NOW - timedelta(days=8)),  # outside the window
        ("3", "whatsapp", "transactional", NOW - timedelta(hours=1)),  # other purpose
    )
    frame = decide_frame([customer(1), customer(2), customer(3)], NO_QUIET, recent_sends=recent)
    assert frame.select("customer_id", "decision", "reason").rows() == [
        (1, "exclude", "frequency_capped"),
        (2, "send", None),
        (3, "send", None),
    ]


def test_a_channel_cap_falls_back_to_the_next_channel() -> None:
    policy = PolicySpec.model_validate(
        {
            "quiet_hours": {"enabled": False},
            "frequency_caps": [
                {"purpose": "marketing", "channel": "whatsapp", "max_messages": 2, "days": 7}
            ],
        }
    )
    recent = sends(
        ("1", "whatsapp", "marketing", NOW - timedelta(days=1)),
        ("1", "whatsapp", "marketing", NOW - timedelta(days=3)),
        ("2", "whatsapp", "marketing", NOW - timedelta(days=1)),
    )
    frame = decide_frame([customer(1), customer(2)], policy, recent_sends=recent)
    assert frame.select("customer_id", "channel", "decision").rows() == [
        (1, "sms", "send"),
        (2, "whatsapp", "send"),
    ]
    assert frame["whatsapp_reason"][0] == "whatsapp_frequency_capped"


def test_holdout_is_a_stable_share_of_the_eligible() -> None:
    policy = PolicySpec.model_validate(
        {"quiet_hours": {"enabled": False}, "holdout": {"share": 0.2}}
    )
    rows = [customer(i, phone=f"+4471234{i:05d}") for i in range(1, 1001)]
    rows.append(customer(5000, phone="n/a"))  # excluded customers are never held out
    first = decide_frame(rows, policy, salt="winback")
    again = decide_frame(list(reversed(rows[:500])), policy, salt="winback")
    held = set(first.filter(pl.col("decision") == "holdout")["customer_id"])
    assert 150 < len(held) < 250
    assert held & set(range(1, 501)) == set(
        again.filter(pl.col("decision") == "holdout")["customer_id"]
    )
    holdouts = first.filter(pl.col("decision") == "holdout")
    assert set(holdouts["reason"]) == {"holdout"}
    assert holdouts["channel"].null_count() == 0  # the would-be channel is recorded
    other_salt = decide_frame(rows, policy, salt="another_activation")
    assert held != set(other_salt.filter(pl.col("decision") == "holdout")["customer_id"])
    assert first.filter(pl.col("customer_id") == 5000)["decision"][0] == "exclude"


@pytest.mark.parametrize(
    ("now", "timezone", "country", "expected_not_before"),
    [
        # 14:00 UTC = 23:00 in Tokyo: quiet until 09:00 JST = 00:00 UTC next day.
        (
            datetime(2026, 11, 23, 14, 0, tzinfo=UTC),
            "Asia/Tokyo",
            "JP",
            datetime(2026, 11, 24, 0, 0, tzinfo=UTC),
        ),
        # 06:00 UTC = 06:00 in London (winter): quiet until 09:00 the same day.
        (
            datetime(2026, 11, 23, 6, 0, tzinfo=UTC),
            "Europe/London",
            "GB",
            datetime(2026, 11, 23, 9, 0, tzinfo=UTC),
        ),
        # 20:59:59 local is still allowed; the boundary is 21:00.
        (datetime(2026, 11, 23, 20, 59, 59, tzinfo=UTC), "Europe/London", "GB", None),
        (
            datetime(2026, 11, 23, 21, 0, 0, tzinfo=UTC),
            "Europe/London",
            "GB",
            datetime(2026, 11, 24, 9, 0, tzinfo=UTC),
        ),
        # An invalid zone falls back to the country's: 14:00 UTC is 23:00 in Japan.
        (
            datetime(2026, 11, 23, 14, 0, tzinfo=UTC),
            "Mars/Olympus",
            "JP",
            datetime(2026, 11, 24, 0, 0, tzinfo=UTC),
        ),
        # DST starts in New York on 2026-03-08: 09:00 EDT that morning is 13:00 UTC.
        (
            datetime(2026, 3, 8, 5, 0, tzinfo=UTC),
            "America/New_York",
            "US",
            datetime(2026, 3, 8, 13, 0, tzinfo=UTC),
        ),
        # ... and ends on 2026-11-01: 09:00 EST is 14:00 UTC.
        (
            datetime(2026, 11, 1, 5, 0, tzinfo=UTC),
            "America/New_York",
            "US",
            datetime(2026, 11, 1, 14, 0, tzinfo=UTC),
        ),
    ],
)
def test_quiet_hours_defer_in_the_recipients_own_time(
    now: datetime, timezone: str, country: str, expected_not_before: datetime | None
) -> None:
    phone = {"JP": "+819012345678", "GB": GB_A, "US": "+12015550123"}[country]
    # Quiet hours are what is tested here: WhatsApp marketing reaches the US in this policy.
    policy = PolicySpec(whatsapp_marketing_blocked_countries=[])
    frame = decide_frame(
        [customer(1, timezone=timezone, country=country, phone=phone)], policy, now=now
    )
    row = frame.row(0, named=True)
    assert row["channel"] == "whatsapp"
    assert row["not_before"] == expected_not_before
    assert row["decision"] == ("defer" if expected_not_before else "send")


@pytest.mark.parametrize(
    ("now", "timezone", "country", "send_until", "reopens_at"),
    [
        # 20:30 in London: it may go until 21:00, then waits until 09:00.
        (
            datetime(2026, 11, 23, 20, 30, tzinfo=UTC),
            "Europe/London",
            "GB",
            datetime(2026, 11, 23, 21, 0, tzinfo=UTC),
            datetime(2026, 11, 24, 9, 0, tzinfo=UTC),
        ),
        # Deferred to 09:00 (23:00 in Tokyo now): its window is that day's, until 21:00 JST.
        (
            datetime(2026, 11, 23, 14, 0, tzinfo=UTC),
            "Asia/Tokyo",
            "JP",
            datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
            datetime(2026, 11, 25, 0, 0, tzinfo=UTC),
        ),
        # New York's clocks go back on 2026-11-01: 21:00 EST that evening is 02:00 UTC, and
        # 09:00 EST the next morning 14:00 UTC.
        (
            datetime(2026, 11, 1, 14, 0, tzinfo=UTC),
            "America/New_York",
            "US",
            datetime(2026, 11, 2, 2, 0, tzinfo=UTC),
            datetime(2026, 11, 2, 14, 0, tzinfo=UTC),
        ),
    ],
)
def test_each_message_says_until_when_it_may_go_and_when_its_quiet_hours_end(
    now: datetime, timezone: str, country: str, send_until: datetime, reopens_at: datetime
) -> None:
    # A decision holds when it is made; a long send can reach the customer later. The plan
    # carries the end of the window it was decided for, for the claim to check.
    phone = {"JP": "+819012345678", "GB": GB_A, "US": "+12015550123"}[country]
    policy = PolicySpec(whatsapp_marketing_blocked_countries=[])
    frame = decide_frame(
        [customer(1, timezone=timezone, country=country, phone=phone)], policy, now=now
    )
    row = frame.row(0, named=True)
    assert (row["send_until"], row["reopens_at"]) == (send_until, reopens_at)
    without = decide_frame(
        [customer(1, timezone=timezone, country=country, phone=phone)],
        PolicySpec(whatsapp_marketing_blocked_countries=[], quiet_hours={"enabled": False}),
        now=now,
    )
    assert without.row(0, named=True)["send_until"] is None


def test_quiet_hours_wholly_in_a_clock_change_s_gap_are_the_next_day_s() -> None:
    # Paris springs forward from 02:00 to 03:00 on 2025-03-30: quiet hours of 02:00-03:00
    # do not happen that night; the next ones are the following night's.
    from cdp_activation.policy.quiet_hours import next_quiet
    from cdp_activation.spec import QuietHoursSpec

    night = QuietHoursSpec(start="02:00", end="03:00")
    assert next_quiet("Europe/Paris", datetime(2025, 3, 30, 0, 0, tzinfo=UTC), night) == (
        datetime(2025, 3, 31, 0, 0, tzinfo=UTC),
        datetime(2025, 3, 31, 1, 0, tzinfo=UTC),
    )


def test_country_channel_order_overrides_the_plan() -> None:
    policy = PolicySpec.model_validate(
        {"quiet_hours": {"enabled": False}, "country_channels": {"DE": ["sms"]}}
    )
    frame = decide_frame(
        [
            customer(1),
            customer(2, phone=DE_A, country="DE"),
            customer(3, phone="+4915112345679", country="DE", sms_marketing_consent=False),
        ],
        policy,
    )
    assert frame.select("customer_id", "channel", "reason").rows() == [
        (1, "whatsapp", None),
        (2, "sms", None),  # WhatsApp is not used in DE at all
        (3, None, "sms_no_consent"),
    ]


def test_a_country_route_must_use_channels_of_the_plan() -> None:
    from pydantic import ValidationError

    from cdp_activation.spec import ActivationSpec

    with pytest.raises(ValidationError, match=r"country_channels.UA uses \['viber'\]"):
        ActivationSpec.model_validate(
            {
                "audience": {"sql": "sql/audiences/x.sql"},
                "channel_plan": TEMPLATE_PLAN.model_dump(),
                "policy": {"country_channels": {"UA": ["viber", "sms"]}},
            }
        )


def test_a_body_repeating_a_field_renders_each_occurrence() -> None:
    plan = ChannelPlanSpec.model_validate(
        {
            "steps": [
                {
                    "channel": "sms",
                    "connector": "twilio",
                    "body": "{first_name}! {offer_code}, {first_name}",
                }
            ]
        }
    )
    audience = pl.DataFrame(
        [customer(1)], schema_overrides={"whatsapp_last_inbound_at": pl.Datetime("us", "UTC")}
    )
    result = decide(audience, plan, now=NOW, suppressions=NO_SUPPRESSIONS, catalogs=APPROVED)
    assert with_bodies(result.frame, plan)["body"].to_list() == ["Ann1! CODE1, Ann1"]


# --- templates from Twilio's Content API, and parameter names ------------------------------

CONTENT_SID = "HX" + "0a" * 16
SMS_CONTENT_PLAN = ChannelPlanSpec.model_validate(
    {
        "purpose": "marketing",
        "steps": [
            {
                "channel": "sms",
                "connector": "twilio",
                "template": {**WINBACK, "name": CONTENT_SID},
            }
        ],
    }
)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("APPROVED", ("sms", None)),
        ("PENDING", (None, "sms_template_not_approved")),
        ("UNSUBMITTED", (None, "sms_template_not_approved")),
    ],
)
def test_a_twilio_content_template_goes_only_when_approved(
    status: str, expected: tuple[str | None, str | None]
) -> None:
    info = TemplateInfo(CONTENT_SID, "en", "MARKETING", status, 2, ("1", "2"))
    result = run([customer(1)], SMS_CONTENT_PLAN, catalogs={"twilio": [info]})
    assert result[1] == expected


def test_a_template_with_named_parameters_is_not_filled_by_position() -> None:
    info = TemplateInfo("winback_offer", "en", "MARKETING", "APPROVED", 2, ("name", "code"))
    assert template_problem([info], TEMPLATE_PLAN.steps[0].template, "marketing") == (
        "template 'winback_offer' takes named parameters (name, code); the plan maps its "
        "variables by position ({{1}}, {{2}}, …): use a positional template"
    )
    positional = TemplateInfo("winback_offer", "en", "MARKETING", "APPROVED", 2, ("1", "2"))
    assert template_problem([positional], TEMPLATE_PLAN.steps[0].template, "marketing") is None


def test_a_large_audience_keeps_every_row_with_its_own_customer() -> None:
    # Big enough for the per-row pass to work in many slices: every row must come back
    # with its own customer's number and variables, in the audience's order.
    n = 300_000
    ids = pl.col("customer_id")
    audience = (
        pl.select(pl.int_range(1, n + 1).alias("customer_id"))
        .with_columns(
            pl.format("+4479{}", ids.cast(pl.String).str.zfill(8)).alias("phone"),
            pl.lit("GB").alias("country"),
            pl.format("Ann{}", ids).alias("first_name"),
            pl.format("CODE{}", ids).alias("offer_code"),
            (ids % 3 != 0).alias("whatsapp_marketing_consent"),
            pl.lit(True).alias("sms_marketing_consent"),
            pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias("whatsapp_last_inbound_at"),
        )
        .sample(fraction=1.0, shuffle=True, seed=3)
    )
    result = decide(
        audience, TEMPLATE_PLAN, now=NOW, suppressions=NO_SUPPRESSIONS, catalogs=APPROVED
    )
    frame = result.frame
    assert frame["customer_id"].to_list() == audience["customer_id"].to_list()
    checks = frame.select(
        (pl.col("phone_e164") == pl.format("+4479{}", ids.cast(pl.String).str.zfill(8))).all(),
        (pl.col("variables").struct.field("1") == pl.format("Ann{}", ids)).all(),
    )
    assert checks.row(0) == (True, True)
    whatsapp = frame.filter(pl.col("channel") == "whatsapp")["customer_id"]
    assert whatsapp.len() == n - n // 3 and (whatsapp % 3 != 0).all()


@pytest.mark.parametrize("slice_rows", [10_000, 1 << 18])
def test_the_decisions_columns_share_their_chunks_and_keep_the_audience_s_ids(
    slice_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An audience read in pieces (DuckDB, Parquet) whose columns are chunked differently.
    # Polars copies every column of a frame whose columns are not chunked alike the first
    # time an expression runs over it (+685 MB on 10,000,000 customers): the decisions'
    # columns must share their chunks, and the ids must be the audience's own, not a copy.
    # Slices of 10,000 rows cut the pieces; of 262,144, the pieces are small and are joined
    # into slices of their own (copied: a query a chunk would cost more than its rows).
    from cdp_activation.policy import engine

    monkeypatch.setattr(engine, "_SLICE_ROWS", slice_rows)
    n = 120_000
    ids = pl.col("customer_id")

    def pieces(expr: pl.Expr, sizes: list[int]) -> pl.Series:
        rows = pl.select(pl.int_range(1, n + 1).alias("customer_id"))
        whole = rows.with_columns(expr.alias("value"))["value"].alias("customer_id")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return pl.concat(
            [whole.slice(s, z) for s, z in zip(starts, sizes, strict=True)], rechunk=False
        )

    by_four, by_three = [30_000] * 4, [50_000, 50_000, 20_000]
    audience = pl.DataFrame(
        [
            pieces(ids, by_four),
            pieces(
                pl.format("+4479{}", (ids % 90_000).cast(pl.String).str.zfill(8)), by_three
            ).alias("phone"),  # shared numbers: one message per phone takes some off
            pieces(pl.lit("GB"), by_three).alias("country"),
            pieces(pl.format("Ann{}", ids), by_four).alias("first_name"),
            pieces(pl.format("CODE{}", ids), by_three).alias("offer_code"),
            pieces(ids % 3 != 0, by_four).alias("whatsapp_marketing_consent"),
            pieces(pl.lit(True), by_three).alias("sms_marketing_consent"),
            pieces(pl.lit(None, dtype=pl.Datetime("us", "UTC")), by_four).alias(
                "whatsapp_last_inbound_at"
            ),
        ]
    )
    result = decide(
        audience,
        TEMPLATE_PLAN,
        now=NOW,
        suppressions=NO_SUPPRESSIONS,
        catalogs=APPROVED,
        max_recipients=50_000,
    )
    frame = result.frame
    layouts = {c.name: [len(p) for p in c.get_chunks()] for c in frame.get_columns()}
    assert len({tuple(layout) for layout in layouts.values()}) == 1, layouts
    assert frame["customer_id"].to_list() == audience["customer_id"].to_list()
    assert result.counts()["send"] == 50_000
    assert frame.filter(pl.col("reason") == "duplicate_phone").height > 0
    if slice_rows < 30_000:  # cut, not joined: the ids are the audience's own
        assert len(layouts["customer_id"]) > 1  # not copied into one piece either
        assert _views_of(frame["customer_id"], audience["customer_id"])


def _views_of(column: pl.Series, source: pl.Series) -> bool:
    """Whether every chunk of a numeric `column` lies in the memory of `source`'s chunks."""
    spans = [
        (buffer.address, buffer.address + buffer.size)
        for piece in source.get_chunks()
        for buffer in [piece.to_arrow().buffers()[1]]
    ]
    return all(
        any(start <= piece.to_arrow().buffers()[1].address < end for start, end in spans)
        for piece in column.get_chunks()
    )


def test_the_second_row_by_row_pass_keeps_the_first_pass_s_pieces() -> None:
    # Polars cuts a slice's output in a piece per thread: the pass that finishes the
    # decisions takes those pieces as they are. Joining the small ones (as the first pass
    # does with a warehouse's small batches) copied every column of the decisions.
    from cdp_activation.policy.engine import _row_wise

    pieces = [pl.DataFrame({"id": range(i, i + 1_000)}) for i in range(0, 8_000, 1_000)]
    frame = pl.concat(pieces, rechunk=False)

    def query(rows: pl.LazyFrame) -> pl.LazyFrame:
        return rows.with_columns((pl.col("id") * 2).alias("twice"))

    kept = _row_wise(frame, query, join_small=False)
    assert _views_of(kept["id"], frame["id"])
    assert (kept["twice"] == frame["id"] * 2).all()
    joined = _row_wise(frame, query)  # the first pass's way: 1,000-row chunks are joined
    assert not _views_of(joined["id"], frame["id"])
    assert joined["id"].to_list() == frame["id"].to_list()


def test_a_platform_that_owns_its_templates_is_not_checked_against_a_catalog() -> None:
    plan = ChannelPlanSpec.model_validate(
        {
            "purpose": "marketing",
            "steps": [
                {
                    "channel": "whatsapp",
                    "connector": "braze",
                    "template": {**WINBACK, "name": "winback_campaign"},
                }
            ],
        }
    )
    assert run([customer(1)], plan, catalogs={"braze": None})[1] == ("whatsapp", None)
    # An empty catalog is a catalog without the template: nothing goes.
    assert run([customer(1)], plan, catalogs={"braze": []})[1] == (
        None,
        "whatsapp_template_not_approved",
    )


LINE_PLAN = ChannelPlanSpec.model_validate(
    {
        "purpose": "marketing",
        "steps": [
            {"channel": "line", "connector": "line", "body": "{first_name}さん、20% off"},
            {"channel": "sms", "connector": "twilio", "body": "Hi {first_name}, use {offer_code}"},
        ],
    }
)
LINE_USER = "U" + "4af4980629" * 3 + "ab"


def test_line_goes_to_the_line_user_id_and_needs_one() -> None:
    rows = [
        customer(1, line_user_id=LINE_USER, line_marketing_consent=True),
        customer(2, line_user_id=None, line_marketing_consent=True),  # never followed
        customer(3, line_user_id="not-a-line-id", line_marketing_consent=True),
        customer(4, line_user_id="U" + "0" * 32, line_marketing_consent=False),
    ]
    frame = decide(
        pl.DataFrame(rows),
        LINE_PLAN,
        now=NOW,
        suppressions=NO_SUPPRESSIONS,
        catalogs={},
        policy=PolicySpec.model_validate({"quiet_hours": {"enabled": False}}),
    ).frame
    assert frame.select("customer_id", "channel", "recipient", "line_reason").rows() == [
        (1, "line", LINE_USER, None),
        (2, "sms", customer(2)["phone"], "line_no_address"),
        (3, "sms", customer(3)["phone"], "line_no_address"),
        (4, "sms", customer(4)["phone"], "line_no_consent"),
    ]


def test_a_line_step_takes_a_body_not_a_template() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="line has no provider-approved templates"):
        ChannelPlanSpec.model_validate(
            {"steps": [{"channel": "line", "connector": "line", "template": WINBACK}]}
        )


def test_whatsapp_marketing_skips_the_us_and_customers_meta_s_limit_refused_lately() -> None:
    """Meta delivers no marketing templates to US numbers, and refuses a customer for a while
    once its per-user marketing limit is reached (131049): both go to the plan's next channel
    (`whatsapp_marketing_unavailable`) instead of WhatsApp, the back-off only for that
    customer."""
    us = customer(1, country="US", phone="+12015550123")
    gb, limited = customer(2), customer(3, phone=GB_B)
    us_lower = customer(4, country="us", phone="+12015550124")  # the country as the CRM wrote it
    backoff = pl.DataFrame(
        {"customer_id": ["3"], "channel": ["whatsapp"], "until": [NOW + timedelta(days=1)]},
        schema_overrides={"until": pl.Datetime("us", "UTC")},
    )
    frame = decide_frame([us, gb, limited, us_lower], PolicySpec(), marketing_backoff=backoff)
    reasons_of = {r["customer_id"]: r["whatsapp_reason"] for r in frame.iter_rows(named=True)}
    assert reasons_of == {
        1: "whatsapp_marketing_unavailable",
        2: None,
        3: "whatsapp_marketing_unavailable",
        4: "whatsapp_marketing_unavailable",
    }
    allowed = decide_frame([us], PolicySpec(whatsapp_marketing_blocked_countries=[]))
    assert allowed["channel"].to_list() == ["whatsapp"]
