"""Suppression: numbers that must never be messaged, globally or on one channel.

A suppression list is often kept in another format than the CRM (`07911 123456` there,
`+447911123456` here), so both sides are compared as E.164. A national-format entry without a
country is read in each country of the audience: over-matching suppresses, which is the safe side.
"""

from __future__ import annotations

import polars as pl

from cdp_activation.policy.phone_cache import PhoneCache
from cdp_activation.policy.phones import STATUS_OK, normalise_frame


def normalise_suppressions(
    suppressions: pl.DataFrame, regions: list[str], cache: PhoneCache | None = None
) -> pl.DataFrame:
    """(phone_e164, channel) rows; channel null means every channel.

    International forms (+… or 00…) are read as they are; a national form is read in the
    entry's own `country` when the list has one, else in every region of the audience. All of
    it goes through the same vectorised, cached normalisation as the audience's numbers.
    """
    schema = {"phone_e164": pl.String, "channel": pl.String}
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


def flag_suppressed(
    frame: pl.DataFrame, suppressed: pl.DataFrame, channels: list[str]
) -> pl.DataFrame:
    """Add `suppressed_all` and `suppressed_<channel>` boolean columns keyed on `phone_e164`."""
    global_numbers = suppressed.filter(pl.col("channel").is_null())["phone_e164"].implode()
    out = frame.with_columns(
        pl.col("phone_e164").is_in(global_numbers).fill_null(False).alias("suppressed_all")
    )
    for channel in channels:
        numbers = suppressed.filter(pl.col("channel") == channel)["phone_e164"].implode()
        out = out.with_columns(
            pl.col("phone_e164").is_in(numbers).fill_null(False).alias(f"suppressed_{channel}")
        )
    return out
