"""Consent: a channel may be used for a purpose only with an explicit opt-in.

The audience SQL returns one boolean column per channel and purpose, `<channel>_<purpose>_consent`
(latest consent record wins, opt-outs win ties: see the demo audience). Null means no record, and
no record means no consent.
"""

from __future__ import annotations

import polars as pl


def consent_column(channel: str, purpose: str) -> str:
    return f"{channel}_{purpose}_consent"


def has_consent(channel: str, purpose: str) -> pl.Expr:
    return pl.col(consent_column(channel, purpose)).cast(pl.Boolean).fill_null(False)
