"""Small integer codes shown as names: the policy works on one byte a row, people read names.

Reason codes, decisions, channels and phone statuses repeat a handful of values over millions
of rows. The engine computes them as integer codes and turns them into polars enums at the end:
one byte a row instead of a string, and comparisons with plain strings still work.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl


def enum_from_codes(codes: pl.Expr, names: Sequence[str]) -> pl.Expr:
    """`names[code]` per row as `pl.Enum(names)`; a null code gives null."""
    dtype = pl.Enum(list(names))
    return pl.lit(pl.Series(list(names), dtype=dtype)).gather(codes)
