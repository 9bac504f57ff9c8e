"""Holdout: a deterministic control group for measuring uplift.

A customer is held out when the stable hash of (salt, customer id) falls below the share, so
the same customers are held out on every run and partition of the activation (same salt), and
the group is independent of the audience's size or order.
"""

from __future__ import annotations

import polars as pl

from cdp_activation.policy.hashing import stable_fraction


def holdout_mask(customer_ids: pl.Series, share: float, salt: str) -> pl.Series:
    if share <= 0 or customer_ids.is_empty():
        return pl.Series("holdout", [False] * len(customer_ids), dtype=pl.Boolean)
    return (stable_fraction(customer_ids, f"holdout:{salt}") < share).alias("holdout")
