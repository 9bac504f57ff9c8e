"""Frequency caps held at the claim, so two activations that decided at the same moment
cannot both message a customer a cap allows once.

The policy reads the caps when it decides (accepted messages and those on their way, from
every activation), which covers activations deciding apart. Two that decide together each see
the other's rows still unwritten, or both planned: each would send. The claim settles it: a
claimed row whose customer already has, from another activation (or another partition of
this one), as many messages sent, in flight, `unknown` or waiting in a request their provider
may already hold (planned with a `request_id`) within a cap's days as the cap allows is
cancelled before it leaves, with the policy's own reason code
(`frequency_capped` for a cap on every channel, `<channel>_frequency_capped` for one
channel's). The first claim wins. Claims of capped customers are serialised: SQLite runs a
claim under its one write lock; PostgreSQL takes a transaction advisory lock per customer
(sorted, taken all at once, so two claims never wait for each other in a cycle) before it
reads the other rows, so the second claim sees the first one's rows once it commits.

A row claimed again in a request its provider may already hold (`resent_request`) is never
taken out of it: that would change the request's key.
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
from cdp_activation.vocabulary import CANCELLED, IN_FLIGHT, PLANNED, SENT, UNKNOWN

log = logging.getLogger(__name__)

# The first key of the caps' advisory locks (pg_advisory_xact_lock(int, int)): "caps".
_LOCK_SPACE = 0x63617073
# Customers read in one statement.
_CUSTOMERS_PER_READ = 500
CAPPED = "frequency_capped"


def capped_code(cap: FrequencyCap, channel: str) -> str:
    """The policy's reason code for a row `cap` stops."""
    return CAPPED if cap.channel == "any" else f"{channel}_{CAPPED}"


def _applies(cap: FrequencyCap, row: PlannedSend) -> bool:
    return cap.purpose in ("any", row.purpose) and cap.channel in ("any", row.channel)


def _lock_key(customer_id: str) -> int:
    """A customer's advisory lock (a collision only makes two claims wait for each other)."""
    digest = hashlib.blake2b(customer_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def hold_caps(
    con: sa.Connection,
    scope: tuple[str, str, str],
    caps: Sequence[FrequencyCap],
    claimed: list[list[PlannedSend]],
    now: datetime,
) -> list[list[PlannedSend]]:
    """`claimed` without the rows a cap stops, those cancelled in `con`'s transaction (the
    claim's)."""
    checked = [
        r
        for batch in claimed
        for r in batch
        if r.customer_id is not None and not r.resent_request and any(_applies(c, r) for c in caps)
    ]
    if not checked:
        return claimed
    dialect = con.dialect.name
    mark = "?" if dialect == "sqlite" else "%s"
    customers = sorted({r.customer_id for r in checked if r.customer_id is not None})
    if dialect == "postgresql":
        keys = sorted({_lock_key(c) for c in customers})
        driver_rows(
            con,
            "SELECT pg_advisory_xact_lock(%s, k) FROM unnest(%s::int[]) WITH ORDINALITY "
            "AS u(k, n) ORDER BY n",
            (_LOCK_SPACE, keys),
        )
    since = now - timedelta(days=max(c.days for c in caps))
    at = "COALESCE(sent_at, updated_at)"
    # By the customer's index: the state's would walk every message sent in the window, which
    # both planners chose (`state || ''` keeps them off it).
    state = "(state || '')"
    others: dict[str, list[tuple[str, str, datetime]]] = defaultdict(list)
    for first in range(0, len(customers), _CUSTOMERS_PER_READ):
        part = customers[first : first + _CUSTOMERS_PER_READ]
        among, values = _among("customer_id", part, dialect)
        rows = driver_rows(
            con,
            f"SELECT customer_id, channel, purpose, {at} FROM sends WHERE {among} "
            f"AND ({state} IN ('{SENT}', '{IN_FLIGHT}', '{UNKNOWN}') "
            f"OR ({state} = '{PLANNED}' AND request_id IS NOT NULL)) AND {at} > {mark} "
            f"AND NOT (activation = {mark} AND partition_key = {mark})",
            (*values, db_time(since, dialect), scope[0], scope[1]),
        )
        for customer, channel, purpose, when in rows:
            others[customer].append((channel, purpose, as_time(when)))
    stopped: dict[int, tuple[str, str]] = {}
    for row in checked:
        theirs = others.get(row.customer_id or "")
        if not theirs:
            continue
        for cap in sorted(caps, key=lambda c: c.channel != "any"):  # the overall code first
            if not _applies(cap, row):
                continue
            window_start = now - timedelta(days=cap.days)
            count = sum(
                1
                for channel, purpose, when in theirs
                if when > window_start
                and cap.purpose in ("any", purpose)
                and cap.channel in ("any", channel)
            )
            if count >= cap.max_messages:
                stopped[row.id] = (capped_code(cap, row.channel), _why(cap))
                break
    if not stopped:
        return claimed
    stamp = db_time(now, dialect)
    # Never tried: the claim's attempt and any request number it stamped are taken back.
    cancel = (
        f"state = '{CANCELLED}', error_code = {mark}, error_message = {mark}, "
        f"updated_at = {mark}, claimed_by = NULL, request_id = NULL, attempts = attempts - 1"
    )
    by_reason: dict[tuple[str, str], list[int]] = defaultdict(list)
    for id_, reason in sorted(stopped.items()):
        by_reason[reason].append(id_)
    for (code, why), ids in by_reason.items():  # one statement a reason (mostly one)
        among, values = _among("id", ids, dialect)
        con.exec_driver_sql(  # (rows this transaction claimed: by their key alone)
            f"UPDATE sends SET {cancel} WHERE {among}",
            (code, why, stamp, *values),
        )
    log.info(
        "%d message(s) of %s not sent: another message reached their customer first, up to a "
        "frequency cap (cancelled at the claim, frequency_capped)",
        len(stopped),
        "/".join(scope),
    )
    return [[r for r in batch if r.id not in stopped] for batch in claimed]


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
