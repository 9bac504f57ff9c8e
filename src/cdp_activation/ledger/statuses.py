"""Status intake: provider reports stored once each, moving sends' delivery status forward
and reconciling `unknown` sends a report proves accepted."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from cdp_activation.contracts import STATUS_RANK, Pricing, StatusEvent, send_id_of
from cdp_activation.ledger.base import LedgerBase, as_time, aware, chunks, db_time, utc_now
from cdp_activation.ledger.fallback import cancel_fallbacks_of
from cdp_activation.ledger.records import OLDER_THAN_SEND, STATUS_CLOCK_SKEW, StatusWrite
from cdp_activation.ledger.schema import send_events, sends, status_events
from cdp_activation.plugins import connector_of
from cdp_activation.vocabulary import (
    SENT,
    UNKNOWN,
)

log = logging.getLogger(__name__)


class StatusIntake(LedgerBase):
    """Provider status reports into the ledger."""

    def record_statuses(self, events: Sequence[StatusEvent]) -> StatusWrite:
        """Store provider status reports and move each message's `delivery_status` forward,
        in one transaction (the webhook receiver answers 200 only after it commits).

        A report already stored (same `event_key`) is ignored; a report whose status does not
        outrank the message's current one changes nothing, so duplicates and reordering are
        harmless. Messages are matched on `provider_message_id` among the rows of the
        provider's own connector (`statuses.connector_of`). A report can arrive before the
        send's own answer is recorded (Meta's `sent` often does): it is kept unapplied and
        applied by `apply_pending_statuses` (the end of every run) once the send is known.
        """
        if not events:
            return StatusWrite(received=0, duplicates=0, advanced=0)
        now = db_time(utc_now(), self.dialect)
        unique = list({e.event_key: e for e in events}.values())
        with self.engine.begin() as con:
            known = self._known_event_keys(con, [e.event_key for e in unique])
            fresh = [e for e in unique if e.event_key not in known]
            reconciled = self._reconcile(con, fresh) if fresh else 0
            # Matched before they are stored, so each is written once with its flags (applied,
            # ignored) instead of written, then updated (and moved in the pending index).
            matched, stale = self._match(con, fresh)
            applied = {r.event_key for r in matched}
            ignored = set(stale)
            if fresh:
                con.exec_driver_sql(
                    "INSERT INTO status_events (event_key, provider, provider_message_id, "
                    "status, error_code, occurred_at, received_at, payload, source, "
                    "customer_id, reference, billable, pricing_category, pricing_model, "
                    "price, price_currency, applied, ignored) VALUES "
                    f"({self._marks(18)}) ON CONFLICT (event_key) DO NOTHING",
                    [
                        (
                            e.event_key,
                            e.provider,
                            e.provider_message_id,
                            e.status,
                            e.error_code,
                            db_time(e.occurred_at, self.dialect),
                            now,
                            e.payload,
                            e.source,
                            e.customer_id,
                            e.reference,
                            *_pricing_values(e.pricing),
                            e.event_key in applied,
                            OLDER_THAN_SEND if e.event_key in ignored else None,
                        )
                        for e in fresh
                    ],
                )
            advanced = self._advance(con, matched)
        if stale:
            log.warning(
                "ignored %d status report(s) dated before their send was planned (a replay, "
                "or a report of another ledger's message); kept in status_events, flagged "
                "ignored = '%s'",
                len(stale),
                OLDER_THAN_SEND,
            )
        return StatusWrite(
            received=len(events),
            duplicates=len(events) - len(fresh),
            advanced=advanced,
            reconciled=reconciled,
            stale=len(stale),
        )

    def apply_pending_statuses(self) -> int:
        """Apply stored reports that arrived before their send was recorded (see
        `record_statuses`); returns how many statuses moved. Delivery calls it at the end of
        every run, so a report that came early is applied as soon as its send is known."""
        mark = self._mark
        false = "0" if self.dialect == "sqlite" else "false"
        since = db_time(utc_now() - timedelta(days=1), self.dialect)
        with self.engine.begin() as con:
            pending = con.exec_driver_sql(
                "SELECT event_key, provider, provider_message_id, status, error_code, "
                "occurred_at, customer_id, reference, billable, pricing_category, "
                f"pricing_model, price, price_currency FROM status_events "
                f"WHERE applied = {false} AND ignored IS NULL AND received_at >= {mark}",
                (since,),
            ).all()
            self._reconcile(con, pending)
            return self._apply_statuses(con, pending)[0]

    def _reconcile(self, con: sa.Connection, reports: Sequence[Any]) -> int:
        """`unknown` sends (their answer was lost) that a report names by our reference: the
        provider has them, so they become `sent` with the provider's id, and the report then
        moves their delivery status like any other. Only rows of the report's own connector,
        still without a provider id, change."""
        mark = self._mark
        now = db_time(utc_now(), self.dialect)
        params = []
        for report in reports:
            send_id = send_id_of(getattr(report, "reference", None))
            if send_id is None or not report.provider_message_id:
                continue
            latest_plan = db_time(as_time(report.occurred_at) + STATUS_CLOCK_SKEW, self.dialect)
            params.append(
                (
                    report.provider_message_id,
                    now,
                    now,
                    send_id,
                    connector_of(report.provider),
                    latest_plan,
                )
            )
        if not params:
            return 0
        # A report dated before the send was planned names another message (a reference of
        # another ledger, whose ids restarted): it proves nothing here.
        result = con.exec_driver_sql(
            f"UPDATE sends SET state = '{SENT}', provider_message_id = {mark}, "
            f"sent_at = {mark}, updated_at = {mark}, error_message = 'reconciled: the "
            "provider reported it after its answer was lost' "
            f"WHERE id = {mark} AND connector = {mark} AND state = '{UNKNOWN}' "
            f"AND provider_message_id IS NULL AND planned_at <= {mark}",
            params,
        )
        return max(result.rowcount or 0, 0)

    def reconciled_count(self, activation: str, partition_key: str) -> int:
        """Sends of the partition that were `unknown` and were proved accepted by a report."""
        with self.engine.connect() as con:
            return con.execute(
                sa.select(sa.func.count())
                .select_from(send_events.join(sends, sends.c.id == send_events.c.send_id))
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    send_events.c.from_state == UNKNOWN,
                    send_events.c.to_state == SENT,
                )
            ).scalar_one()

    def _apply_statuses(self, con: sa.Connection, pending: Sequence[Any]) -> tuple[int, int]:
        """Apply stored, unapplied reports (rows read back: anything with a `StatusEvent`'s
        fields) and flag them: applied, those whose send exists; `ignored`, those dated before
        it (`_match`). Returns (statuses moved, reports flagged)."""
        matched, stale = self._match(con, pending)
        for chunk in chunks(stale, 5000):
            con.exec_driver_sql(
                f"UPDATE status_events SET ignored = '{OLDER_THAN_SEND}' WHERE event_key IN "
                f"({self._marks(len(chunk))})",
                tuple(chunk),
            )
        advanced = self._advance(con, matched)
        true = "1" if self.dialect == "sqlite" else "true"
        for chunk in chunks([r.event_key for r in matched], 5000):
            con.exec_driver_sql(
                f"UPDATE status_events SET applied = {true} WHERE event_key IN "
                f"({self._marks(len(chunk))})",
                tuple(chunk),
            )
        return advanced, len(stale)

    def _match(self, con: sa.Connection, pending: Sequence[Any]) -> tuple[list[Any], list[str]]:
        """`pending` reports whose send exists (to apply), and the event keys of those dated
        before their send was planned (beyond `STATUS_CLOCK_SKEW`: a replay or another
        message's, flagged `ignored` and never applied). A report for a message the ledger
        never sent (another tool's, on the same sender) is neither: it stays unapplied, is
        looked at again at the end of each run for a day, and is given up after that."""
        # The sends that exist now; a send committed after this read is matched next time (a
        # report is only marked applied together with the update it made).
        ids = sorted({r.provider_message_id for r in pending if r.provider_message_id})
        planned_at: dict[tuple[str, str], datetime] = {}
        for chunk in chunks(ids, 5000):
            rows = con.exec_driver_sql(  # driver SQL: Core's IN cost more than the query
                "SELECT provider_message_id, connector, planned_at FROM sends "
                f"WHERE provider_message_id IN ({self._marks(len(chunk))})",
                tuple(chunk),
            )
            planned_at.update({(r[0], r[1]): as_time(r[2]) for r in rows})
        matched, stale = [], []
        for report in pending:
            planned = planned_at.get((report.provider_message_id, connector_of(report.provider)))
            if planned is None:
                continue
            if as_time(report.occurred_at) + STATUS_CLOCK_SKEW < planned:
                stale.append(report.event_key)
            else:
                matched.append(report)
        return matched, stale

    def _advance(self, con: sa.Connection, matched: Sequence[Any]) -> int:
        """Move the sends `matched` reports name forward (lowest rank first: a report never
        moves a status back), and record what they say each message cost. Returns the
        statuses moved."""
        if not matched:
            return 0
        mark = self._mark
        rank = " ".join(f"WHEN '{status}' THEN {n}" for status, n in STATUS_RANK.items())
        changed = db_time(utc_now(), self.dialect)  # the send log exports rows changed since
        result = con.exec_driver_sql(
            f"UPDATE sends SET delivery_status = {mark}, delivery_status_at = {mark}, "
            f"delivery_error_code = {mark}, updated_at = {mark} "
            f"WHERE provider_message_id = {mark} AND connector = {mark} "
            f"AND customer_id = COALESCE({mark}, customer_id) "
            f"AND (CASE delivery_status {rank} ELSE 0 END) < {mark}",
            [
                (
                    r.status,
                    db_time(r.occurred_at, self.dialect)
                    if isinstance(r.occurred_at, datetime)
                    else r.occurred_at,  # read back from SQLite: already its text
                    r.error_code,
                    changed,
                    r.provider_message_id,
                    connector_of(r.provider),
                    r.customer_id,
                    STATUS_RANK[r.status],
                )
                for r in sorted(matched, key=lambda r: STATUS_RANK[r.status])
            ],
        )
        # A fallback planned for a message now delivered or read must not go out (one already
        # claimed is on its way: nothing stops that).
        landed = sorted(
            {r.provider_message_id for r in matched if r.status in ("delivered", "read")}
        )
        for chunk in chunks(landed, 5000):
            cancel_fallbacks_of(
                con, sa.select(sends.c.id).where(sends.c.provider_message_id.in_(chunk))
            )
        # What the message cost, whatever the report's rank: Meta says it on `sent`, which
        # may arrive after `delivered`. A later report's word replaces an earlier one's.
        priced = [(r, _pricing_of(r)) for r in matched]
        priced = [(r, p) for r, p in priced if p is not None]
        if priced:
            con.exec_driver_sql(
                _set_pricing(mark) + f" AND customer_id = COALESCE({mark}, customer_id)",
                [
                    (
                        *_pricing_values(p),
                        changed,
                        r.provider_message_id,
                        connector_of(r.provider),
                        r.customer_id,
                    )
                    for r, p in priced
                ],
            )
        return max(result.rowcount or 0, 0)

    def unpriced_sends(self, connector: str, sent_before: datetime, limit: int) -> list[str]:
        """Provider ids of accepted sends through `connector`, sent before `sent_before`,
        with no word on their cost yet: newest first, at most `limit`."""
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(sends.c.provider_message_id)
                .where(
                    sends.c.connector == connector,
                    sends.c.state == SENT,
                    sends.c.provider_message_id.is_not(None),
                    sends.c.price.is_(None),
                    sends.c.billable.is_(None),
                    sends.c.sent_at < sent_before,
                )
                .order_by(sends.c.sent_at.desc())
                .limit(limit)
            ).all()
        return [r[0] for r in rows]

    def record_prices(self, connector: str, prices: Mapping[str, Pricing]) -> int:
        """A provider's word on what its messages cost (`Pricing` by provider message id),
        read from the provider (Twilio's Message resource); returns the sends it priced."""
        if not prices:
            return 0
        mark = self._mark
        changed = db_time(utc_now(), self.dialect)
        with self.engine.begin() as con:
            result = con.exec_driver_sql(
                _set_pricing(mark),
                [
                    (*_pricing_values(pricing), changed, message_id, connector)
                    for message_id, pricing in sorted(prices.items())
                ],
            )
        return max(result.rowcount or 0, 0)

    def _known_event_keys(self, con: sa.Connection, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in chunks(keys, 5000):
            rows = con.exec_driver_sql(
                "SELECT event_key FROM status_events "
                f"WHERE event_key IN ({self._marks(len(chunk))})",
                tuple(chunk),
            )
            found.update(r[0] for r in rows)
        return found

    def newest_status_time(self, source: str) -> datetime | None:
        """The provider time of the newest event stored from a status source (its cursor)."""
        with self.engine.connect() as con:
            value = con.execute(
                sa.select(sa.func.max(status_events.c.occurred_at)).where(
                    status_events.c.source == source
                )
            ).scalar_one()
        return aware(value) if value is not None else None


def _set_pricing(mark: str) -> str:
    """The UPDATE giving a send a provider's word on its cost (the five pricing columns, a
    null keeping what was there) and `updated_at`, by provider message id and connector."""
    columns = ("billable", "pricing_category", "pricing_model", "price", "price_currency")
    values = ", ".join(f"{c} = COALESCE({mark}, {c})" for c in columns)
    return (
        f"UPDATE sends SET {values}, updated_at = {mark} "
        f"WHERE provider_message_id = {mark} AND connector = {mark}"
    )


def _pricing_values(pricing: Pricing | None) -> tuple[Any, ...]:
    """A `Pricing` as the five columns the ledger keeps it in (all null: none)."""
    if pricing is None:
        return (None, None, None, None, None)
    return (pricing.billable, pricing.category, pricing.model, pricing.price, pricing.currency)


def _pricing_of(report: Any) -> Pricing | None:
    """A report's pricing: a `StatusEvent`'s own, or a stored row's columns read back."""
    if isinstance(report, StatusEvent):
        return report.pricing
    billable = getattr(report, "billable", None)
    found = Pricing(
        billable=None if billable is None else bool(billable),
        category=getattr(report, "pricing_category", None),
        model=getattr(report, "pricing_model", None),
        price=getattr(report, "price", None),
        currency=getattr(report, "price_currency", None),
    )
    return None if found == Pricing() else found
