"""Apply every rule of the plan to an audience and decide, per customer, a channel or a reason.

Order: customer-level rules (a usable number, not globally suppressed), then each channel of
the plan in order (consent, channel suppression, template, window, variables); a customer gets
the first channel that passes. Then one message per phone number and the recipient cap.
Everything is a polars expression over the whole frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from cdp_activation.connectors.base import TemplateInfo
from cdp_activation.policy import reasons
from cdp_activation.policy.consent import has_consent
from cdp_activation.policy.phones import STATUS_INVALID, STATUS_MISSING, normalise_frame
from cdp_activation.policy.suppression import flag_suppressed
from cdp_activation.policy.templates import (
    body_variables_ok,
    render_body,
    template_problem,
    variable_as_text,
    whatsapp_variables_ok,
)
from cdp_activation.policy.window import in_window
from cdp_activation.specs import ChannelPlanSpec

STEP = "initial"  # the plan's first send; a later fallback send is another step


@dataclass(frozen=True)
class Decisions:
    """Per customer: the chosen channel and its message, or why not."""

    frame: pl.DataFrame
    template_problems: dict[str, str]  # channel -> why its template may not be sent

    @property
    def chosen(self) -> pl.DataFrame:
        return self.frame.filter(pl.col("channel").is_not_null())

    def eligible_by_channel(self) -> dict[str, int]:
        counts = self.chosen.group_by("channel").len().sort("channel")
        return dict(zip(counts["channel"].to_list(), counts["len"].to_list(), strict=True))

    def excluded_by_reason(self) -> dict[str, int]:
        counts = (
            self.frame.filter(pl.col("reason").is_not_null())
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
    max_recipients: int | None = None,
    salt: str = "",
) -> Decisions:
    """Decide every customer of `audience` (one row per customer, contract columns present).

    `catalogs` maps a connector name to its template catalog; `suppressions` holds normalised
    (phone_e164, channel) rows, channel null for all channels.
    """
    channels = [step.channel for step in plan.steps]
    frame = normalise_frame(audience)
    frame = flag_suppressed(frame, suppressions, channels)
    columns = frame.columns

    customer_reason = (
        pl.when(pl.col("phone_status") == STATUS_MISSING)
        .then(pl.lit(reasons.MISSING_PHONE))
        .when(pl.col("phone_status") == STATUS_INVALID)
        .then(pl.lit(reasons.INVALID_PHONE))
        .when(pl.col("suppressed_all"))
        .then(pl.lit(reasons.SUPPRESSED))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    frame = frame.with_columns(customer_reason.alias("customer_reason"))

    template_problems: dict[str, str] = {}
    step_reason_cols: list[str] = []
    for step in plan.steps:
        channel = step.channel
        problem = None
        if step.template is not None:
            problem = template_problem(
                catalogs.get(step.connector, ()), step.template, plan.purpose
            )
            if problem:
                template_problems[channel] = problem
        variables = step.variable_columns()
        unique_vars = list(dict.fromkeys(variables))
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
        reason = (
            pl.when(~has_consent(channel, plan.purpose))
            .then(pl.lit(reasons.channel_reason(channel, reasons.NO_CONSENT)))
            .when(pl.col(f"suppressed_{channel}"))
            .then(pl.lit(reasons.channel_reason(channel, reasons.CHANNEL_SUPPRESSED)))
            .when(pl.lit(problem is not None))
            .then(pl.lit(reasons.channel_reason(channel, reasons.TEMPLATE_NOT_APPROVED)))
            .when(~window_ok)
            .then(pl.lit(reasons.channel_reason(channel, reasons.OUTSIDE_WINDOW)))
            .when(~vars_ok)
            .then(pl.lit(reasons.channel_reason(channel, reasons.INVALID_VARIABLES)))
            .otherwise(pl.lit(None, dtype=pl.String))
        )
        name = f"{channel}_reason"
        frame = frame.with_columns(reason.alias(name))
        step_reason_cols.append(name)

    # The first step that passes wins.
    chosen_index = pl.lit(None, dtype=pl.Int32)
    for index in reversed(range(len(plan.steps))):
        chosen_index = (
            pl.when(pl.col(step_reason_cols[index]).is_null())
            .then(pl.lit(index, dtype=pl.Int32))
            .otherwise(chosen_index)
        )
    frame = frame.with_columns(
        pl.when(pl.col("customer_reason").is_null()).then(chosen_index).alias("step_index")
    )
    # No channel passed: the reason names why each one failed, in plan order, e.g.
    # "whatsapp_no_consent+sms_no_consent", so no one reads it as "WhatsApp only".
    all_steps_failed = pl.concat_str([pl.col(c) for c in step_reason_cols], separator="+")
    frame = frame.with_columns(
        pl.coalesce(
            pl.col("customer_reason"),
            pl.when(pl.col("step_index").is_null()).then(all_steps_failed),
        ).alias("reason")
    )

    frame = _one_message_per_phone(frame)
    frame = _apply_cap(frame, max_recipients, salt)
    frame = _attach_messages(frame, plan)
    keep = [
        "customer_id",
        "phone_e164",
        "channel",
        "connector",
        "step",
        "template_name",
        "template_language",
        "variables",
        "body",
        "reason",
        *step_reason_cols,
    ]
    return Decisions(frame=frame.select(keep), template_problems=template_problems)


def _one_message_per_phone(frame: pl.DataFrame) -> pl.DataFrame:
    """Of customers sharing a number, only the lowest customer id is messaged."""
    rank = (
        pl.col("customer_id")
        .rank(method="ordinal")
        .over(pl.col("phone_e164"), pl.col("step_index").is_not_null())
    )
    duplicate = pl.col("step_index").is_not_null() & pl.col("phone_e164").is_not_null() & (rank > 1)
    return frame.with_columns(
        pl.when(duplicate)
        .then(pl.lit(reasons.DUPLICATE_PHONE))
        .otherwise(pl.col("reason"))
        .alias("reason"),
        pl.when(duplicate).then(None).otherwise(pl.col("step_index")).alias("step_index"),
    )


def _apply_cap(frame: pl.DataFrame, max_recipients: int | None, salt: str) -> pl.DataFrame:
    """Keep at most `max_recipients`, chosen by a stable hash so re-runs pick the same people."""
    if max_recipients is None:
        return frame
    order = (
        pl.concat_str(pl.lit(salt), pl.col("customer_id").cast(pl.String))
        .hash(seed=0)
        .rank(method="ordinal")
        .over(pl.col("step_index").is_not_null())
    )
    over = pl.col("step_index").is_not_null() & (order > max_recipients)
    return frame.with_columns(
        pl.when(over)
        .then(pl.lit(reasons.OVER_RECIPIENT_CAP))
        .otherwise(pl.col("reason"))
        .alias("reason"),
        pl.when(over).then(None).otherwise(pl.col("step_index")).alias("step_index"),
    )


def _attach_messages(frame: pl.DataFrame, plan: ChannelPlanSpec) -> pl.DataFrame:
    """Channel, connector and the rendered message of each chosen customer."""

    def by_step(values: list[pl.Expr | None], dtype: pl.DataType) -> pl.Expr:
        expr: pl.Expr = pl.lit(None, dtype=dtype)
        for index in reversed(range(len(values))):
            value = values[index]
            if value is None:
                value = pl.lit(None, dtype=dtype)
            expr = pl.when(pl.col("step_index") == index).then(value).otherwise(expr)
        return expr

    steps = plan.steps
    return frame.with_columns(
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
