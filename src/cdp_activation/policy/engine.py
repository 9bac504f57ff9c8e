"""Apply every rule of the policy to an audience: per customer, a channel or a reason code.

Order:
1. customer-level rules: a usable phone number, not globally suppressed, under the overall
   frequency caps;
2. each channel of the plan: consent for the purpose, not suppressed on the channel, a number
   that can take the channel, an approved template, the WhatsApp window for free-form
   messages, valid variables, under the channel's frequency caps;
3. routing: the first channel that passes, in the customer's country's order;
4. one message per phone number, the holdout group, the recipient cap;
5. quiet hours: a chosen recipient in their night is deferred to its end, not dropped.

Everything is a polars expression over the whole frame, or a computation over distinct values
(phone numbers, time zones) joined back; nothing walks the rows in Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from cdp_activation.connectors.base import TemplateInfo
from cdp_activation.policy import reasons
from cdp_activation.policy.caps import EMPTY_SENDS, capped_customers
from cdp_activation.policy.consent import has_consent
from cdp_activation.policy.hashing import stable_fraction
from cdp_activation.policy.holdout import holdout_mask
from cdp_activation.policy.phone_cache import PhoneCache
from cdp_activation.policy.phones import STATUS_INVALID, STATUS_MISSING, normalise_frame
from cdp_activation.policy.quiet_hours import not_before
from cdp_activation.policy.routing import route
from cdp_activation.policy.suppression import flag_suppressed
from cdp_activation.policy.templates import (
    body_variables_ok,
    render_body,
    template_problem,
    variable_as_text,
    whatsapp_variables_ok,
)
from cdp_activation.policy.window import in_window
from cdp_activation.specs import ChannelPlanSpec, PolicySpec

STEP = "initial"  # the plan's first send; a later fallback send is another step

SEND, DEFER, HOLDOUT, EXCLUDE = "send", "defer", "holdout", "exclude"
# Number types that can receive an SMS (phonenumbers' names); a fixed line cannot.
MOBILE_TYPES = ("mobile", "fixed_line_or_mobile")


@dataclass(frozen=True)
class Decisions:
    """Per customer: `decision` (send, defer, holdout, exclude), the channel and message, the
    `not_before` time of a deferred send, or the reason code of an exclusion."""

    frame: pl.DataFrame
    template_problems: dict[str, str]  # channel -> why its template may not be sent

    @property
    def chosen(self) -> pl.DataFrame:
        """Customers to message now or later (send and defer)."""
        return self.frame.filter(pl.col("decision").is_in([SEND, DEFER]))

    def counts(self) -> dict[str, int]:
        counts = self.frame.group_by("decision").len()
        found = dict(zip(counts["decision"].to_list(), counts["len"].to_list(), strict=True))
        return {d: found.get(d, 0) for d in (SEND, DEFER, HOLDOUT, EXCLUDE)}

    def eligible_by_channel(self) -> dict[str, int]:
        counts = self.chosen.group_by("channel").len().sort("channel")
        return dict(zip(counts["channel"].to_list(), counts["len"].to_list(), strict=True))

    def excluded_by_reason(self) -> dict[str, int]:
        counts = (
            self.frame.filter(pl.col("decision") == EXCLUDE)
            .group_by("reason")
            .len()
            .sort(["len", "reason"], descending=[True, False])
        )
        return dict(zip(counts["reason"].to_list(), counts["len"].to_list(), strict=True))


def decide(
    audience: pl.DataFrame,
    plan: ChannelPlanSpec,
    *,
    now: datetime,
    suppressions: pl.DataFrame,
    catalogs: Mapping[str, Sequence[TemplateInfo]],
    policy: PolicySpec | None = None,
    recent_sends: pl.DataFrame | None = None,
    max_recipients: int | None = None,
    salt: str = "",
    phone_cache: PhoneCache | None = None,
) -> Decisions:
    """Decide every customer of `audience` (one row per customer, contract columns present).

    `catalogs` maps a connector name to its template catalog; `suppressions` holds normalised
    (phone_e164, channel) rows, channel null for all channels; `recent_sends` holds the
    ledger's accepted messages (customer_id text, channel, purpose, sent_at) for the caps;
    `phone_cache` keeps each distinct number's validation across runs (beside the ledger).
    """
    policy = policy or PolicySpec()
    sends = EMPTY_SENDS if recent_sends is None else recent_sends
    channels = [step.channel for step in plan.steps]
    # Carry only what the rules and messages read: a wide audience costs memory at every step.
    needed = {"customer_id", "phone", "country", "timezone"}
    for step in plan.steps:
        needed |= {f"{step.channel}_{plan.purpose}_consent", f"{step.channel}_last_inbound_at"}
        needed |= set(step.variable_columns())
    audience = audience.select([c for c in audience.columns if c in needed])
    frame = normalise_frame(audience, cache=phone_cache)
    frame = flag_suppressed(frame, suppressions, channels)
    frame = frame.with_columns(pl.col("customer_id").cast(pl.String).alias("_cid"))
    columns = frame.columns

    def capped(channel: str) -> pl.Expr:
        ids = capped_customers(sends, policy.frequency_caps, plan.purpose, channel, now)
        return pl.col("_cid").is_in(ids.implode())

    customer_reason = (
        pl.when(pl.col("phone_status") == STATUS_MISSING)
        .then(pl.lit(reasons.MISSING_PHONE))
        .when(pl.col("phone_status") == STATUS_INVALID)
        .then(pl.lit(reasons.INVALID_PHONE))
        .when(pl.col("suppressed_all"))
        .then(pl.lit(reasons.SUPPRESSED))
        .when(capped("any"))
        .then(pl.lit(reasons.FREQUENCY_CAPPED))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    frame = frame.with_columns(customer_reason.alias("customer_reason"))

    template_problems: dict[str, str] = {}
    reason_columns: list[str] = []
    for step in plan.steps:
        channel = step.channel
        problem = None
        if step.template is not None:
            problem = template_problem(
                catalogs.get(step.connector, ()), step.template, plan.purpose
            )
            if problem:
                template_problems[channel] = problem
        unique_vars = list(dict.fromkeys(step.variable_columns()))
        vars_ok = (
            whatsapp_variables_ok(unique_vars)
            if step.template is not None
            else body_variables_ok(unique_vars)
        )
        # A free-form WhatsApp message may only go inside the 24-hour customer-care window.
        window_ok = (
            in_window(channel, now, columns)
            if channel == "whatsapp" and step.template is None
            else pl.lit(True)
        )
        number_ok = (
            pl.col("phone_type").is_in(MOBILE_TYPES).fill_null(False)
            if channel in policy.mobile_only and "phone_type" in columns
            else pl.lit(True)
        )

        def code(reason: str, channel: str = channel) -> pl.Expr:
            return pl.lit(reasons.channel_reason(channel, reason))

        reason = (
            pl.when(~has_consent(channel, plan.purpose))
            .then(code(reasons.NO_CONSENT))
            .when(pl.col(f"suppressed_{channel}"))
            .then(code(reasons.CHANNEL_SUPPRESSED))
            .when(~number_ok)
            .then(code(reasons.NOT_MOBILE))
            .when(pl.lit(problem is not None))
            .then(code(reasons.TEMPLATE_NOT_APPROVED))
            .when(~window_ok)
            .then(code(reasons.OUTSIDE_WINDOW))
            .when(~vars_ok)
            .then(code(reasons.INVALID_VARIABLES))
            .when(capped(channel))
            .then(code(reasons.FREQUENCY_CAPPED))
            .otherwise(pl.lit(None, dtype=pl.String))
        )
        name = f"{channel}_reason"
        frame = frame.with_columns(reason.alias(name))
        reason_columns.append(name)

    step_index, all_failed = route(frame, reason_columns, channels, policy.country_channels)
    frame = frame.with_columns(
        pl.when(pl.col("customer_reason").is_null()).then(step_index).alias("step_index")
    )
    frame = frame.with_columns(
        # No channel passed: the reason names why each one failed, in the customer's order,
        # e.g. "whatsapp_no_consent+sms_no_consent", so no one reads it as "WhatsApp only".
        pl.coalesce(
            pl.col("customer_reason"),
            pl.when(pl.col("step_index").is_null()).then(all_failed),
        ).alias("reason")
    )

    frame = _one_message_per_phone(frame)
    frame = _holdout(frame, policy.holdout.share, policy.holdout.salt or salt)
    frame = _apply_cap(frame, max_recipients, salt)
    frame = _defer_quiet_hours(frame, now, policy)
    frame = _attach_messages(frame, plan)
    keep = [
        "customer_id",
        "phone_e164",
        "decision",
        "channel",
        "connector",
        "step",
        "template_name",
        "template_language",
        "variables",
        "body",
        "not_before",
        "zone",
        "reason",
        *reason_columns,
    ]
    return Decisions(frame=frame.select(keep), template_problems=template_problems)


def _exclude(frame: pl.DataFrame, mask: pl.Expr | pl.Series, reason: str) -> pl.DataFrame:
    """Take the masked, still-routed customers off their channel with `reason`."""
    return frame.with_columns(
        pl.when(mask).then(pl.lit(reason)).otherwise(pl.col("reason")).alias("reason"),
        pl.when(mask).then(None).otherwise(pl.col("step_index")).alias("step_index"),
    )


def _one_message_per_phone(frame: pl.DataFrame) -> pl.DataFrame:
    """Of customers routed to the same number, only the lowest customer id is messaged.

    Shared numbers are rare (households), so the work is done on the few duplicated rows
    only, not as a window over every number.
    """
    routed = frame.select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"), "customer_id", "phone_e164"
    ).filter(frame["step_index"].is_not_null() & frame["phone_e164"].is_not_null())
    shared = routed.filter(pl.col("phone_e164").is_duplicated())
    if shared.is_empty():
        return frame
    losers = shared.filter(pl.col("customer_id") != pl.col("customer_id").min().over("phone_e164"))[
        "_row"
    ]
    mask = pl.Series([False] * frame.height, dtype=pl.Boolean).scatter(losers, True)
    return _exclude(frame, mask, reasons.DUPLICATE_PHONE)


def _holdout(frame: pl.DataFrame, share: float, salt: str) -> pl.DataFrame:
    """Mark a stable share of the routed customers as the control group."""
    frame = frame.with_columns(pl.lit(False).alias("_holdout"))
    if share <= 0:
        return frame
    routed = frame["step_index"].is_not_null()
    held = holdout_mask(frame.filter(routed)["customer_id"], share, salt)
    mask = pl.Series("_holdout", [False] * frame.height, dtype=pl.Boolean)
    mask = mask.scatter(routed.arg_true(), held)
    return frame.with_columns(mask)


def _apply_cap(frame: pl.DataFrame, max_recipients: int | None, salt: str) -> pl.DataFrame:
    """Keep at most `max_recipients` to message, chosen by a stable hash so re-runs agree."""
    if max_recipients is None:
        return frame
    routed = frame["step_index"].is_not_null() & ~frame["_holdout"]
    if routed.sum() <= max_recipients:
        return frame
    positions = routed.arg_true()
    fractions = stable_fraction(frame["customer_id"].gather(positions), f"cap:{salt}")
    order = fractions.rank(method="ordinal")
    over = pl.Series([False] * frame.height, dtype=pl.Boolean).scatter(
        positions, order > max_recipients
    )
    return _exclude(frame, over, reasons.OVER_RECIPIENT_CAP)


def _defer_quiet_hours(frame: pl.DataFrame, now: datetime, policy: PolicySpec) -> pl.DataFrame:
    frame = not_before(frame, now, policy.quiet_hours)
    routed = pl.col("step_index").is_not_null()
    decision = (
        pl.when(~routed)
        .then(pl.lit(EXCLUDE))
        .when(pl.col("_holdout"))
        .then(pl.lit(HOLDOUT))
        .when(pl.col("not_before").is_not_null())
        .then(pl.lit(DEFER))
        .otherwise(pl.lit(SEND))
    )
    return frame.with_columns(
        decision.alias("decision"),
        pl.when(routed & ~pl.col("_holdout")).then(pl.col("not_before")).alias("not_before"),
        pl.when(routed & pl.col("_holdout"))
        .then(pl.lit(reasons.HOLDOUT))
        .otherwise(pl.col("reason"))
        .alias("reason"),
    )


def _attach_messages(frame: pl.DataFrame, plan: ChannelPlanSpec) -> pl.DataFrame:
    """Channel, connector and the rendered message of each routed customer."""

    def by_step(values: list[pl.Expr | None], dtype: pl.DataType) -> pl.Expr:
        expr: pl.Expr = pl.lit(None, dtype=dtype)
        for index in reversed(range(len(values))):
            value = values[index]
            if value is None:
                value = pl.lit(None, dtype=dtype)
            expr = pl.when(pl.col("step_index") == index).then(value).otherwise(expr)
        return expr

    steps = plan.steps
    # Messages are rendered only for routed customers (often a fraction of the audience),
    # then put back in place by row number.
    routed = frame.with_row_index("_row").filter(pl.col("step_index").is_not_null())
    rendered = routed.select(
        "_row",
        by_step([pl.lit(s.channel) for s in steps], pl.String()).alias("channel"),
        by_step([pl.lit(s.connector) for s in steps], pl.String()).alias("connector"),
        pl.when(pl.col("step_index").is_not_null()).then(pl.lit(STEP)).alias("step"),
        by_step(
            [pl.lit(s.template.name) if s.template else None for s in steps], pl.String()
        ).alias("template_name"),
        by_step(
            [pl.lit(s.template.language) if s.template else None for s in steps], pl.String()
        ).alias("template_language"),
        by_step(
            [
                pl.concat_list([variable_as_text(c) for c in s.template.variables])
                if s.template and s.template.variables
                else None
                for s in steps
            ],
            pl.List(pl.String),
        ).alias("variables"),
        by_step(
            [render_body(s.body, s.variable_columns()) if s.body else None for s in steps],
            pl.String(),
        ).alias("body"),
    )
    return (
        frame.with_row_index("_row")
        .join(rendered, on="_row", how="left", maintain_order="left")
        .drop("_row")
    )
