"""The fallback's queries: which first messages call for a fallback, which partitions still
have work."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import polars as pl
import sqlalchemy as sa

from cdp_activation.ledger.base import LedgerBase, aware, of_step, utc_now
from cdp_activation.ledger.records import (
    PRIMARY_NOT_DELIVERED,
    PRIMARY_NOT_READ,
    PRIMARY_UNREACHABLE,
    PRIMARY_WINDOW_CLOSED,
)
from cdp_activation.ledger.schema import inbound_events, sends
from cdp_activation.vocabulary import (
    CANCELLED,
    DEAD_LETTER,
    FAILED,
    FALLBACK_NOT_DUE,
    FALLBACK_STEP,
    HOLDOUT,
    IN_FLIGHT,
    INITIAL_STEP,
    PLANNED,
    SENT,
    WINDOW_CLOSED_CODE,
)


class FallbackQueries(LedgerBase):
    """Queries the fallback and the caps ask."""

    def due_partitions(
        self, activation: str, now: datetime | None = None, step: str | None = None
    ) -> dict[str, datetime]:
        """Partitions with planned rows (of `step`, if given) now due: deferred ones whose
        time has come, retries backed off, and rows a stopped or failed run left waiting; with
        the latest of their `not_before` (or last change), which moves whenever a run touched
        them, so a sensor keyed on it asks again after each attempt."""
        now = now or utc_now()
        latest = sa.func.max(sa.func.coalesce(sends.c.not_before, sends.c.updated_at))
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(sends.c.partition_key, latest)
                .where(
                    sends.c.activation == activation,
                    sends.c.state == PLANNED,
                    sa.or_(sends.c.not_before.is_(None), sends.c.not_before <= now),
                    *of_step(step),
                )
                .group_by(sends.c.partition_key)
            ).all()
        return {partition: aware(when) for partition, when in rows}

    def partitions_to_recover(self, activation: str) -> set[str]:
        """Partitions with rows left in flight by workers that are gone (killed, stopped, or
        silent past their lease): a run of the partition recovers them. Reads only."""
        with self.engine.connect() as con:
            held = con.execute(
                sa.select(sends.c.partition_key, sends.c.claimed_by)
                .distinct()
                .where(sends.c.activation == activation, sends.c.state == IN_FLIGHT)
            ).all()
            if not held:
                return set()
            gone = self._gone_workers(con, (w for _, w in held))
        return {partition for partition, worker_id in held if worker_id in gone}

    def partitions_with_pending(
        self, activation: str, step: str, now: datetime | None = None
    ) -> set[str]:
        """Partitions holding planned rows of `step` that are due (deferred ones whose time has
        come, or ones a failed or killed run planned and never sent)."""
        now = now or utc_now()
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(sends.c.partition_key)
                .distinct()
                .where(
                    sends.c.activation == activation,
                    sends.c.step == step,
                    sends.c.state == PLANNED,
                    sa.or_(sends.c.not_before.is_(None), sends.c.not_before <= now),
                )
            ).scalars()
            return set(rows)

    def due_fallbacks(
        self,
        activation: str,
        fallback_channel: str,
        *,
        not_delivered_by: datetime,
        not_read_by: datetime | None = None,
        unreachable_codes: Mapping[str, Iterable[str]] | None = None,
        partition_key: str | None = None,
        undecided_only: bool = False,
        changed_since: datetime | None = None,
    ) -> pl.DataFrame:
        """First messages (step `initial`, on a channel other than `fallback_channel`) whose
        fallback is due, with no fallback decided yet (none, or one still `planned`, which a
        run decides again; `undecided_only`: none at all, what the sensor looks for, so a
        fallback deferred by quiet hours does not launch a run every minute). `changed_since`
        keeps first messages whose row changed since then (the sensor's horizon).

        Due, with `fallback_reason`:
        - `primary_unreachable`: failed, at send time or in a status report, with one of its
          connector's `unreachable_codes`; at once;
        - `primary_not_delivered`: sent, failed or dead-lettered, not delivered nor read, and
          sent (or given up) at or before `not_delivered_by`;
        - `primary_not_read`: delivered, not read, sent at or before `not_read_by` (if given);
        - `primary_window_closed`: a WhatsApp message cancelled, never sent, because its
          customer's 24-hour window had closed (`whatsapp_outside_window`: at its claim, or
          by a later run's decision); at once. Not one cancelled with a request its provider
          may hold (`request_id`): that request may have reached the customer.
        `unknown` sends never fall back: the provider may have delivered them, nor any other
        cancelled send (the customer said stop, or was erased). Columns:
        partition_key, fallback_of (the first message's id), customer_id, channel, connector,
        fallback_reason, error_code (the failure's code, if any), variant (the first
        message's experiment variant, if any: its fallback counts in the same arm).
        """
        first = sends.alias("first")
        fallback = sends.alias("fallback")
        status = sa.func.coalesce(first.c.delivery_status, SENT)
        failure_code = sa.case(
            (first.c.state == SENT, first.c.delivery_error_code), else_=first.c.error_code
        )
        failed = sa.or_(
            first.c.state.in_([FAILED, DEAD_LETTER]),
            sa.and_(first.c.state == SENT, status == "failed"),
        )
        by_connector = [
            sa.and_(first.c.connector == connector, failure_code.in_(sorted(codes)))
            for connector, codes in (unreachable_codes or {}).items()
            if codes
        ]
        unreachable = sa.and_(failed, sa.or_(*by_connector)) if by_connector else sa.false()
        window_closed = sa.and_(
            first.c.channel == "whatsapp",
            first.c.state == CANCELLED,
            first.c.error_code == WINDOW_CLOSED_CODE,
            first.c.request_id.is_(None),
        )
        # A message its customer answered reached them: it is neither undelivered nor unread.
        answered = answered_since_sent(first)
        not_delivered = sa.and_(
            first.c.state.in_([SENT, FAILED, DEAD_LETTER]),
            status.not_in(["delivered", "read"]),
            sa.func.coalesce(first.c.sent_at, first.c.updated_at) <= not_delivered_by,
            ~answered,
        )
        not_read = (
            sa.and_(
                first.c.state == SENT,
                status == "delivered",
                first.c.sent_at <= not_read_by,
                ~answered,
            )
            if not_read_by is not None
            else sa.false()
        )
        decided = sa.select(fallback.c.id).where(fallback.c.fallback_of == first.c.id)
        if not undecided_only:
            decided = decided.where(fallback.c.state != PLANNED)
        where = [
            first.c.activation == activation,
            first.c.step == INITIAL_STEP,
            first.c.channel != fallback_channel,
            sa.or_(unreachable, window_closed, not_delivered, not_read),
            ~decided.exists(),
        ]
        if partition_key is not None:
            where.append(first.c.partition_key == partition_key)
        if changed_since is not None:
            where.append(first.c.updated_at >= changed_since)
        query = sa.select(
            first.c.partition_key,
            first.c.id.label("fallback_of"),
            first.c.customer_id,
            first.c.channel,
            first.c.connector,
            sa.case(
                (unreachable, PRIMARY_UNREACHABLE),
                (window_closed, PRIMARY_WINDOW_CLOSED),
                (not_delivered, PRIMARY_NOT_DELIVERED),
                else_=PRIMARY_NOT_READ,
            ).label("fallback_reason"),
            sa.case((failed, failure_code), (window_closed, first.c.error_code), else_=None).label(
                "error_code"
            ),
            first.c.variant,
        ).where(*where)
        schema = {
            "partition_key": pl.String,
            "fallback_of": pl.Int64,
            "customer_id": pl.String,
            "channel": pl.String,
            "connector": pl.String,
            "fallback_reason": pl.String,
            "error_code": pl.String,
            "variant": pl.String,
        }
        with self.engine.connect() as con:
            rows = con.execute(query.order_by(first.c.id)).all()
        return pl.DataFrame([tuple(r) for r in rows], schema=schema, orient="row")

    def cancel_landed_fallbacks(self, activation: str, partition_key: str) -> int:
        """Planned fallbacks of the partition whose first message has since landed end
        `cancelled` (`_landed_fallbacks`): the customer got it. The delivery report or reply
        that proves it cancels them as it is recorded; this catches any left."""
        with self.engine.begin() as con:
            if con.dialect.name == "postgresql":
                # A receiver writing a report about one of their first messages may not have
                # seen a fallback planned just now, nor this statement its report: wait for
                # it (its lock on the first message), so the update below, on a new snapshot,
                # sees its commit. SQLite's single writer orders the two anyway.
                first, planned = sends.alias("first"), sends.alias("planned")
                con.execute(
                    sa.select(first.c.id)
                    .join(planned, planned.c.fallback_of == first.c.id)
                    .where(
                        planned.c.activation == activation,
                        planned.c.partition_key == partition_key,
                        planned.c.step == FALLBACK_STEP,
                        planned.c.state == PLANNED,
                    )
                    .order_by(first.c.id)
                    .with_for_update(of=first)
                ).all()
            result = con.execute(
                sa.update(sends)
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    _landed_fallbacks(),
                )
                .values(
                    state=CANCELLED,
                    error_code=FALLBACK_NOT_DUE,
                    error_message=FIRST_LANDED,
                    updated_at=utc_now(),
                )
            )
        return result.rowcount or 0

    def first_message_outcomes(
        self, activation: str, partition_key: str, fallback_channel: str
    ) -> dict[str, int]:
        """First messages (step `initial`) on the channels that fall back, by what became of
        them: the latest delivery status of an accepted one (`sent` if none beyond it), else
        its state (`failed`, `unknown`, `planned`, …)."""
        outcome = sa.case(
            (sends.c.state == SENT, sa.func.coalesce(sends.c.delivery_status, SENT)),
            else_=sends.c.state,
        )
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(outcome, sa.func.count())
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.step == INITIAL_STEP,
                    sends.c.channel != fallback_channel,
                    sends.c.state != HOLDOUT,
                )
                .group_by(outcome)
            ).all()
        return {status: count for status, count in rows}


FIRST_LANDED = "the first message was delivered before the fallback went out"


def _landed_fallbacks() -> sa.ColumnElement[bool]:
    """Planned fallbacks whose first message has landed: delivered, or read for a fallback
    due because it was not read; or its customer answered it on its channel since it was
    sent. One kept in a request its provider may hold (`request_id`: sent again whole, on one
    key) stays: taken out, the request would carry another key and reach the rest twice."""
    first = sends.alias("first")
    landed = (
        sa.select(first.c.id)
        .where(
            first.c.id == sends.c.fallback_of,
            sa.or_(
                first.c.delivery_status == "read",
                sa.and_(
                    first.c.delivery_status == "delivered",
                    sa.func.coalesce(sends.c.fallback_reason, "") != PRIMARY_NOT_READ,
                ),
                answered_since_sent(first),
            ),
        )
        .exists()
    )
    return sa.and_(
        sends.c.step == FALLBACK_STEP,
        sends.c.state == PLANNED,
        sends.c.request_id.is_(None),
        landed,
    )


# Inbound events that are no answer from the customer to a message (LINE's follows, Meta's
# system notices): they prove nothing about the first message.
NOT_ANSWERS = ("follow", "unfollow", "system")


def answered_since_sent(first: sa.FromClause) -> sa.ColumnElement[bool]:
    """Whether the customer of the send `first` wrote to us on its channel since it was sent
    (a reply, a button tap, a STOP): the message reached them, though its delivery report is
    lost, late or not sent (read receipts off). A send never accepted (no `sent_at`) is never
    answered, and one reported failed is not proved landed by an answer (the customer may be
    writing about another message; Meta withholds some marketing from active users)."""
    wrote = (
        sa.select(inbound_events.c.id)
        .where(
            inbound_events.c.customer_id == first.c.customer_id,
            inbound_events.c.channel == first.c.channel,
            inbound_events.c.occurred_at >= first.c.sent_at,
            inbound_events.c.kind.not_in(NOT_ANSWERS),
        )
        .exists()
    )
    return sa.and_(sa.func.coalesce(first.c.delivery_status, "") != "failed", wrote)


def cancel_fallbacks_of(con: sa.Connection, first_ids: sa.Select[Any]) -> int:
    """Within the caller's transaction: the planned fallbacks of the first messages
    `first_ids` selects that have landed (`_landed_fallbacks`) end `cancelled`. The receiver
    calls it for the messages a delivery report or a reply just named, so a fallback not yet
    claimed never goes out to a customer who got the first message."""
    # Their fallbacks first, by ix_sends_fallback_of (none, mostly: a report costs an index
    # probe or two); asked in one statement with the state, SQLite walked every planned row.
    fallbacks = con.execute(sa.select(sends.c.id).where(sends.c.fallback_of.in_(first_ids)))
    ids = fallbacks.scalars().all()
    if not ids:
        return 0
    result = con.execute(
        sa.update(sends)
        .where(sends.c.id.in_(ids), _landed_fallbacks())
        .values(
            state=CANCELLED,
            error_code=FALLBACK_NOT_DUE,
            error_message=FIRST_LANDED,
            updated_at=utc_now(),
        )
    )
    return max(result.rowcount or 0, 0)
