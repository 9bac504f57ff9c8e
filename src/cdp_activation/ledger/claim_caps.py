"""Frequency caps held at the claim, so two activations that decided at the same moment
cannot both message a customer a cap allows once.

The policy reads the caps when it decides (accepted messages and those on their way, from
every activation), which covers activations deciding apart. Two that decide together each see
the other's rows still unwritten, or both planned: each would send. The claim settles it, as
if the claims of one customer ran one after the other. A claimed row is held back when its
customer already has, from another activation (or another partition of this one), within a
cap's days and of its purpose and channel, as many messages as the cap allows:

- sent, `unknown`, or planned again after they went out (a request whose answer was lost,
  kept whole, or a one-message request tried before: their provider may hold them): the row
  is cancelled before it leaves, untried, with the policy's own code (`frequency_capped` for
  a cap on every channel, `<channel>_frequency_capped` for one channel's);
- in flight (its request is out, or about to be): the row goes back to planned for a few
  seconds, untried, and its next claim sees how that message ended (sent: cancelled; given
  back unsent, failed: it goes). One in flight for longer than any request takes (its worker
  gone) counts as sent.

The first claim wins, and keeps the customer through its retries: a row tried before is never
held back (it may already be at its provider), nor one claimed again in a request its
provider may hold (`resent_request`: taking it out would change the request's key). An
activation without caps, or whose caps do not cover a message, neither waits nor holds back;
its messages count against the others' caps once claimed.

Claims of one customer are serialised: SQLite runs a claim under its one write lock;
PostgreSQL takes transaction advisory locks before it reads the other rows (one per bucket of
customers, sorted and taken in one statement, under a shared lock on the whole space; a claim
of more buckets takes the whole space alone: a claim holds at most `_MOST_LOCKS` + 1 locks,
however many customers it has). Under READ COMMITTED the second claim then sees the first
one's rows.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from cdp_activation.ledger.base import as_time, db_time, driver_rows
from cdp_activation.ledger.records import FrequencyCap, PlannedSend
from cdp_activation.vocabulary import (
    CANCELLED,
    FREQUENCY_CAPPED,
    IN_FLIGHT,
    PLANNED,
    SENT,
    UNKNOWN,
)

log = logging.getLogger(__name__)

# How long a row waits for another activation's message in flight to end.
RECHECK_AFTER = timedelta(seconds=5)
# In flight longer than this, a message counts as sent: no request takes so long, so its
# worker is gone (its partition's next run makes it `unknown`).
STALE_IN_FLIGHT = timedelta(minutes=5)
# The caps' advisory locks (pg_advisory_xact_lock(int, int)): "caps", then a bucket of
# customers, or -1 for the whole space.
_LOCK_SPACE = 0x63617073
_BUCKETS = 4096
_WHOLE = -1
_MOST_LOCKS = 128
# Customers read, rows changed, in one statement.
_PER_STATEMENT = 500

_WAITING = (
    "waiting for another message to this customer, in flight, to end (frequency cap): "
    "claimed again once it has"
)


def capped_code(cap: FrequencyCap, channel: str) -> str:
    """The policy's reason code for a row `cap` stops."""
    return FREQUENCY_CAPPED if cap.channel == "any" else f"{channel}_{FREQUENCY_CAPPED}"


def _applies(cap: FrequencyCap, row: PlannedSend) -> bool:
    return cap.purpose in ("any", row.purpose) and cap.channel in ("any", row.channel)


def _bucket(customer_id: str) -> int:
    """A customer's lock (customers sharing one only make their claims wait in turn)."""
    digest = hashlib.blake2b(customer_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % _BUCKETS


def hold_caps(
    con: sa.Connection,
    scope: tuple[str, str, str],
    caps: Sequence[FrequencyCap],
    claimed: list[list[PlannedSend]],
    now: datetime,
) -> list[list[PlannedSend]]:
    """`claimed` without the rows the caps hold back: those cancelled or put back (see the
    module) in `con`'s transaction, the claim's."""
    checked = [
        r
        for batch in claimed
        for r in batch
        if r.customer_id is not None
        and r.attempts == 1  # (counted by this claim: never tried before)
        and not r.resent_request
        and any(_applies(c, r) for c in caps)
    ]
    if not checked:
        return claimed
    dialect = con.dialect.name
    customers = sorted({r.customer_id for r in checked if r.customer_id is not None})
    if dialect == "postgresql":
        _lock(con, customers)
    others = _other_messages(
        con, scope, customers, now - timedelta(days=max(c.days for c in caps)), now
    )
    stopped: dict[int, tuple[str, str]] = {}
    waiting: list[int] = []
    for row in checked:
        theirs = others.get(row.customer_id or "")
        if not theirs:
            continue
        for cap in sorted(caps, key=lambda c: c.channel != "any"):  # the overall code first
            if not _applies(cap, row):
                continue
            window_start = now - timedelta(days=cap.days)
            counted = [
                in_the_air
                for channel, purpose, when, in_the_air in theirs
                if when > window_start
                and cap.purpose in ("any", purpose)
                and cap.channel in ("any", channel)
            ]
            if counted.count(False) >= cap.max_messages:
                stopped[row.id] = (capped_code(cap, row.channel), _why(cap))
                break
            if len(counted) >= cap.max_messages:
                waiting.append(row.id)
                break
    if not stopped and not waiting:
        return claimed
    _take_back(con, stopped, waiting, now)
    if stopped:
        log.info(
            "%d message(s) of %s not sent: another message reached their customer first, up "
            "to a frequency cap (cancelled at the claim, frequency_capped)",
            len(stopped),
            "/".join(scope),
        )
    held = set(stopped) | set(waiting)
    return [[r for r in batch if r.id not in held] for batch in claimed]


def _lock(con: sa.Connection, customers: list[str]) -> None:
    """PostgreSQL: this transaction's locks on `customers`' buckets, or on the whole space."""
    buckets = sorted({_bucket(c) for c in customers})
    if len(buckets) > _MOST_LOCKS:
        driver_rows(con, "SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_SPACE, _WHOLE))
        return
    # The whole space shared first, then the buckets in order: one statement, one order.
    driver_rows(
        con,
        "SELECT CASE WHEN n = 1 THEN pg_advisory_xact_lock_shared(%s, k) "
        "ELSE pg_advisory_xact_lock(%s, k) END "
        "FROM unnest(%s::int[]) WITH ORDINALITY AS u(k, n) ORDER BY n",
        (_LOCK_SPACE, _LOCK_SPACE, [_WHOLE, *buckets]),
    )


def _other_messages(
    con: sa.Connection,
    scope: tuple[str, str, str],
    customers: list[str],
    since: datetime,
    now: datetime,
) -> dict[str, list[tuple[str, str, datetime, bool]]]:
    """Per customer, the messages the caps count: (channel, purpose, when, still in the
    air), from other activations and partitions, since `since`."""
    dialect = con.dialect.name
    mark = "?" if dialect == "sqlite" else "%s"
    at = "COALESCE(sent_at, updated_at)"
    # By the customer's index: the state's would walk every message sent in the window, which
    # both planners chose (`state || ''` keeps them off it).
    state = "(state || '')"
    fresh = now - STALE_IN_FLIGHT
    others: dict[str, list[tuple[str, str, datetime, bool]]] = defaultdict(list)
    for first in range(0, len(customers), _PER_STATEMENT):
        among, values = _among("customer_id", customers[first : first + _PER_STATEMENT], dialect)
        rows = driver_rows(
            con,
            f"SELECT customer_id, channel, purpose, {at}, {state} FROM sends WHERE {among} "
            f"AND ({state} IN ('{SENT}', '{IN_FLIGHT}', '{UNKNOWN}') OR ({state} = "
            f"'{PLANNED}' AND (request_id IS NOT NULL OR attempts > 0))) AND {at} > {mark} "
            f"AND NOT (activation = {mark} AND partition_key = {mark})",
            (*values, db_time(since, dialect), scope[0], scope[1]),
        )
        for customer, channel, purpose, when, row_state in rows:
            moment = as_time(when)
            in_the_air = row_state == IN_FLIGHT and moment > fresh
            others[customer].append((channel, purpose, moment, in_the_air))
    return others


def _take_back(
    con: sa.Connection, stopped: dict[int, tuple[str, str]], waiting: list[int], now: datetime
) -> None:
    """The held-back rows, untried: the claim's attempt and any request number it stamped
    taken back; `stopped` cancelled with their reason, `waiting` planned again shortly."""
    dialect = con.dialect.name
    mark = "?" if dialect == "sqlite" else "%s"
    stamp = db_time(now, dialect)
    untried = f"updated_at = {mark}, claimed_by = NULL, request_id = NULL, attempts = attempts - 1"
    by_reason: dict[tuple[str, str], list[int]] = defaultdict(list)
    for id_, reason in sorted(stopped.items()):
        by_reason[reason].append(id_)
    changes: list[tuple[str, tuple[Any, ...], list[int]]] = [
        (f"state = '{CANCELLED}', error_code = {mark}, error_message = {mark}", reason, ids)
        for reason, ids in by_reason.items()
    ]
    if waiting:
        later = (db_time(now + RECHECK_AFTER, dialect), _WAITING)
        changes.append(
            (f"state = '{PLANNED}', not_before = {mark}, error_message = {mark}", later, waiting)
        )
    for assignments, values, ids in changes:  # (rows this transaction claimed: by key alone)
        for first in range(0, len(ids), _PER_STATEMENT):
            among, keys = _among("id", ids[first : first + _PER_STATEMENT], dialect)
            con.exec_driver_sql(
                f"UPDATE sends SET {assignments}, {untried} WHERE {among}",
                (*values, stamp, *keys),
            )


def _among(column: str, values: list[Any], dialect: str) -> tuple[str, tuple[Any, ...]]:
    """`column` is one of `values`, and its parameters: one array on PostgreSQL."""
    if dialect == "postgresql":
        return f"{column} = ANY(%s)", (values,)
    return f"{column} IN ({', '.join(['?'] * len(values))})", tuple(values)


def _why(cap: FrequencyCap) -> str:
    on = "any channel" if cap.channel == "any" else cap.channel
    return (
        "frequency cap reached at the claim: another message to this customer (another "
        "activation's, or another partition's of this one) was sent or on its way first "
        f"({cap.max_messages} {cap.purpose} message(s) on {on} per {cap.days} day(s))"
    )
