"""Channel routing: each customer goes to the first channel of *their* order that passes.

The order is the plan's, unless the customer's country has its own (`policy.country_channels`,
e.g. Viber first in UA, LINE in JP); channels missing from a country's order are not used there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl

from cdp_activation.policy.codes import map_strings


def orders_by_country(
    plan_channels: Sequence[str], overrides: Mapping[str, Sequence[str]]
) -> list[tuple[str | None, list[int]]]:
    """(country, step indexes to try) per order; the first, country None, is everyone else's.

    The position of an order in this list is the order id `order_id` gives each customer.
    """
    index = {channel: i for i, channel in enumerate(plan_channels)}
    orders: list[tuple[str | None, list[int]]] = [(None, list(range(len(plan_channels))))]
    for country, channels in overrides.items():
        orders.append((country.upper(), [index[c] for c in channels]))
    return orders


def order_id(country: pl.Expr, orders: Sequence[tuple[str | None, Sequence[int]]]) -> pl.Expr:
    """Per customer, the position in `orders` of their country's order (0: the plan's)."""
    own = {c: i for i, (c, _) in enumerate(orders) if c is not None}
    if not own:
        return pl.lit(0, dtype=pl.UInt8)
    return map_strings(country.cast(pl.String).str.to_uppercase(), own, pl.UInt8()).fill_null(0)
