"""The send log: the ledger exported to the warehouse, so analysts can join sends, statuses,
fallbacks and holdouts to outcomes (`activation_send_log`, one row per send).

Incremental: each export reads the ledger rows changed since the newest `updated_at` already in
the table (less a few minutes of overlap, so a row committed late with an earlier stamp is not
missed) and upserts them by `send_id`. Running it twice, or after a crash, exports nothing
twice: the table keeps one row per send, in its latest state.

No personal data leaves the ledger: the log has the customer id (a key the warehouse already
holds) but not the phone number, LINE id or message text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import polars as pl
import sqlalchemy as sa

from cdp_activation.audience.warehouse import duckdb_path
from cdp_activation.db import with_driver
from cdp_activation.ledger import Ledger, sends

SEND_LOG_TABLE = "activation_send_log"
OVERLAP = timedelta(minutes=5)
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
    "run_id": pl.String(),
    "not_before": _UTC,
    "planned_at": _UTC,
    "sent_at": _UTC,
    "updated_at": _UTC,
}


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
    with ledger.engine.connect() as con:
        rows = con.execute(query).all()
    frame = pl.DataFrame(
        [tuple(r) for r in rows],
        schema={
            name: (pl.Datetime("us") if dtype == _UTC else dtype) for name, dtype in COLUMNS.items()
        },
        orient="row",
    )
    # The ledger stores UTC; SQLite hands times back without their zone.
    return frame.with_columns(
        pl.col(name).dt.replace_time_zone("UTC") for name, dtype in COLUMNS.items() if dtype == _UTC
    )


def export_send_log(ledger: Ledger, url: str, table: str = SEND_LOG_TABLE) -> SendLogExport:
    """Upsert the ledger's rows changed since the last export into `table` at `url` (a
    `duckdb:///file` or any SQLAlchemy URL)."""
    sink = _sink(url)
    try:
        newest = sink.newest(table)
        since = (newest - OVERLAP).astimezone(UTC) if newest is not None else None
        frame = changed_sends(ledger, since)
        rows = sink.upsert(table, frame)
    finally:
        sink.close()
    return SendLogExport(exported=frame.height, since=since, table_rows=rows)


class _DuckDBSink:
    def __init__(self, path: str) -> None:
        self.path = path

    def close(self) -> None:
        pass

    def newest(self, table: str) -> datetime | None:
        with duckdb.connect(self.path) as con:
            if not _duckdb_has(con, table):
                return None
            value = con.execute(f'SELECT max(updated_at) FROM "{table}"').fetchone()
        return value[0] if value else None

    def upsert(self, table: str, frame: pl.DataFrame) -> int:
        with duckdb.connect(self.path) as con:
            con.register("incoming", frame.to_arrow())
            con.execute("BEGIN")
            con.execute(f'CREATE TABLE IF NOT EXISTS "{table}" AS FROM incoming LIMIT 0')
            con.execute(f'DELETE FROM "{table}" WHERE send_id IN (SELECT send_id FROM incoming)')
            con.execute(f'INSERT INTO "{table}" BY NAME FROM incoming')
            con.execute("COMMIT")
            count = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        return int(count[0]) if count else 0


def _duckdb_has(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    found = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
    ).fetchone()
    return bool(found and found[0])


class _SQLAlchemySink:
    """Any SQLAlchemy database (PostgreSQL, Snowflake, BigQuery, …): a typed table, and an
    upsert as delete-then-insert of the changed ids in one transaction."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(with_driver(url))

    def close(self) -> None:
        self.engine.dispose()

    def _table(self, name: str) -> sa.Table:
        kinds: dict[pl.DataType, sa.types.TypeEngine[Any]] = {
            pl.Int64(): sa.BigInteger(),
            pl.String(): sa.Text(),
            _UTC: sa.DateTime(timezone=True),
        }
        columns = [
            sa.Column(column, kinds[dtype], primary_key=column == "send_id")
            for column, dtype in COLUMNS.items()
        ]
        return sa.Table(name, sa.MetaData(), *columns)

    def newest(self, table: str) -> datetime | None:
        if not sa.inspect(self.engine).has_table(table):
            return None
        target = self._table(table)
        with self.engine.connect() as con:
            return con.execute(sa.select(sa.func.max(target.c.updated_at))).scalar_one()

    def upsert(self, table: str, frame: pl.DataFrame) -> int:
        target = self._table(table)
        target.metadata.create_all(self.engine)
        rows = frame.to_dicts()
        ids = frame["send_id"].to_list()
        with self.engine.begin() as con:
            for start in range(0, len(ids), 5000):
                chunk = ids[start : start + 5000]
                con.execute(sa.delete(target).where(target.c.send_id.in_(chunk)))
            if rows:
                con.execute(sa.insert(target), rows)
            return int(con.execute(sa.select(sa.func.count()).select_from(target)).scalar_one())


def _sink(url: str) -> _DuckDBSink | _SQLAlchemySink:
    path = duckdb_path(url)
    return _DuckDBSink(str(path)) if path is not None else _SQLAlchemySink(url)
