"""Channel routing: each customer goes to the first channel of *their* order that passes.

The order is the plan's, unless the customer's country has its own (`policy.country_channels`,
e.g. Viber first in UA, LINE in JP); channels missing from a country's order are not used there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl


def orders_by_country(
    plan_channels: Sequence[str], overrides: Mapping[str, Sequence[str]]
) -> dict[str | None, list[int]]:
    """Step indexes to try per country; key None is everyone else."""
    index = {channel: i for i, channel in enumerate(plan_channels)}
    orders: dict[str | None, list[int]] = {None: list(range(len(plan_channels)))}
    for country, channels in overrides.items():
        orders[country] = [index[c] for c in channels]
    return orders


def chosen_step(reason_columns: Sequence[str], order: Sequence[int]) -> pl.Expr:
    """The first step in `order` whose reason column is null, else null."""
    expr: pl.Expr = pl.lit(None, dtype=pl.Int32)
    for index in reversed(order):
        expr = (
            pl.when(pl.col(reason_columns[index]).is_null())
            .then(pl.lit(index, dtype=pl.Int32))
            .otherwise(expr)
        )
    return expr


def failed_reasons(reason_columns: Sequence[str], order: Sequence[int]) -> pl.Expr:
    """Each tried channel's reason, in the customer's order, joined by '+'."""
    return pl.concat_str([pl.col(reason_columns[i]) for i in order], separator="+")


def route(
    frame: pl.DataFrame,
    reason_columns: Sequence[str],
    plan_channels: Sequence[str],
    overrides: Mapping[str, Sequence[str]],
) -> tuple[pl.Expr, pl.Expr]:
    """(step index, reason if no step passed) expressions over the whole frame."""
    orders = orders_by_country(plan_channels, overrides)
    step: pl.Expr = chosen_step(reason_columns, orders[None])
    reason: pl.Expr = failed_reasons(reason_columns, orders[None])
    for country, order in orders.items():
        if country is None:
            continue
        in_country = pl.col("country").str.to_uppercase() == country
        step = pl.when(in_country).then(chosen_step(reason_columns, order)).otherwise(step)
        reason = pl.when(in_country).then(failed_reasons(reason_columns, order)).otherwise(reason)
    return step, reason
