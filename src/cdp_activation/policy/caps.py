"""Frequency caps: at most N messages of a purpose on a channel per customer in D days,
counted across every activation from the ledger.

A cap on one channel is a channel-level rule (the customer may still get another channel of
the plan); a cap on `any` channel is customer-level. The sends of the run being repeated
(same activation, partition and step) are not counted, so a re-run is "already sent", not
"capped".
"""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl

from cdp_activation.spec import FrequencyCapSpec


def cap_applies(cap: FrequencyCapSpec, purpose: str) -> bool:
    return cap.purpose in ("any", purpose)


def capped_customers(
    sends: pl.DataFrame, caps: list[FrequencyCapSpec], purpose: str, channel: str, now: datetime
) -> pl.Series:
    """Customer ids (as text) that reached a cap for `channel` ("any" for the overall caps).

    `sends`: one row per accepted message, columns customer_id (text), channel, purpose,
    sent_at (UTC).
    """
    reached: list[pl.Series] = []
    for cap in caps:
        if not cap_applies(cap, purpose) or cap.channel != channel:
            continue
        window = sends.filter(pl.col("sent_at") > now - timedelta(days=cap.days))
        if cap.purpose != "any":
            window = window.filter(pl.col("purpose") == cap.purpose)
        if cap.channel != "any":
            window = window.filter(pl.col("channel") == cap.channel)
        counts = window.group_by("customer_id").len()
        reached.append(counts.filter(pl.col("len") >= cap.max_messages)["customer_id"])
    if not reached:
        return pl.Series("customer_id", [], dtype=pl.String)
    return pl.concat(reached).unique()


EMPTY_SENDS = pl.DataFrame(
    schema={
        "customer_id": pl.String,
        "channel": pl.String,
        "purpose": pl.String,
        "sent_at": pl.Datetime("us", "UTC"),
    }
)
