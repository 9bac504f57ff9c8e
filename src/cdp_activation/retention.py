"""Retention and erasure of personal data in the ledger, the phone cache, the send log and
Dagster's stored step outputs (see `pii.py` for what is kept and why).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from cdp_activation.ledger import (
    CANCELLED,
    IN_FLIGHT,
    PLANNED,
    Ledger,
    idempotency_key,
    inbound_events,
    opt_outs,
    sends,
    status_events,
)
from cdp_activation.ledger.replies import give_up_requests
from cdp_activation.pii import stored_outputs
from cdp_activation.policy.phone_cache import remove_entries
from cdp_activation.policy.reasons import ERASED as ERASED_REASON
from cdp_activation.settings import get_settings

ERASED = ""  # what a purged or erased row keeps as its recipient
ERASED_PREFIX = "erased-"  # the pseudonym that replaces an erased customer id


def minimal_message(message: str) -> str:
    """A send's stored message without its text or variables: which template it was, only."""
    try:
        data = json.loads(message)
    except (TypeError, ValueError):
        return "{}"
    kept = {k: data[k] for k in ("template", "language") if isinstance(data, dict) and k in data}
    return json.dumps(kept)


@dataclass(frozen=True)
class Purged:
    sends: int  # rows whose number, message text and error text were taken out
    status_reports: int  # stored reports whose payload was dropped
    phone_cache: int  # phone cache entries removed
    send_log: int = 0  # send log rows rewritten with the pseudonym (erasure only)
    outputs: int = 0  # Dagster's sealed step outputs removed


def purge(
    ledger: Ledger,
    days: int | None = None,
    now: datetime | None = None,
    storage_dir: Path | None = None,
) -> Purged:
    """Take personal data out of everything older than `days` (CDP_PII_RETENTION_DAYS):
    finished sends (any state but planned or in flight, last changed before the cutoff), status
    reports received before it, phone cache entries stored before it, and Dagster's sealed step
    outputs written before it under `storage_dir`. Safe to run at any time and as often as
    wanted: rows still to be sent are never touched."""
    days = days if days is not None else get_settings().pii_retention_days
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    finished = sa.and_(
        sends.c.state.not_in([PLANNED, IN_FLIGHT]),
        sends.c.updated_at < cutoff,
        # Not purged yet: a number, an error text, or a message with its text or variables
        # (a refused fallback has no number, but its variables are personal too).
        sa.or_(
            sends.c.recipient != ERASED,
            sends.c.error_message.is_not(None),
            sends.c.message.contains('"parameters"'),
            sends.c.message.contains('"body"'),
        ),
    )
    with ledger.engine.begin() as con:
        cleared = _clear_sends(con, finished)
        reports = con.execute(
            sa.update(status_events)
            .where(status_events.c.received_at < cutoff, status_events.c.payload.is_not(None))
            .values(payload=None)
        ).rowcount
    cache = remove_entries(ledger.engine, before=cutoff)
    outputs = _remove_outputs(storage_dir, before=cutoff)
    return Purged(cleared, max(reports or 0, 0), cache, outputs=outputs)


def _remove_outputs(storage_dir: Path | None, before: datetime | None) -> int:
    """Delete sealed step outputs under `storage_dir` written before `before` (all: None)."""
    if storage_dir is None or not storage_dir.is_dir():
        return 0
    removed = 0
    for path in stored_outputs(storage_dir):
        if before is None or datetime.fromtimestamp(path.stat().st_mtime, UTC) < before:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _clear_sends(con: sa.Connection, where: sa.ColumnElement[bool]) -> int:
    """Number, message text and error text out of the `sends` rows matching `where`."""
    rows = con.execute(sa.select(sends.c.id, sends.c.message).where(where)).all()
    for start in range(0, len(rows), 5000):
        chunk = rows[start : start + 5000]
        con.execute(
            sa.update(sends)
            .where(sends.c.id == sa.bindparam("row_id"))
            .values(recipient=ERASED, message=sa.bindparam("kept"), error_message=None),
            [{"row_id": r.id, "kept": minimal_message(r.message)} for r in chunk],
        )
    return len(rows)


def erase(
    ledger: Ledger,
    customer_ids: Sequence[str],
    send_log_url: str | None = None,
    storage_dir: Path | None = None,
) -> Purged:
    """A data subject's erasure: every send of these customers loses its number, message text
    and error text, their customer id becomes a pseudonym (`erased-…`, one per customer) in
    the ledger and in the send log, their status reports lose their payloads, the phone cache
    is emptied and Dagster's stored step outputs (whole audiences, sealed) under `storage_dir`
    are deleted. Rows still planned are cancelled first: nobody erased is messaged."""
    wanted = sorted({str(c) for c in customer_ids if str(c)})
    if not wanted:
        return Purged(0, 0, 0)
    pseudonyms = {c: f"{ERASED_PREFIX}{uuid.uuid4().hex[:16]}" for c in wanted}
    now = datetime.now(UTC)
    with ledger.engine.begin() as con:
        rows = con.execute(
            sa.select(
                sends.c.id,
                sends.c.activation,
                sends.c.partition_key,
                sends.c.customer_id,
                sends.c.step,
                sends.c.provider_message_id,
            ).where(sends.c.customer_id.in_(wanted))
        ).all()
        erased = con.execute(
            sa.update(sends)
            .where(sends.c.customer_id.in_(wanted), sends.c.state == PLANNED)
            .values(state=CANCELLED, error_code=ERASED_REASON, error_message=None, updated_at=now)
            .returning(sends.c.activation, sends.c.partition_key, sends.c.request_id)
        ).all()
        give_up_requests(
            con,
            {tuple(r) for r in erased if r[2] is not None},
            now,
            "a customer in its request was erased: the request, which goes out again whole or "
            "not at all, is not sent again",
        )
        cleared = _clear_sends(con, sends.c.customer_id.in_(wanted))
        for start in range(0, len(rows), 5000):
            chunk = rows[start : start + 5000]
            con.execute(
                sa.update(sends)
                .where(sends.c.id == sa.bindparam("row_id"))
                .values(
                    customer_id=sa.bindparam("pseudonym"),
                    idempotency_key=sa.bindparam("key"),
                    updated_at=now,
                ),
                [
                    {
                        "row_id": r.id,
                        "pseudonym": pseudonyms[r.customer_id],
                        "key": idempotency_key(
                            r.activation, r.partition_key, pseudonyms[r.customer_id], r.step
                        ),
                    }
                    for r in chunk
                ],
            )
        # Their replies and opt-outs keep counting under the pseudonym: an erased customer
        # who said STOP is still never messaged from a ledger row that names them.
        for table in (inbound_events, opt_outs):
            for customer, pseudonym in pseudonyms.items():
                con.execute(
                    sa.update(table)
                    .where(table.c.customer_id == customer)
                    .values(customer_id=pseudonym)
                )
        # Their status reports: those stored with their customer id (status sources), then
        # those of their sends' provider message ids.
        forget = {"payload": None, "customer_id": None}
        reports = (
            con.execute(
                sa.update(status_events)
                .where(status_events.c.customer_id.in_(wanted))
                .values(**forget)
            ).rowcount
            or 0
        )
        message_ids = [r.provider_message_id for r in rows if r.provider_message_id]
        for start in range(0, len(message_ids), 5000):
            reports += (
                con.execute(
                    sa.update(status_events)
                    .where(
                        status_events.c.provider_message_id.in_(message_ids[start : start + 5000]),
                        status_events.c.payload.is_not(None),
                    )
                    .values(**forget)
                ).rowcount
                or 0
            )
    emptied = remove_entries(ledger.engine, before=None)
    logged = 0
    if send_log_url:
        # The erased rows changed just now: the incremental export rewrites each of them
        # with its pseudonym (the send log never held numbers or message text).
        from cdp_activation.feedback.send_log import export_send_log

        logged = export_send_log(ledger, send_log_url).exported
    outputs = _remove_outputs(storage_dir, before=None)
    return Purged(cleared, reports, emptied, logged, outputs)
