"""Reads for runs, sensors, the CLI and tests: counts, progress, pending rows, history."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta

import polars as pl
import sqlalchemy as sa

from cdp_activation.db import as_utc, read_frame
from cdp_activation.ledger.base import LedgerBase, aware, db_time, of_step, utc_now
from cdp_activation.ledger.records import PlannedSend
from cdp_activation.ledger.schema import send_events, sends
from cdp_activation.vocabulary import (
    CANCELLED,
    DEAD_LETTER,
    FAILED,
    IN_FLIGHT,
    PLANNED,
    SENT,
    UNKNOWN,
)


class Reads(LedgerBase):
    """What the ledger holds, read back."""

    def ping(self) -> None:
        """Raise unless the ledger answers a read of its `sends` table (readiness)."""
        with self.engine.connect() as con:
            con.exec_driver_sql("SELECT 1 FROM sends LIMIT 1").all()

    def due_counts(
        self, activation: str, partition_key: str, step: str, until: datetime
    ) -> dict[str, int]:
        """Planned rows of a step due by `until`, per connector."""
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(sends.c.connector, sa.func.count())
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.state == PLANNED,
                    sends.c.step == step,
                    sa.or_(sends.c.not_before.is_(None), sends.c.not_before <= until),
                )
                .group_by(sends.c.connector)
            ).all()
        return {connector: count for connector, count in rows}

    def next_due(
        self, activation: str, partition_key: str, step: str, connector: str, until: datetime
    ) -> datetime | None:
        """When the next planned row of this connector falls due, if by `until` (None: none
        does); a row with no `not_before` is due now. One probe of `ix_sends_due`."""
        nulls_first = " NULLS FIRST" if self.dialect == "postgresql" else ""
        mark = self._mark
        with self.engine.connect() as con:
            row = con.exec_driver_sql(
                f"SELECT 1, not_before FROM sends WHERE activation = {mark} "
                f"AND partition_key = {mark} AND state = '{PLANNED}' AND step = {mark} "
                f"AND connector = {mark} AND (not_before IS NULL OR not_before <= {mark}) "
                f"ORDER BY not_before{nulls_first} LIMIT 1",
                (activation, partition_key, step, connector, db_time(until, self.dialect)),
            ).first()
        if row is None:
            return None
        if row[1] is None:
            return utc_now()
        when = row[1]
        if isinstance(when, str):  # SQLite's text
            when = datetime.fromisoformat(when)
        return aware(when)

    def dead_letters_by_reason(self, activation: str, partition_key: str) -> dict[str, int]:
        """The partition's dead letters by reason (`error_code`: `send_deadline_passed`, or an
        earlier version's last error for retries it gave up)."""
        return self._by_reason(activation, partition_key, DEAD_LETTER, "retries_exhausted")

    def cancelled_by_reason(self, activation: str, partition_key: str) -> dict[str, int]:
        """The partition's cancelled sends by reason code (`error_code`: the policy's when a
        later decision dropped them, `whatsapp_outside_window`, `<channel>_opted_out`,
        `fallback_not_due`, `left_audience`; `unrecorded` for an earlier version's)."""
        return self._by_reason(activation, partition_key, CANCELLED, "unrecorded")

    def _by_reason(
        self, activation: str, partition_key: str, state: str, unrecorded: str
    ) -> dict[str, int]:
        reason = sa.func.coalesce(sends.c.error_code, unrecorded)
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(reason, sa.func.count())
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.state == state,
                )
                .group_by(reason)
            ).all()
        return {code: count for code, count in rows}

    def history(self, idempotency_keys: Sequence[str] | None = None) -> pl.DataFrame:
        """Every state change (send_events joined to the send's key), oldest first."""
        query = (
            sa.select(
                sends.c.idempotency_key,
                send_events.c.from_state,
                send_events.c.to_state,
                send_events.c.attempts,
                send_events.c.error_code,
                send_events.c.run_id,
                send_events.c.at,
            )
            .join(sends, sends.c.id == send_events.c.send_id)
            .order_by(send_events.c.id)
        )
        if idempotency_keys is not None:
            query = query.where(sends.c.idempotency_key.in_(list(idempotency_keys)))
        with self.engine.connect() as con:
            rows = con.execute(query).all()
        schema: dict[str, pl.DataType] = {
            "idempotency_key": pl.String(),
            "from_state": pl.String(),
            "to_state": pl.String(),
            "attempts": pl.Int64(),
            "error_code": pl.String(),
            "run_id": pl.String(),
            "at": pl.Datetime("us", "UTC"),
        }
        return pl.DataFrame([(*r[:6], aware(r[6])) for r in rows], schema=schema, orient="row")

    def pending(
        self,
        activation: str,
        partition_key: str,
        now: datetime | None = None,
        step: str | None = None,
    ) -> list[PlannedSend]:
        """Planned rows due by `now` (default: now): deferred ones wait for their not_before.
        `step` keeps one step's rows (a run sends `initial`, the fallback `fallback`)."""
        now = now or utc_now()
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(
                    sends.c.id,
                    sends.c.idempotency_key,
                    sends.c.channel,
                    sends.c.connector,
                    sends.c.recipient,
                    sends.c.message,
                    sends.c.attempts,
                    sends.c.customer_id,
                    sends.c.request_id,
                    sends.c.purpose,
                )
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.state == PLANNED,
                    sa.or_(sends.c.not_before.is_(None), sends.c.not_before <= now),
                    *of_step(step),
                )
                .order_by(sends.c.id)
            ).all()
        return [
            PlannedSend(
                r.id,
                r.idempotency_key,
                r.channel,
                r.connector,
                r.recipient,
                json.loads(r.message),
                r.attempts,
                r.customer_id,
                r.request_id,
                r.purpose,
            )
            for r in rows
        ]

    def deferred(
        self,
        activation: str,
        partition_key: str,
        now: datetime | None = None,
        step: str | None = None,
    ) -> int:
        """Planned rows (of `step`, if given) waiting for their not_before (quiet hours)."""
        now = now or utc_now()
        with self.engine.connect() as con:
            return con.execute(
                sa.select(sa.func.count()).where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.state == PLANNED,
                    sends.c.not_before > now,
                    *of_step(step),
                )
            ).scalar_one()

    def progress(
        self, activation: str, partition_key: str, now: datetime | None = None
    ) -> tuple[int, int]:
        """(done, left) of one partition: rows with an outcome (sent, failed, unknown,
        dead-lettered), and rows due to go (planned and due, or in flight). For a progress bar;
        deferred rows are in neither."""
        now = now or utc_now()
        done = sends.c.state.in_([SENT, FAILED, UNKNOWN, DEAD_LETTER])
        due = sa.or_(
            sends.c.state == IN_FLIGHT,
            sa.and_(
                sends.c.state == PLANNED,
                sa.or_(sends.c.not_before.is_(None), sends.c.not_before <= now),
            ),
        )
        with self.engine.connect() as con:
            row = con.execute(
                sa.select(sa.func.count().filter(done), sa.func.count().filter(due)).where(
                    sends.c.activation == activation, sends.c.partition_key == partition_key
                )
            ).one()
        return int(row[0]), int(row[1])

    def delivery_status_counts(
        self, activation: str, partition_key: str, step: str | None = None
    ) -> dict[str, int]:
        """Accepted sends of one partition (of `step`, if given) by their latest delivery
        report ("sent" when the provider has not reported beyond accepting it)."""
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(sa.func.coalesce(sends.c.delivery_status, "sent"), sa.func.count())
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.state == SENT,
                    *of_step(step),
                )
                .group_by(sa.func.coalesce(sends.c.delivery_status, "sent"))
            ).all()
        return {status: count for status, count in rows}

    def delivery_statuses(self, activation: str, partition_key: str) -> pl.DataFrame:
        """(idempotency_key, recipient, state, provider_message_id, delivery_status,
        delivery_error_code) of one partition's rows, in the order they were planned."""
        return read_frame(
            self.engine,
            "SELECT idempotency_key, recipient, state, provider_message_id, delivery_status, "
            "delivery_error_code FROM sends WHERE activation = $1 AND partition_key = $2 "
            "ORDER BY id",
            (activation, partition_key),
            schema={
                "idempotency_key": pl.String,
                "recipient": pl.String,
                "state": pl.String,
                "provider_message_id": pl.String,
                "delivery_status": pl.String,
                "delivery_error_code": pl.String,
            },
        )

    def counts(self, activation: str, partition_key: str) -> dict[str, int]:
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(sends.c.state, sa.func.count())
                .where(sends.c.activation == activation, sends.c.partition_key == partition_key)
                .group_by(sends.c.state)
            ).all()
        return {state: count for state, count in rows}

    def sends_since(
        self,
        since: datetime,
        exclude: tuple[str, str] | None = None,
        committed: bool = False,
    ) -> pl.DataFrame:
        """Accepted messages since `since`, one row each (customer_id, channel, purpose,
        sent_at); `exclude` = (activation, partition) being re-run. With `committed` (the
        frequency caps), also the messages on their way: planned (at their `not_before`, or
        when last changed), in flight, and `unknown` (they may have gone), so two activations
        deciding hours apart do not both message a customer the first has not reached yet."""
        query = sa.select(
            sends.c.customer_id, sends.c.channel, sends.c.purpose, sends.c.sent_at
        ).where(sends.c.state == SENT, sends.c.sent_at >= since)
        if committed:
            at = sa.func.coalesce(sends.c.not_before, sends.c.updated_at)
            on_their_way = sa.select(
                sends.c.customer_id, sends.c.channel, sends.c.purpose, at.label("sent_at")
            ).where(sends.c.state.in_([PLANNED, IN_FLIGHT, UNKNOWN]), at >= since)
        if exclude is not None:
            other = sa.not_(
                sa.and_(sends.c.activation == exclude[0], sends.c.partition_key == exclude[1])
            )
            query = query.where(other)
            if committed:
                # Of two activations that both planned the customer (deciding at the same
                # time, neither saw the other), the one planned first keeps its message: the
                # later one's planned row does not count against it, so at their re-runs one
                # of them is capped, not both.
                own = sends.alias("own")
                ours_first = (
                    sa.select(own.c.id)
                    .where(
                        own.c.customer_id == sends.c.customer_id,
                        own.c.activation == exclude[0],
                        own.c.partition_key == exclude[1],
                        own.c.planned_at <= sends.c.planned_at,
                    )
                    .exists()
                )
                on_their_way = on_their_way.where(
                    other, sa.not_(sa.and_(sends.c.state == PLANNED, ours_first))
                )
        if committed:
            query = sa.union_all(query, on_their_way)  # type: ignore[assignment]
        schema = pl.Schema(
            {
                "customer_id": pl.String(),
                "channel": pl.String(),
                "purpose": pl.String(),
                "sent_at": pl.Datetime("us", "UTC"),
            }
        )
        with self.engine.connect() as con:
            frame = pl.read_database(query, con)
        if frame.is_empty():
            return pl.DataFrame(schema=schema)
        return frame.with_columns(as_utc(frame, "sent_at")).cast(schema)

    def recent_sends(
        self, as_of: datetime, days: int = 30, exclude: tuple[str, str] | None = None
    ) -> pl.DataFrame:
        """Per customer, channel and purpose: messages accepted in the last 1, 7 and `days` days.

        Audience SQL may join this as `ledger_recent_sends` (the framework makes it available
        to the warehouse), so frequency caps can also be applied where the audience is built.
        """
        sent = self.sends_since(as_of - timedelta(days=days), exclude=exclude).filter(
            pl.col("sent_at") <= as_of
        )
        return (
            sent.group_by("customer_id", "channel", "purpose")
            .agg(
                (pl.col("sent_at") > as_of - timedelta(days=1)).sum().alias("sends_24h"),
                (pl.col("sent_at") > as_of - timedelta(days=7)).sum().alias("sends_7d"),
                pl.len().alias(f"sends_{days}d"),
                pl.col("sent_at").max().alias("last_sent_at"),
            )
            .cast({"sends_24h": pl.Int64, "sends_7d": pl.Int64, f"sends_{days}d": pl.Int64})
        )

    def rows(self, activation: str, partition_key: str | None = None) -> pl.DataFrame:
        """The ledger rows of an activation (for tests, previews and exports)."""
        query = sa.select(sends).where(sends.c.activation == activation)
        if partition_key is not None:
            query = query.where(sends.c.partition_key == partition_key)
        with self.engine.connect() as con:
            result = con.execute(query.order_by(sends.c.id))
            data = [dict(r._mapping) for r in result]
        if not data:
            return pl.DataFrame(schema=[c.name for c in sends.columns])
        # Infer each column's type from every row, not the first 100: after a crash the first
        # hundred rows can all be `unknown`, with no provider id, and a later `sent` row's id
        # would not fit the Null column inferred from them.
        return pl.DataFrame(data, infer_schema_length=None)
