"""Holdout: a deterministic control group for measuring uplift.

A customer is held out when the stable hash of (salt, customer id) falls below the share, so
the same customers are held out on every run and partition of the activation (same salt), and
the group is independent of the audience's size or order.
"""

from __future__ import annotations

import polars as pl

from cdp_activation.policy.hashing import stable_fraction


def held_out(customer_id: pl.Expr, share: float, salt: str) -> pl.Expr:
    """True for the customers in the control group of `share` (0 to 1) under `salt`."""
    if share <= 0:
        return pl.lit(False)
    return stable_fraction(customer_id, f"holdout:{salt}") < share
