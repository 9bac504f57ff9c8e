"""A stable uniform number in [0, 1) per customer, for holdouts and recipient caps.

It must not change when a library is upgraded (a customer in the control group today must be
in it tomorrow), so it is MD5 of "salt:customer_id", a fixed standard, not polars' `hash`,
whose values may change between versions. DuckDB computes it vectorised over Arrow.
"""

from __future__ import annotations

import duckdb
import polars as pl

_TWO_TO_64 = 18446744073709551616.0


def stable_fraction(customer_ids: pl.Series, salt: str) -> pl.Series:
    """`md5(salt + ":" + id)` as a float in [0, 1), one per id, in the same order."""
    if customer_ids.is_empty():
        return pl.Series("fraction", [], dtype=pl.Float64)
    table = pl.DataFrame({"id": customer_ids.cast(pl.String)}).with_row_index("i").to_arrow()
    with duckdb.connect() as con:
        con.execute("SET enable_progress_bar = false")
        con.register("ids", table)
        relation = con.sql(
            "SELECT CAST(md5_number_lower($salt || ':' || id) AS DOUBLE) / $scale AS fraction "
            "FROM ids ORDER BY i",
            params={"salt": salt, "scale": _TWO_TO_64},
        )
        result = pl.from_arrow(relation.to_arrow_table())
    return result["fraction"]  # type: ignore[index]
