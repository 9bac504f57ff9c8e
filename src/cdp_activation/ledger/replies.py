"""Replies: what customers sent us, and the opt-outs it (or a provider's refusal) made.

An inbound message is stored once (by the provider's message id) and matched to a customer
through the number (or LINE user id) the ledger last sent to on that channel. An opt-out
becomes a row of `opt_outs` and cancels that customer's planned sends on the channel at once
(a deferred send never goes out); an opt-in keyword lifts only what a keyword set. A send the
provider refused because the customer had opted out (Twilio 21610, Meta 131050) becomes an
opt-out too (`suppress_refusals`). All of it in the same transaction as the events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from cdp_activation.contracts import ALL_PURPOSES, OPT_IN, OPT_OUT, InboundMessage
from cdp_activation.db import read_frame
from cdp_activation.ledger.base import LedgerBase, as_time, aware, chunks, utc_now
from cdp_activation.ledger.fallback import NOT_ANSWERS, cancel_fallbacks_of
from cdp_activation.ledger.schema import inbound_events, opt_outs, sends
from cdp_activation.vocabulary import (
    CANCELLED,
    CARE_WINDOW,
    FAILED,
    OPTED_OUT,
    PLANNED,
    UNKNOWN,
)


@dataclass(frozen=True)
class InboundWrite:
    received: int  # messages handed in
    duplicates: int  # already stored: ignored
    unmatched: int  # from an address the ledger never sent to: stored without a customer
    opted_out: int  # opt-outs recorded
    opted_in: int  # keyword opt-outs lifted
    cancelled: int  # planned sends cancelled: by an opt-out, or fallbacks the answer made moot


def _aliases(channel: str, sender: str) -> list[str]:
    """Other spellings of a sender's number than the ledger's: WhatsApp gives a Mexican
    mobile's sender as 52 1 and ten digits (the mobile prefix its ids kept), where E.164,
    and so the number the ledger sent to, has had 52 and ten digits since 2019."""
    if channel == "whatsapp" and len(sender) == 14 and sender.startswith("+521"):
        return ["+52" + sender[4:]]
    return []


class Replies(LedgerBase):
    """Inbound messages and opt-outs."""

    def record_inbound(
        self, messages: Sequence[InboundMessage], received_at: datetime | None = None
    ) -> InboundWrite:
        """Store each new message, match it to a customer, and apply its opt-out or -in."""
        now = received_at or utc_now()
        unique = {m.event_key: m for m in messages}
        with self.engine.begin() as con:
            self._lock_for_write(con)
            known = self._known_inbound(con, list(unique))
            fresh = sorted(
                (m for k, m in unique.items() if k not in known), key=lambda m: m.occurred_at
            )
            customers = self._customers_of(con, {(m.channel, m.sender) for m in fresh})
            rows = []
            opted_out = opted_in = cancelled = 0
            for message in fresh:
                customer = customers.get((message.channel, message.sender))
                rows.append(
                    {
                        "event_key": message.event_key,
                        "provider": message.provider,
                        "channel": message.channel,
                        "customer_id": customer,
                        "kind": message.kind[:20],
                        "summary": (message.summary or message.kind)[:120],
                        "opt": message.opt,
                        # In UTC: SQLite keeps a time's clock reading, not its offset, and
                        # providers write theirs (Infobip, Vonage) with one; a fallback
                        # compares it with the send's time.
                        "occurred_at": aware(message.occurred_at).astimezone(UTC),
                        "received_at": aware(now).astimezone(UTC),
                    }
                )
                if customer is None or message.opt is None:
                    continue
                if message.opt == OPT_OUT:
                    opted_out += 1
                    cancelled += self._opt_out(
                        con,
                        customer,
                        message.channel,
                        message.purpose,
                        message.reason or "keyword",
                        message.event_key,
                        now,
                    )
                elif message.opt == OPT_IN:
                    opted_in += self._lift(con, customer, message, now)
            if rows:  # a concurrent delivery of the same webhook may have stored it meanwhile
                insert = postgres_insert if con.dialect.name == "postgresql" else sqlite_insert
                con.execute(insert(inbound_events).on_conflict_do_nothing(), rows)
            self._reopen_windows(con, rows)
            # An answer proves the message it answers landed: its fallback must not go out.
            answered = {(r["channel"], r["customer_id"]) for r in rows if r["customer_id"]}
            for channel in {channel for channel, _ in answered}:
                who = {customer for ch, customer in answered if ch == channel}
                cancelled += cancel_fallbacks_of(
                    con,
                    sa.select(sends.c.id).where(
                        sends.c.customer_id.in_(sorted(who)), sends.c.channel == channel
                    ),
                )
        return InboundWrite(
            received=len(messages),
            duplicates=len(messages) - len(fresh),
            unmatched=sum(1 for r in rows if r["customer_id"] is None),
            opted_out=opted_out,
            opted_in=opted_in,
            cancelled=cancelled,
        )

    def _reopen_windows(self, con: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
        """A customer who wrote on WhatsApp opened their 24-hour window again: their planned
        free-form messages may go until 24 hours after this message (else the claim would
        cancel them when the window the policy saw closes)."""
        latest: dict[str, datetime] = {}
        for r in rows:
            if r["channel"] == "whatsapp" and r["customer_id"] and r["kind"] not in NOT_ANSWERS:
                customer = r["customer_id"]
                latest[customer] = max(r["occurred_at"], latest.get(customer, r["occurred_at"]))
        # The customer's index (see `_opt_out` for SQLite's unary `+`).
        planned = (
            sa.literal_column("+sends.state") == PLANNED
            if con.dialect.name == "sqlite"
            else sends.c.state == PLANNED
        )
        now = utc_now()
        for customer, at in sorted(latest.items()):
            # A time in the future is bad data (the policy counts it outside the window).
            closes = min(at, now) + CARE_WINDOW
            con.execute(
                sa.update(sends)
                .where(
                    sends.c.customer_id == customer,
                    sends.c.channel == "whatsapp",
                    planned,
                    sends.c.window_until.is_not(None),
                    sends.c.window_until < closes,
                )
                .values(window_until=closes)
            )

    def suppress_refusals(self, codes: Mapping[tuple[str, str], str]) -> int:
        """Opt-outs for the sends a provider refused because the customer had opted out:
        `codes` maps (connector, error code) to the purpose it covers (Twilio 21610: `all`;
        Meta 131050: `marketing`). Each refused send counts once, however often this runs."""
        if not codes:
            return 0
        now = utc_now()
        wanted: dict[str, set[str]] = {}
        for connector, code in codes:
            wanted.setdefault(connector, set()).add(code)
        refused = _refusals(wanted)
        new = sa.select(refused).where(
            ~sa.exists().where(opt_outs.c.source == _send_source(refused.c.id))
        )
        seen: set[int] = set()
        with self.engine.begin() as con:
            for send_id, customer, channel, connector, code, _at in con.execute(new).all():
                if send_id in seen:  # refused at send time and again in a report
                    continue
                seen.add(send_id)
                purpose = codes[(connector, code)]
                self._opt_out(con, customer, channel, purpose, code, f"send:{send_id}", now)
        return len(seen)

    def opt_outs(self) -> pl.DataFrame:
        """The opt-outs in force: (customer_id, channel, purpose), one row each."""
        return read_frame(
            self.engine,
            "SELECT DISTINCT customer_id, channel, purpose FROM opt_outs WHERE lifted_at IS NULL",
            (),
            schema={"customer_id": pl.String, "channel": pl.String, "purpose": pl.String},
        )

    def marketing_backoff(
        self, codes: Mapping[str, frozenset[str]], now: datetime, days: int = 30
    ) -> pl.DataFrame:
        """Customers a provider refused for now (`codes`: connector -> its `backoff_codes`,
        Meta 131049) in the last `days`, with the time until which their marketing on that
        channel waits: 1 day after the latest refusal, doubling with each earlier one in the
        window (2, 4, at most 8 days). Columns: customer_id, channel, until."""
        since = now - timedelta(days=days)
        refused = _refusals({c: set(w) for c, w in codes.items() if w})
        query = (
            sa.select(
                refused.c.customer_id,
                refused.c.channel,
                sa.func.count(sa.distinct(refused.c.id)),
                sa.func.max(refused.c.at),
            )
            .where(refused.c.at >= since)
            .group_by(refused.c.customer_id, refused.c.channel)
        )
        with self.engine.connect() as con:
            found = con.execute(query).all() if codes else []
        rows: list[tuple[str, str, datetime]] = [
            (customer, channel, as_time(latest) + timedelta(days=2 ** (min(int(times), 4) - 1)))
            for customer, channel, times, latest in found
        ]
        frame = pl.DataFrame(
            rows,
            schema={
                "customer_id": pl.String,
                "channel": pl.String,
                "until": pl.Datetime("us", "UTC"),
            },
            orient="row",
        )
        return frame.filter(pl.col("until") > now)

    def last_inbound(self, channel: str) -> pl.DataFrame:
        """Each matched customer's latest message on `channel`: (customer_id, last_inbound_at)."""
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(inbound_events.c.customer_id, sa.func.max(inbound_events.c.occurred_at))
                .where(
                    inbound_events.c.channel == channel,
                    inbound_events.c.customer_id.is_not(None),
                )
                .group_by(inbound_events.c.customer_id)
            ).all()
        schema = {"customer_id": pl.String(), "last_inbound_at": pl.Datetime("us", "UTC")}
        return pl.DataFrame([(c, aware(t)) for c, t in rows], schema=schema, orient="row")

    def replies_seen(self) -> tuple[int, int]:
        """The newest inbound event's and opt-out's ids (0 with none): they move whenever a
        reply is stored or an opt-out made, at the cost of two index lookups; `reply_counts`
        reads a whole partition's customers."""
        with self.engine.connect() as con:
            row = con.execute(
                sa.select(
                    sa.select(sa.func.max(inbound_events.c.id)).scalar_subquery(),
                    sa.select(sa.func.max(opt_outs.c.id)).scalar_subquery(),
                )
            ).one()
        return int(row[0] or 0), int(row[1] or 0)

    def reply_counts(self, activation: str, partition_key: str) -> dict[str, int]:
        """Of the customers a partition messaged: how many wrote back, and how many are opted
        out now (on any channel)."""
        messaged = (
            sa.select(sends.c.customer_id)
            .where(sends.c.activation == activation, sends.c.partition_key == partition_key)
            .distinct()
            .scalar_subquery()
        )
        with self.engine.connect() as con:
            replied = con.execute(
                sa.select(sa.func.count(sa.distinct(inbound_events.c.customer_id))).where(
                    inbound_events.c.customer_id.in_(messaged)
                )
            ).scalar_one()
            opted_out = con.execute(
                sa.select(sa.func.count(sa.distinct(opt_outs.c.customer_id))).where(
                    opt_outs.c.customer_id.in_(messaged), opt_outs.c.lifted_at.is_(None)
                )
            ).scalar_one()
        return {"replied": int(replied), "opted_out": int(opted_out)}

    def replies_by_activation(self) -> dict[str, dict[str, int]]:
        """Per activation: its customers who wrote back, and who are opted out now."""
        messaged = sa.select(sends.c.activation, sends.c.customer_id).distinct().subquery()
        counts: dict[str, dict[str, int]] = {}
        with self.engine.connect() as con:
            for figure, table, extra in (
                ("replied", inbound_events, ()),
                ("opted_out", opt_outs, (opt_outs.c.lifted_at.is_(None),)),
            ):
                rows = con.execute(
                    sa.select(
                        messaged.c.activation, sa.func.count(sa.distinct(table.c.customer_id))
                    )
                    .join(table, table.c.customer_id == messaged.c.customer_id)
                    .where(*extra)
                    .group_by(messaged.c.activation)
                ).all()
                for activation, count in rows:
                    counts.setdefault(activation, {"replied": 0, "opted_out": 0})[figure] = count
        return counts

    def _known_inbound(self, con: sa.Connection, keys: Sequence[str]) -> set[str]:
        known: set[str] = set()
        for chunk in chunks(keys, 5000):
            known |= set(
                con.execute(
                    sa.select(inbound_events.c.event_key).where(
                        inbound_events.c.event_key.in_(chunk)
                    )
                ).scalars()
            )
        return known

    def _customers_of(
        self, con: sa.Connection, addresses: set[tuple[str, str]]
    ) -> dict[tuple[str, str], str]:
        """(channel, address) -> the customer the ledger last sent to there."""
        found: dict[tuple[str, str], str] = {}
        for channel in {c for c, _ in addresses}:
            wanted = [a for c, a in addresses if c == channel]
            # Another spelling of the sender's number, where the ledger may have sent to it.
            aliases = {alias: a for a in wanted for alias in _aliases(channel, a)}
            by_alias: dict[tuple[str, str], str] = {}
            for chunk in chunks([*wanted, *aliases], 5000):
                for recipient, customer in con.execute(_last_sent_to(channel, chunk)):
                    if recipient in aliases:  # (a number may be one sender's and another's alias)
                        by_alias[(channel, aliases[recipient])] = customer
                    if (channel, recipient) in addresses:
                        found[(channel, recipient)] = customer
            for key, customer in by_alias.items():
                found.setdefault(key, customer)  # the number as written first
        return found

    def _opt_out(
        self,
        con: sa.Connection,
        customer: str,
        channel: str,
        purpose: str,
        reason: str,
        source: str,
        now: datetime,
    ) -> int:
        """Record one opt-out (once per source, whichever process gets there first: two runs
        may turn the same refusal into one at the same moment) and cancel the customer's
        planned sends it covers."""
        insert = postgres_insert if con.dialect.name == "postgresql" else sqlite_insert
        con.execute(
            insert(opt_outs)
            .values(
                customer_id=customer,
                channel=channel,
                purpose=purpose,
                reason=reason[:40],
                source=source[:300],
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["source"])
        )
        # On SQLite the unary `+` keeps the planner on the customer's index: offered the
        # `state` one too (a bound `state = ?`), it chose that and read every planned row,
        # ~2.4 ms an opt-out at 4,000 planned rows, holding the ledger's write lock.
        planned = (
            sa.literal_column("+sends.state") == PLANNED
            if con.dialect.name == "sqlite"
            else sends.c.state == PLANNED
        )
        covered = [sends.c.customer_id == customer, sends.c.channel == channel, planned]
        if purpose != ALL_PURPOSES:
            covered.append(sends.c.purpose == purpose)
        cancelled = con.execute(
            sa.update(sends)
            .where(*covered)
            .values(
                state=CANCELLED,
                error_code=f"{channel}_{OPTED_OUT}"[:40],
                error_message=f"the customer opted out ({reason})"[:500],
                updated_at=now,
            )
            .returning(sends.c.activation, sends.c.partition_key, sends.c.request_id)
        ).all()
        give_up_requests(con, {tuple(r) for r in cancelled if r[2] is not None}, now)
        return len(cancelled)

    def cancel_recently_opted_out(
        self, activation: str, partition_key: str, step: str, since: datetime
    ) -> int:
        """Planned rows of a partition's step whose customer opted out since `since` (after
        the policy read the opt-outs, before the rows were planned: the STOP found nothing to
        cancel) end `cancelled`. Driven by the recent opt-outs (`opt_outs` is read whole: it is
        small next to `sends`), never by every planned row."""
        recent = sa.select(opt_outs.c.customer_id).where(
            opt_outs.c.created_at >= since, opt_outs.c.lifted_at.is_(None)
        )
        with self.engine.begin() as con:
            who = sorted(set(con.execute(recent).scalars()))
            cancelled = 0
            for chunk in chunks(who, 5000):
                # Their rows by the customer's index first: asked with the partition in the
                # same statement, SQLite took ix_sends_due and read every planned row.
                theirs = con.execute(
                    sa.select(
                        sends.c.id, sends.c.activation, sends.c.partition_key, sends.c.step
                    ).where(sends.c.customer_id.in_(chunk))
                )
                ids = [r.id for r in theirs if tuple(r[1:]) == (activation, partition_key, step)]
                for id_chunk in chunks(ids, 5000):
                    cancelled += cancel_opted_out(
                        con,
                        sends.c.id.in_(id_chunk),
                        "the customer opted out after the run decided, before it planned",
                    )
        return cancelled

    def _lift(
        self, con: sa.Connection, customer: str, message: InboundMessage, now: datetime
    ) -> int:
        """An opt-in keyword: lift the customer's keyword opt-outs on the channel (never one a
        button or a provider's refusal made) that they wrote before it: a START delivered
        after a STOP the customer wrote later (a provider's retry, webhooks out of order)
        lifts nothing. Messages of one webhook are taken in the order they were written, so
        an opt-out from one whose own event is not stored yet is an earlier one."""
        later = (
            sa.select(inbound_events.c.id)
            .where(
                inbound_events.c.event_key == opt_outs.c.source,
                inbound_events.c.occurred_at > aware(message.occurred_at).astimezone(UTC),
            )
            .exists()
        )
        result = con.execute(
            sa.update(opt_outs)
            .where(
                opt_outs.c.customer_id == customer,
                opt_outs.c.channel == message.channel,
                opt_outs.c.reason == "keyword",
                opt_outs.c.lifted_at.is_(None),
                ~later,
            )
            .values(lifted_at=now)
        )
        return result.rowcount or 0


_SAID_STOP = (
    "a customer in its request said stop: the request, which goes out again whole or not at "
    "all, is not sent again"
)


def give_up_requests(
    con: sa.Connection, requests: set[tuple[Any, ...]], now: datetime, why: str = _SAID_STOP
) -> None:
    """A cancelled row inside a request that must go out again whole (`request_id`: the
    provider may hold it, and de-duplicates it on a key made of its members) would send
    that request again without it, under another key: its other customers could get the
    message twice. The request goes out whole or not at all, and never again to who said
    stop (whose window closed, who was erased): its other rows are `unknown`, as through a
    provider without a key."""
    for activation, partition_key, request_id in requests:
        con.execute(
            sa.update(sends)
            .where(
                sends.c.activation == activation,
                sends.c.partition_key == partition_key,
                sends.c.request_id == request_id,
                sends.c.state == PLANNED,
            )
            .values(state=UNKNOWN, error_message=why[:500], updated_at=now)
        )


def cancel_opted_out(con: sa.Connection, which: sa.ColumnElement[bool], why: str) -> int:
    """Within the caller's transaction: planned rows (`which` narrows them) whose customer
    has an opt-out covering them end `cancelled`; a request one of them was kept in is
    given up whole (`give_up_requests`). For what a STOP recorded while a row was not
    planned could not cancel: in flight (then put back to planned by a retryable answer),
    or decided and not yet planned."""
    stopped = (
        sa.select(opt_outs.c.id)
        .where(
            opt_outs.c.customer_id == sends.c.customer_id,
            opt_outs.c.channel == sends.c.channel,
            opt_outs.c.lifted_at.is_(None),
            sa.or_(opt_outs.c.purpose == ALL_PURPOSES, opt_outs.c.purpose == sends.c.purpose),
        )
        .exists()
    )
    now = utc_now()
    cancelled = con.execute(
        sa.update(sends)
        .where(which, sends.c.state == PLANNED, stopped)
        .values(
            state=CANCELLED,
            error_code=sends.c.channel.concat(f"_{OPTED_OUT}"),
            error_message=why[:500],
            updated_at=now,
        )
        .returning(sends.c.activation, sends.c.partition_key, sends.c.request_id)
    ).all()
    give_up_requests(con, {tuple(r) for r in cancelled if r[2] is not None}, now)
    return len(cancelled)


def _send_source(send_id: sa.ColumnElement[int]) -> sa.ColumnElement[str]:
    """`opt_outs.source` of a refused send: "send:<id>"."""
    return sa.literal("send:", sa.String) + sa.cast(send_id, sa.String)


def _refusals(codes: Mapping[str, set[str]]) -> sa.Subquery:
    """Sends a connector's provider refused with one of its `codes` (connector -> codes), at
    send time (`failed` with `error_code`) or in a later status report
    (`delivery_error_code`): (id, customer_id, channel, connector, code, at). Two indexed
    reads of the few failed rows, never a scan of the ledger."""
    parts = []
    for connector, wanted in sorted(codes.items()):
        listed = sorted(wanted)
        parts.append(
            sa.select(
                sends.c.id,
                sends.c.customer_id,
                sends.c.channel,
                sends.c.connector,
                sends.c.error_code.label("code"),
                sends.c.updated_at.label("at"),
            ).where(
                sends.c.error_code.in_(listed),
                sends.c.connector == connector,
                sends.c.state == FAILED,
            )
        )
        parts.append(
            sa.select(
                sends.c.id,
                sends.c.customer_id,
                sends.c.channel,
                sends.c.connector,
                sends.c.delivery_error_code.label("code"),
                sa.func.coalesce(sends.c.delivery_status_at, sends.c.updated_at).label("at"),
            ).where(sends.c.delivery_error_code.in_(listed), sends.c.connector == connector)
        )
    if not parts:  # nothing to look for: an empty selection of the same shape
        parts.append(
            sa.select(
                sends.c.id,
                sends.c.customer_id,
                sends.c.channel,
                sends.c.connector,
                sends.c.error_code.label("code"),
                sends.c.updated_at.label("at"),
            ).where(sa.false())
        )
    return sa.union(*parts).subquery("refused")


def _last_sent_to(channel: str, addresses: Sequence[str]) -> sa.Select[Any]:
    """(recipient, customer_id) of the latest send to each address on `channel` (an indexed
    read: `ix_sends_recipient_channel`)."""
    latest = (
        sa.select(sends.c.recipient, sa.func.max(sends.c.id).label("id"))
        .where(sends.c.recipient.in_(list(addresses)), sends.c.channel == channel)
        .group_by(sends.c.recipient)
        .subquery()
    )
    return sa.select(sends.c.recipient, sends.c.customer_id).join(latest, latest.c.id == sends.c.id)
