"""`<name>/results`: an experiment's conversion per variant and its lift over the holdout,
for one partition, as metadata the Dagster UI shows as a table and plots across partitions
(each variant's rate and lift are numeric entries). Materialised on demand or by its daily
schedule (off until turned on): conversions keep arriving for `conversion_window_days`."""

from typing import Any

import dagster as dg

from cdp_activation.activation import run
from cdp_activation.activation.results import experiment_results, results_markdown


def results_defs(
    activation: run.Activation, common: dict[str, Any], deliveries_key: dg.AssetKey
) -> dg.Definitions:
    name = activation.name
    experiment = activation.spec.experiment
    assert experiment is not None
    key = dg.AssetKey([name, "results"])
    # In the activation's pool like its other assets (one run of the activation at a time):
    # results read while a send of the same activation writes would count it half done.
    options = {k: v for k, v in common.items() if k != "kinds"}

    @dg.asset(
        key=key,
        deps=[deliveries_key],
        description=(
            f"Conversion per variant of {name}'s experiment and each variant's lift over "
            f"the holdout, from {experiment.conversion_sql} within "
            f"{experiment.conversion_window_days} days of the decision (intention to treat)."
        ),
        required_resource_keys={"warehouse", "ledger"},
        kinds={"polars", "statsmodels"},
        **options,
    )
    def results(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        found = experiment_results(
            activation,
            context.resources.ledger.ledger(),
            context.resources.warehouse.warehouse(),
            context.partition_key,
        )
        return dg.MaterializeResult(metadata=results_metadata(found))

    job = dg.define_asset_job(
        name=f"{name}_results_job",
        selection=dg.AssetSelection.assets(key),
        tags={"activation": name},
        description=f"Measure {name}'s experiment for one day's partition.",
    )
    return dg.Definitions(assets=[results], jobs=[job])


def results_metadata(found: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "results": dg.MetadataValue.md(results_markdown(found)),
        "baseline": found.baseline,
        "conversion_window_days": found.window_days,
        "open_conversion_windows": found.open_windows,
        "summary": dg.MetadataValue.json(found.as_json()),
    }
    if found.window_closes_at is not None:
        meta["last_window_closes_at"] = found.window_closes_at.isoformat()
    for v in found.variants:
        meta[f"customers_{v.variant}"] = v.customers
        meta[f"conversion_rate_{v.variant}"] = dg.MetadataValue.float(v.rate)
        if v.lift is not None:
            meta[f"lift_{v.variant}"] = dg.MetadataValue.float(v.lift)
            meta[f"p_value_{v.variant}"] = dg.MetadataValue.float(v.p_value)
    return meta
