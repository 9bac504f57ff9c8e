"""The ledger: the durable record of every planned and attempted send.

It is the source of truth for "never twice, never lost". Each send has an idempotency key made
of activation, partition, customer and step, unique in the table; planned rows are written in
bulk before the first request, and every state change is a bulk UPDATE guarded by the state it
leaves, so a re-run, a retry or a backfill can never plan or send the same key twice.

States: planned -> in_flight -> sent | failed | unknown | dead_letter; a planned row may carry
`not_before` (quiet hours: deferred, sent by a later run) or end `cancelled` (a later run's
policy no longer chooses it); a holdout row is written as `holdout` and never sent.

Steps: a customer's first message of a partition is step `initial`; where the channel plan has
a fallback, a second row, step `fallback`, links to it (`fallback_of`) with the reason it was
due (`fallback_reason`); a fallback the policy refuses is written `excluded` with the reason
code in `error_code`, so it is decided once.
A row is sent only by the delivery worker that claimed it (`claim`: planned -> in_flight for
that worker, one statement); workers hold a lease (`delivery_workers`). A row left `in_flight`
by a worker that is gone was interrupted mid-request: the provider may have accepted it, so it
becomes `unknown` and is not resent (Meta, Twilio, Infobip and Vonage take no idempotency
key), unless its provider de-duplicates on our key. A living worker's rows are never touched.

SQLite (WAL) is the embedded default; PostgreSQL in production (any SQLAlchemy URL).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import sqlalchemy as sa

from cdp_activation.contracts import Outcome, SendResult, send_id_of
from cdp_activation.db import as_utc, open_engine, read_frame
from cdp_activation.errors import CdpError
from cdp_activation.masking import masked
from cdp_activation.processes import host_id, process_gone
from cdp_activation.settings import SettingsError
from cdp_activation.statuses import STATUS_RANK, StatusEvent, connector_of
from cdp_activation.vocabulary import (  # noqa: F401  # re-exported: the ledger's words
    CANCELLED,
    DEAD_LETTER,
    EXCLUDED,
    FAILED,
    FALLBACK_STEP,
    HOLDOUT,
    IN_FLIGHT,
    INITIAL_STEP,
    PLANNED,
    SENT,
    TERMINAL_STATES,
    UNKNOWN,
    idempotency_key,
    idempotency_key_expr,
)

log = logging.getLogger(__name__)

# Why a fallback was due (`fallback_reason`): the first message failed with a code meaning the
# customer cannot receive it on that channel; it was not delivered within the plan's window;
# it was delivered but not read within the plan's window (only where the plan asks for it).
PRIMARY_UNREACHABLE = "primary_unreachable"
PRIMARY_NOT_DELIVERED = "primary_not_delivered"
PRIMARY_NOT_READ = "primary_not_read"

metadata = sa.MetaData()

sends = sa.Table(
    "sends",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("idempotency_key", sa.String(300), nullable=False, unique=True),
    sa.Column("activation", sa.String(120), nullable=False),
    sa.Column("partition_key", sa.String(40), nullable=False),
    sa.Column("customer_id", sa.String(120), nullable=False),
    sa.Column("step", sa.String(40), nullable=False),
    sa.Column("channel", sa.String(20), nullable=False),
    sa.Column("purpose", sa.String(20), nullable=False, default="marketing"),
    sa.Column("connector", sa.String(40), nullable=False),
    sa.Column("recipient", sa.String(40), nullable=False),
    sa.Column("message", sa.Text, nullable=False),  # JSON: template + variables, or body
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("provider_message_id", sa.String(200)),
    sa.Column("error_code", sa.String(40)),
    sa.Column("error_message", sa.String(500)),
    # The provider's own word on an accepted message, where it gives one (Meta's
    # `message_status`: accepted, held_for_quality_assessment, paused).
    sa.Column("provider_status", sa.String(40)),
    sa.Column("run_id", sa.String(64)),
    sa.Column("not_before", sa.DateTime(timezone=True)),  # deferred (quiet hours) until then
    sa.Column("sent_at", sa.DateTime(timezone=True)),  # when the provider accepted it
    sa.Column("planned_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # Through a provider that de-duplicates a whole request on one key (LINE's retry key, the
    # webhook's Idempotency-Key): the number of the request this row last went in (random,
    # see `_claim_request`), kept while the provider may have that request, so the row goes
    # out again with exactly the same companions and therefore the same key. Null for
    # one-recipient providers, unsent rows, and requests the provider surely did not take.
    sa.Column("request_id", sa.BigInteger().with_variant(sa.Integer, "sqlite")),
    # What the provider reported after accepting it (status webhooks): sent, delivered, read
    # or failed, only ever moving forward (`statuses.STATUS_RANK`), with the latest report's time.
    sa.Column("delivery_status", sa.String(20)),
    sa.Column("delivery_status_at", sa.DateTime(timezone=True)),
    sa.Column("delivery_error_code", sa.String(40)),
    # A fallback send: the id of the send it stands in for, and why it was due.
    sa.Column("fallback_of", sa.BigInteger().with_variant(sa.Integer, "sqlite")),
    sa.Column("fallback_reason", sa.String(40)),
    # The delivery worker (`delivery_workers.id`) that claimed it: only that worker sends it,
    # and only while that worker's lease lives (see `claim`, `recover_interrupted`).
    sa.Column("claimed_by", sa.String(64)),
    sa.Index("ix_sends_activation_partition_state", "activation", "partition_key", "state"),
    sa.Index("ix_sends_state_sent_at", "state", "sent_at"),
    sa.Index("ix_sends_provider_message_id", "provider_message_id"),
    sa.Index("ix_sends_updated_at", "updated_at"),  # the send log's incremental export
    sa.Index("ix_sends_fallback_of", "fallback_of"),
)

# Status webhooks as they arrived, once each: `event_key` identifies a report (provider, its
# message id, the status and the provider's own time or event id), so a duplicate delivery of
# the same webhook is ignored. Written before the receiver answers 200, in the same
# transaction as the statuses they move forward.
status_events = sa.Table(
    "status_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("event_key", sa.String(300), nullable=False, unique=True),
    sa.Column("provider", sa.String(40), nullable=False),
    sa.Column("provider_message_id", sa.String(200)),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("error_code", sa.String(40)),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("payload", sa.Text),  # the event as the provider sent it (JSON), for audits
    # Whether it has found its send: a report may arrive before the send's answer is recorded.
    sa.Column("applied", sa.Boolean, nullable=False, default=False),
    # Why a stored report was left unapplied for good: `older_than_send` (its time is before
    # the send was planned: a replay, or a report of another ledger's message).
    sa.Column("ignored", sa.String(40)),
    # Where it came from: null for a webhook, the status source's name for events read from
    # the warehouse (`status_sources.py`), whose newest `occurred_at` is that source's cursor.
    sa.Column("source", sa.String(80)),
    # The customer the report is about, where the provider's id covers a whole batch (a Braze
    # dispatch id): the report then moves only that customer's send.
    sa.Column("customer_id", sa.String(120)),
    # The send's reference the provider echoed (`connectors.base.send_reference`): reconciles
    # a send whose own answer was lost (`unknown`) with what the provider reports about it.
    sa.Column("reference", sa.String(40)),
    sa.Index("ix_status_events_applied_received", "applied", "received_at"),
    sa.Index("ix_status_events_source_occurred", "source", "occurred_at"),
)


# One row per state change of a send, written by the database itself (triggers on `sends`), so
# no code path can change a state without leaving its trace, in the same transaction.
send_events = sa.Table(
    "send_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("send_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
    sa.Column("from_state", sa.String(20)),  # null: the row was planned (inserted)
    sa.Column("to_state", sa.String(20), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("error_code", sa.String(40)),
    sa.Column("run_id", sa.String(64)),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_send_events_send_id", "send_id"),
)

# Every process that sends registers here and renews its lease (`heartbeat_at`) while it lives;
# the rows it claimed are recovered only once it is gone: stopped, its lease expired, or (on this
# host) its process no longer running. One small UPDATE renews the lease of all its rows.
delivery_workers = sa.Table(
    "delivery_workers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("run_id", sa.String(64)),
    sa.Column("activation", sa.String(120), nullable=False),
    sa.Column("partition_key", sa.String(40), nullable=False),
    sa.Column("step", sa.String(40), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("state", sa.String(20), nullable=False),  # alive | stopped | expired
    sa.Column("lease_seconds", sa.Float, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_delivery_workers_state", "state"),
)
WORKER_ALIVE, WORKER_STOPPED, WORKER_EXPIRED = "alive", "stopped", "expired"

# The newest word on each provider template (`template_states.py`): a status webhook (Meta's
# `message_template_status_update`) or a catalog sync. A template whose newest word is PAUSED
# or DISABLED is not sent: its rows stay planned until it is approved again.
template_states = sa.Table(
    "template_states",
    metadata,
    sa.Column("connector", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(512), primary_key=True),
    sa.Column("language", sa.String(20), primary_key=True),
    sa.Column("status", sa.String(40), nullable=False),
    sa.Column("reason", sa.String(300)),
    sa.Column("source", sa.String(20), nullable=False),  # webhook | catalog
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)

_EVENT_COLUMNS = "send_id, from_state, to_state, attempts, error_code, run_id, at"
_SQLITE_TRIGGERS = (
    f"""CREATE TRIGGER IF NOT EXISTS sends_planned AFTER INSERT ON sends BEGIN
        INSERT INTO send_events ({_EVENT_COLUMNS})
        VALUES (NEW.id, NULL, NEW.state, NEW.attempts, NEW.error_code, NEW.run_id,
                NEW.updated_at);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS sends_changed AFTER UPDATE OF state ON sends
    WHEN OLD.state IS NOT NEW.state BEGIN
        INSERT INTO send_events ({_EVENT_COLUMNS})
        VALUES (NEW.id, OLD.state, NEW.state, NEW.attempts, NEW.error_code, NEW.run_id,
                NEW.updated_at);
    END""",
)
_POSTGRES_TRIGGERS = (
    f"""CREATE OR REPLACE FUNCTION record_send_event() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'INSERT' OR OLD.state IS DISTINCT FROM NEW.state THEN
            INSERT INTO send_events ({_EVENT_COLUMNS})
            VALUES (NEW.id, CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.state END,
                    NEW.state, NEW.attempts, NEW.error_code, NEW.run_id, NEW.updated_at);
        END IF;
        RETURN NULL;
    END $$ LANGUAGE plpgsql""",
    "CREATE OR REPLACE TRIGGER sends_events AFTER INSERT OR UPDATE OF state ON sends "
    "FOR EACH ROW EXECUTE FUNCTION record_send_event()",
)


@dataclass(frozen=True)
class PlannedSend:
    """A row to send, as the delivery engine reads it back from the ledger."""

    id: int
    idempotency_key: str
    channel: str
    connector: str
    recipient: str
    message: dict[str, Any]
    attempts: int
    customer_id: str | None = None
    request_id: int | None = None  # the (grouped) request it goes in, when it has one
    purpose: str | None = None
    # Claimed as a request made before (a lost answer, a crash): the provider may have it,
    # so whatever the answer now, the row keeps its request (`Settlement.uncertain`).
    resent_request: bool = False


@dataclass(frozen=True)
class StatusWrite:
    received: int  # reports handed in
    duplicates: int  # already stored (or repeated in the same call): ignored
    advanced: int  # messages whose delivery_status moved forward
    reconciled: int = 0  # `unknown` sends a report proved accepted: now `sent`
    stale: int = 0  # reports older than their send: kept, flagged, never applied


@dataclass(frozen=True)
class PlanResult:
    planned: int  # new rows written by this call
    existing: dict[str, int]  # keys already in the ledger, by their current state


@dataclass(frozen=True)
class ClaimRequest:
    """Up to `limit` due rows of one connector for one request. `whole_requests`: the provider
    de-duplicates whole requests (`delivery.groups_requests`), so rows a crash left in a
    request are claimed together again, and fresh rows are stamped with their request's id."""

    connector: str
    limit: int
    whole_requests: bool = False


@dataclass(frozen=True)
class Settlement:
    """What became of one claimed row once its request was answered (`Ledger.settle`).

    `state` is terminal (sent, failed, unknown) or `planned`: a retryable answer (429, 5xx, a
    request that never left) puts the row back, due again at `not_before`; `unsent` means the
    request was never made (the step stopped first), so its attempt is given back.
    """

    row_id: int
    state: str
    provider_message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    not_before: datetime | None = None
    unsent: bool = False
    provider_status: str | None = None  # the provider's word on an accepted message
    # The provider may have taken the request (a lost answer, asked again through a provider
    # that de-duplicates on our key): the row keeps its request, to go out again exactly so.
    uncertain: bool = False


class LeaseLost(CdpError, RuntimeError):
    """This worker was taken for dead (its lease expired) and its rows were recovered by
    another process: it must stop claiming."""

    transient = True


# How far a provider's clock may be behind ours: a status report dated earlier than this
# before its send was planned cannot be about that send.
STATUS_CLOCK_SKEW = timedelta(minutes=10)
OLDER_THAN_SEND = "older_than_send"  # status_events.ignored

DEADLINE_PASSED = "send_deadline_passed"  # dead_letter reason: not sent within max_send_delay


def _now() -> datetime:
    return datetime.now(UTC)


class LedgerUnavailable(SettingsError):
    """The ledger cannot be opened or created where CDP_LEDGER_URL points: said in one line,
    naming the setting and what to check, before anything is planned or sent."""

    @classmethod
    def of(cls, url: str, err: BaseException) -> LedgerUnavailable:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        if isinstance(err, OSError) and err.filename:
            reason = f"{err.strerror or type(err).__name__}: {err.filename}"
        hint = (
            "the folder must exist or be creatable, and be writable, by this user"
            if url.startswith("sqlite")
            else "the database must answer and accept these credentials"
        )
        return cls(f"CDP_LEDGER_URL={masked(url)}: cannot open the ledger ({reason}); {hint}")


class Ledger:
    """SQLAlchemy Core access to the `sends` table; every write is a bulk statement."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = open_engine(url)
            if url not in _MIGRATED or not _has_sends(self.engine):
                self.migrate()
        except (sa.exc.OperationalError, OSError) as err:
            raise LedgerUnavailable.of(url, err) from None

    def migrate(self) -> None:
        """Create or upgrade the schema (tables, added columns, indexes, triggers). Done on a
        ledger's first opening in each process (or by `cdp-activation migrate`), not on every
        one: a sensor opening the ledger every minute takes no schema lock."""
        triggers = {"sqlite": _SQLITE_TRIGGERS, "postgresql": _POSTGRES_TRIGGERS}
        # One process at a time creates or upgrades the schema: runs and workers that start
        # together would otherwise race to create the same tables and triggers.
        with self.engine.begin() as con:
            _lock_schema(con)
            metadata.create_all(con)
            _add_missing_columns(con)
            if not _has_trigger(con):
                for statement in triggers.get(self.engine.dialect.name, ()):
                    con.exec_driver_sql(statement)
        _MIGRATED.add(self.url)

    def dispose(self) -> None:
        self.engine.dispose()

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
        rows = _plan_rows(activation, partition_key, chosen, run_id, purpose, self.dialect)
        known = rows.select("idempotency_key", "not_before").join(
            self._partition_states(activation, partition_key),
            on="idempotency_key",
            how="inner",
            suffix="_now",
        )
        counts = dict(known.group_by("state").len().iter_rows())
        redeferred = known.filter(
            (pl.col("state") == PLANNED) & pl.col("not_before").ne_missing(pl.col("not_before_now"))
        )
        mark = self._mark
        with self.engine.begin() as con:
            con.exec_driver_sql(self._insert_sql(), rows.rows())
            if not redeferred.is_empty():
                con.exec_driver_sql(
                    f"UPDATE sends SET not_before = {mark} WHERE idempotency_key = {mark} "
                    f"AND state = '{PLANNED}'",
                    redeferred.sort("idempotency_key")
                    .select("not_before", "idempotency_key")
                    .rows(),
                )
        return PlanResult(planned=rows.height - sum(counts.values()), existing=counts)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def _insert_sql(self) -> str:
        """The driver-level insert of `_PLAN_COLUMNS`; keys already present are skipped."""
        columns = ", ".join(_PLAN_COLUMNS)
        values = ", ".join([self._mark] * len(_PLAN_COLUMNS))
        return (
            f"INSERT INTO sends ({columns}) VALUES ({values}) "
            "ON CONFLICT (idempotency_key) DO NOTHING"
        )

    def _partition_states(self, activation: str, partition_key: str) -> pl.DataFrame:
        """(idempotency_key, state, not_before) of every row of one partition, in one read;
        `not_before` as `_plan_rows` writes it (SQLite: its text)."""
        when = pl.String if self.dialect == "sqlite" else pl.Datetime("us", "UTC")
        return read_frame(
            self.engine,
            "SELECT idempotency_key, state, not_before FROM sends "
            "WHERE activation = $1 AND partition_key = $2",
            (activation, partition_key),
            schema={"idempotency_key": pl.String, "state": pl.String, "not_before": when},
        )

    def states_of(self, keys: Sequence[str]) -> dict[str, int]:
        """How many of these idempotency keys are in the ledger, by state (reads only)."""
        with self.engine.connect() as con:
            return self._states_of(con, keys)

    def _states_of(self, con: sa.Connection, keys: Sequence[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for chunk in _chunks(keys, 5000):
            rows = con.execute(
                sa.select(sends.c.state, sa.func.count())
                .where(sends.c.idempotency_key.in_(chunk))
                .group_by(sends.c.state)
            ).all()
            for state, count in rows:
                counts[state] = counts.get(state, 0) + count
        return counts

    # ------------------------------------------------------------ claims and leases

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
        now = _now()
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
        return worker_id

    def heartbeat(self, worker_id: str) -> bool:
        """Renew a worker's lease (one row, whatever it holds); False when it has lost it."""
        with self.engine.begin() as con:
            return self._renew(con, worker_id)

    def _renew(self, con: sa.Connection, worker_id: str) -> bool:
        result = con.execute(
            sa.update(delivery_workers)
            .where(delivery_workers.c.id == worker_id, delivery_workers.c.state == WORKER_ALIVE)
            .values(heartbeat_at=self._db_now())
        )
        return (result.rowcount or 0) == 1

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
    ) -> list[list[PlannedSend]]:
        """Atomically move due `planned` rows to `in_flight` for `worker_id` and return them,
        one list per request, in one transaction that also renews the worker's lease.

        A row is sent only by the worker this returned it to: PostgreSQL picks rows with
        `FOR UPDATE SKIP LOCKED` (concurrent claimers never wait for or share a row), SQLite
        runs the whole claim under its single write lock. Raises `LeaseLost` when the worker
        was taken for dead meanwhile.
        """
        now = now or _now()
        results: list[list[PlannedSend]] = [[] for _ in requests]
        with self.engine.begin() as con:
            if not self._renew(con, worker_id):
                raise LeaseLost(
                    f"delivery worker {worker_id[:8]} lost its lease (it was stalled longer than "
                    "its lease and another run recovered its rows): it stops here"
                )
            scope = (activation, partition_key, step)
            shared: dict[str, list[int]] = {}
            for index, request in enumerate(requests):
                if request.whole_requests:
                    results[index] = self._claim_request(con, worker_id, scope, request, now)
                else:
                    shared.setdefault(request.connector, []).append(index)
            for connector, indexes in shared.items():
                total = sum(requests[i].limit for i in indexes)
                rows = self._claim_rows(con, worker_id, scope, connector, total, now, False)
                for i in indexes:
                    results[i], rows = rows[: requests[i].limit], rows[requests[i].limit :]
        return results

    def _claim_request(
        self,
        con: sa.Connection,
        worker_id: str,
        scope: tuple[str, str, str],
        request: ClaimRequest,
        now: datetime,
    ) -> list[PlannedSend]:
        """One whole request's rows: first a request a crash or a retry left (`request_id`
        set), exactly as it was; else fresh rows, stamped with their request's id."""
        mark = self._mark
        activation, partition_key, step = scope
        due = (
            f"activation = {mark} AND partition_key = {mark} AND state = '{PLANNED}' "
            f"AND step = {mark} AND connector = {mark} "
            f"AND (not_before IS NULL OR not_before <= {mark})"
        )
        args = (activation, partition_key, step, request.connector, _db_time(now, self.dialect))
        request_id = con.exec_driver_sql(
            f"SELECT MIN(request_id) FROM sends WHERE {due} AND request_id IS NOT NULL", args
        ).scalar()
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
        rows = self._claim_rows(
            con, worker_id, scope, request.connector, request.limit, now, fresh_only=True
        )
        if rows:
            # A fresh number, never a row's id: rows of a request the provider surely did not
            # take forget it (`settle`), and the smallest id of a later batch would then be an
            # earlier request's number, merging two requests into one of another key.
            request_id = secrets.randbits(62)
            for chunk in _chunks([r.id for r in rows], 5000):
                con.execute(
                    sa.update(sends).where(sends.c.id.in_(chunk)).values(request_id=request_id)
                )
            rows = [_with_request(r, request_id) for r in rows]
        return rows

    def _claim_rows(
        self,
        con: sa.Connection,
        worker_id: str,
        scope: tuple[str, str, str],
        connector: str,
        limit: int,
        now: datetime,
        fresh_only: bool,
    ) -> list[PlannedSend]:
        """Up to `limit` due planned rows of one connector, earliest due first (the
        `ix_sends_due` index walks exactly those)."""
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
            f"AND (not_before IS NULL OR not_before <= {mark}) ORDER BY {order} "
            f"LIMIT {mark}{lock}"
        )
        args = (activation, partition_key, step, connector, _db_time(now, self.dialect), limit)
        return self._claim_where(con, worker_id, select, args, now)

    def _claim_where(
        self,
        con: sa.Connection,
        worker_id: str,
        select: str,
        args: tuple[Any, ...],
        now: datetime,
    ) -> list[PlannedSend]:
        """planned -> in_flight for the rows `select` picks, returned (one statement)."""
        mark = self._mark
        columns = (
            "id, idempotency_key, channel, connector, recipient, message, attempts, "
            "customer_id, request_id, purpose"
        )
        stamp = _db_time(now, self.dialect)
        if self.dialect == "postgresql":
            returning = ", ".join(f"sends.{c.strip()}" for c in columns.split(","))
            sql = (
                f"UPDATE sends SET state = '{IN_FLIGHT}', claimed_by = {mark}, "
                f"attempts = sends.attempts + 1, updated_at = {mark} FROM ({select}) AS due "
                f"WHERE sends.id = due.id RETURNING {returning}"
            )
        else:
            sql = (
                f"UPDATE sends SET state = '{IN_FLIGHT}', claimed_by = {mark}, "
                f"attempts = attempts + 1, updated_at = {mark} WHERE id IN ({select}) "
                f"RETURNING {columns}"
            )
        rows = con.exec_driver_sql(sql, (worker_id, stamp, *args)).all()
        claimed = [
            PlannedSend(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], r[9])
            for r in rows
        ]
        claimed.sort(key=lambda r: r.id)
        return claimed

    def settle(self, worker_id: str, settlements: Iterable[Settlement]) -> None:
        """Write what became of claimed rows, in one transaction: terminal states (a late
        answer may also correct a row another run recovered as `unknown`), and rows back to
        `planned` (due again at their `not_before`) that the provider did not take. Rows the
        worker no longer holds are left alone."""
        now = _db_time(_now(), self.dialect)
        final, retry, unsent = [], [], []
        for s in settlements:
            message = (s.error_message or "")[:500] or None
            if s.state == PLANNED:
                due = _db_time(s.not_before, self.dialect) if s.not_before else None
                if s.unsent:
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
        for params in (final, retry, unsent):  # one lock order for every writer: by id
            params.sort(key=lambda p: p[-2])
        mark = self._mark
        held = f"WHERE id = {mark} AND claimed_by = {mark}"
        with self.engine.begin() as con:
            if final:
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

    @property
    def _mark(self) -> str:
        return "?" if self.dialect == "sqlite" else "%s"

    def _db_now(self) -> Any:
        """The time leases are stamped and judged by: PostgreSQL's own clock, so workers on
        hosts whose clocks differ agree; SQLite's file lives on one host, whose clock it is."""
        return sa.func.now() if self.dialect == "postgresql" else _now()

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
        now = _now()
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
            if _process_of_gone(worker):
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

    def _lapsed(self, lease_seconds: float, now: datetime) -> Any:
        """The heartbeat time before which a lease of `lease_seconds` has lapsed."""
        if self.dialect == "postgresql":
            return sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, lease_seconds)
        return now - timedelta(seconds=lease_seconds)

    def _lock_for_write(self, con: sa.Connection) -> None:
        """SQLite: take the write lock now (waiting out the busy timeout), so a transaction
        that reads before it writes cannot fail to upgrade its lock under concurrency."""
        if self.dialect == "sqlite":
            con.exec_driver_sql("UPDATE delivery_workers SET state = state WHERE 0")

    def revive_given_up(
        self, activation: str, partition_key: str, step: str, max_delay: timedelta
    ) -> int:
        """Dead letters an earlier version gave up on after its retries (429, 5xx, no
        connection: never accepted by the provider) go back to `planned` while they are within
        the send deadline: nobody who could still be reached is given up on. Dead letters of
        the deadline itself stay."""
        now = _now()
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
        now = _now()
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
                (activation, partition_key, step, connector, _db_time(until, self.dialect)),
            ).first()
        if row is None:
            return None
        if row[1] is None:
            return _now()
        when = row[1]
        if isinstance(when, str):  # SQLite's text
            when = datetime.fromisoformat(when)
        return _aware(when)

    def dead_letters_by_reason(self, activation: str, partition_key: str) -> dict[str, int]:
        """The partition's dead letters by reason (`error_code`: `send_deadline_passed`, or an
        earlier version's last error for retries it gave up)."""
        reason = sa.func.coalesce(sends.c.error_code, "retries_exhausted")
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(reason, sa.func.count())
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.state == DEAD_LETTER,
                )
                .group_by(reason)
            ).all()
        return {code: count for code, count in rows}

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
                .values(state=PLANNED, updated_at=_now())
            )
        return result.rowcount or 0

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
        return pl.DataFrame([(*r[:6], _aware(r[6])) for r in rows], schema=schema, orient="row")

    def pending(
        self,
        activation: str,
        partition_key: str,
        now: datetime | None = None,
        step: str | None = None,
    ) -> list[PlannedSend]:
        """Planned rows due by `now` (default: now): deferred ones wait for their not_before.
        `step` keeps one step's rows (a run sends `initial`, the fallback `fallback`)."""
        now = now or _now()
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
                    *_of_step(step),
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

    def mark_in_flight(self, ids: Sequence[int], requests: Sequence[tuple[int, int]] = ()) -> None:
        """planned -> in_flight, in one transaction, just before the requests go out.

        `requests` holds (row id, request id) of rows sent through a provider that
        de-duplicates whole requests: the request id is kept, so a crash-recovered row goes
        out again in the same request (`PlannedSend.request_id`).
        """
        now = _now()
        with self.engine.begin() as con:
            for chunk in _chunks(ids, 5000):
                con.execute(
                    sa.update(sends)
                    .where(sends.c.id.in_(chunk), sends.c.state == PLANNED)
                    .values(state=IN_FLIGHT, attempts=sends.c.attempts + 1, updated_at=now)
                )
            if requests:
                mark = "?" if self.dialect == "sqlite" else "%s"
                con.exec_driver_sql(
                    f"UPDATE sends SET state = '{IN_FLIGHT}', attempts = attempts + 1, "
                    f"request_id = {mark}, updated_at = {mark} "
                    f"WHERE id = {mark} AND state = '{PLANNED}'",
                    [(request, _db_time(now, self.dialect), row) for row, request in requests],
                )

    def record(self, results: Iterable[tuple[int, SendResult, int]]) -> None:
        """Write final outcomes (row id, result, attempts made) in bulk; only from in_flight.
        For rows marked by `mark_in_flight` (tests, tools); the delivery engine claims and
        `settle`s instead.

        One driver-level `executemany` of plain tuples (SQLAlchemy's per-row parameter
        handling cost more than the database's own work).
        """
        now = _now()
        stamp = _db_time(now, self.dialect)
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
        mark = "?" if self.dialect == "sqlite" else "%s"
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
        chosen_keys: Sequence[str],
        reason: str,
        step: str | None = None,
    ) -> int:
        """Planned rows of this partition (of `step`, if given) that the latest decisions no
        longer choose (consent withdrawn since a deferral, say) end `cancelled`: they must not
        go out. A row of a request that must go out again whole (`request_id`: its provider
        may already have it, and de-duplicates the request on its key) is left in it: taken
        out, the request would carry another key and reach its other recipients twice."""
        keep = set(chosen_keys)
        with self.engine.begin() as con:
            rows = con.execute(
                sa.select(sends.c.id, sends.c.idempotency_key).where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.state == PLANNED,
                    sends.c.request_id.is_(None),
                    *_of_step(step),
                )
            ).all()
            ids = [r.id for r in rows if r.idempotency_key not in keep]
            for chunk in _chunks(ids, 5000):
                con.execute(
                    sa.update(sends)
                    .where(sends.c.id.in_(chunk), sends.c.state == PLANNED)
                    .values(state=CANCELLED, error_message=reason[:500], updated_at=_now())
                )
        return len(ids)

    def deferred(
        self,
        activation: str,
        partition_key: str,
        now: datetime | None = None,
        step: str | None = None,
    ) -> int:
        """Planned rows (of `step`, if given) waiting for their not_before (quiet hours)."""
        now = now or _now()
        with self.engine.connect() as con:
            return con.execute(
                sa.select(sa.func.count()).where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.state == PLANNED,
                    sends.c.not_before > now,
                    *_of_step(step),
                )
            ).scalar_one()

    def progress(
        self, activation: str, partition_key: str, now: datetime | None = None
    ) -> tuple[int, int]:
        """(done, left) of one partition: rows with an outcome (sent, failed, unknown,
        dead-lettered), and rows due to go (planned and due, or in flight). For a progress bar;
        deferred rows are in neither."""
        now = now or _now()
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

    def due_partitions(
        self, activation: str, now: datetime | None = None, step: str | None = None
    ) -> dict[str, datetime]:
        """Partitions with planned rows (of `step`, if given) now due: deferred ones whose
        time has come, retries backed off, and rows a stopped or failed run left waiting; with
        the latest of their `not_before` (or last change), which moves whenever a run touched
        them, so a sensor keyed on it asks again after each attempt."""
        now = now or _now()
        latest = sa.func.max(sa.func.coalesce(sends.c.not_before, sends.c.updated_at))
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(sends.c.partition_key, latest)
                .where(
                    sends.c.activation == activation,
                    sends.c.state == PLANNED,
                    sa.or_(sends.c.not_before.is_(None), sends.c.not_before <= now),
                    *_of_step(step),
                )
                .group_by(sends.c.partition_key)
            ).all()
        return {partition: _aware(when) for partition, when in rows}

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
            ids = sorted({w for _, w in held if w is not None})
            workers = {
                w.id: w
                for w in con.execute(
                    sa.select(delivery_workers).where(delivery_workers.c.id.in_(ids))
                )
            }
        now = _now()

        def gone(worker_id: str | None) -> bool:
            worker = workers.get(worker_id) if worker_id else None
            if worker is None or worker.state != WORKER_ALIVE:
                return True
            lapsed = _aware(worker.heartbeat_at) + timedelta(seconds=worker.lease_seconds)
            return lapsed < now or _process_of_gone(worker)

        return {partition for partition, worker_id in held if gone(worker_id)}

    def partitions_with_pending(
        self, activation: str, step: str, now: datetime | None = None
    ) -> set[str]:
        """Partitions holding planned rows of `step` that are due (deferred ones whose time has
        come, or ones a failed or killed run planned and never sent)."""
        now = now or _now()
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
        - `primary_not_read`: delivered, not read, sent at or before `not_read_by` (if given).
        `unknown` sends never fall back: the provider may have delivered them. Columns:
        partition_key, fallback_of (the first message's id), customer_id, channel, connector,
        fallback_reason, error_code (the failure's code, if any).
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
        not_delivered = sa.and_(
            first.c.state.in_([SENT, FAILED, DEAD_LETTER]),
            status.not_in(["delivered", "read"]),
            sa.func.coalesce(first.c.sent_at, first.c.updated_at) <= not_delivered_by,
        )
        not_read = (
            sa.and_(first.c.state == SENT, status == "delivered", first.c.sent_at <= not_read_by)
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
            sa.or_(unreachable, not_delivered, not_read),
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
                (not_delivered, PRIMARY_NOT_DELIVERED),
                else_=PRIMARY_NOT_READ,
            ).label("fallback_reason"),
            sa.case((failed, failure_code), else_=None).label("error_code"),
        ).where(*where)
        schema = {
            "partition_key": pl.String,
            "fallback_of": pl.Int64,
            "customer_id": pl.String,
            "channel": pl.String,
            "connector": pl.String,
            "fallback_reason": pl.String,
            "error_code": pl.String,
        }
        with self.engine.connect() as con:
            rows = con.execute(query.order_by(first.c.id)).all()
        return pl.DataFrame([tuple(r) for r in rows], schema=schema, orient="row")

    def cancel_landed_fallbacks(self, activation: str, partition_key: str) -> int:
        """Planned fallbacks whose first message has since been delivered (or read, for a
        fallback due because it was not read) end `cancelled`: the customer got it."""
        first = sends.alias("first")
        landed = (
            sa.select(first.c.id)
            .where(
                first.c.id == sends.c.fallback_of,
                sa.or_(
                    first.c.delivery_status == "read",
                    sa.and_(
                        first.c.delivery_status == "delivered",
                        sends.c.fallback_reason != PRIMARY_NOT_READ,
                    ),
                ),
            )
            .exists()
        )
        with self.engine.begin() as con:
            result = con.execute(
                sa.update(sends)
                .where(
                    sends.c.activation == activation,
                    sends.c.partition_key == partition_key,
                    sends.c.step == FALLBACK_STEP,
                    sends.c.state == PLANNED,
                    landed,
                )
                .values(
                    state=CANCELLED,
                    error_message="the first message was delivered before the fallback went out",
                    updated_at=_now(),
                )
            )
        return result.rowcount or 0

    def sends_since(self, since: datetime, exclude: tuple[str, str] | None = None) -> pl.DataFrame:
        """Accepted messages since `since`, one row each (customer_id, channel, purpose,
        sent_at), for frequency caps; `exclude` = (activation, partition) being re-run."""
        query = sa.select(
            sends.c.customer_id, sends.c.channel, sends.c.purpose, sends.c.sent_at
        ).where(sends.c.state == SENT, sends.c.sent_at >= since)
        if exclude is not None:
            query = query.where(
                sa.not_(
                    sa.and_(sends.c.activation == exclude[0], sends.c.partition_key == exclude[1])
                )
            )
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

    def record_statuses(self, events: Sequence[StatusEvent]) -> StatusWrite:
        """Store provider status reports and move each message's `delivery_status` forward,
        in one transaction (the webhook receiver answers 200 only after it commits).

        A report already stored (same `event_key`) is ignored; a report whose status does not
        outrank the message's current one changes nothing, so duplicates and reordering are
        harmless. Messages are matched on `provider_message_id` among the rows of the
        provider's own connector (`CONNECTOR_OF_PROVIDER`). A report can arrive before the
        send's own answer is recorded (Meta's `sent` often does): it is kept unapplied and
        applied by `apply_pending_statuses` (the end of every run) once the send is known.
        """
        if not events:
            return StatusWrite(received=0, duplicates=0, advanced=0)
        mark = "?" if self.dialect == "sqlite" else "%s"
        now = _db_time(_now(), self.dialect)
        unique = list({e.event_key: e for e in events}.values())
        with self.engine.begin() as con:
            known = self._known_event_keys(con, [e.event_key for e in unique])
            fresh = [e for e in unique if e.event_key not in known]
            if fresh:
                con.exec_driver_sql(
                    "INSERT INTO status_events (event_key, provider, provider_message_id, "
                    "status, error_code, occurred_at, received_at, payload, source, "
                    "customer_id, reference, applied) VALUES "
                    f"({', '.join([mark] * 11)}, {'0' if self.dialect == 'sqlite' else 'false'}) "
                    "ON CONFLICT (event_key) DO NOTHING",
                    [
                        (
                            e.event_key,
                            e.provider,
                            e.provider_message_id,
                            e.status,
                            e.error_code,
                            _db_time(e.occurred_at, self.dialect),
                            now,
                            e.payload,
                            e.source,
                            e.customer_id,
                            e.reference,
                        )
                        for e in fresh
                    ],
                )
            reconciled = self._reconcile(con, fresh) if fresh else 0
            advanced, stale = self._apply_statuses(con, fresh) if fresh else (0, 0)
        if stale:
            log.warning(
                "ignored %d status report(s) dated before their send was planned (a replay, "
                "or a report of another ledger's message); kept in status_events, flagged "
                "ignored = '%s'",
                stale,
                OLDER_THAN_SEND,
            )
        return StatusWrite(
            received=len(events),
            duplicates=len(events) - len(fresh),
            advanced=advanced,
            reconciled=reconciled,
            stale=stale,
        )

    def apply_pending_statuses(self) -> int:
        """Apply stored reports that arrived before their send was recorded (see
        `record_statuses`); returns how many statuses moved. Delivery calls it at the end of
        every run, so a report that came early is applied as soon as its send is known."""
        mark = "?" if self.dialect == "sqlite" else "%s"
        false = "0" if self.dialect == "sqlite" else "false"
        since = _db_time(_now() - timedelta(days=1), self.dialect)
        with self.engine.begin() as con:
            pending = con.exec_driver_sql(
                "SELECT event_key, provider, provider_message_id, status, error_code, "
                f"occurred_at, customer_id, reference FROM status_events "
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
        now = _db_time(_now(), self.dialect)
        params = []
        for report in reports:
            send_id = send_id_of(getattr(report, "reference", None))
            if send_id is None or not report.provider_message_id:
                continue
            latest_plan = _db_time(_as_time(report.occurred_at) + STATUS_CLOCK_SKEW, self.dialect)
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
        """Apply `pending` reports (`StatusEvent`s just stored, or unapplied rows read back:
        anything with their fields), lowest rank first, and mark applied those whose send
        exists. A report for a message the ledger never sent (another tool's, on the same
        sender) stays unapplied, is looked at again at the end of each run for a day, and is
        given up after that. A report dated before its send was planned (beyond
        `STATUS_CLOCK_SKEW`) is a replay or another message's: flagged `ignored`, never
        applied. Returns (statuses moved, reports flagged)."""
        mark = "?" if self.dialect == "sqlite" else "%s"
        # The sends that exist now; a send committed after this read is matched next time (a
        # report is only marked applied together with the update it made).
        ids = sorted({r.provider_message_id for r in pending if r.provider_message_id})
        planned_at: dict[tuple[str, str], datetime] = {}
        for chunk in _chunks(ids, 5000):
            rows = con.execute(
                sa.select(sends.c.provider_message_id, sends.c.connector, sends.c.planned_at).where(
                    sends.c.provider_message_id.in_(chunk)
                )
            ).all()
            planned_at.update({(r[0], r[1]): _aware(r[2]) for r in rows})
        matched, stale = [], []
        for report in pending:
            planned = planned_at.get((report.provider_message_id, connector_of(report.provider)))
            if planned is None:
                continue
            if _as_time(report.occurred_at) + STATUS_CLOCK_SKEW < planned:
                stale.append(report.event_key)
            else:
                matched.append(report)
        for chunk in _chunks(stale, 5000):
            con.exec_driver_sql(
                f"UPDATE status_events SET ignored = '{OLDER_THAN_SEND}' WHERE event_key IN "
                f"({', '.join([mark] * len(chunk))})",
                tuple(chunk),
            )
        if not matched:
            return 0, len(stale)
        rank = " ".join(f"WHEN '{status}' THEN {n}" for status, n in STATUS_RANK.items())
        changed = _db_time(_now(), self.dialect)  # the send log exports rows changed since
        result = con.exec_driver_sql(
            f"UPDATE sends SET delivery_status = {mark}, delivery_status_at = {mark}, "
            f"delivery_error_code = {mark}, updated_at = {mark} "
            f"WHERE provider_message_id = {mark} AND connector = {mark} "
            f"AND customer_id = COALESCE({mark}, customer_id) "
            f"AND (CASE delivery_status {rank} ELSE 0 END) < {mark}",
            [
                (
                    r.status,
                    _db_time(r.occurred_at, self.dialect)
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
        true = "1" if self.dialect == "sqlite" else "true"
        for chunk in _chunks([r.event_key for r in matched], 5000):
            con.exec_driver_sql(
                f"UPDATE status_events SET applied = {true} WHERE event_key IN "
                f"({', '.join([mark] * len(chunk))})",
                tuple(chunk),
            )
        return max(result.rowcount or 0, 0), len(stale)

    def _known_event_keys(self, con: sa.Connection, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(keys, 5000):
            rows = con.execute(
                sa.select(status_events.c.event_key).where(status_events.c.event_key.in_(chunk))
            )
            found.update(r.event_key for r in rows)
        return found

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

    def newest_status_time(self, source: str) -> datetime | None:
        """The provider time of the newest event stored from a status source (its cursor)."""
        with self.engine.connect() as con:
            value = con.execute(
                sa.select(sa.func.max(status_events.c.occurred_at)).where(
                    status_events.c.source == source
                )
            ).scalar_one()
        return _aware(value) if value is not None else None

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
                    *_of_step(step),
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


def _process_of_gone(worker: Any) -> bool:
    """Whether a `delivery_workers` row's process is certainly gone (on this host)."""
    started = _aware(worker.started_at).timestamp()
    return process_gone(worker.host, worker.pid, started) is not None


def _of_step(step: str | None) -> tuple[sa.ColumnElement[bool], ...]:
    """The WHERE condition keeping one step's rows (none when `step` is None)."""
    return () if step is None else (sends.c.step == step,)


def _lock_schema(con: sa.Connection) -> None:
    """Hold the ledger's schema lock until `con`'s transaction ends."""
    if con.dialect.name == "postgresql":
        con.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('cdp_activation.ledger'))")
    elif con.dialect.name == "sqlite":
        # pysqlite opens a transaction at the first write: the DELETE takes the write lock
        # (waiting out the busy timeout), and the DDL that follows runs inside it.
        con.exec_driver_sql("CREATE TABLE IF NOT EXISTS ledger_schema_lock (id INTEGER)")
        con.exec_driver_sql("DELETE FROM ledger_schema_lock")


_MIGRATED: set[str] = set()  # ledger URLs this process brought up to this schema


def _has_sends(engine: sa.Engine) -> bool:
    """The `sends` table is there (a catalog read, no lock): the schema was not dropped."""
    with engine.connect() as con:
        return sa.inspect(con).has_table("sends")


def _add_missing_columns(con: sa.Connection) -> None:
    """Bring a ledger made by an earlier version up to this schema: `create_all` makes missing
    tables, not missing columns or indexes. Only nullable columns are ever added, so old rows
    stay valid. On PostgreSQL only what is missing is created: even `CREATE INDEX IF NOT
    EXISTS` takes a lock that waits behind every open write, so opening a ledger would queue
    behind running deliveries."""
    inspector = sa.inspect(con)
    postgres = con.dialect.name == "postgresql"
    existing: set[str] | None = None
    if postgres:
        existing = set(
            con.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            ).scalars()
        )
    indexes: list[tuple[str, str]] = []
    for table in (sends, status_events):
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in [c for c in table.columns if c.name not in present]:
            kind = column.type.compile(dialect=con.dialect)
            con.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")
        for index in table.indexes:
            columns = ", ".join(c.name for c in index.columns)
            indexes.append((str(index.name), f"ON {table.name} ({columns})"))
    # The claim's walk (`Ledger._claim_rows`): one partition's planned rows of a step and
    # connector, those with no `not_before` first, then by it, so the rows due now come first
    # and deferred ones are never read. SQLite sorts NULLs first already; PostgreSQL must be
    # told. Not declared on the Table: `create_all` cannot say NULLS FIRST.
    nulls_first = " NULLS FIRST" if postgres else ""
    indexes.append(
        (
            "ix_sends_due",
            "ON sends (activation, partition_key, state, step, connector, "
            f"not_before{nulls_first})",
        )
    )
    # Requests that must go out again whole (`Ledger._claim_request`): few rows, found fast.
    indexes.append(
        (
            "ix_sends_requests",
            "ON sends (activation, partition_key, request_id) "
            f"WHERE state = '{PLANNED}' AND request_id IS NOT NULL",
        )
    )
    for name, definition in indexes:
        if existing is None or name not in existing:
            con.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {name} {definition}")


def _has_trigger(con: sa.Connection) -> bool:
    """Whether the history trigger exists (PostgreSQL; SQLite's are `IF NOT EXISTS`):
    replacing it would lock `sends` against every running delivery."""
    if con.dialect.name != "postgresql":
        return False
    return bool(
        con.exec_driver_sql(
            "SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = 'sends_events' "
            "AND c.relname = 'sends' AND n.nspname = current_schema()"
        ).first()
    )


def _as_time(value: datetime | str) -> datetime:
    """A stored time, aware: SQLite's rows read back hold the text it was written as."""
    return _aware(value if isinstance(value, datetime) else datetime.fromisoformat(value))


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything the ledger stores is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _db_time(value: datetime, dialect: str) -> datetime | str:
    """A UTC time as the driver takes it: SQLite as the text SQLAlchemy writes and reads."""
    if dialect == "sqlite":
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


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
    "planned_at",
    "updated_at",
    "error_code",
    "fallback_of",
    "fallback_reason",
)


def _plan_rows(
    activation: str,
    partition_key: str,
    chosen: pl.DataFrame,
    run_id: str | None,
    purpose: str,
    dialect: str,
) -> pl.DataFrame:
    """The `sends` rows of `chosen` decisions (columns `_PLAN_COLUMNS`), built in polars.

    The message is JSON: `{"template", "language", "parameters"[, "names"]}` for a template
    (parameters from the `variables` list, names from `variable_names` when present: the
    columns they came from), else `{"body"}`. Times are UTC; SQLite gets them as the text
    SQLAlchemy writes (`YYYY-MM-DD HH:MM:SS.ffffff`), so both paths read back alike.

    A `holdout` decision is written `holdout`, an `exclude` one (a refused fallback)
    `excluded` with its reason code as `error_code`; `fallback_of` and `fallback_reason` are
    copied when the frame has them (fallback rows).
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
    body = pl.struct(pl.col("body").cast(pl.String)).struct.json_encode()
    decision = pl.col("decision").cast(pl.String) if "decision" in chosen.columns else pl.lit("")
    excluded = decision == "exclude"

    def optional(column: str, dtype: pl.DataType) -> pl.Expr:
        present = column in chosen.columns
        return (pl.col(column) if present else pl.lit(None)).cast(dtype).alias(column)

    not_before = (
        pl.col("not_before").cast(pl.Datetime("us", "UTC"))
        if "not_before" in chosen.columns
        else pl.lit(None, dtype=pl.Datetime("us", "UTC"))
    )
    now = pl.lit(_now(), dtype=pl.Datetime("us", "UTC"))

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
        pl.when(pl.col("template_name").is_not_null())
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
        stamp(not_before).alias("not_before"),
        stamp(now).alias("planned_at"),
        stamp(now).alias("updated_at"),
        pl.when(excluded).then(pl.col("reason").cast(pl.String)).alias("error_code")
        if "reason" in chosen.columns
        else pl.lit(None, dtype=pl.String).alias("error_code"),
        optional("fallback_of", pl.Int64()),
        optional("fallback_reason", pl.String()),
    )


def _with_request(row: PlannedSend, request_id: int) -> PlannedSend:
    return replace(row, request_id=request_id)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
