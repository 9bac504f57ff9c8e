"""The send log: the ledger exported to the warehouse, so analysts can join sends, statuses,
fallbacks and holdouts to outcomes (`activation_send_log`, one row per send), with the
customers' replies (`activation_inbound_log`) and opt-outs (`activation_suppressions`).

Incremental: each export reads the ledger rows changed since the newest `updated_at` already in
the table (less a few minutes of overlap, so a row committed late with an earlier stamp is not
missed) and upserts them by `send_id`. Running it twice, or after a crash, exports nothing
twice: the table keeps one row per send, in its latest state.

Exports to one table run one at a time (`_Sink.exclusive`): the scheduled export, the funnel's
and a hand-started one may overlap. Together, they raced to create the table and to insert the
same keys (PostgreSQL refused all but one), or met DuckDB's lock on the file and failed at once;
and one that read the ledger before another could write its older rows over the other's newer
ones. PostgreSQL holds an advisory lock for the table, DuckDB a lock file beside the
warehouse's (its own file is opened only to read and to write, waiting while another process
has it, as the audience's reads do). Other warehouses are not locked.

No personal data leaves the ledger: the log has the customer id (a key the warehouse already
holds) but not the phone number, LINE id or message text.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import duckdb
import polars as pl
import sqlalchemy as sa
from filelock import FileLock, Timeout

from cdp_activation.audience.warehouse import connect_duckdb, duckdb_path
from cdp_activation.db import with_driver
from cdp_activation.errors import CdpError
from cdp_activation.ledger import Ledger, decision_counts, inbound_events, opt_outs, sends

logger = logging.getLogger(__name__)

SEND_LOG_TABLE = "activation_send_log"
OVERLAP = timedelta(minutes=5)
# How long an export waits for another holding its table before it gives up (`ExportBusy`):
# far longer than any export takes, so only one that hangs (alive, but stuck) is waited out.
EXPORT_WAIT = timedelta(minutes=30)


class ExportBusy(CdpError):
    """Another export held the table longer than `EXPORT_WAIT`: nothing was written. The
    next export catches up (each reads from the newest row the table holds)."""

    transient: ClassVar[bool] = True

    @classmethod
    def of(cls, name: str, holder: str) -> ExportBusy:
        seconds = EXPORT_WAIT.total_seconds()
        waited = f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} s"
        return cls(
            f"another export has held {name} for over {waited}: not exported now "
            f"(the next export catches up); if no export is running, a stuck process holds "
            f"it ({holder})"
        )


_UTC = pl.Datetime("us", "UTC")
# Column of the send log -> its type; `send_id` is the ledger's `id`.
COLUMNS: dict[str, pl.DataType] = {
    "send_id": pl.Int64(),
    "idempotency_key": pl.String(),
    "activation": pl.String(),
    "partition_key": pl.String(),
    "customer_id": pl.String(),
    "step": pl.String(),
    "channel": pl.String(),
    "purpose": pl.String(),
    "connector": pl.String(),
    "state": pl.String(),
    "attempts": pl.Int64(),
    "provider_message_id": pl.String(),
    "error_code": pl.String(),
    "delivery_status": pl.String(),
    "delivery_status_at": _UTC,
    "delivery_error_code": pl.String(),
    "fallback_of": pl.Int64(),
    "fallback_reason": pl.String(),
    "variant": pl.String(),  # the experiment's arm (null without one)
    "country": pl.String(),
    # What it cost, as its provider reported it (feedback/costs.py prices the rest).
    "billable": pl.Boolean(),
    "pricing_category": pl.String(),
    "pricing_model": pl.String(),
    "price": pl.Float64(),
    "price_currency": pl.String(),
    "run_id": pl.String(),
    "not_before": _UTC,
    "planned_at": _UTC,
    "sent_at": _UTC,
    "updated_at": _UTC,
}


INBOUND_LOG_TABLE = "activation_inbound_log"
OPT_OUTS_TABLE = "activation_suppressions"
# What customers sent us (no text: the kind and a short summary) and the opt-outs in force or
# lifted, for analysts to count replies and opt-outs per activation and channel.
INBOUND_COLUMNS: dict[str, pl.DataType] = {
    "inbound_id": pl.Int64(),
    "provider": pl.String(),
    "channel": pl.String(),
    "customer_id": pl.String(),
    "kind": pl.String(),
    "summary": pl.String(),
    "opt": pl.String(),
    "occurred_at": _UTC,
    "updated_at": _UTC,  # when it was received: the export's cursor
}
OPT_OUT_COLUMNS: dict[str, pl.DataType] = {
    "opt_out_id": pl.Int64(),
    "customer_id": pl.String(),
    "channel": pl.String(),
    "purpose": pl.String(),
    "reason": pl.String(),
    "created_at": _UTC,
    "lifted_at": _UTC,
    "updated_at": _UTC,  # the later of created and lifted: the export's cursor
}


DECISION_COUNTS_TABLE = "activation_decision_counts"
# Each real run's decisions, counted (ledger.decision_counts): the funnel's first stages.
DECISION_COUNT_COLUMNS: dict[str, pl.DataType] = {
    "count_key": pl.String(),
    "activation": pl.String(),
    "partition_key": pl.String(),
    "step": pl.String(),
    "country": pl.String(),
    "channel": pl.String(),
    "decision": pl.String(),
    "reason": pl.String(),
    "customers": pl.Int64(),
    "updated_at": _UTC,
}


@dataclass(frozen=True)
class LogTable:
    """A warehouse table the ledger is exported to: its columns (the first is the key, upserted
    on) and the ledger rows changed since a time."""

    name: str
    columns: dict[str, pl.DataType]
    changed: Any  # (ledger, since) -> pl.DataFrame of `columns`

    @property
    def key(self) -> str:
        return next(iter(self.columns))


@dataclass(frozen=True)
class SendLogExport:
    exported: int  # rows upserted by this export
    since: datetime | None  # the cursor it read from (None: the whole ledger)
    table_rows: int  # rows in the send log afterwards


def changed_sends(ledger: Ledger, since: datetime | None) -> pl.DataFrame:
    """The ledger's rows changed at or after `since` (all of them when None), as the send
    log's columns."""
    columns = [sends.c.id.label("send_id")] + [
        sends.c[name] for name in COLUMNS if name != "send_id"
    ]
    query = sa.select(*columns).order_by(sends.c.id)
    if since is not None:
        query = query.where(sends.c.updated_at >= since)
    return _frame(ledger, query, COLUMNS)


def changed_decision_counts(ledger: Ledger, since: datetime | None) -> pl.DataFrame:
    """The decision counts written at or after `since`."""
    query = sa.select(*(decision_counts.c[n] for n in DECISION_COUNT_COLUMNS)).order_by(
        decision_counts.c.count_key
    )
    if since is not None:
        query = query.where(decision_counts.c.updated_at >= since)
    return _frame(ledger, query, DECISION_COUNT_COLUMNS)


def changed_inbound(ledger: Ledger, since: datetime | None) -> pl.DataFrame:
    """The customers' messages received at or after `since`."""
    query = sa.select(
        inbound_events.c.id.label("inbound_id"),
        *(inbound_events.c[n] for n in list(INBOUND_COLUMNS)[1:-1]),
        inbound_events.c.received_at.label("updated_at"),
    ).order_by(inbound_events.c.id)
    if since is not None:
        query = query.where(inbound_events.c.received_at >= since)
    return _frame(ledger, query, INBOUND_COLUMNS)


def changed_opt_outs(ledger: Ledger, since: datetime | None) -> pl.DataFrame:
    """The opt-outs made or lifted at or after `since`."""
    changed = sa.func.coalesce(opt_outs.c.lifted_at, opt_outs.c.created_at)
    query = sa.select(
        opt_outs.c.id.label("opt_out_id"),
        *(opt_outs.c[n] for n in list(OPT_OUT_COLUMNS)[1:-1]),
        changed.label("updated_at"),
    ).order_by(opt_outs.c.id)
    if since is not None:
        query = query.where(changed >= since)
    return _frame(ledger, query, OPT_OUT_COLUMNS)


def _frame(ledger: Ledger, query: Any, columns: dict[str, pl.DataType]) -> pl.DataFrame:
    with ledger.engine.connect() as con:
        rows = con.execute(query).all()
    frame = pl.DataFrame(
        [tuple(r) for r in rows],
        schema={
            name: (pl.Datetime("us") if dtype == _UTC else dtype) for name, dtype in columns.items()
        },
        orient="row",
    )
    # The ledger stores UTC; SQLite hands times back without their zone (or as text).
    return frame.with_columns(
        pl.col(name).dt.replace_time_zone("UTC") for name, dtype in columns.items() if dtype == _UTC
    )


SEND_LOG = LogTable(SEND_LOG_TABLE, COLUMNS, changed_sends)
INBOUND_LOG = LogTable(INBOUND_LOG_TABLE, INBOUND_COLUMNS, changed_inbound)
OPT_OUTS_LOG = LogTable(OPT_OUTS_TABLE, OPT_OUT_COLUMNS, changed_opt_outs)
DECISION_COUNTS_LOG = LogTable(
    DECISION_COUNTS_TABLE, DECISION_COUNT_COLUMNS, changed_decision_counts
)


def export_send_log(ledger: Ledger, url: str, table: str = SEND_LOG_TABLE) -> SendLogExport:
    """Upsert the ledger's rows changed since the last export into `table` at `url` (a
    `duckdb:///file` or any SQLAlchemy URL)."""
    return export_table(ledger, url, LogTable(table, COLUMNS, changed_sends))


def export_replies(ledger: Ledger, url: str) -> dict[str, SendLogExport]:
    """The customers' messages (`activation_inbound_log`) and the opt-outs
    (`activation_suppressions`), exported the same way."""
    return {log.name: export_table(ledger, url, log) for log in (INBOUND_LOG, OPT_OUTS_LOG)}


def export_decision_counts(ledger: Ledger, url: str) -> SendLogExport:
    """Each real run's decisions, counted (`activation_decision_counts`), the same way."""
    return export_table(ledger, url, DECISION_COUNTS_LOG)


def export_table(ledger: Ledger, url: str, log: LogTable) -> SendLogExport:
    sink = _sink(url)
    try:
        # Read and written under the table's lock: an export that read the ledger earlier
        # never writes after one that read it later.
        with sink.exclusive(log.name):
            newest = sink.newest(log)
            since = (newest - OVERLAP).astimezone(UTC) if newest is not None else None
            frame = log.changed(ledger, since)
            rows = sink.upsert(log, frame)
    finally:
        sink.close()
    return SendLogExport(exported=frame.height, since=since, table_rows=rows)


class _DuckDBSink:
    """A DuckDB file, opened for each read and write only (DuckDB lets one process write or
    several read: the audience's reads wait out those moments, `connect_duckdb`, and so do
    these), with exports to a table kept one at a time by a lock file beside it, held
    across the whole export (the ledger's read included) without holding the warehouse."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def exclusive(self, table: str) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        path = self.path.with_name(f".{self.path.name}.{table}.lock")
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            _waiting(table)
            try:
                lock.acquire(timeout=EXPORT_WAIT.total_seconds())
            except Timeout:
                raise ExportBusy.of(table, f"the process holding the lock file {path}") from None
        try:
            yield
        finally:
            lock.release()

    def newest(self, log: LogTable) -> datetime | None:
        with connect_duckdb(self.path, read_only=False) as con:
            if not _duckdb_has(con, log.name):
                return None
            value = con.execute(f'SELECT max(updated_at) FROM "{log.name}"').fetchall()
        return value[0][0] if value else None

    def upsert(self, log: LogTable, frame: pl.DataFrame) -> int:
        table, key = log.name, log.key
        with connect_duckdb(self.path, read_only=False) as con:
            con.register("incoming", frame.to_arrow())
            con.execute("BEGIN")
            try:
                con.execute(f'CREATE TABLE IF NOT EXISTS "{table}" AS FROM incoming LIMIT 0')
                # A table an earlier version made lacks the columns added since (`variant`).
                present = {
                    row[0]
                    for row in con.execute(
                        "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                        [table],
                    ).fetchall()
                }
                for column in [c for c in frame.columns if c not in present]:
                    kind = con.execute(f"SELECT typeof({column}) FROM incoming LIMIT 1").fetchall()
                    kind_name = kind[0][0] if kind else "VARCHAR"
                    con.execute(f'ALTER TABLE "{table}" ADD COLUMN {column} {kind_name}')
                con.execute(f'DELETE FROM "{table}" WHERE {key} IN (SELECT {key} FROM incoming)')
                con.execute(f'INSERT INTO "{table}" BY NAME FROM incoming')
            except BaseException:
                # Rolled back before anything else runs on the connection: DuckDB refuses
                # every statement of an aborted transaction, and that refusal would take
                # the real error's place (as would a failing ROLLBACK: ignored).
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            count = con.execute(f'SELECT count(*) FROM "{table}"').fetchall()
        return int(count[0][0]) if count else 0


def _duckdb_has(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    found = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
    ).fetchall()
    return bool(found and found[0][0])


class _SQLAlchemySink:
    """Any SQLAlchemy database (PostgreSQL, Snowflake, BigQuery, …): a typed table, and an
    upsert as delete-then-insert of the changed ids in one transaction."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(with_driver(url))

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def exclusive(self, table: str) -> Iterator[None]:
        with warehouse_lock(self.engine, table):
            yield

    def _table(self, log: LogTable) -> sa.Table:
        kinds: dict[pl.DataType, sa.types.TypeEngine[Any]] = {
            pl.Int64(): sa.BigInteger(),
            pl.String(): sa.Text(),
            pl.Boolean(): sa.Boolean(),
            pl.Float64(): sa.Float(),
            _UTC: sa.DateTime(timezone=True),
        }
        columns = [
            sa.Column(column, kinds[dtype], primary_key=column == log.key)
            for column, dtype in log.columns.items()
        ]
        return sa.Table(log.name, sa.MetaData(), *columns)

    def newest(self, log: LogTable) -> datetime | None:
        if not sa.inspect(self.engine).has_table(log.name):
            return None
        target = self._table(log)
        with self.engine.connect() as con:
            return con.execute(sa.select(sa.func.max(target.c.updated_at))).scalar_one()

    def upsert(self, log: LogTable, frame: pl.DataFrame) -> int:
        target = self._table(log)
        target.metadata.create_all(self.engine)
        # A table an earlier version made lacks the columns added since (`variant`).
        present = {c["name"] for c in sa.inspect(self.engine).get_columns(log.name)}
        with self.engine.begin() as con:
            for column in [c for c in target.columns if c.name not in present]:
                kind = column.type.compile(dialect=self.engine.dialect)
                con.exec_driver_sql(f"ALTER TABLE {log.name} ADD COLUMN {column.name} {kind}")
        rows = frame.to_dicts()
        ids = frame[log.key].to_list()
        with self.engine.begin() as con:
            for start in range(0, len(ids), 5000):
                chunk = ids[start : start + 5000]
                con.execute(sa.delete(target).where(target.c[log.key].in_(chunk)))
            if rows:
                con.execute(sa.insert(target), rows)
            return int(con.execute(sa.select(sa.func.count()).select_from(target)).scalar_one())


@contextlib.contextmanager
def warehouse_lock(engine: sa.Engine, name: str) -> Iterator[None]:
    """Hold the warehouse's lock `name` (a table or view of the connection's current schema:
    each is written by one export at a time) while the block
    runs: on PostgreSQL a transaction-level advisory lock, waited for, in a transaction kept
    open on a connection of its own until the block ends (released however it ends, and
    whole behind a pooler that hands out connections a transaction at a time); on other
    databases nothing is held. Waited for `EXPORT_WAIT` at most (`ExportBusy`)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    key = "hashtext('cdp_activation.' || current_schema() || '.' || %s)"
    with engine.connect() as con, con.begin():
        taken = con.exec_driver_sql(f"SELECT pg_try_advisory_xact_lock({key})", (name,))
        if not taken.scalar_one():
            _waiting(name)
            wait_ms = int(EXPORT_WAIT.total_seconds() * 1000)
            con.exec_driver_sql(f"SET LOCAL lock_timeout = {wait_ms}")
            try:
                con.exec_driver_sql(f"SELECT pg_advisory_xact_lock({key})", (name,))
            except sa.exc.OperationalError as err:
                code = getattr(err.orig, "sqlstate", None) or getattr(err.orig, "pgcode", None)
                if code != _LOCK_NOT_AVAILABLE:
                    raise
                holder = "pg_locks, locktype 'advisory', joined to pg_stat_activity"
                raise ExportBusy.of(name, holder) from None
        # (The bound stays on this connection's transaction, which takes no other lock.)
        yield


_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's lock_timeout


def _waiting(name: str) -> None:
    logger.info("another export holds %s: waiting for it to finish (one at a time)", name)


def _sink(url: str) -> _DuckDBSink | _SQLAlchemySink:
    path = duckdb_path(url)
    return _DuckDBSink(str(path)) if path is not None else _SQLAlchemySink(url)
