"""An experiment's results: conversion per variant, and each sending variant against the
holdout (or, without one, against the first variant), with confidence intervals.

Intention to treat: every customer whose first message was decided for good counts in their
variant — sent, failed, unknown or dead-lettered alike, and the holdout — so a variant is not
flattered by leaving out the customers it could not reach. A customer converts when the
activation's `conversion_sql` returns a row for them within `conversion_window_days` after
their message went or would have gone (the end of their quiet hours, else the decision): the
same moment for every arm, so a held-out customer deferred to the morning counts from then.

The statistics are statsmodels': Wilson intervals for each rate, a two-sided two-proportion
z-test for the difference, and Newcombe's interval for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl

from cdp_activation.activation.run import Activation
from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.errors import CdpError
from cdp_activation.ledger import Ledger

CONFIDENCE = 0.95


class ResultsUnavailable(CdpError):
    """The activation has no experiment or no conversion SQL to measure it with."""


@dataclass(frozen=True)
class VariantResult:
    variant: str
    holdout: bool
    customers: int
    conversions: int
    rate: float
    rate_low: float
    rate_high: float
    # Against the baseline (the holdout, or the first variant); None for the baseline itself.
    lift: float | None = None  # difference of rates, in points of proportion
    lift_low: float | None = None
    lift_high: float | None = None
    relative_lift: float | None = None  # lift / the baseline's rate
    p_value: float | None = None


@dataclass(frozen=True)
class ExperimentResults:
    activation: str
    partition: str | None
    baseline: str
    window_days: int
    variants: list[VariantResult]
    open_windows: int  # customers whose conversion window has not closed yet
    window_closes_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["window_closes_at"] = (
            self.window_closes_at.isoformat() if self.window_closes_at else None
        )
        return out

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame([asdict(v) for v in self.variants])


def decided_outcomes(
    decisions: pl.DataFrame, conversions: pl.DataFrame, window: timedelta
) -> pl.DataFrame:
    """`decisions` (customer_id, partition_key, variant, decided_at) with `converted`: a
    conversion of that customer in [decided_at, decided_at + window)."""
    hits = (
        decisions.select("customer_id", "partition_key", "decided_at")
        .join(
            conversions.select(pl.col("customer_id").cast(pl.String), "converted_at"),
            on="customer_id",
        )
        .filter(
            (pl.col("converted_at") >= pl.col("decided_at"))
            & (pl.col("converted_at") < pl.col("decided_at") + window)
        )
        .select("customer_id", "partition_key")
        .unique()
        .with_columns(pl.lit(True).alias("converted"))
    )
    return decisions.join(hits, on=["customer_id", "partition_key"], how="left").with_columns(
        pl.col("converted").fill_null(False)
    )


def compare(
    counts: list[tuple[str, bool, int, int]], confidence: float = CONFIDENCE
) -> tuple[str, list[VariantResult]]:
    """(variant, is holdout, customers, conversions) in the experiment's order → the
    baseline's name and each variant's result against it."""
    from statsmodels.stats.proportion import (
        confint_proportions_2indep,
        proportion_confint,
        proportions_ztest,
    )

    alpha = 1 - confidence
    usable = [c for c in counts if c[2] > 0]
    if not usable:
        return "", []
    baseline = next((c for c in usable if c[1]), usable[0])
    _, _, n0, c0 = baseline
    results = []
    for name, holdout, n, c in usable:
        low, high = proportion_confint(c, n, alpha=alpha, method="wilson")
        result = VariantResult(name, holdout, n, c, c / n, float(low), float(high))
        if name != baseline[0]:
            lift = c / n - c0 / n0
            diff_low, diff_high = confint_proportions_2indep(
                c, n, c0, n0, method="newcomb", compare="diff", alpha=alpha
            )
            if c + c0 in (0, n + n0):  # no variation at all: no test to run
                p_value = 1.0
            else:
                _, p = proportions_ztest([c, c0], [n, n0], alternative="two-sided")
                p_value = float(p)
            result = dataclasses.replace(
                result,
                lift=lift,
                lift_low=float(diff_low),
                lift_high=float(diff_high),
                relative_lift=lift / (c0 / n0) if c0 else None,
                p_value=p_value,
            )
        results.append(result)
    return baseline[0], results


def experiment_results(
    activation: Activation,
    ledger: Ledger,
    warehouse: Warehouse,
    partition_key: str | None = None,
    now: datetime | None = None,
) -> ExperimentResults:
    """Conversion per variant of `activation`'s experiment (one partition, or all)."""
    experiment = activation.spec.experiment
    if experiment is None:
        raise ResultsUnavailable(
            f"{activation.name} has no experiment: add `experiment` (variants with weights, "
            "a holdout, conversion_sql) to its defs.yaml"
        )
    if activation.conversion_query is None:
        raise ResultsUnavailable(
            f"{activation.name}: experiment.conversion_sql is not set: give the SQL returning "
            "(customer_id, converted_at) that says who converted"
        )
    now = now or datetime.now(UTC)
    window = timedelta(days=experiment.conversion_window_days)
    decisions = ledger.experiment_decisions(activation.name, partition_key, now)
    closes: datetime | None = None
    open_windows = 0
    outcomes = decisions.with_columns(pl.lit(False).alias("converted"))
    if not decisions.is_empty():
        start = decisions["decided_at"].min()
        end = decisions["decided_at"].max()
        assert isinstance(start, datetime) and isinstance(end, datetime)
        conversions = warehouse.query(
            activation.conversion_query, {"start": start, "end": end + window}
        )
        missing = {"customer_id", "converted_at"} - set(conversions.columns)
        if missing:
            raise ResultsUnavailable(
                f"{activation.conversion_query.path}: returns no {', '.join(sorted(missing))} "
                "column: it must return customer_id and converted_at"
            )
        if not isinstance(conversions.schema["converted_at"], pl.Datetime):
            raise ResultsUnavailable(
                f"{activation.conversion_query.path}: converted_at is "
                f"{conversions.schema['converted_at']}, not a timestamp: cast it in the SQL"
            )
        conversions = conversions.with_columns(
            pl.col("converted_at").cast(pl.Datetime("us", "UTC"))
        )
        outcomes = decided_outcomes(decisions, conversions, window)
        still_open = decisions.filter(pl.col("decided_at") + window > now)
        open_windows = still_open.height
        if open_windows:
            latest = still_open["decided_at"].max()
            assert isinstance(latest, datetime)
            closes = latest + window
    per_variant = outcomes.group_by("variant").agg(
        pl.len().alias("customers"), pl.col("converted").sum().alias("conversions")
    )
    found = {v: (n, c) for v, n, c in per_variant.iter_rows()}
    counts = [(v.name, v.holdout, *found.get(v.name, (0, 0))) for v in experiment.variants]
    baseline, variants = compare(counts)
    return ExperimentResults(
        activation=activation.name,
        partition=partition_key,
        baseline=baseline,
        window_days=experiment.conversion_window_days,
        variants=variants,
        open_windows=open_windows,
        window_closes_at=closes,
    )


def results_markdown(results: ExperimentResults) -> str:
    """The results as the UI and the CLI show them."""
    lines = [
        f"| variant | customers | conversions | rate ({CONFIDENCE:.0%} CI) | "
        f"lift vs `{results.baseline}` ({CONFIDENCE:.0%} CI) | p-value |",
        "|---|---:|---:|---|---|---:|",
    ]
    for v in results.variants:
        rate = f"{v.rate:.2%} ({v.rate_low:.2%} to {v.rate_high:.2%})"
        if v.lift is None:
            lift, p = "baseline", ""
        else:
            assert v.lift_low is not None and v.lift_high is not None and v.p_value is not None
            lift = f"{v.lift * 100:+.2f} pts ({v.lift_low * 100:+.2f} to {v.lift_high * 100:+.2f})"
            p = f"{v.p_value:.3g}"
        lines.append(
            f"| `{v.variant}` | {v.customers:,} | {v.conversions:,} | {rate} | {lift} | {p} |"
        )
    return "\n".join(lines)
