"""The demo's customers answering a win-back: orders in the week after the decision, added to
the demo warehouse so an experiment's results have something real to measure.

A simulation, and a plain one: every customer of the experiment orders with a base chance,
and a customer whose message was delivered (or read) with more, by what they received — the
long offer template more than the short one or an SMS. Nobody's variant is read: a held-out
customer, or one whose message failed, simply got nothing, so any lift the results show comes
from what the ledger says was delivered. Deterministic: a hash of (seed, customer, partition).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from cdp_activation.audience.warehouse import connect_duckdb
from cdp_activation.ledger import Ledger
from cdp_activation.policy.hashing import stable_fraction

BASE_RATE = 0.04  # orders within the week anyway
# Added to it when the message landed (delivered or read), by the template, or a text.
UPLIFT = {"winback_offer": 0.08, "winback_offer_short": 0.04}
TEXT_UPLIFT = 0.03
WEEK = timedelta(days=7)


def simulate_conversions(
    warehouse: Path, ledger: Ledger, activation: str, partition_key: str, seed: int = 7
) -> int:
    """Append the simulated orders of one partition's decided customers to the warehouse's
    `orders` (once: a second call for the same partition adds nothing). Returns how many."""
    # Held-out customers too, whenever their message would have gone: the week is simulated.
    rows = ledger.experiment_decisions(
        activation, partition_key, now=datetime.max.replace(tzinfo=UTC)
    )
    if rows.is_empty():
        return 0
    received = _messages(ledger, activation, partition_key)
    salt = f"demo-conversion:{seed}:{partition_key}"
    landed = pl.col("delivery_status").is_in(["delivered", "read"]) & (pl.col("state") == "sent")
    uplift = (
        pl.col("template")
        .replace_strict(UPLIFT, default=TEXT_UPLIFT, return_dtype=pl.Float64)
        .fill_null(TEXT_UPLIFT)
    )
    chance = pl.lit(BASE_RATE) + pl.when(landed).then(uplift).otherwise(0.0)
    orders = (
        rows.join(received, on="customer_id", how="left")
        .filter(stable_fraction(pl.col("customer_id"), salt) < chance)
        .select(
            pl.col("customer_id").cast(pl.Int64),
            (
                pl.col("decided_at")
                + pl.duration(
                    seconds=(stable_fraction(pl.col("customer_id"), f"{salt}:when") * 6.5 + 0.05)
                    * 86400
                )
            ).alias("ordered_at"),
            (20 + stable_fraction(pl.col("customer_id"), f"{salt}:amount") * 180)
            .round(2)
            .alias("amount"),
        )
    )
    con = connect_duckdb(warehouse, read_only=False)
    try:
        con.execute(
            "CREATE TABLE IF NOT EXISTS demo_simulated_conversions "
            "(activation VARCHAR, partition_key VARCHAR, orders BIGINT)"
        )
        done = con.execute(
            "SELECT count(*) FROM demo_simulated_conversions WHERE activation = ? "
            "AND partition_key = ?",
            [activation, partition_key],
        ).fetchall()
        if done[0][0]:
            return 0
        con.register("simulated", orders.to_arrow())
        con.execute("BEGIN")
        con.execute(
            """
            INSERT INTO orders
            SELECT (SELECT coalesce(max(order_id), 0) FROM orders)
                       + row_number() OVER (ORDER BY s.customer_id),
                   s.customer_id, s.ordered_at, s.amount::DECIMAL(10, 2),
                   coalesce(c.currency, 'USD')
            FROM simulated AS s
            LEFT JOIN (SELECT customer_id, any_value(currency) AS currency FROM orders
                       GROUP BY customer_id) AS c USING (customer_id)
            """
        )
        con.execute(
            "INSERT INTO demo_simulated_conversions VALUES (?, ?, ?)",
            [activation, partition_key, orders.height],
        )
        con.execute("COMMIT")
    finally:
        con.close()
    return orders.height


def _messages(ledger: Ledger, activation: str, partition_key: str) -> pl.DataFrame:
    """(customer_id, template) of each first message: its template's name, null for a text."""
    sent = ledger.rows(activation, partition_key)
    if sent.is_empty():
        return pl.DataFrame(schema={"customer_id": pl.String, "template": pl.String})
    sent = sent.filter(pl.col("step") == "initial")
    templates = [json.loads(m).get("template") for m in sent["message"].to_list()]
    return pl.DataFrame(
        {"customer_id": sent["customer_id"].cast(pl.String), "template": templates},
        schema={"customer_id": pl.String, "template": pl.String},
    )
