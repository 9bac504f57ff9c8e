"""Which identifier a channel is addressed by: the phone number, or the platform's own user id.

Most channels (WhatsApp, SMS, Viber, RCS) reach a customer at their phone number. LINE does
not: the Messaging API addresses a user by the id LINE gave them for the business's official
account (`U` + 32 hex digits, from a follow event), which the audience returns as
`line_user_id`. WeChat likewise addresses a follower of the Official Account by its openid
(28 characters), the audience's `wechat_openid`. The phone number still identifies the
customer for suppression, caps and "one message per number"; the address is only where the
message goes.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from cdp_activation.vocabulary import ADDRESS_PATTERNS  # what a valid address looks like

# Channels addressed by a platform id, and the audience column holding it.
ADDRESS_COLUMNS: dict[str, str] = {"line": "line_user_id", "wechat": "wechat_openid"}


def address_column(channel: str) -> str | None:
    """The audience column a channel is addressed by; None when it is the phone number."""
    return ADDRESS_COLUMNS.get(channel)


def has_address(channel: str) -> pl.Expr:
    """True where the row has a usable address for `channel` (always, for phone channels)."""
    column = address_column(channel)
    if column is None:
        return pl.lit(True)
    return pl.col(column).cast(pl.String).str.contains(ADDRESS_PATTERNS[channel]).fill_null(False)


def recipient(channels: Sequence[str]) -> pl.Expr:
    """Where each decided message goes: the channel's address column, else `phone_e164`."""
    expr = pl.col("phone_e164")
    for channel in channels:
        column = address_column(channel)
        if column is not None:
            expr = pl.when(pl.col("channel") == channel).then(pl.col(column)).otherwise(expr)
    return expr
