"""Shared asset: what the sends cost, estimated against what the providers reported."""

import dagster as dg

from cdp_activation.activation.pricing import load_prices
from cdp_activation.feedback.costs import cost_report, reconcile_prices
from cdp_activation.plugins import plugins
from cdp_activation.settings import get_settings

# Connectors that can say what a message cost after the fact (Twilio's Message resource).
FETCHERS = sorted(n for n, p in plugins().items() if hasattr(p.connector, "fetch_prices"))


@dg.asset(
    key="activation_costs",
    group_name="costs",
    kinds={"polars"},
    required_resource_keys={"ledger", *FETCHERS},
    description="Per activation, day and channel: the messages accepted, their cost as the "
    "preview estimated it (the price list, CDP_PRICES_FILE) and as the providers reported it "
    "(a price in the delivery report, or Meta's billable category at the price list's rate), "
    "with how many sends have a report yet. docs/experiments.md's sibling: docs/costs.md.",
)
def activation_costs(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    ledger = context.resources.ledger.ledger()
    connectors = {name: getattr(context.resources, name).connector() for name in FETCHERS}
    priced = reconcile_prices(ledger, connectors)
    prices = load_prices(get_settings().prices_path())
    report = cost_report(ledger, prices)
    frame = report.frame
    same = frame.filter(frame["actual_currency"] == report.currency)
    estimated = float(frame["estimated_cost"].sum() or 0.0)
    reported = int(frame["reported"].sum() or 0)
    sends = int(frame["sends"].sum() or 0)
    return dg.MaterializeResult(
        metadata={
            "costs": dg.MetadataValue.md(report.markdown()),
            "currency": report.currency,
            "estimated_cost": dg.MetadataValue.float(round(estimated, 2)),
            "actual_cost": dg.MetadataValue.float(round(float(same["actual_cost"].sum() or 0), 2)),
            "sends": sends,
            "sends_with_a_reported_cost": reported,
            **{f"priced_now_{name}": n for name, n in priced.items()},
            "dagster/row_count": frame.height,
        }
    )


costs_job = dg.define_asset_job(
    "report_costs", selection=dg.AssetSelection.assets(activation_costs)
)

costs_schedule = dg.ScheduleDefinition(
    job=costs_job,
    cron_schedule="0 * * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Compare estimated and reported costs every hour (off until turned on).",
)
