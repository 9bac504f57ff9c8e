"""The WhatsApp 24-hour customer-care window.

Inside it (strictly less than 24 h 00 min 00 s after the customer's last inbound message) a
free-form session message may go; outside it only an approved template. A last inbound time in
the future is bad data and counts as outside. A message that waits for the customer's quiet
hours must go before the window closes; one planned in time that is still unsent when it
closes (a long send, a retry) is cancelled at its claim (`SendStates.claim`).
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

from cdp_activation.vocabulary import CARE_WINDOW as WINDOW


def last_inbound_column(channel: str) -> str:
    return f"{channel}_last_inbound_at"


def in_window(
    channel: str, now: datetime, columns: list[str], goes_at: pl.Expr | None = None
) -> pl.Expr:
    """Whether a free-form message may go: the window is open now and, for a message that
    waits for the customer's quiet hours to end (`goes_at`, null: it goes now), still open
    when it goes."""
    column = last_inbound_column(channel)
    if column not in columns:
        return pl.lit(False)
    last = pl.col(column)
    now_lit = pl.lit(now)
    ok = (last <= now_lit) & (now_lit - last < pl.lit(WINDOW))
    if goes_at is not None:
        ok = ok & (goes_at.fill_null(now_lit) - last < pl.lit(WINDOW))
    return ok.fill_null(False)


def window_closes(channel: str) -> pl.Expr:
    """When the customer-care window closes: 24 hours after the customer's last message."""
    return pl.col(last_inbound_column(channel)) + pl.lit(WINDOW)
