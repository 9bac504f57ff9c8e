"""Experiment variants as the ledger keeps them: each customer's arm, from the first time
they were planned, per activation and salt (`schema.variant_assignments`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import polars as pl

from cdp_activation.db import read_frame
from cdp_activation.ledger.base import LedgerBase, db_time, utc_now
from cdp_activation.vocabulary import (
    DEAD_LETTER,
    FAILED,
    HOLDOUT,
    INITIAL_STEP,
    SENT,
    UNKNOWN,
)

_UTC = pl.Datetime("us", "UTC")

# Rows one INSERT statement carries (SQLite binds at most 32,766 values, 5 a row).
_ROWS_PER_STATEMENT = 1000


class Assignments(LedgerBase):
    """Read and record experiment variants."""

    def variant_assignments(self, activation: str, salt: str) -> pl.DataFrame:
        """(customer_id, variant) of every customer assigned in this activation's experiment."""
        return read_frame(
            self.engine,
            "SELECT customer_id, variant FROM variant_assignments "
            "WHERE activation = $1 AND salt = $2",
            (activation, salt),
            schema={"customer_id": pl.String, "variant": pl.String},
        )

    def record_assignments(self, activation: str, salt: str, chosen: pl.DataFrame) -> int:
        """Keep each customer's variant (`chosen`: customer_id, variant); a customer already
        assigned keeps their first. Returns how many were new."""
        rows = chosen.select(
            pl.col("customer_id").cast(pl.String), pl.col("variant").cast(pl.String)
        ).filter(pl.col("variant").is_not_null())
        if rows.is_empty():
            return 0
        known = self.variant_assignments(activation, salt)
        new = rows.join(known, on="customer_id", how="anti").unique("customer_id")
        if new.is_empty():
            return 0
        now = db_time(utc_now(), self.dialect)
        mark = self._mark
        with self.engine.begin() as con:
            for chunk in new.sort("customer_id").iter_slices(_ROWS_PER_STATEMENT):
                values = ", ".join([f"({mark}, {mark}, {mark}, {mark}, {mark})"] * chunk.height)
                params = [
                    value
                    for customer, variant in chunk.iter_rows()
                    for value in (activation, salt, customer, variant, now)
                ]
                con.exec_driver_sql(
                    "INSERT INTO variant_assignments "
                    "(activation, salt, customer_id, variant, assigned_at) "
                    f"VALUES {values} ON CONFLICT DO NOTHING",
                    tuple(params),
                )
        return new.height

    def experiment_decisions(
        self, activation: str, partition_key: str | None = None, now: datetime | None = None
    ) -> pl.DataFrame:
        """Each first message of an experiment decided for good by `now`, one row a customer
        and partition: customer_id, partition_key, variant, state, delivery_status and
        decided_at, when the message went or would have gone (its `not_before`, the end of
        its quiet hours, else when it was planned). Sent, failed, unknown and dead-lettered
        rows count, and held-out ones once their moment has passed; rows still planned or
        cancelled do not: no treatment was decided for them yet."""
        now = now or utc_now()
        sql = (
            "SELECT customer_id, partition_key, variant, state, delivery_status, "
            "coalesce(not_before, planned_at) AS decided_at FROM sends "
            "WHERE activation = $1 AND step = $2 AND variant IS NOT NULL "
            "AND (state IN ($3, $4, $5, $6) OR (state = $7 AND coalesce(not_before, "
            "planned_at) <= $8))"
        )
        params: list[Any] = [
            activation,
            INITIAL_STEP,
            SENT,
            FAILED,
            UNKNOWN,
            DEAD_LETTER,
            HOLDOUT,
            db_time(now, self.dialect),
        ]
        if partition_key is not None:
            sql += " AND partition_key = $9"
            params.append(partition_key)
        frame = read_frame(
            self.engine,
            sql,
            params,
            schema={
                "customer_id": pl.String,
                "partition_key": pl.String,
                "variant": pl.String,
                "state": pl.String,
                "delivery_status": pl.String,
                "decided_at": pl.String if self.dialect == "sqlite" else _UTC,
            },
        )
        if self.dialect == "sqlite":  # the text SQLAlchemy writes, UTC
            frame = frame.with_columns(
                pl.col("decided_at").str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_zone="UTC")
            )
        return frame.with_columns(pl.col("decided_at").cast(_UTC))

    def record_decision_counts(
        self, activation: str, partition_key: str, step: str, counts: pl.DataFrame
    ) -> None:
        """Keep a real run's decisions, counted (`counts`: country, channel, decision,
        reason, customers), as this partition and step's: combinations an earlier run had
        and this one has not drop to 0."""
        now = db_time(utc_now(), self.dialect)
        mark = self._mark
        rows = [
            (
                "|".join(str(v or "") for v in (activation, partition_key, step, *r[:4])),
                activation,
                partition_key,
                step,
                *r,
                now,
            )
            for r in counts.select(
                pl.col("country").cast(pl.String),
                pl.col("channel").cast(pl.String),
                pl.col("decision").cast(pl.String),
                pl.col("reason").cast(pl.String),
                pl.col("customers").cast(pl.Int64),
            ).iter_rows()
        ]
        with self.engine.begin() as con:
            con.exec_driver_sql(
                f"UPDATE decision_counts SET customers = 0, updated_at = {mark} "
                f"WHERE activation = {mark} AND partition_key = {mark} AND step = {mark}",
                (now, activation, partition_key, step),
            )
            if rows:
                con.exec_driver_sql(
                    "INSERT INTO decision_counts (count_key, activation, partition_key, step, "
                    "country, channel, decision, reason, customers, updated_at) VALUES "
                    f"({', '.join([mark] * 10)}) ON CONFLICT (count_key) DO UPDATE SET "
                    "customers = excluded.customers, updated_at = excluded.updated_at",
                    rows,
                )
