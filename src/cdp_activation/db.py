"""The framework's own database (ledger and phone cache): one way to open it.

SQLite (WAL, a busy timeout, its folder created) by default; PostgreSQL through psycopg 3 in
production, where a plain `postgresql://` URL means that driver.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import sqlalchemy as sa
import tenacity


def with_driver(url: str) -> str:
    """`postgresql://…` means psycopg 3 here (the driver this project installs)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def open_engine(url: str) -> sa.Engine:
    url = with_driver(url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # The busy timeout first: switching a new database to WAL waits for other connections.
    cursor.execute("PRAGMA busy_timeout=30000")
    # Not always: processes opening a new database at the same instant can find it locked
    # while another switches it, where SQLite does not wait because waiting could deadlock
    # ("database is locked" at once, 2 rounds in 8 of six processes opening the phone cache
    # on a new file). That is tried again here for a minute (an attempt may itself wait out
    # the busy timeout first), for whoever opens it.
    for attempt in tenacity.Retrying(
        retry=tenacity.retry_if_exception(sqlite_locked),
        wait=tenacity.wait_random_exponential(multiplier=0.05, max=2.0),
        stop=tenacity.stop_after_delay(60.0),
        reraise=True,
    ):
        with attempt:
            cursor.execute("PRAGMA journal_mode=WAL")
    # Every commit on disk before it returns (the WAL synced): a claim must outlive a power
    # loss or an OS crash, or its request, already sent, would be sent again once its row came
    # back `planned`; a status report or a STOP answered 200 must too, as the provider will
    # not send it again. NORMAL syncs only at checkpoints, and such a crash may roll the last
    # commits back (https://sqlite.org/pragma.html#pragma_synchronous). Measured: claims and
    # outcomes written 32 a transaction cost 10-17 µs a row more (`python -m bench engine`);
    # a delivery's rate 2-5% less, its CPU unchanged (the sync waits off the event loop,
    # `python -m bench throughput`); the status receiver unchanged (`python -m bench webhooks`).
    cursor.execute("PRAGMA synchronous=FULL")
    # Statement journals (a multi-row write that fires the ledger's history triggers, or an
    # upsert, keeps one to undo just that statement) and sorters in memory, not temporary
    # files: 10-17% off the ledger's plan and settle a row (`python -m bench engine`).
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.close()


def sqlite_locked(err: BaseException) -> bool:
    """SQLite's "database is locked", from its driver or through SQLAlchemy."""
    kinds = (sqlite3.OperationalError, sa.exc.OperationalError)
    return isinstance(err, kinds) and "database is locked" in str(err)


def read_frame(
    engine: sa.Engine, sql: str, params: Sequence[Any] = (), schema: Mapping[str, Any] | None = None
) -> pl.DataFrame:
    """The result of one query as a polars frame, the fastest way the database allows.

    SQLAlchemy's result rows cost ~2 µs a row; a phone cache or ledger table of a million rows
    is read several times faster as Arrow through ADBC (PostgreSQL, `adbc-driver-postgresql`),
    or, from SQLite, as one JSON array per column (ADBC's SQLite driver is another copy of
    SQLite in the process, and two copies' file locks can corrupt a database both have open —
    https://sqlite.org/howtocorrupt.html §2.2.1 — so it is not used).
    `sql` uses `$1, $2…` placeholders; `schema` fixes the column types, which an empty
    result could not tell.
    """
    if engine.dialect.name == "postgresql":
        table = _read_arrow_postgres(engine, sql, params)
        if table is not None:
            frame: pl.DataFrame = pl.from_arrow(table)  # type: ignore[assignment]
            return frame.cast(dict(schema)) if schema else frame  # type: ignore[arg-type]
    if engine.dialect.name == "sqlite" and schema:
        return _read_sqlite_columns(engine, sql, params, schema)
    style = "%s" if engine.dialect.name == "postgresql" else "?"
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(re.sub(r"\$\d+", style, sql), tuple(params))
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
        cursor.close()
    finally:
        raw.close()
    return pl.DataFrame(rows, schema=names, orient="row", infer_schema_length=None)


def _read_sqlite_columns(
    engine: sa.Engine, sql: str, params: Sequence[Any], schema: Mapping[str, Any]
) -> pl.DataFrame:
    """SQLite: each column comes back as one JSON array (`json_group_array`), decoded by
    polars, instead of a Python tuple per row: half the time for a million rows."""
    names = list(schema)
    arrays = ", ".join(f'json_group_array("{name}")' for name in names)
    inner = re.sub(r"\$\d+", "?", sql)
    wrapped = f"SELECT {arrays} FROM ({inner})"
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        row = cursor.execute(wrapped, tuple(params)).fetchone()
        cursor.close()
    finally:
        raw.close()
    return pl.DataFrame(
        {
            name: pl.Series([text]).str.json_decode(pl.List(schema[name])).explode()
            for name, text in zip(names, row, strict=True)
        }
    ).filter(pl.lit(row[0] != "[]"))  # an empty table still gives one row of "[]"


def _read_arrow_postgres(engine: sa.Engine, sql: str, params: Sequence[Any]) -> pa.Table | None:
    try:
        import adbc_driver_postgresql.dbapi as adbc_pg
    except ImportError:  # the [postgres] extra brings it; without it, DB-API rows
        return None
    uri = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with adbc_pg.connect(uri) as con, con.cursor() as cur:
        cur.execute(sql, tuple(params))
        return cur.fetch_arrow_table()


def as_utc(frame: pl.DataFrame, column: str) -> pl.Expr:
    """`column` of `frame` as a UTC datetime: converted from another zone, taken as UTC when it
    has none (SQLite hands times back naive; a warehouse may store them so), parsed if text."""
    dtype = frame.schema[column]
    if isinstance(dtype, pl.Datetime) and dtype.time_zone:
        return pl.col(column).dt.convert_time_zone("UTC")
    if isinstance(dtype, pl.Datetime):
        return pl.col(column).dt.replace_time_zone("UTC")
    return pl.col(column).str.to_datetime(time_zone="UTC")


def lock_schema(con: sa.Connection) -> None:
    """Hold the ledger's schema lock until `con`'s transaction ends: DDL on the ledger's
    database (the ledger's tables, the phone cache's) one process at a time."""
    if con.dialect.name == "postgresql":
        con.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('cdp_activation.ledger'))")
    elif con.dialect.name == "sqlite":
        # pysqlite opens a transaction at the first write: the DELETE takes the write lock
        # (waiting out the busy timeout), and the DDL that follows runs inside it.
        con.exec_driver_sql("CREATE TABLE IF NOT EXISTS ledger_schema_lock (id INTEGER)")
        con.exec_driver_sql("DELETE FROM ledger_schema_lock")
