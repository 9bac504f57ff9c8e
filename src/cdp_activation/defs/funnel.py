"""Shared asset: the activation funnel (sql/reporting/funnel.sql) as a view in the warehouse."""

from pathlib import Path

import dagster as dg
import yaml

from cdp_activation.activation.run import Activation
from cdp_activation.feedback.funnel import (
    FUNNEL_SQL,
    FUNNEL_VIEW,
    STAGES,
    conversions,
    funnel_markdown,
    funnel_totals,
    refresh_funnel,
)
from cdp_activation.spec import ActivationSpec

ACTIVATIONS = Path(__file__).parent / "activations"


def _activations(dialect: str) -> list[Activation]:
    """Every activation whose experiment measures conversions (the funnel's last stage)."""
    found = []
    for path in sorted(ACTIVATIONS.glob("*/defs.yaml")):
        attributes = (yaml.safe_load(path.read_text()) or {}).get("attributes") or {}
        if not (attributes.get("experiment") or {}).get("conversion_sql"):
            continue
        spec = ActivationSpec.model_validate(attributes)
        found.append(Activation.from_spec(path.parent.name, spec, dialect=dialect))
    return found


@dg.asset(
    key="activation_funnel",
    group_name="send_log",
    kinds={"sql"},
    required_resource_keys={"ledger", "warehouse", "send_log"},
    description=f"The funnel audience → eligible → sent → delivered → read → converted per "
    f"activation, day, country and channel: the view `{FUNNEL_VIEW}` ({FUNNEL_SQL}) over the "
    "send log, each run's decisions counted and the experiments' conversions, exported first.",
)
def activation_funnel(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    ledger = context.resources.ledger.ledger()
    warehouse = context.resources.warehouse.warehouse()
    found = conversions(_activations(warehouse.dialect), ledger, warehouse)
    exports, funnel = refresh_funnel(ledger, context.resources.send_log.url, found)
    totals = funnel_totals(funnel)
    return dg.MaterializeResult(
        metadata={
            "funnel": dg.MetadataValue.md(funnel_markdown(funnel)),
            # One number per stage: the asset's Plots tab draws each across refreshes.
            **{f"customers_{stage}": totals[stage] for stage in STAGES},
            "view": FUNNEL_VIEW,
            "dagster/row_count": funnel.height,
            **{f"{table}_exported": done.exported for table, done in exports.items()},
        }
    )


funnel_job = dg.define_asset_job(
    "refresh_funnel", selection=dg.AssetSelection.assets(activation_funnel)
)
