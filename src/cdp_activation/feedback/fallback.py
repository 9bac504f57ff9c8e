"""Fallback: send the plan's fallback channel to customers whose first message did not land.

Plain Python; the `fallback` asset of an activation (and its sensor) call it. One pass:

1. the ledger says which first messages are due a fallback (`Ledger.due_fallbacks`: failed
   with a code meaning "cannot receive it here", a free-form WhatsApp message its customer's
   24-hour window outran before it went, not delivered within the plan's window, or
   optionally not read), on the latest status it holds, leaving out any already decided;
2. the audience SQL runs again and the policy is applied again for the fallback channel alone
   (consent, suppression, number type, quiet hours, frequency caps), so a customer who has
   since withdrawn consent, or left the audience, is not messaged;
3. every due customer gets a ledger row of step `fallback` linked to the first message
   (`fallback_of`, `fallback_reason`): planned (sent now or after quiet hours) or `excluded`
   with the policy's reason code, so the decision is taken once;
4. planned fallbacks whose first message has since been delivered are cancelled, and the rest
   go out through the fallback connector, as any send does.

A status report that arrives after the fallback was decided is recorded on the first message
and sends nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from cdp_activation.activation.run import (
    Activation,
    DeliverySummary,
    caps_at_claim,
    compute_audience,
    compute_decisions,
    prepare_delivery,
    recover_interrupted,
    send_and_finish,
)
from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.connectors import connector_class
from cdp_activation.connectors.base import Connector
from cdp_activation.delivery.engine import DeliveryOptions
from cdp_activation.errors import CdpError
from cdp_activation.ledger import FALLBACK_STEP, Ledger
from cdp_activation.policy import reasons
from cdp_activation.policy.engine import EXCLUDE, excluded_by_reason
from cdp_activation.spec import ChannelPlanSpec, FallbackSpec, HoldoutSpec

# How far back the sensor looks for first messages due a fallback: one whose row has not
# changed for a week is past any fallback worth sending, and the ledger only grows.
SENSOR_HORIZON = timedelta(days=7)


class NoFallbackPlanned(CdpError, ValueError):
    """The activation's channel plan has no `fallback`."""


@dataclass(frozen=True)
class FallbackDecisions:
    """The due customers' fallback decisions (decisions rows of step `fallback`, with
    `fallback_of` and `fallback_reason`), and why each was due."""

    channel: str  # the fallback channel
    frame: pl.DataFrame
    due_by_reason: dict[str, int] = field(default_factory=dict)  # e.g. primary_unreachable
    due_by_code: dict[str, int] = field(default_factory=dict)  # failure codes among the due

    def eligible(self) -> int:
        if self.frame.is_empty():
            return 0
        return self.frame.filter(pl.col("decision") != EXCLUDE).height

    def excluded_by_reason(self) -> dict[str, int]:
        return {} if self.frame.is_empty() else excluded_by_reason(self.frame)


def fallback_spec(activation: Activation) -> FallbackSpec:
    spec = activation.spec.channel_plan.fallback
    if spec is None:
        raise NoFallbackPlanned(
            f"activation {activation.name!r} has no fallback: add channel_plan.fallback to its "
            "defs.yaml (e.g. channel: sms, not_delivered_within_minutes: 30)"
        )
    return spec


def fallback_activation(activation: Activation) -> Activation:
    """The activation as the policy sees it for the fallback: a plan of the fallback step
    alone, no per-country channel order, no holdout (held-out customers got no first
    message to fall back from), no experiment (a fallback row keeps its first message's
    variant, `due_fallbacks`)."""
    spec = activation.spec
    plan = spec.channel_plan
    step = plan.step_for(fallback_spec(activation).channel)
    return dataclasses.replace(
        activation,
        spec=spec.model_copy(
            update={
                "channel_plan": ChannelPlanSpec(purpose=plan.purpose, steps=[step]),
                "policy": spec.policy.model_copy(
                    update={"country_channels": {}, "holdout": HoldoutSpec()}
                ),
                "experiment": None,
            }
        ),
    )


def unreachable_codes(activation: Activation) -> dict[str, frozenset[str]]:
    """Per connector of the plan's other steps, the failure codes that fall back at once:
    the plan's `failure_codes`, else the connector's own (`Capabilities.unreachable_codes`)."""
    spec = fallback_spec(activation)
    return {
        step.connector: frozenset(spec.failure_codes)
        if spec.failure_codes is not None
        else connector_class(step.connector).capabilities.unreachable_codes
        for step in activation.spec.channel_plan.steps
        if step.channel != spec.channel
    }


def due_fallbacks(
    activation: Activation,
    ledger: Ledger,
    now: datetime,
    partition_key: str | None = None,
    not_delivered_within_minutes: float | None = None,
    **options: Any,
) -> pl.DataFrame:
    """`Ledger.due_fallbacks` with the plan's windows and codes (see there for columns and
    `options`)."""
    spec = fallback_spec(activation)
    minutes = (
        spec.not_delivered_within_minutes
        if not_delivered_within_minutes is None
        else not_delivered_within_minutes
    )
    return ledger.due_fallbacks(
        activation.name,
        spec.channel,
        not_delivered_by=now - timedelta(minutes=minutes),
        not_read_by=now - timedelta(hours=spec.not_read_within_hours)
        if spec.not_read_within_hours is not None
        else None,
        unreachable_codes=unreachable_codes(activation),
        partition_key=partition_key,
        **options,
    )


def partitions_due(activation: Activation, ledger: Ledger, now: datetime) -> set[str]:
    """Partitions whose fallback run has something to do (the sensor's question): first
    messages due a fallback and not yet decided, changed within `SENSOR_HORIZON`, or planned
    fallbacks now due (quiet hours over, or left unsent by a failed run)."""
    due = due_fallbacks(
        activation, ledger, now, undecided_only=True, changed_since=now - SENSOR_HORIZON
    )
    pending = ledger.partitions_with_pending(activation.name, FALLBACK_STEP, now)
    return set(due["partition_key"].to_list()) | pending


def backlog(activation: Activation, ledger: Ledger, now: datetime) -> int:
    """First messages due a fallback and not decided yet, changed within `SENSOR_HORIZON`:
    what the fallback runs still have to decide (the backlog alert's figure)."""
    return due_fallbacks(
        activation, ledger, now, undecided_only=True, changed_since=now - SENSOR_HORIZON
    ).height


def compute_fallback_decisions(
    activation: Activation,
    warehouse: Warehouse,
    ledger: Ledger,
    connectors: Mapping[str, Connector],
    partition_key: str,
    now: datetime,
    parameters: Mapping[str, Any],
    not_delivered_within_minutes: float | None = None,
    dry_run: bool = False,
) -> FallbackDecisions:
    """Decide the fallback of every customer of the partition whose first message is due one.

    `parameters` are the audience SQL's, as the partition's run used them (the YAML's
    defaults fill in any missing). A real run first applies the delivery reports that came
    before their send's answer was recorded (a run that never finished left them waiting), so
    a message reported delivered is not taken for undelivered; a dry run writes nothing.
    """
    if not dry_run:
        ledger.apply_pending_statuses()
    due = due_fallbacks(activation, ledger, now, partition_key, not_delivered_within_minutes)
    if due.is_empty():
        return FallbackDecisions(fallback_spec(activation).channel, frame=pl.DataFrame())
    due_by_reason = _counts(due, "fallback_reason")
    due_by_code = _counts(due.filter(pl.col("error_code").is_not_null()), "error_code")
    defaults = {
        name: spec.default
        for name, spec in activation.spec.audience.parameters.items()
        if spec.default is not None
    }
    audience = compute_audience(
        activation, warehouse, partition_key, {**defaults, **parameters}, ledger
    )
    key = pl.col("customer_id").cast(pl.String)
    still_in = audience.filter(key.is_in(due["customer_id"].implode()))
    links = due.select("customer_id", "fallback_of", "fallback_reason", "variant")
    decided = compute_decisions(
        fallback_activation(activation),
        still_in,
        warehouse,
        connectors,
        now=now,
        max_recipients=None,
        ledger=ledger,
        partition_key=partition_key,
    ).frame
    decided = _as_text(decided).join(links, on="customer_id", how="inner")
    left = links.join(decided.select("customer_id"), on="customer_id", how="anti").with_columns(
        pl.lit(EXCLUDE).alias("decision"), pl.lit(reasons.LEFT_AUDIENCE).alias("reason")
    )
    step = activation.spec.channel_plan.step_for(fallback_spec(activation).channel)
    # Refused rows too name the fallback channel: the ledger records what was not sent where.
    frame = pl.concat([decided, left], how="diagonal_relaxed").with_columns(
        pl.lit(FALLBACK_STEP).alias("step"),
        pl.lit(step.channel).alias("channel"),
        pl.lit(step.connector).alias("connector"),
    )
    return FallbackDecisions(
        fallback_spec(activation).channel,
        frame,
        due_by_reason=due_by_reason,
        due_by_code=due_by_code,
    )


def deliver_fallback(
    activation: Activation,
    decisions: FallbackDecisions,
    ledger: Ledger,
    connectors: Mapping[str, Connector],
    partition_key: str,
    dry_run: bool,
    run_id: str | None = None,
    options: DeliveryOptions | None = None,
) -> DeliverySummary:
    """Record and send the fallbacks in this process (as `deliver_decisions` does for first
    messages): `prepare_fallback`, one `send_due`, `finish_delivery`."""
    try:
        summary = prepare_fallback(
            activation, decisions, ledger, connectors, partition_key, dry_run, run_id
        )
        if dry_run or decisions.frame.is_empty():
            return summary
        caps = caps_at_claim(activation)
        return send_and_finish(summary, ledger, connectors, FALLBACK_STEP, run_id, options, caps)
    finally:
        ledger.dispose()


def prepare_fallback(
    activation: Activation,
    decisions: FallbackDecisions,
    ledger: Ledger,
    connectors: Mapping[str, Connector],
    partition_key: str,
    dry_run: bool,
    run_id: str | None = None,
) -> DeliverySummary:
    """`prepare_delivery` for the fallback step. With nothing newly due, it still mends what a
    crashed run left in flight and cancels planned fallbacks whose first message has landed
    since; then there is nothing for claim workers to do."""
    if not decisions.frame.is_empty():
        return prepare_delivery(
            activation,
            decisions.frame,
            ledger,
            connectors,
            partition_key,
            dry_run,
            run_id,
            step=FALLBACK_STEP,
        )
    summary = DeliverySummary(activation.name, partition_key, dry_run)
    if not dry_run:
        recover_interrupted(activation, ledger, connectors, partition_key, summary)
        summary.cancelled = ledger.cancel_landed_fallbacks(activation.name, partition_key)
        summary.ledger_states = ledger.counts(activation.name, partition_key)
    return summary


def _counts(frame: pl.DataFrame, column: str) -> dict[str, int]:
    counts = frame.group_by(column).len().sort(["len", column], descending=[True, False])
    return dict(zip(counts[column].to_list(), counts["len"].to_list(), strict=True))


def _as_text(frame: pl.DataFrame) -> pl.DataFrame:
    """Decisions with their enum columns as plain text, so rows of another origin (customers
    who left the audience) can join them."""
    enums = [name for name, dtype in frame.schema.items() if isinstance(dtype, pl.Enum)]
    return frame.with_columns(
        pl.col("customer_id").cast(pl.String), *(pl.col(c).cast(pl.String) for c in enums)
    )
