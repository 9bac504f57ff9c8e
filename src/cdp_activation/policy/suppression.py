"""Suppression: numbers that must never be messaged, globally or on one channel.

A suppression list is often kept in another format than the CRM (`07911 123456` there,
`+447911123456` here), so both sides are compared as E.164. A national-format entry without a
country is read in each country of the audience: over-matching suppresses, which is the safe side.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from cdp_activation.policy.phone_cache import PhoneCache
from cdp_activation.policy.phones import STATUS_OK, e164_number, normalise_frame


def normalise_suppressions(
    suppressions: pl.DataFrame, regions: list[str], cache: PhoneCache | None = None
) -> pl.DataFrame:
    """(phone_e164, channel) rows; channel null means every channel.

    International forms (+… or 00…) are read as they are; a national form is read in the
    entry's own `country` when the list has one, else in every region of the audience. All of
    it goes through the same vectorised, cached normalisation as the audience's numbers.
    """
    schema = pl.Schema({"phone_e164": pl.String(), "channel": pl.String()})
    if suppressions.is_empty():
        return pl.DataFrame(schema=schema)
    entries = suppressions.select(
        pl.col("phone").cast(pl.String),
        (pl.col("channel") if "channel" in suppressions.columns else pl.lit(None))
        .cast(pl.String)
        .alias("channel"),
        (pl.col("country") if "country" in suppressions.columns else pl.lit(None))
        .cast(pl.String)
        .alias("country"),
    ).unique()
    international = pl.col("phone").str.strip_chars().str.contains(r"^(\+|00)")
    own = entries.filter(international | pl.col("country").is_not_null()).with_columns(
        pl.when(international).then(pl.lit(None)).otherwise(pl.col("country")).alias("region")
    )
    national = entries.filter(~international & pl.col("country").is_null()).join(
        pl.DataFrame({"region": regions}, schema={"region": pl.String}), how="cross"
    )
    candidates = pl.concat(
        [own.select("phone", "channel", "region"), national.select("phone", "channel", "region")]
    )
    normalised = normalise_frame(candidates, "phone", "region", cache=cache)
    return (
        normalised.filter(pl.col("phone_status") == STATUS_OK)
        .select("phone_e164", "channel")
        .unique()
        .cast(schema)
    )


def suppressed_flags(
    number: pl.Expr, suppressed: pl.DataFrame, channels: Sequence[str]
) -> dict[str, pl.Expr]:
    """`_suppressed_all` and `_suppressed_<channel>`: is the row's number on the list.

    `number` is the row's E.164 number as an integer (`phones.e164_number`); the list is
    `normalise_suppressions`' (phone_e164, channel) rows, channel null for every channel.
    """
    numbers = suppressed.select(e164_number(pl.col("phone_e164")).alias("n"), "channel")

    def on_list(rows: pl.DataFrame) -> pl.Expr:
        if rows.is_empty():
            return pl.lit(False)
        return number.is_in(rows["n"].drop_nulls().implode()).fill_null(False)

    flags = {"_suppressed_all": on_list(numbers.filter(pl.col("channel").is_null()))}
    for channel in channels:
        flags[f"_suppressed_{channel}"] = on_list(numbers.filter(pl.col("channel") == channel))
    return flags
