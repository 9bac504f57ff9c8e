"""The WhatsApp 24-hour customer-care window.

Inside it (strictly less than 24 h 00 min 00 s after the customer's last inbound message) a
free-form session message may go; outside it only an approved template. A last inbound time in
the future is bad data and counts as outside.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl

WINDOW = timedelta(hours=24)


def last_inbound_column(channel: str) -> str:
    return f"{channel}_last_inbound_at"


def in_window(channel: str, now: datetime, columns: list[str]) -> pl.Expr:
    column = last_inbound_column(channel)
    if column not in columns:
        return pl.lit(False)
    last = pl.col(column)
    now_lit = pl.lit(now)
    return ((last <= now_lit) & (now_lit - last < pl.lit(WINDOW))).fill_null(False)
