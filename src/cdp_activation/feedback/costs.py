"""What the sends cost: the preview's estimate against what the providers reported, per
activation, day (partition) and channel.

Per accepted send (state `sent`):
- estimated: the price list's unit price for its channel, the customer's country and the
  activation's purpose (`activation/pricing.py`, CDP_PRICES_FILE), as the preview priced it;
- actual: the provider's own amount where its report carries one (Infobip's and Vonage's
  delivery reports, Twilio's `Price`); else, for a report that says whether it is billed
  (Meta's `pricing`), the price list's price for the category it was billed under (a
  marketing template at the marketing price, utility and authentication at the transactional
  one), or nothing when it is not billable (a free-form reply in the service window);
  unknown (null) while no report has said. Twilio's callbacks carry no price:
  `reconcile_prices` reads it from each Message resource once the message has gone.

Amounts are summed per currency: a provider that bills in another currency than the price
list is shown in its own, never converted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
import polars as pl

from cdp_activation.activation.pricing import PriceList
from cdp_activation.db import read_frame
from cdp_activation.ledger import SENT, Ledger

# A billed category → the price list's purpose it is priced at; others are free.
CATEGORY_PURPOSE: dict[str, Literal["marketing", "transactional"]] = {
    "marketing": "marketing",
    "marketing_lite": "marketing",
    "utility": "transactional",
    "authentication": "transactional",
    "authentication-international": "transactional",
}

COLUMNS = {
    "activation": pl.String,
    "partition_key": pl.String,
    "channel": pl.String,
    "purpose": pl.String,
    "country": pl.String,
    "billable": pl.Boolean,
    "pricing_category": pl.String,
    "price": pl.Float64,
    "price_currency": pl.String,
}


@dataclass(frozen=True)
class CostReport:
    currency: str  # the price list's
    frame: pl.DataFrame  # one row per activation, partition, channel and actual currency

    def markdown(self) -> str:
        lines = [
            "| activation | day | channel | sends | estimated | actual | reported | difference |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in self.frame.iter_rows(named=True):
            actual = (
                f"{row['actual_cost']:,.2f} {row['actual_currency']}"
                if row["reported"]
                else "not reported"
            )
            same = row["actual_currency"] == self.currency and row["reported"]
            difference = f"{row['actual_cost'] - row['estimated_cost']:+,.2f}" if same else ""
            lines.append(
                f"| {row['activation']} | {row['partition_key']} | {row['channel']} | "
                f"{row['sends']:,} | {row['estimated_cost']:,.2f} {self.currency} | {actual} | "
                f"{row['reported']:,} | {difference} |"
            )
        return "\n".join(lines)


def sent_rows(ledger: Ledger, activation: str | None = None) -> pl.DataFrame:
    """Accepted sends with what the cost needs (no phone number, no message)."""
    # A boolean as a number: SQLite keeps 0 and 1.
    selected = [
        "CASE WHEN billable THEN 1 WHEN NOT billable THEN 0 END AS billable"
        if c == "billable"
        else c
        for c in COLUMNS
    ]
    sql = f"SELECT {', '.join(selected)} FROM sends WHERE state = $1" + (
        " AND activation = $2" if activation else ""
    )
    params = [SENT, activation] if activation else [SENT]
    frame = read_frame(ledger.engine, sql, params, schema={**COLUMNS, "billable": pl.Int64})
    return frame.cast(COLUMNS)  # type: ignore[arg-type]


def cost_report(ledger: Ledger, prices: PriceList, activation: str | None = None) -> CostReport:
    rows = sent_rows(ledger, activation)
    priced = _priced(rows, prices)
    frame = (
        priced.group_by("activation", "partition_key", "channel", "actual_currency")
        .agg(
            pl.len().alias("sends"),
            pl.col("estimated").sum().round(4).alias("estimated_cost"),
            pl.col("actual").sum().round(4).alias("actual_cost"),
            pl.col("actual").is_not_null().sum().alias("reported"),
        )
        .sort("activation", "partition_key", "channel", "actual_currency", nulls_last=True)
    )
    return CostReport(currency=prices.currency, frame=frame)


def _priced(rows: pl.DataFrame, prices: PriceList) -> pl.DataFrame:
    """`rows` with `estimated`, `actual` and `actual_currency` (each distinct channel,
    country and purpose priced once)."""
    keys = rows.select("channel", "country", "purpose", "pricing_category").unique()
    table = []
    for channel, country, purpose, category in keys.iter_rows():
        estimate = prices.unit_price(channel, country, purpose)
        billed_as = CATEGORY_PURPOSE.get((category or "").lower())
        card = prices.unit_price(channel, country, billed_as) if billed_as else None
        table.append((channel, country, purpose, category, estimate, card))
    lookup = pl.DataFrame(
        table,
        schema={
            "channel": pl.String,
            "country": pl.String,
            "purpose": pl.String,
            "pricing_category": pl.String,
            "estimated": pl.Float64,
            "_card": pl.Float64,
        },
        orient="row",
    )
    joined = rows.join(
        lookup,
        on=["channel", "country", "purpose", "pricing_category"],
        how="left",
        nulls_equal=True,
    )
    reported_price = pl.col("price").is_not_null()
    return joined.with_columns(
        pl.when(reported_price)
        .then(pl.col("price"))
        .when(pl.col("billable").not_())
        .then(0.0)
        .when(pl.col("billable"))
        .then(pl.col("_card"))
        .alias("actual"),
        pl.when(reported_price)
        .then(pl.col("price_currency"))
        .when(pl.col("billable").is_not_null())
        .then(pl.lit(prices.currency))
        .alias("actual_currency"),
        pl.col("estimated").fill_null(0.0),
    )


# A provider prices a message once it has gone: ask after this long.
PRICE_AFTER = timedelta(minutes=10)


def price_fetchers(connectors: Mapping[str, Any]) -> dict[str, Any]:
    """The connectors that can be asked what their messages cost (`fetch_prices`)."""
    return {n: c for n, c in connectors.items() if callable(getattr(c, "fetch_prices", None))}


def reconcile_prices(
    ledger: Ledger,
    connectors: Mapping[str, Any],
    now: datetime | None = None,
    limit: int = 2000,
) -> dict[str, int]:
    """Ask each connector that can (Twilio) what its sends of more than `PRICE_AFTER` ago
    with no word on their cost yet cost, at most `limit` a connector a call (the next call
    asks for the rest); record the answers. Returns the sends priced, by connector."""
    now = now or datetime.now(UTC)
    done: dict[str, int] = {}
    for name, connector in sorted(price_fetchers(connectors).items()):
        ids = ledger.unpriced_sends(name, now - PRICE_AFTER, limit)
        if not ids:
            continue

        async def fetch(connector: Any = connector, ids: list[str] = ids) -> Any:
            async with httpx.AsyncClient(timeout=30) as client:
                return await connector.fetch_prices(client, ids)

        done[name] = ledger.record_prices(name, asyncio.run(fetch()))
    return done
