"""Small integer codes shown as names: the policy works on one byte a row, people read names.

Reason codes, decisions, channels and phone statuses repeat a handful of values over millions
of rows. The engine computes them as integer codes and turns them into polars enums at the end:
one byte a row instead of a string, and comparisons with plain strings still work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl


def enum_from_codes(codes: pl.Expr, names: Sequence[str]) -> pl.Expr:
    """`names[code]` per row as `pl.Enum(names)`; a null code gives null."""
    dtype = pl.Enum(list(names))
    return pl.lit(pl.Series(list(names), dtype=dtype)).gather(codes)


def map_strings(
    text: pl.Expr, mapping: Mapping[str, int | None], dtype: pl.DataType | None = None
) -> pl.Expr:
    """`mapping[value]` per row for a text column; values not in `mapping` give null.

    A cast to an enum of the keys and a gather from the values: unlike `replace_strict`,
    both run in polars' streaming engine, so the lookup never holds a whole column.
    """
    dtype = dtype or pl.UInt32()
    if not mapping:
        return pl.lit(None, dtype=dtype)
    keys = list(mapping)
    values = pl.Series([mapping[k] for k in keys], dtype=dtype)
    index = text.cast(pl.String).cast(pl.Enum(keys), strict=False).to_physical()
    return pl.lit(values).gather(index)
