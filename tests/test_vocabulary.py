"""The idempotency key has one definition, in Python and in polars alike."""

from __future__ import annotations

import polars as pl
from hypothesis import given
from hypothesis import strategies as st

from cdp_activation.vocabulary import idempotency_key, idempotency_key_expr

texts = st.text(min_size=1, max_size=20)


@given(texts, texts, st.lists(st.tuples(texts, st.sampled_from(["initial", "fallback"]))))
def test_the_frame_key_is_the_row_key(activation: str, partition: str, rows: list) -> None:
    frame = pl.DataFrame(rows, schema=["customer_id", "step"], orient="row")
    keys = frame.select(
        idempotency_key_expr(activation, partition, pl.col("customer_id"), pl.col("step"))
    ).to_series()
    assert keys.to_list() == [idempotency_key(activation, partition, c, s) for c, s in rows]
