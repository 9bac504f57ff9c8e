"""Suppression: numbers that must never be messaged, globally or on one channel.

A suppression list is often kept in another format than the CRM (`07911 123456` there,
`+447911123456` here), so both sides are compared as E.164. A national-format entry without a
country is read in each country of the audience: over-matching suppresses, which is the safe side.
"""

from __future__ import annotations

import polars as pl

from cdp_activation.policy.phones import STATUS_OK, normalise


def normalise_suppressions(suppressions: pl.DataFrame, regions: list[str]) -> pl.DataFrame:
    """(phone_e164, channel) rows; channel null means every channel."""
    if suppressions.is_empty():
        return pl.DataFrame(schema={"phone_e164": pl.String, "channel": pl.String})
    has_country = "country" in suppressions.columns
    has_channel = "channel" in suppressions.columns
    rows: list[tuple[str, str | None]] = []
    columns = (
        ["phone"] + (["country"] if has_country else []) + (["channel"] if has_channel else [])
    )
    for record in suppressions.select(columns).unique().iter_rows(named=True):
        raw = record["phone"]
        channel = record.get("channel")
        candidates = [record["country"]] if has_country and record["country"] else regions
        if raw and raw.strip().startswith(("+", "00")):
            candidates = [None]
        for region in candidates:
            e164, status = normalise(raw, region)
            if status == STATUS_OK:
                rows.append((e164, channel))  # type: ignore[arg-type]
    return pl.DataFrame(
        rows, schema={"phone_e164": pl.String, "channel": pl.String}, orient="row"
    ).unique()


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
