"""A stable uniform number in [0, 1) per customer, for holdouts and recipient caps.

It must not change when a library is upgraded (a customer in the control group today must be
in it tomorrow), so it is a fixed, specified hash — XXH64 with seed 0 of the UTF-8 text
"salt:customer_id", divided by 2**64 — and not polars' `hash`, whose values may change between
versions. The `polars-hash` plugin computes it vectorised and keeps its values across polars
versions; anyone can recompute it (Python: `xxhash.xxh64_intdigest(f"{salt}:{id}".encode())`,
ClickHouse: `xxHash64`). MD5, used before, cost ~0.3 µs a customer; XXH64 about 15 ns.
"""

from __future__ import annotations

import polars as pl
import polars_hash  # noqa: F401  # registers the `nchash` expression namespace

_TWO_TO_64 = 18446744073709551616.0


def stable_fraction(customer_id: pl.Expr, salt: str) -> pl.Expr:
    """`xxh64(salt + ":" + id) / 2**64` per row, as a Float64 in [0, 1)."""
    text = pl.lit(f"{salt}:") + customer_id.cast(pl.String)
    return text.nchash.xxhash64().cast(pl.Float64) / _TWO_TO_64  # type: ignore[attr-defined]
