"""Sends and their state machine: planning, claims and leases, settling answers, recovering
what a crash left in flight, cancelling and expiring."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from itertools import chain
from typing import Any, cast

import polars as pl
import sqlalchemy as sa

from cdp_activation import json_codec
from cdp_activation.contracts import Outcome, SendResult
from cdp_activation.db import read_frame
from cdp_activation.ledger.base import (
    LedgerBase,
    as_time,
    chunks,
    db_time,
    driver_rows,
    driver_slices,
    quiet_hours_end,
    utc_now,
    worker_process_gone,
)
from cdp_activation.ledger.claim_caps import hold_caps
from cdp_activation.ledger.records import (
    DEADLINE_PASSED,
    ClaimRequest,
    FrequencyCap,
    LeaseLost,
    PlannedSend,
    PlanResult,
    Settlement,
)
from cdp_activation.ledger.replies import cancel_opted_out, give_up_requests
from cdp_activation.ledger.schema import (
    WORKER_ALIVE,
    WORKER_EXPIRED,
    WORKER_STOPPED,
    delivery_workers,
    sends,
)
from cdp_activation.processes import host_id
from cdp_activation.vocabulary import (
    CANCELLED,
    DEAD_LETTER,
    EXCLUDED,
    FAILED,
    HOLDOUT,
    IN_FLIGHT,
    PLANNED,
    SENT,
    UNKNOWN,
    WINDOW_CLOSED_CODE,
    idempotency_key_expr,
)

log = logging.getLogger(__name__)


class SendStates(LedgerBase):
    """Planned rows and their states: plan, claim, settle, recover."""

    def plan(
        self,
        activation: str,
        partition_key: str,
        chosen: pl.DataFrame,
        run_id: str | None = None,
        purpose: str = "marketing",
    ) -> PlanResult:
        """Write a planned row per chosen decision; keys already present are left untouched
        (a row still planned takes the latest `not_before`).

        The rows are built in polars (keys, message JSON, timestamps) and handed to the
        driver as plain tuples in one `executemany`: no per-row work in Python. Rows already
        in the ledger are neither rewritten nor locked (a run planning the partition while
        another sends from it must not wait for, or deadlock with, that run's writes); only
        planned rows whose deferral changed are updated.
        """
        if chosen.is_empty():
            return PlanResult(planned=0, existing={})
        # A slice of the decisions at a time: each of the message's forms is built for every
        # row of a slice before one is picked (10M customers, a million planned: the run's
        # peak 4,588 -> 4,461 MB, one run each). The slices share one planning time.
        now = utc_now()
        rows = pl.concat(
            [
                _plan_rows(activation, partition_key, part, run_id, purpose, self.dialect, now)
                for part in chosen.iter_slices(_PLAN_BUILD_SLICE)
            ],
            rechunk=False,
        )
        timing = ("not_before", "send_until", "reopens_at", "window_until")
        route = ("channel", "connector", "recipient")
        held = ("idempotency_key", "state", *timing, *route, "request_id", "attempts")
        known = rows.select("idempotency_key", *timing, *route).join(
            self._partition_rows(activation, partition_key, held),
            on="idempotency_key",
            how="inner",
            suffix="_now",
        )
        counts = dict(known.group_by("state").len().iter_rows())
        # Only keys the ledger does not hold yet go to the INSERT: on PostgreSQL, a unique
        # check against a row another transaction is updating waits for that transaction,
        # so inserting every key again made a plan wait behind a stalled sender's open
        # settle (a SIGSTOPped worker held the next run for good). A key planned meanwhile by
        # another run is still skipped by ON CONFLICT.
        all_rows = rows
        if not known.is_empty():  # (a first plan of a partition knows none: no copy made)
            rows = rows.join(known.select("idempotency_key"), on="idempotency_key", how="anti")
        changed = pl.any_horizontal(pl.col(c).ne_missing(pl.col(f"{c}_now")) for c in timing)
        # A row still planned whose customer the policy now sends another way (consent for
        # the planned channel withdrawn overnight, its 24-hour window closed, a cap reached
        # there; a number changed) takes the new route and message: the old one must not go
        # out. Only a row never tried: one that went out before may be held by a provider
        # that de-duplicates it (`request_id`, or an uncertain answer one at a time), and
        # sent another way it could reach the customer twice.
        moved = pl.any_horizontal(pl.col(c).ne_missing(pl.col(f"{c}_now")) for c in route)
        # A free-form message now a template on the same route, or the other way round: the
        # window (`window_until`) belongs to the message it was decided for.
        moved = moved | (pl.col("window_until").is_null() != pl.col("window_until_now").is_null())
        untried = pl.col("request_id").is_null() & (pl.col("attempts") == "0")
        movable = (pl.col("state") == PLANNED) & untried
        rerouted = known.filter(movable & moved).select("idempotency_key")
        # A row that keeps its route keeps its window too: a tried WhatsApp row the policy
        # would now send by SMS is still that WhatsApp message, whose window still closes.
        redeferred = known.filter(
            (pl.col("state") == PLANNED) & changed & ~(movable & moved)
        ).with_columns(
            pl.when(moved)
            .then(pl.col("window_until_now"))
            .otherwise(pl.col("window_until"))
            .alias("window_until")
        )
        mark = self._mark
        planned = rows.height
        with self.engine.begin() as con:
            # Python tuples a slice at a time: a million rows' tuples at once took ~1.8 GB.
            if rows.is_empty():
                pass
            elif self.dialect == "sqlite":
                # Many rows a statement, not one: SQLite pays a statement journal and a trigger
                # program per statement. In key order, the unique index grows at its end.
                # Each statement's rows gathered in key order from the frame as it is, not
                # from a sorted copy of every row held beside it.
                order = rows.get_column("idempotency_key").arg_sort()
                step = _sqlite_rows_per_statement(con, len(_PLAN_COLUMNS))
                for start in range(0, rows.height, step):
                    chunk = rows[order.slice(start, step)]
                    values = tuple(chain(*chunk.rows()))
                    con.exec_driver_sql(_sqlite_insert(chunk.height), values)
            elif rows.height >= _COPY_FROM and con.dialect.driver == "psycopg":
                _copy_plan(con, rows)
            else:
                for chunk in rows.iter_slices(_PLAN_ROWS_PER_BATCH):
                    con.exec_driver_sql(self._insert_sql(), chunk.rows())
            if not rerouted.is_empty():
                self._reroute(con, all_rows.join(rerouted, on="idempotency_key", how="semi"))
            if not redeferred.is_empty():
                # (A customer who wrote again since: their window closes later.)
                con.exec_driver_sql(
                    f"UPDATE sends SET not_before = {mark}, send_until = {mark}, "
                    f"reopens_at = {mark}, window_until = {mark} WHERE idempotency_key = {mark} "
                    f"AND state = '{PLANNED}'",
                    redeferred.sort("idempotency_key").select(*timing, "idempotency_key").rows(),
                )
        if self.dialect == "postgresql" and planned >= _COPY_FROM:
            self._analyze_after_load(planned)
        return PlanResult(planned=planned, existing=counts)

    def _reroute(self, con: sa.Connection, rows: pl.DataFrame) -> None:
        """Planned rows (not in a kept request) given their new decision's channel, connector,
        recipient, message and timing, in the plan's transaction."""
        mark = self._mark
        columns: tuple[str, ...] = ("channel", "connector", "recipient", "message")
        columns += ("not_before", "send_until", "reopens_at", "window_until", "updated_at")
        assignments = ", ".join(f"{c} = {mark}" for c in columns)
        con.exec_driver_sql(
            f"UPDATE sends SET {assignments} WHERE idempotency_key = {mark} "
            f"AND state = '{PLANNED}' AND request_id IS NULL",
            rows.sort("idempotency_key").select(*columns, "idempotency_key").rows(),
        )
        log.info("%d planned row(s) now go by another channel, as the policy decided", rows.height)

    def _analyze_after_load(self, loaded: int) -> None:
        """PostgreSQL: refresh the planner's statistics of `sends` after a plan loaded a large
        share of it, as after any bulk load. Until autovacuum gets to it (a minute or more),
        a table that grew from little plans its lookups as if it were still small: a status
        webhook's lookup by provider message id scanned every row of a fresh ledger's 10,000
        sends (3 ms against 0.13 ms by its index), once per batch of reports."""
        with self.engine.connect() as con:
            known = con.exec_driver_sql(
                "SELECT reltuples FROM pg_class WHERE oid = 'sends'::regclass"
            ).scalar_one()
            if known >= 0 and loaded < known * 0.1:
                return  # a small part of what the statistics already describe
            try:
                # Never a wait before the first send: ANALYZE's lock conflicts with a running
                # (anti-wraparound) vacuum, another ANALYZE and CREATE/DROP INDEX CONCURRENTLY.
                con.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
                con.exec_driver_sql("ANALYZE sends")
                con.commit()
            except sa.exc.DBAPIError as err:  # statistics help; a plan never fails for them
                log.warning("could not refresh the statistics of sends: %s", err.orig)

    def _insert_sql(self) -> str:
        """The driver-level insert of `_PLAN_COLUMNS`; keys already present are skipped."""
        columns = ", ".join(_PLAN_COLUMNS)
        values = self._marks(len(_PLAN_COLUMNS))
        return (
            f"INSERT INTO sends ({columns}) VALUES ({values}) "
            "ON CONFLICT (idempotency_key) DO NOTHING"
        )

    def _partition_rows(
        self, activation: str, partition_key: str, columns: Sequence[str]
    ) -> pl.DataFrame:
        """These `_PARTITION_COLUMNS` of every row of one partition, in one read; the times as
        `_plan_rows` writes them (SQLite: their text)."""
        when = pl.String if self.dialect == "sqlite" else pl.Datetime("us", "UTC")
        return read_frame(
            self.engine,
            f"SELECT {', '.join(columns)} FROM sends WHERE activation = $1 AND partition_key = $2",
            (activation, partition_key),
            schema={c: when if c in _TIMES else pl.String for c in columns},
        )

    def partition_states(self, activation: str, partition_key: str) -> pl.DataFrame:
        """(idempotency_key, state, connector, error_code, not_before, send_until, reopens_at,
        planned_at, orphaned) of every row of one partition (reads only); the times as
        `_plan_rows` writes them (SQLite: their text). `orphaned`: in flight, and its worker
        is gone (`worker_gone`), so the next run recovers it (`recover_interrupted`)."""
        rows = self._partition_rows(activation, partition_key, _PARTITION_COLUMNS)
        holders = rows.filter(pl.col("state") == IN_FLIGHT)["claimed_by"].to_list()
        with self.engine.connect() as con:
            gone = [w for w in self._gone_workers(con, holders) if w is not None]
        orphaned = (pl.col("state") == IN_FLIGHT) & (
            pl.col("claimed_by").is_null()
            | pl.col("claimed_by").is_in(pl.Series(gone, dtype=pl.String).implode())
        )
        return rows.with_columns(orphaned.alias("orphaned")).drop("claimed_by")

    def register_worker(
        self,
        activation: str,
        partition_key: str,
        step: str,
        lease_seconds: float,
        run_id: str | None = None,
    ) -> str:
        """A new delivery worker, alive with a fresh lease; returns its id (`claimed_by`)."""
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be greater than 0, got {lease_seconds}")
        worker_id = uuid.uuid4().hex
        now = utc_now()
        with self.engine.begin() as con:
            con.execute(
                sa.insert(delivery_workers).values(
                    id=worker_id,
                    run_id=run_id,
                    activation=activation,
                    partition_key=partition_key,
                    step=step,
                    host=host_id(),
                    pid=os.getpid(),
                    state=WORKER_ALIVE,
                    lease_seconds=lease_seconds,
                    started_at=now,
                    heartbeat_at=now,
                )
            )
        self._leases[worker_id] = lease_seconds
        return worker_id

    def heartbeat(self, worker_id: str) -> bool:
        """Renew a worker's lease (one row, whatever it holds); False when it has lost it."""
        with self.engine.begin() as con:
            return self._renew(con, worker_id)

    def _idle_bound_ms(self, worker_id: str) -> int | None:
        """On PostgreSQL, the server ends a transaction of a delivery worker that the worker
        leaves idle longer than its lease (frozen, SIGSTOPped, its host lost with the
        connection open): a worker silent that long is taken for dead anyway, and the row
        locks of its open transaction would otherwise hold the run that recovers its rows
        for as long as the connection lives. The bound in ms; None: no bound to set."""
        lease = self._leases.get(worker_id)
        if lease and self.dialect == "postgresql":
            return max(1, int(lease * 1000))
        return None

    def _bound_idle(self, con: sa.Connection, worker_id: str) -> None:
        """Bound this transaction's idle time by the worker's lease (`_idle_bound_ms`)."""
        bound = self._idle_bound_ms(worker_id)
        if bound is not None:
            con.exec_driver_sql(f"SET LOCAL idle_in_transaction_session_timeout = {bound}")

    def _renew(self, con: sa.Connection, worker_id: str) -> bool:
        """Renew the worker's lease in this transaction, and bound its idle time: False when
        the worker was taken for dead. One statement of fixed text (every claim runs it):
        on PostgreSQL the renewal is joined to a one-row relation that sets the bound
        (`set_config(…, true)`, local to the transaction, as SET LOCAL), so a row renewed
        means the bound is set, without a round trip of its own."""
        where = f"WHERE id = {self._mark} AND state = '{WORKER_ALIVE}'"
        bound = self._idle_bound_ms(worker_id)
        if self.dialect != "postgresql":
            sql = f"UPDATE delivery_workers SET heartbeat_at = ? {where}"
            args: tuple[Any, ...] = (db_time(utc_now(), self.dialect), worker_id)
        elif bound is None:
            sql, args = f"UPDATE delivery_workers SET heartbeat_at = now() {where}", (worker_id,)
        else:
            sql = (
                "UPDATE delivery_workers SET heartbeat_at = now() FROM (SELECT set_config("
                f"'idle_in_transaction_session_timeout', %s, true)) AS bound {where}"
            )
            args = (str(bound), worker_id)
        return (con.exec_driver_sql(sql, args).rowcount or 0) == 1

    def stop_worker(self, worker_id: str) -> None:
        """The worker is done: rows it still holds in flight (a step interrupted mid-request)
        are recovered by the next run at once, without waiting for the lease."""
        with self.engine.begin() as con:
            con.execute(
                sa.update(delivery_workers)
                .where(delivery_workers.c.id == worker_id, delivery_workers.c.state == WORKER_ALIVE)
                .values(state=WORKER_STOPPED)
            )

    def claim(
        self,
        worker_id: str,
        activation: str,
        partition_key: str,
        step: str,
        requests: Sequence[ClaimRequest],
        now: datetime | None = None,
        caps: Sequence[FrequencyCap] = (),
    ) -> list[list[PlannedSend]]:
        """Atomically move due `planned` rows to `in_flight` for `worker_id` and return them,
        one list per request, in one transaction that also renews the worker's lease.

        A row is sent only by the worker this returned it to: PostgreSQL picks rows with
        `FOR UPDATE SKIP LOCKED` (concurrent claimers never wait for or share a row), SQLite
        runs the whole claim under its single write lock. Rows whose customer another
        activation reached first up to one of the activation's `caps` are cancelled instead
        (`claim_caps`): a request may come back shorter than asked, or empty, with rows still
        due. Raises `LeaseLost` when the worker was taken for dead meanwhile.
        """
        now = now or utc_now()
        results: list[list[PlannedSend]] = [[] for _ in requests]
        with self.engine.begin() as con:
            if not self._renew(con, worker_id):
                raise LeaseLost(
                    f"delivery worker {worker_id[:8]} lost its lease (it was stalled longer than "
                    "its lease and another run recovered its rows): it stops here"
                )
            scope = (activation, partition_key, step)
            self._cancel_closed_windows(con, scope, now)
            shared: dict[str, list[int]] = {}
            singles: dict[str, list[int]] = {}  # one-message requests, claimed together
            no_resend: set[str] = set()  # connectors found with no request left to resend
            for index, request in enumerate(requests):
                if not request.whole_requests:
                    shared.setdefault(request.connector, []).append(index)
                elif request.limit == 1 and request.connector in no_resend:
                    singles.setdefault(request.connector, []).append(index)
                else:
                    results[index] = self._claim_request(
                        con, worker_id, scope, request, now, no_resend
                    )
            for connector, indexes in shared.items():
                total = sum(requests[i].limit for i in indexes)
                rows = self._claim_rows(con, worker_id, scope, connector, total, now, False)
                for i in indexes:
                    results[i], rows = rows[: requests[i].limit], rows[requests[i].limit :]
            for connector, indexes in singles.items():
                # Each row its own request, numbered by the database: one statement for all.
                rows = self._claim_rows(
                    con, worker_id, scope, connector, len(indexes), now, True, _EACH_ITS_OWN
                )
                for i, row in zip(indexes, rows, strict=False):
                    results[i] = [row]
            if caps:
                results = hold_caps(con, scope, caps, results, now)
        return results

    def _cancel_closed_windows(
        self, con: sa.Connection, scope: tuple[str, str, str], now: datetime
    ) -> None:
        """Planned free-form WhatsApp messages whose customer-care window has closed are
        cancelled (`whatsapp_outside_window`): Meta takes only a template then. One kept in a
        request its provider may hold (`request_id`) cannot be taken out alone (the request
        would change its key): that request is given up, its other rows `unknown`
        (`give_up_requests`), as for a STOP. `ix_sends_window` holds only planned rows with a
        window, so this costs a claim one index probe."""
        mark = self._mark
        lock = " FOR UPDATE SKIP LOCKED" if self.dialect == "postgresql" else ""
        ended = driver_rows(
            con,
            f"UPDATE sends SET state = '{CANCELLED}', error_code = '{WINDOW_CLOSED_CODE}', "
            f"error_message = {mark}, updated_at = {mark} WHERE id IN (SELECT id FROM sends "
            f"WHERE activation = {mark} AND partition_key = {mark} AND step = {mark} "
            f"AND window_until <= {mark} AND state = '{PLANNED}'{lock}) RETURNING request_id",
            (_WINDOW_CLOSED, db_time(now, self.dialect), *scope, db_time(now, self.dialect)),
        )
        cancelled = len(ended)
        requests = {(*scope[:2], r[0]) for r in ended if r[0] is not None}
        if requests:
            give_up_requests(con, requests, now, _WINDOW_CLOSED_REQUEST)
        if cancelled:
            log.warning(
                "%d free-form WhatsApp message(s) of %s not sent: their customer's 24-hour "
                "window closed before they went (cancelled, whatsapp_outside_window)",
                cancelled,
                "/".join(scope),
            )

    def _claim_request(
        self,
        con: sa.Connection,
        worker_id: str,
        scope: tuple[str, str, str],
        request: ClaimRequest,
        now: datetime,
        no_resend: set[str],
    ) -> list[PlannedSend]:
        """One whole request's rows: first a request a crash or a retry left (`request_id`
        set), exactly as it was; else fresh rows, stamped with their request's id.

        A connector in `no_resend` had none left to resend earlier in this transaction: it is
        not asked again (one that another worker puts back meanwhile waits for the next
        claim, never merged with fresh rows)."""
        if request.connector in no_resend:
            return self._claim_fresh(con, worker_id, scope, request, now)
        mark = self._mark
        activation, partition_key, step = scope
        due = (
            f"activation = {mark} AND partition_key = {mark} AND state = '{PLANNED}' "
            f"AND step = {mark} AND connector = {mark} "
            f"AND (not_before IS NULL OR not_before <= {mark})"
        )
        args = (activation, partition_key, step, request.connector, db_time(now, self.dialect))
        request_id = driver_rows(
            con, f"SELECT MIN(request_id) FROM sends WHERE {due} AND request_id IS NOT NULL", args
        )[0][0]
        if request_id is not None:
            lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
            select = (
                f"SELECT id FROM sends WHERE activation = {mark} AND partition_key = {mark} "
                f"AND state = '{PLANNED}' AND request_id = {mark}{lock}"
            )
            rows = self._claim_where(
                con, worker_id, select, (activation, partition_key, request_id), now
            )
            return [replace(r, resent_request=True) for r in rows]
        no_resend.add(request.connector)
        return self._claim_fresh(con, worker_id, scope, request, now)

    def _claim_fresh(
        self,
        con: sa.Connection,
        worker_id: str,
        scope: tuple[str, str, str],
        request: ClaimRequest,
        now: datetime,
    ) -> list[PlannedSend]:
        """A new request's rows, stamped with its number by the claim itself. A fresh number,
        never a row's id: rows of a request the provider surely did not take forget it
        (`settle`), and the smallest id of a later batch would then be an earlier request's
        number, merging two requests into one of another key."""
        return self._claim_rows(
            con,
            worker_id,
            scope,
            request.connector,
            request.limit,
            now,
            fresh_only=True,
            request_id=secrets.randbits(62),
        )

    def _claim_rows(
        self,
        con: sa.Connection,
        worker_id: str,
        scope: tuple[str, str, str],
        connector: str,
        limit: int,
        now: datetime,
        fresh_only: bool,
        request_id: int | None = None,
    ) -> list[PlannedSend]:
        """Up to `limit` due planned rows of one connector, earliest due first (the
        `ix_sends_due` index walks exactly those), stamped with `request_id` when given."""
        if limit <= 0:
            return []
        mark = self._mark
        activation, partition_key, step = scope
        fresh = " AND request_id IS NULL" if fresh_only else ""
        if self.dialect == "postgresql":
            order, lock = "not_before NULLS FIRST", " FOR UPDATE SKIP LOCKED"
        else:
            order, lock = "not_before", ""
        select = (
            f"SELECT id FROM sends WHERE activation = {mark} AND partition_key = {mark} "
            f"AND state = '{PLANNED}' AND step = {mark} AND connector = {mark}{fresh} "
            f"AND (not_before IS NULL OR not_before <= {mark}) "
            # (A closed window's row the cancel before skipped: locked then on PostgreSQL.)
            f"AND (window_until IS NULL OR window_until > {mark}) ORDER BY {order} "
            f"LIMIT {mark}{lock}"
        )
        stamp = db_time(now, self.dialect)
        args = (activation, partition_key, step, connector, stamp, stamp, limit)
        return self._claim_where(con, worker_id, select, args, now, request_id)

    def _claim_where(
        self,
        con: sa.Connection,
        worker_id: str,
        select: str,
        args: tuple[Any, ...],
        now: datetime,
        request_id: int | None = None,
    ) -> list[PlannedSend]:
        """planned -> in_flight for the rows `select` picks, returned (one statement); with
        `request_id`, the rows become that request's (`_EACH_ITS_OWN`: each row a request of
        its own, numbered by the database)."""
        mark = self._mark
        request: tuple[int, ...] = ()
        if request_id is None:
            stamp_request = ""
        elif request_id == _EACH_ITS_OWN:
            stamp_request = f", request_id = {_RANDOM_REQUEST_ID[self.dialect]}"
        else:
            stamp_request, request = f", request_id = {mark}", (request_id,)
        columns = (
            "id, idempotency_key, channel, connector, recipient, message, attempts, "
            "customer_id, request_id, purpose"
        )
        stamp = db_time(now, self.dialect)
        # The row's send window, only once it has closed (else null: nothing to parse).
        closed = (
            "CASE WHEN {t}send_until <= %s THEN {t}send_until END, "
            "CASE WHEN {t}send_until <= %s THEN {t}reopens_at END"
        ).replace("%s", mark)
        if self.dialect == "postgresql":
            returning = ", ".join(f"sends.{c.strip()}" for c in columns.split(","))
            sql = (
                f"UPDATE sends SET state = '{IN_FLIGHT}', claimed_by = {mark}, "
                f"attempts = sends.attempts + 1, updated_at = {mark}{stamp_request} "
                f"FROM ({select}) AS due "
                f"WHERE sends.id = due.id RETURNING {returning}, {closed.format(t='sends.')}"
            )
        else:
            sql = (
                f"UPDATE sends SET state = '{IN_FLIGHT}', claimed_by = {mark}, "
                f"attempts = attempts + 1, updated_at = {mark}{stamp_request} "
                f"WHERE id IN ({select}) "
                f"RETURNING {columns}, {closed.format(t='')}"
            )
        rows = driver_rows(con, sql, (worker_id, stamp, *request, *args, stamp, stamp))
        claimed = []
        for r in rows:
            window = None if r[10] is None or r[11] is None else (as_time(r[10]), as_time(r[11]))
            claimed.append(
                PlannedSend(
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    r[4],
                    json_codec.loads(r[5]),
                    r[6],
                    r[7],
                    r[8],
                    r[9],
                    reopens_at=None if window is None else quiet_hours_end(*window, now),
                )
            )
        claimed.sort(key=lambda r: r.id)
        return claimed

    def quiet_windows(self, ids: Sequence[int]) -> list[tuple[datetime, datetime]]:
        """The planned quiet hours (`send_until`, `reopens_at`) of these rows, where known."""
        with self.engine.connect() as con:
            rows = driver_rows(
                con,
                f"SELECT send_until, reopens_at FROM sends WHERE id IN ({self._marks(len(ids))}) "
                "AND send_until IS NOT NULL AND reopens_at IS NOT NULL",
                tuple(ids),
            )
        return [(as_time(s), as_time(r)) for s, r in rows]

    def settle(self, worker_id: str, settlements: Iterable[Settlement]) -> None:
        """Write what became of claimed rows, in one transaction: terminal states (a late
        answer may also correct a row another run recovered as `unknown`), and rows back to
        `planned` (due again at their `not_before`) that the provider did not take. Rows the
        worker no longer holds are left alone."""
        now = db_time(utc_now(), self.dialect)
        final, retry, unsent, deferred = [], [], [], []
        for s in settlements:
            message = (s.error_message or "")[:500] or None
            if s.state == PLANNED:
                due = db_time(s.not_before, self.dialect) if s.not_before else None
                if s.deferred:
                    keep = 1 if s.uncertain else 0
                    deferred.append((due, message, now, keep, s.row_id, worker_id))
                elif s.unsent:
                    unsent.append((due, s.error_code, message, now, s.row_id, worker_id))
                else:
                    keep = 1 if s.uncertain else 0
                    retry.append((due, s.error_code, message, now, keep, s.row_id, worker_id))
            else:
                sent_at = now if s.state == SENT else None
                row = (
                    s.state,
                    s.provider_message_id,
                    s.error_code,
                    message,
                    (s.provider_status or "")[:40] or None,
                    now,
                    sent_at,
                )
                final.append((*row, s.row_id, worker_id))
        for params in (final, retry, unsent, deferred):  # one lock order for every writer: by id
            params.sort(key=lambda p: p[-2])
        mark = self._mark
        held = f"WHERE id = {mark} AND claimed_by = {mark}"
        with self.engine.begin() as con:
            self._bound_idle(con, worker_id)
            if final and self.dialect == "sqlite":
                # Many rows a statement (see `plan`): about half the cost a row.
                step = _sqlite_rows_per_statement(con, len(_SETTLE_FIELDS))
                for start in range(0, len(final), step):
                    chunk = final[start : start + step]
                    con.exec_driver_sql(_sqlite_settle(len(chunk)), tuple(chain(*chunk)))
            elif final:
                con.exec_driver_sql(
                    f"UPDATE sends SET state = {mark}, provider_message_id = {mark}, "
                    f"error_code = {mark}, error_message = {mark}, provider_status = {mark}, "
                    f"updated_at = {mark}, sent_at = {mark} {held} "
                    f"AND state IN ('{IN_FLIGHT}', '{UNKNOWN}')",
                    final,
                )
            if retry:
                # The provider did not take it: due again at `not_before`, with any request
                # it went in forgotten (a new one may be made), unless the answer was
                # uncertain. Also from `unknown`: a run that took this worker for dead may
                # have recovered it, but this answer says it never reached the provider.
                con.exec_driver_sql(
                    f"UPDATE sends SET state = '{PLANNED}', not_before = {mark}, "
                    f"error_code = {mark}, error_message = {mark}, updated_at = {mark}, "
                    f"request_id = CASE WHEN {mark} = 1 THEN request_id ELSE NULL END, "
                    f"claimed_by = NULL {held} AND state IN ('{IN_FLIGHT}', '{UNKNOWN}')",
                    retry,
                )
            if unsent:
                con.exec_driver_sql(
                    f"UPDATE sends SET state = '{PLANNED}', not_before = COALESCE({mark}, "
                    f"not_before), error_code = {mark}, error_message = {mark}, "
                    f"updated_at = {mark}, claimed_by = NULL, "
                    f"attempts = attempts - 1 {held} AND state IN ('{IN_FLIGHT}', '{UNKNOWN}')",
                    unsent,
                )
            if deferred:
                # Out of the fresh request it was claimed in (its companions go without it; it
                # goes in a request of its own making once its quiet hours end), or, from a
                # request the provider may hold, with it: the request waits whole.
                con.exec_driver_sql(
                    f"UPDATE sends SET state = '{PLANNED}', not_before = {mark}, "
                    f"error_message = {mark}, updated_at = {mark}, claimed_by = NULL, "
                    f"request_id = CASE WHEN {mark} = 1 THEN request_id ELSE NULL END, "
                    f"attempts = attempts - 1 {held} AND state = '{IN_FLIGHT}'",
                    deferred,
                )
            back = [p[-2] for p in (*retry, *unsent, *deferred)]
            for back_ids in chunks(back, 5000):  # a STOP while they were on the wire holds
                cancel_opted_out(
                    con,
                    sends.c.id.in_(back_ids),
                    "the customer opted out while it was being sent; not tried again",
                )

    def recover_interrupted(
        self, activation: str, partition_key: str, idempotent: Iterable[str] = ()
    ) -> int:
        """Rows left in flight by workers that are gone: the provider may have accepted them.

        A worker is gone when it stopped, when its lease expired (no heartbeat for
        `lease_seconds`: a stalled or partitioned process), or when it ran on this host and
        its process no longer exists (killed); rows in flight with no worker at all (written
        by an earlier version) count as gone too. A living worker's rows are never touched.

        Through a connector whose provider de-duplicates on our key (`idempotent`), they go
        back to `planned` and are sent again with the same key; through any other they become
        `unknown` and are never resent (a resend could message the customer twice), unless
        the activation opts in with `resend_unknown` (`replan_unknown`).
        """
        retryable = list(idempotent)
        now = utc_now()
        in_partition = (
            sends.c.activation == activation,
            sends.c.partition_key == partition_key,
            sends.c.state == IN_FLIGHT,
        )
        with self.engine.begin() as con:
            self._lock_for_write(con)
            holders = set(
                con.execute(sa.select(sends.c.claimed_by).distinct().where(*in_partition))
                .scalars()
                .all()
            )
            # Workers of the partition still marked alive, rows or not: one killed between
            # two claims holds nothing, and is marked expired here all the same.
            alive = con.execute(
                sa.select(delivery_workers.c.id).where(
                    delivery_workers.c.activation == activation,
                    delivery_workers.c.partition_key == partition_key,
                    delivery_workers.c.state == WORKER_ALIVE,
                )
            ).scalars()
            living = {h for h in holders if h is not None} | set(alive)
            gone = self._expire_gone_workers(con, sorted(living), now)
            if not holders:
                return 0
            if None in holders:
                gone.add(None)
            if not gone:
                return 0
            named = [g for g in gone if g is not None]
            by_gone = sa.or_(
                sends.c.claimed_by.in_(named) if named else sa.false(),
                sends.c.claimed_by.is_(None) if None in gone else sa.false(),
            )
            replanned = 0
            if retryable:
                replanned = (
                    con.execute(
                        sa.update(sends)
                        .where(*in_partition, by_gone, sends.c.connector.in_(retryable))
                        .values(state=PLANNED, claimed_by=None, updated_at=now)
                    ).rowcount
                    or 0
                )
            result = con.execute(
                sa.update(sends)
                .where(*in_partition, by_gone)
                .values(
                    state=UNKNOWN,
                    error_message="its worker stopped while the request was in flight",
                    updated_at=now,
                )
            )
            return replanned + (result.rowcount or 0)

    def _expire_gone_workers(
        self, con: sa.Connection, worker_ids: Sequence[str], now: datetime
    ) -> set[str | None]:
        """Of these workers, the ones that are gone, marked `expired` (so a stalled one that
        wakes up finds it lost its lease); ids with no worker row count as gone."""
        workers = {
            w.id: w
            for w in con.execute(
                sa.select(delivery_workers).where(delivery_workers.c.id.in_(list(worker_ids)))
            )
        }
        gone: set[str | None] = {w for w in worker_ids if w not in workers}
        for worker in workers.values():
            if worker.state != WORKER_ALIVE:
                gone.add(worker.id)
                continue
            if worker_process_gone(worker):
                condition = delivery_workers.c.state == WORKER_ALIVE
            else:
                # Only if the lease is still lapsed as this statement runs: a heartbeat that
                # wins the race keeps the worker alive.
                condition = sa.and_(
                    delivery_workers.c.state == WORKER_ALIVE,
                    delivery_workers.c.heartbeat_at <= self._lapsed(worker.lease_seconds, now),
                )
            expired = con.execute(
                sa.update(delivery_workers)
                .where(delivery_workers.c.id == worker.id, condition)
                .values(state=WORKER_EXPIRED)
            )
            if expired.rowcount:
                gone.add(worker.id)
        return gone

    def revive_given_up(
        self, activation: str, partition_key: str, step: str, max_delay: timedelta
    ) -> int:
        """Dead letters an earlier version gave up on after its retries (429, 5xx, no
        connection: never accepted by the provider) go back to `planned` while they are within
        the send deadline: nobody who could still be reached is given up on. Dead letters of
        the deadline itself stay."""
        now = utc_now()
        with self.engine.begin() as con:
            result = con.execute(
                sa.update(sends)
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.step == step,
                    sends.c.state == DEAD_LETTER,
                    sa.or_(sends.c.error_code.is_(None), sends.c.error_code != DEADLINE_PASSED),
                    sa.func.coalesce(sends.c.not_before, sends.c.planned_at) >= now - max_delay,
                )
                .values(state=PLANNED, claimed_by=None, request_id=None, updated_at=now)
            )
        return result.rowcount or 0

    def expire_overdue(
        self, activation: str, partition_key: str, step: str, max_delay: timedelta
    ) -> int:
        """Planned rows of a step due for longer than `max_delay` (a win-back that could not
        leave within a day is pointless) end `dead_letter`, reason `send_deadline_passed`."""
        now = utc_now()
        cutoff = now - max_delay
        due_since = sa.func.coalesce(sends.c.not_before, sends.c.planned_at)
        # A request that must go out again whole (`request_id`) expires whole, or not at all:
        # a smaller one would carry another key and reach its other recipients again.
        member = sends.alias("member")
        member_not_late = (
            sa.select(member.c.id)
            .where(
                member.c.request_id == sends.c.request_id,
                member.c.state == PLANNED,
                sa.func.coalesce(member.c.not_before, member.c.planned_at) >= cutoff,
            )
            .exists()
        )
        with self.engine.begin() as con:
            result = con.execute(
                sa.update(sends)
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.step == step,
                    sends.c.state == PLANNED,
                    due_since < cutoff,
                    sa.or_(sends.c.request_id.is_(None), ~member_not_late),
                )
                .values(
                    state=DEAD_LETTER,
                    error_code=DEADLINE_PASSED,
                    error_message=f"not sent within the send deadline ({max_delay})",
                    updated_at=now,
                )
            )
        return result.rowcount or 0

    def replan_unknown(self, activation: str, partition_key: str) -> int:
        """`unknown` rows of this partition back to `planned`, to be sent again.

        Only for activations that opted in (`delivery.resend_unknown`): the provider may have
        accepted them, so a customer may get the message twice. Their history keeps the
        `unknown` state they left.
        """
        with self.engine.begin() as con:
            result = con.execute(
                sa.update(sends)
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.state == UNKNOWN,
                )
                .values(state=PLANNED, updated_at=utc_now())
            )
        return result.rowcount or 0

    def mark_in_flight(self, ids: Sequence[int], requests: Sequence[tuple[int, int]] = ()) -> None:
        """planned -> in_flight, in one transaction, just before the requests go out.

        `requests` holds (row id, request id) of rows sent through a provider that
        de-duplicates whole requests: the request id is kept, so a crash-recovered row goes
        out again in the same request (`PlannedSend.request_id`).
        """
        now = utc_now()
        with self.engine.begin() as con:
            for chunk in chunks(ids, 5000):
                con.execute(
                    sa.update(sends)
                    .where(sends.c.id.in_(chunk), sends.c.state == PLANNED)
                    .values(state=IN_FLIGHT, attempts=sends.c.attempts + 1, updated_at=now)
                )
            if requests:
                mark = self._mark
                con.exec_driver_sql(
                    f"UPDATE sends SET state = '{IN_FLIGHT}', attempts = attempts + 1, "
                    f"request_id = {mark}, updated_at = {mark} "
                    f"WHERE id = {mark} AND state = '{PLANNED}'",
                    [(request, db_time(now, self.dialect), row) for row, request in requests],
                )

    def record(self, results: Iterable[tuple[int, SendResult, int]]) -> None:
        """Write final outcomes (row id, result, attempts made) in bulk; only from in_flight.
        For rows marked by `mark_in_flight` (tests, tools); the delivery engine claims and
        `settle`s instead.

        One driver-level `executemany` of plain tuples (SQLAlchemy's per-row parameter
        handling cost more than the database's own work).
        """
        now = utc_now()
        stamp = db_time(now, self.dialect)
        params = [
            (
                _state_for(result.outcome),
                attempts,
                result.provider_message_id,
                result.error_code,
                (result.error_message or "")[:500] or None,
                stamp,
                stamp if result.outcome == Outcome.SENT else None,
                row_id,
            )
            for row_id, result, attempts in results
        ]
        if not params:
            return
        mark = self._mark
        sql = (
            f"UPDATE sends SET state = {mark}, attempts = {mark}, provider_message_id = {mark}, "
            f"error_code = {mark}, error_message = {mark}, updated_at = {mark}, "
            f"sent_at = {mark} WHERE id = {mark} AND state = '{IN_FLIGHT}'"
        )
        with self.engine.begin() as con:
            con.exec_driver_sql(sql, params)

    def cancel_unchosen(
        self,
        activation: str,
        partition_key: str,
        chosen_keys: pl.Series | Sequence[str],
        reason: str,
        step: str | None = None,
        excluded: pl.LazyFrame | None = None,
        absent: str | None = None,
    ) -> int:
        """Planned rows of this partition (of `step`, if given) that the latest decisions no
        longer choose (consent withdrawn since a deferral, say) end `cancelled`: they must not
        go out. Each takes its reason code as `error_code`: the policy's, from `excluded`
        (customer_id, reason: read only when some row is no longer chosen), else `absent` (no
        decision about it any more). A row of a request that must go out again whole
        (`request_id`: its provider may already have it, and de-duplicates the request on its
        key) is left in it: taken out, the request would carry another key and reach its
        other recipients twice.

        Compared in polars, a slice of the partition at a time: right after a plan its planned
        rows are every chosen one, a million at 10M customers."""
        keep = pl.DataFrame(
            {
                "idempotency_key": chosen_keys
                if isinstance(chosen_keys, pl.Series)
                else pl.Series(list(chosen_keys), dtype=pl.String)
            }
        ).cast(pl.String)
        mark = self._mark
        of_this_step = "" if step is None else f" AND step = {mark}"
        gone_parts: list[pl.DataFrame] = []
        with self.engine.begin() as con:
            sql = (
                f"SELECT id, idempotency_key, customer_id FROM sends WHERE activation = {mark} "
                f"AND partition_key = {mark} AND state = '{PLANNED}' "
                f"AND request_id IS NULL{of_this_step}"
            )
            params = (activation, partition_key, *(() if step is None else (step,)))
            for rows in driver_slices(con, sql, params, _UNCHOSEN_SLICE):
                planned = pl.DataFrame(
                    rows,
                    schema={"id": pl.Int64, "idempotency_key": pl.String, "customer_id": pl.String},
                    orient="row",
                )
                gone_parts.append(planned.join(keep, on="idempotency_key", how="anti"))
            gone = pl.concat(gone_parts).select("id", "customer_id") if gone_parts else None
            if gone is None or gone.is_empty():
                return 0
            if excluded is not None:
                why = excluded.join(gone.lazy().select("customer_id"), on="customer_id", how="semi")
                gone = gone.join(
                    why.collect().unique("customer_id", keep="first", maintain_order=True),
                    on="customer_id",
                    how="left",
                )
            else:
                gone = gone.with_columns(reason=pl.lit(None, pl.String))
            gone = gone.with_columns(pl.col("reason").fill_null(pl.lit(absent, pl.String)))
            gone_by_code = {
                code: ids for code, ids in gone.group_by("reason").agg("id").iter_rows()
            }
            for code, ids in gone_by_code.items():
                for chunk in chunks(ids, 5000):
                    con.execute(
                        sa.update(sends)
                        .where(sends.c.id.in_(chunk), sends.c.state == PLANNED)
                        .values(
                            state=CANCELLED,
                            error_code=code[:40] if code else None,
                            error_message=reason[:500],
                            updated_at=utc_now(),
                        )
                    )
        return gone.height


# Decisions `plan` turns into rows at a time.
_PLAN_BUILD_SLICE = 100_000

# Planned rows `cancel_unchosen` reads at a time.
_UNCHOSEN_SLICE = 50_000


def _state_for(outcome: Outcome) -> str:
    """The state `record` writes for an outcome. RETRY here means "given up" (`dead_letter`):
    only tools and tests record that; the delivery engine puts a retryable row back to
    `planned` (`settle`), and dead-letters only past the send deadline."""
    return {
        Outcome.SENT: SENT,
        Outcome.FAILED: FAILED,
        Outcome.UNKNOWN: UNKNOWN,
        Outcome.RETRY: DEAD_LETTER,
    }[outcome]


_TIMES = frozenset({"not_before", "send_until", "reopens_at", "window_until", "planned_at"})
_PARTITION_COLUMNS = (
    "idempotency_key",
    "state",
    "connector",
    "error_code",
    "not_before",
    "send_until",
    "reopens_at",
    "planned_at",
    "claimed_by",
)
_PLAN_ROWS_PER_BATCH = 10_000  # rows handed to the driver at once (PostgreSQL's executemany)
_COPY_FROM = 1_000  # PostgreSQL plans of at least this many rows go through COPY
_PLAN_COLUMNS = (
    "idempotency_key",
    "activation",
    "partition_key",
    "customer_id",
    "step",
    "channel",
    "purpose",
    "connector",
    "recipient",
    "message",
    "state",
    "attempts",
    "run_id",
    "not_before",
    "send_until",
    "reopens_at",
    "window_until",
    "planned_at",
    "updated_at",
    "error_code",
    "fallback_of",
    "fallback_reason",
    "variant",
    "country",
)


def _plan_rows(
    activation: str,
    partition_key: str,
    chosen: pl.DataFrame,
    run_id: str | None,
    purpose: str,
    dialect: str,
    planned_at: datetime,
) -> pl.DataFrame:
    """The `sends` rows of `chosen` decisions (columns `_PLAN_COLUMNS`), built in polars.

    The message is JSON: `{"template", "language", "parameters"[, "names"]}` for a template
    (parameters from the `variables` list, names from `variable_names` when present: the
    columns they came from), `{"template", "language", "body"}` for a KakaoTalk AlimTalk
    message (its template code and registered text filled in), else `{"body"}`. Times are
    UTC; SQLite gets them as the text SQLAlchemy writes (`YYYY-MM-DD HH:MM:SS.ffffff`), so
    both paths read back alike.

    A `holdout` decision is written `holdout`, an `exclude` one (a refused fallback)
    `excluded` with its reason code as `error_code`; `fallback_of` and `fallback_reason` are
    copied when the frame has them (fallback rows), `variant` too (an experiment's).
    """
    customer = pl.col("customer_id").cast(pl.String)
    parameters = pl.coalesce(pl.col("variables"), pl.lit([], dtype=pl.List(pl.String)))
    names = [pl.col("variable_names").alias("names")] if "variable_names" in chosen.columns else []
    template = pl.struct(
        pl.col("template_name").cast(pl.String).alias("template"),
        pl.col("template_language").cast(pl.String).alias("language"),
        parameters.alias("parameters"),
        *names,
    ).struct.json_encode()
    # A KakaoTalk AlimTalk message is both: its template code and the registered text filled in.
    template_and_body = pl.struct(
        pl.col("template_name").cast(pl.String).alias("template"),
        pl.col("template_language").cast(pl.String).alias("language"),
        pl.col("body").cast(pl.String),
    ).struct.json_encode()
    body = pl.struct(pl.col("body").cast(pl.String)).struct.json_encode()
    decision = pl.col("decision").cast(pl.String) if "decision" in chosen.columns else pl.lit("")
    excluded = decision == "exclude"

    def optional(column: str, dtype: pl.DataType) -> pl.Expr:
        present = column in chosen.columns
        return (pl.col(column) if present else pl.lit(None)).cast(dtype).alias(column)

    def moment(column: str) -> pl.Expr:
        utc = pl.Datetime("us", "UTC")
        return pl.col(column).cast(utc) if column in chosen.columns else pl.lit(None, dtype=utc)

    now = pl.lit(planned_at, dtype=pl.Datetime("us", "UTC"))

    def stamp(value: pl.Expr) -> pl.Expr:
        return value.dt.strftime("%Y-%m-%d %H:%M:%S.%6f") if dialect == "sqlite" else value

    return chosen.select(
        idempotency_key_expr(
            activation, partition_key, customer, pl.col("step").cast(pl.String)
        ).alias("idempotency_key"),
        pl.lit(activation).alias("activation"),
        pl.lit(partition_key).alias("partition_key"),
        customer.alias("customer_id"),
        pl.col("step").cast(pl.String),
        pl.col("channel").cast(pl.String),
        pl.lit(purpose).alias("purpose"),
        pl.col("connector").cast(pl.String),
        # A refused fallback may have no usable address; the column is not nullable.
        pl.col("recipient" if "recipient" in chosen.columns else "phone_e164")
        .fill_null("")
        .alias("recipient"),
        pl.when(pl.col("template_name").is_not_null() & pl.col("body").is_not_null())
        .then(template_and_body)
        .when(pl.col("template_name").is_not_null())
        .then(template)
        .otherwise(body)
        .alias("message"),
        pl.when(decision == "holdout")
        .then(pl.lit(HOLDOUT))
        .when(excluded)
        .then(pl.lit(EXCLUDED))
        .otherwise(pl.lit(PLANNED))
        .alias("state"),
        pl.lit(0).alias("attempts"),
        pl.lit(run_id, dtype=pl.String).alias("run_id"),
        stamp(moment("not_before")).alias("not_before"),
        stamp(moment("send_until")).alias("send_until"),
        stamp(moment("reopens_at")).alias("reopens_at"),
        stamp(moment("window_until")).alias("window_until"),
        stamp(now).alias("planned_at"),
        stamp(now).alias("updated_at"),
        pl.when(excluded).then(pl.col("reason").cast(pl.String)).alias("error_code")
        if "reason" in chosen.columns
        else pl.lit(None, dtype=pl.String).alias("error_code"),
        optional("fallback_of", pl.Int64()),
        optional("fallback_reason", pl.String()),
        optional("variant", pl.String()),
        optional("country", pl.String()),
    )


def _copy_plan(con: sa.Connection, rows: pl.DataFrame) -> None:
    """PostgreSQL: `rows` COPYed (CSV written by polars, a slice at a time) into a temporary
    table dropped at commit, then inserted into `sends` in key order in one statement, keys
    already present skipped as `_insert_sql` skips them. COPY's parsing is several times
    cheaper per row than an `executemany` of bound inserts; the insert's triggers (history)
    run as for any insert."""
    columns = ", ".join(_PLAN_COLUMNS)
    dbapi_error = con.dialect.loaded_dbapi.Error
    cursor = cast(Any, con.connection.driver_connection).cursor()  # psycopg 3's `copy`
    try:
        cursor.execute(
            f"CREATE TEMPORARY TABLE plan_rows ON COMMIT DROP AS SELECT {columns} FROM sends "
            "WITH NO DATA"
        )
        with cursor.copy(f"COPY plan_rows ({columns}) FROM STDIN (FORMAT csv)") as copy:
            for chunk in rows.iter_slices(_PLAN_ROWS_PER_BATCH):
                # Nulls unquoted and empty, empty text quoted: COPY's CSV tells them apart.
                copy.write(
                    chunk.write_csv(
                        include_header=False, datetime_format="%Y-%m-%d %H:%M:%S.%6f%:z"
                    )
                )
        cursor.execute(
            f"INSERT INTO sends ({columns}) SELECT {columns} FROM plan_rows "
            "ORDER BY idempotency_key ON CONFLICT (idempotency_key) DO NOTHING"
        )
    except dbapi_error as err:  # raised as SQLAlchemy raises the other statements' errors
        if con.dialect.is_disconnect(err, con.connection.dbapi_connection, cursor):
            con.invalidate(err)
        raise sa.exc.DBAPIError.instance("COPY plan_rows", (), err, dbapi_error) from err
    finally:
        with contextlib.suppress(Exception):
            cursor.close()


_WINDOW_CLOSED_REQUEST = (
    "a customer in its request reached the end of their 24-hour WhatsApp window: the request, "
    "which goes out again whole or not at all, is not sent again"
)
_WINDOW_CLOSED = (
    "the customer's 24-hour care window closed before it went; a free-form WhatsApp message "
    "may not go after it: not sent"
)

# `request_id` for a claim whose rows are each a request of its own: a random 62-bit number
# per row (never a row's id: see `_claim_fresh`), drawn by the database.
_EACH_ITS_OWN = -1
_RANDOM_REQUEST_ID = {
    "sqlite": "(random() & 4611686018427387903)",
    "postgresql": "floor(random() * 4611686018427387903)::bigint",
}


def _sqlite_rows_per_statement(con: sa.Connection, columns: int) -> int:
    """Rows of `columns` values one SQLite statement may bind: this build's variable limit
    (SQLITE_LIMIT_VARIABLE_NUMBER: 32,766 by default since 3.32, 999 before), at most 1,000
    rows so each statement's text stays small."""
    driver = con.connection.driver_connection
    limit = driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if driver else 999
    return max(1, min(1000, limit // columns))


@functools.lru_cache(maxsize=16)
def _sqlite_insert(count: int) -> str:
    """`INSERT … VALUES (…), (…)` of `count` rows of `_PLAN_COLUMNS`; known keys skipped."""
    row = "(" + ", ".join("?" * len(_PLAN_COLUMNS)) + ")"
    return (
        f"INSERT INTO sends ({', '.join(_PLAN_COLUMNS)}) VALUES "
        + ", ".join([row] * count)
        + " ON CONFLICT (idempotency_key) DO NOTHING"
    )


_SETTLE_FIELDS = ("state", "pmid", "code", "msg", "pstatus", "at", "sent", "id", "worker")


@functools.lru_cache(maxsize=64)
def _sqlite_settle(count: int) -> str:
    """`settle`'s terminal rows, `count` of its parameter tuples (state, provider id, error
    code, message, provider status, updated_at, sent_at, row id, worker), in one UPDATE.
    The unary `+` keeps the planner on the primary key: were the index on `state` usable, it
    would walk every in-flight row once per settled row."""
    row = "(" + ", ".join("?" * len(_SETTLE_FIELDS)) + ")"
    named = ", ".join(f"column{i + 1} AS {name}" for i, name in enumerate(_SETTLE_FIELDS))
    return (
        "UPDATE sends SET state = s.state, provider_message_id = s.pmid, error_code = s.code, "
        "error_message = s.msg, provider_status = s.pstatus, updated_at = s.at, "
        f"sent_at = s.sent FROM (SELECT {named} FROM (VALUES {', '.join([row] * count)})) AS s "
        "WHERE sends.id = s.id AND +sends.claimed_by = s.worker "
        f"AND +sends.state IN ('{IN_FLIGHT}', '{UNKNOWN}')"
    )
