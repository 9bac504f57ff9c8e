"""What the activation's assets record in Dagster (their materialisation metadata): built here,
at the Dagster edge, from the plain results the core returns (`activation_run`, `fallback`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import dagster as dg
import polars as pl

from cdp_activation.activation.pricing import estimate_cost, load_prices
from cdp_activation.activation.run import DeliverySummary, sample_messages
from cdp_activation.feedback.fallback import FallbackDecisions
from cdp_activation.policy import Decisions, reasons
from cdp_activation.policy.engine import DEFER, EXCLUDE, HOLDOUT, SEND
from cdp_activation.policy.variants import variant_counts
from cdp_activation.settings import get_settings
from cdp_activation.spec import (
    ChannelPlanSpec,
    ExperimentSpec,
    QuietHoursSpec,
    storable_parameters,
)

_WINDOW = re.compile(r"(\d\d:\d\d)-(\d\d:\d\d)")


def audience_metadata(
    frame: pl.DataFrame, parameters: Mapping[str, Any], partition_key: str
) -> dict[str, Any]:
    nulls = {c: frame[c].null_count() for c in frame.columns}
    return {
        "dagster/row_count": frame.height,
        "audience_size": frame.height,
        "partition": partition_key,
        "parameters": dg.MetadataValue.json(storable_parameters(dict(parameters))),
        "dagster/column_schema": _column_schema(frame.schema),
        "null_counts": dg.MetadataValue.md(
            "| column | nulls |\n|---|---:|\n"
            + "\n".join(f"| {c} | {n:,} |" for c, n in nulls.items())
        ),
    }


def _column_schema(schema: pl.Schema) -> dg.TableSchema:
    """The frame's columns as Dagster's `TableSchema`. Built here, away from the frame: the
    first `TableSchema` a process makes keeps its caller's local variables for good (Dagster's
    record class builds its constructor in that frame's namespace), and an audience of
    10,000,000 rows must not be one of them."""
    return dg.TableSchema(
        columns=[dg.TableColumn(name, str(dtype)) for name, dtype in schema.items()]
    )


def cost_metadata(result: Decisions, plan: ChannelPlanSpec) -> dict[str, Any]:
    """The preview's estimated cost: every chosen message at its unit price for the
    customer's country (the decisions' own, `with_country`: the one the ledger keeps and
    prices by) and the channel (`pricing.py`; CDP_PRICES_FILE)."""
    prices = load_prices(get_settings().prices_path())
    chosen = result.chosen_columns("channel", "country")
    total, by_channel, unpriced = estimate_cost(chosen, prices, plan.purpose)
    lines = [f"| channel | estimated cost ({prices.currency}) |", "|---|---:|"]
    lines += [f"| {c} | {v:,.2f} |" for c, v in by_channel.items()]
    meta: dict[str, Any] = {
        "estimated_cost": dg.MetadataValue.float(total),
        "currency": prices.currency,
        "estimated_cost_by_channel": dg.MetadataValue.md("\n".join(lines)),
    }
    if unpriced:
        meta["messages_without_a_price"] = unpriced
    return meta


def md_counts(title: str, counts: Mapping[str, int]) -> str:
    """A Markdown table of counts, the count first: long codes must not push it out of view
    in the UI's narrow metadata column."""
    if not counts:
        return f"_no {title.lower()}_"
    lines = [f"| {v:,} | `{k}` |" for k, v in counts.items()]
    return "\n".join([f"| count | {title} |", "|---:|---|", *lines])


def send_window_text(quiet: QuietHoursSpec) -> str:
    """The local send window decisions were made with, as their metadata shows it
    (`send_window_of` reads it back)."""
    window = f"{quiet.end}-{quiet.start}"
    return f"{window} local time" if quiet.enabled else f"{window} (quiet hours off: any time)"


def send_window_of(text: object) -> tuple[str, str] | None:
    """The (start, end) a `send_window` entry names; None for anything else."""
    match = _WINDOW.match(text) if isinstance(text, str) else None
    return (match[1], match[2]) if match else None


def decisions_metadata(
    result: Decisions,
    plan: ChannelPlanSpec,
    experiment: ExperimentSpec | None,
    quiet: QuietHoursSpec,
) -> dict[str, Any]:
    """The decisions asset's metadata: counts for the UI, the estimated cost, the send window
    they were made with, and `summary`, the run summary's part as one JSON entry
    (`runner.RunSummary` is rebuilt from it)."""
    eligible = result.eligible_by_channel()
    excluded = result.excluded_by_reason()
    counts = result.counts()
    samples = sample_messages(result.frame, plan, experiment=experiment)
    cost = cost_metadata(result, plan)
    variants = variant_counts(result.frame)
    meta: dict[str, Any] = {
        "audience_size": result.frame.height,
        "eligible": sum(eligible.values()),
        "excluded": sum(excluded.values()),
        "deferred": counts[DEFER],
        "holdout": counts[HOLDOUT],
        "eligible_by_channel": dg.MetadataValue.md(md_counts("Channel", eligible)),
        "excluded_by_reason": dg.MetadataValue.md(md_counts("Reason", excluded)),
        "reason_meanings": dg.MetadataValue.md(
            "\n".join(f"- `{code}`: {reasons.describe(code)}" for code in excluded)
            or "_nobody excluded_"
        ),
        "sample_messages": dg.MetadataValue.md(samples),
        "send_window": send_window_text(quiet),
        **cost,
        "summary": dg.MetadataValue.json(
            {
                "eligible": eligible,
                "excluded": excluded,
                "holdout": counts[HOLDOUT],
                "estimated_cost": cost["estimated_cost"].value,
                "currency": cost["currency"],
                "estimated_cost_by_channel": cost["estimated_cost_by_channel"].value,
                "sample_messages": samples,
                **({"variants": variants} if variants else {}),
            }
        ),
    }
    for channel, count in eligible.items():
        meta[f"eligible_{channel}"] = count
    for reason, count in excluded.items():
        meta[f"excluded_{reason}"] = count
    if result.template_problems:
        meta["template_problems"] = dg.MetadataValue.json(result.template_problems)
    if variants:
        meta["variants"] = dg.MetadataValue.md(md_variants(variants))
    return meta


def md_variants(variants: Mapping[str, Mapping[str, int]]) -> str:
    """An experiment's customers per variant and decision, as a Markdown table."""
    decisions = (SEND, DEFER, HOLDOUT, EXCLUDE)
    lines = ["| variant | " + " | ".join(decisions) + " |", "|---|" + "---:|" * len(decisions)]
    for name, counts in variants.items():
        lines.append(f"| `{name}` | " + " | ".join(f"{counts.get(d, 0):,}" for d in decisions))
    return "\n".join(lines)


def previous_audience_size(instance: Any, asset_key: Any, run_id: str) -> int | None:
    """The audience size of the last successful earlier run (any partition), or None."""
    result = instance.fetch_materializations(asset_key, limit=20)
    for record in result.records:
        if record.run_id == run_id:
            continue
        run = instance.get_run_by_id(record.run_id)
        if run is None or run.status != dg.DagsterRunStatus.SUCCESS:
            continue
        size = record.asset_materialization.metadata.get("audience_size")
        if size is not None:
            return int(size.value)
    return None


def delivery_metadata(summary: DeliverySummary) -> dict[str, Any]:
    """The deliveries step's metadata: its figures for the UI, and `summary`, the whole
    `DeliverySummary` as one JSON entry, which the CLI rebuilds (`DeliverySummary.from_json`)."""
    meta: dict[str, Any] = {
        "summary": dg.MetadataValue.json(summary.as_json()),
        "dry_run": summary.dry_run,
        "eligible": summary.eligible,
        "to_send": summary.to_send,
        "deferred": summary.deferred,
        "holdout": summary.holdout,
        "cancelled": summary.cancelled,
        "sent": summary.sent,
        "failed": summary.failed,
        "unknown": summary.unknown,
        "dead_letter": summary.dead_letter,
        "already_sent": summary.already_sent,
        "already_done_other": summary.already_done_other,
        "recovered_in_flight": summary.recovered_in_flight,
        "resent_unknown": summary.resent_unknown,
        "retried": summary.retried,
        "held_for_quiet_hours": summary.held_for_quiet_hours,
        "revived": summary.revived,
        "waiting": summary.waiting,
        "in_flight": summary.in_flight,
        "unknown_reconciled": summary.unknown_reconciled,
        "replied": summary.replied,
        "opted_out": summary.opted_out,
        "elapsed_seconds": summary.elapsed_seconds,
        "throughput_per_second": summary.throughput_per_second,
        "p50_latency_ms": summary.p50_latency_ms,
        "p95_latency_ms": summary.p95_latency_ms,
    }
    if summary.dry_run:
        meta["estimated_seconds_at_rate_limit"] = summary.estimated_seconds
    if summary.error_codes:
        meta["error_codes"] = dg.MetadataValue.md(md_counts("Error code", summary.error_codes))
    if summary.accepted_as:
        meta["accepted_as"] = dg.MetadataValue.md(
            md_counts("Accepted as (provider's word)", summary.accepted_as)
        )
    if summary.ledger_states:
        meta["partition_states"] = dg.MetadataValue.md(
            md_counts("State (whole partition)", summary.ledger_states)
        )
    if summary.dead_letter_by_reason:
        meta["dead_letter_by_reason"] = dg.MetadataValue.md(
            md_counts("Dead-letter reason", summary.dead_letter_by_reason)
        )
    if summary.cancelled_by_reason:
        meta["cancelled_by_reason"] = dg.MetadataValue.md(
            md_counts("Cancelled: reason code", summary.cancelled_by_reason)
        )
    if len(summary.workers) > 1:
        meta["workers"] = len(summary.workers)
        meta["per_worker"] = dg.MetadataValue.md(_workers_table(summary.workers))
    if summary.stopped_by:
        meta["stopped_by"] = summary.stopped_by
    return meta


def _workers_table(workers: list[dict[str, Any]]) -> str:
    lines = ["| Worker | Sent | Seconds | Sent/s | Stopped by |", "|---|---:|---:|---:|---|"]
    for w in workers:
        lines.append(
            f"| {w['worker']} | {w['sent']:,} | {w['seconds']} | {w['per_second']:,} | "
            f"{w.get('stopped_by', '')} |"
        )
    return "\n".join(lines)


def fallback_metadata(
    decisions: FallbackDecisions, summary: DeliverySummary, first_messages: Mapping[str, int]
) -> dict[str, Any]:
    """The fallback asset's materialisation metadata: what became of the first messages, why
    customers were due, what the policy decided for the fallback channel, and what was sent.
    `first_messages` is `Ledger.first_message_outcomes`."""
    excluded = decisions.excluded_by_reason()
    landed = first_messages.get("delivered", 0) + first_messages.get("read", 0)
    meta: dict[str, Any] = {
        "first_messages_delivered": landed,
        "first_messages_not_delivered": sum(first_messages.values()) - landed,
        "first_messages": dg.MetadataValue.md(md_counts("First message", first_messages)),
        "channel": decisions.channel,
        "fallback_due": sum(decisions.due_by_reason.values()),
        "fallback_eligible": decisions.eligible(),
        "fallback_excluded": sum(excluded.values()),
        "due_by_reason": dg.MetadataValue.md(md_counts("Why due", decisions.due_by_reason)),
        "excluded_by_reason": dg.MetadataValue.md(md_counts("Reason", excluded)),
        **delivery_metadata(summary),
        "fallback": dg.MetadataValue.json(
            {
                "channel": decisions.channel,
                "first_messages": dict(first_messages),
                "due": decisions.due_by_reason,
                "due_codes": decisions.due_by_code,
                "eligible": decisions.eligible(),
                "excluded": excluded,
            }
        ),
    }
    for reason, count in decisions.due_by_reason.items():
        meta[f"due_{reason}"] = count
    return meta
