"""The warehouse: where audience SQL runs. A DuckDB file is the embedded default.

Whatever the warehouse, the audience crosses as Arrow (then polars), never as Python rows, on a
connection that cannot write, with a time limit, and with the run's parameters bound by the
database, never formatted into the SQL:

- **DuckDB** (`duckdb:///path`): the file is opened `read_only=True`; `:name` placeholders become
  DuckDB's named `$name` parameters; results come from DuckDB's Arrow export (streamed in record
  batches by `query_batches`). DuckDB has no statement timeout, so a timer interrupts the
  connection when the query's time is up.
- **PostgreSQL** (`postgresql://`, `postgres://`, `postgresql+psycopg://` …): through ADBC
  (`adbc-driver-postgresql`, libpq underneath). Framework tables (`tables=`) are created as TEMP
  tables and filled by ADBC's bulk ingest (binary COPY) first; then the query runs in a
  `BEGIN READ ONLY` transaction with `SET LOCAL statement_timeout`, as a server-side cursor
  `DECLARE … CURSOR FOR <audience SQL>` whose `$1, $2 …` parameters the server binds (extended
  protocol), read by `FETCH FORWARD n`, each answer converted to Arrow in C by the driver.
- **Others** (Snowflake, BigQuery, Trino): the installed SQLAlchemy dialect, through polars'
  `read_database`. Read-only there is the credentials' job (a role with SELECT grants only), and
  neither `tables=` nor the timeout is available yet.

Why ADBC with a cursor, for PostgreSQL. Measured by `python -m bench audience` (2 cores, shared
and busy, PostgreSQL 15 on the same machine; best of 2 fresh processes; 1,000,000 rows of the
demo audience's 14 columns read from a table, so only the transfer is timed; peak RSS of the
whole process, of which ~100 MB is the interpreter and its imports):

| transport                                        |   wall | peak RSS | parameters  | streams |
| ------------------------------------------------ | -----: | -------: | ----------- | ------- |
| `psql \\copy (…) to /dev/null` (floor: no Arrow) | 0.85 s |   136 MB | pasted      | yes     |
| ADBC default: `COPY (…) TO STDOUT (FORMAT binary)` | 1.53 s | 260 MB | pasted      | yes     |
| connectorx `read_sql(return_type="arrow")`       | 1.78 s |   264 MB | pasted      | no      |
| ADBC, prepared statement with bound `$n`         | 1.94 s |   652 MB | server-side | no      |
| psycopg `COPY (…) (FORMAT csv)` → `pyarrow.csv`   | 2.39 s |   597 MB | pasted      | no      |
| **ADBC `DECLARE` cursor, bound `$n`, `FETCH`** → polars | 2.78 s | 405 MB | server-side | yes |

The cursor is not the fastest transfer, and is kept anyway: it is the only candidate that binds
the parameters on the server (COPY takes no `$n`, connectorx has no parameters at all), runs in
the READ ONLY transaction with the timeout, sees the session's TEMP tables (connectorx opens its
own connections), and streams in bounded memory (the prepared statement returns one result of
every row: 652 MB). Its ~1 s per million rows over the floor is small against the audience
query itself: end to end on the 1M-customer demo (257,025 rows) `Warehouse.query` took 7.6 s
against 10.5 s for `psql \\copy` of the same query, and streaming the wide audience (856,765
rows) to Parquet peaked at 265 MB against 470 MB collecting it. `bench/results.md` has it all.

Two PostgreSQL types arrive differently from DuckDB: NUMERIC comes as text (ADBC cannot know a
decimal's precision up front), so cast it in the SQL (`CAST(x AS DOUBLE PRECISION)`) when
arithmetic is needed; naive `TIMESTAMP` stays naive. Sessions use the UTC time zone on both
warehouses, so `CAST(ts AS DATE)` gives the same day everywhere.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import duckdb
import polars as pl
import pyarrow as pa
import sqlalchemy as sa
import tenacity
from sqlglot.dialects import Dialect
from sqlglot.tokens import TokenType

from cdp_activation.audience.sql import AudienceQuery, sql_dialect
from cdp_activation.errors import CdpError

DEFAULT_STATEMENT_TIMEOUT_S = 300.0
"""Five minutes: a real audience query on a warehouse takes seconds to a minute; one that runs
longer is usually a missing join condition, and should not hold a warehouse slot for hours."""

DEFAULT_BATCH_ROWS = 100_000
"""Rows per record batch from `query_batches`: ~15 MB for the demo audience's 14 columns, large
enough that per-batch overhead (one FETCH round trip) is negligible."""

_QUERY_FETCH_ROWS = 250_000
"""Rows per PostgreSQL FETCH when `query` collects everything anyway: fewer round trips."""

_CURSOR = "cdp_audience"
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_BINDABLE = (bool, int, float, Decimal, str, date, datetime, type(None))


class WarehouseError(CdpError, RuntimeError):
    """The warehouse refused or failed a query; the message says which file and why."""


def duckdb_path(url: str) -> Path | None:
    """The file of a `duckdb:///path` URL, or None for another kind of warehouse."""
    prefix = "duckdb:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, for messages and logs."""
    password = _url_password(url)
    return url.replace(f":{password}@", ":***@") if password else url


def postgres_uri(url: str) -> str:
    """The libpq URI of a PostgreSQL URL: SQLAlchemy's `+driver` suffix dropped."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0].lower() not in ("postgresql", "postgres"):
        raise WarehouseError(f"not a PostgreSQL URL: {redact_url(url)}")
    return f"postgresql://{rest}"


def postgres_endpoint(url: str) -> str:
    """`host:port/database` of a PostgreSQL URL, for messages: never user or password."""
    parts = urlsplit(postgres_uri(url))
    host = parts.hostname or "localhost (Unix socket)"
    try:
        port: int | str = parts.port or 5432
    except ValueError:
        port = "?"
    database = parts.path.lstrip("/") or "(default database)"
    return f"{host}:{port}/{database}"


@dataclass
class _Deadline:
    """The time a query may still use, counted only while the warehouse works on it.

    Counting only warehouse time (not the time a caller of `query_batches` spends writing each
    batch) keeps the limit meaning what `statement_timeout` means: how long the query runs.
    """

    seconds: float
    used: float = 0.0
    started: float = field(default=0.0, repr=False)

    def remaining(self) -> float:
        return max(self.seconds - self.used, 0.001)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.used += time.perf_counter() - started


class Warehouse:
    """Runs audience queries read-only and returns Arrow record batches or polars frames.

    `url` is a `duckdb:///path` or an SQLAlchemy-style URL (`postgresql://user@host/db`,
    `snowflake://…`, `bigquery://…`, `trino://…`). `statement_timeout_s` bounds how long the
    warehouse may work on one query (DuckDB and PostgreSQL).
    """

    def __init__(
        self,
        url: str,
        *,
        statement_timeout_s: float = DEFAULT_STATEMENT_TIMEOUT_S,
        duckdb_memory_limit: str | None = None,
    ) -> None:
        if statement_timeout_s <= 0:
            raise ValueError(f"statement_timeout_s must be > 0, got {statement_timeout_s}")
        self.url = url
        self.statement_timeout_s = statement_timeout_s
        # DuckDB's `memory_limit` for its queries ("2GB"); past it, they spill to a temporary
        # directory of their own. None or empty: DuckDB's default.
        self.duckdb_memory_limit = (duckdb_memory_limit or "").strip() or None

    def __repr__(self) -> str:
        return f"Warehouse({redact_url(self.url)!r})"

    @property
    def dialect(self) -> str:
        """The sqlglot dialect of this warehouse: duckdb, postgres, snowflake, bigquery, trino…"""
        try:
            return sql_dialect(self.url)
        except ValueError as err:
            raise WarehouseError(str(err)) from None

    # ------------------------------------------------------------------ public API

    def query(
        self,
        query: AudienceQuery,
        params: Mapping[str, Any],
        tables: Mapping[str, pa.Table] | None = None,
    ) -> pl.DataFrame:
        """Run an audience query with its parameters bound; the whole result as polars.

        `tables` makes small framework tables (e.g. the ledger's recent sends per customer)
        readable by name in the SQL for this query only, so a frequency cap can be a join in
        the warehouse rather than a second pass in Python.
        """
        bound = self._bound(query, params)
        path = duckdb_path(self.url)
        if path is not None:
            table = self._duckdb_table(path, query, bound, tables)
        elif self.dialect == "postgres":
            table = pa.Table.from_batches(
                list(self._postgres_batches(query, bound, tables, _QUERY_FETCH_ROWS))
            )
        else:
            return self._sqlalchemy_frame(query, bound, tables)
        return pl.from_arrow(table)  # type: ignore[return-value]

    def query_batches(
        self,
        query: AudienceQuery,
        params: Mapping[str, Any],
        batch_rows: int = DEFAULT_BATCH_ROWS,
        tables: Mapping[str, pa.Table] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream the result in record batches of at most `batch_rows` rows.

        Memory stays bounded by a few batches whatever the audience's size, so a 10M-row
        audience can go to a Parquet file (or the ledger) without being held whole. An empty
        result yields one empty batch, so a consumer still learns the schema. Stop iterating
        early (or close the generator) and the query is cancelled and its connection closed.
        """
        if batch_rows <= 0:
            raise ValueError(f"batch_rows must be > 0, got {batch_rows}")
        bound = self._bound(query, params)
        path = duckdb_path(self.url)
        if path is not None:
            batches = self._duckdb_batches(path, query, bound, tables, batch_rows)
        elif self.dialect == "postgres":
            batches = self._postgres_batches(query, bound, tables, batch_rows)
        else:
            batches = self._sqlalchemy_batches(query, bound, tables, batch_rows)
        yield from _at_least_one(batches)

    def read_table_sql(self, sql: str) -> pl.DataFrame:
        """Run a trusted, parameterless query of the framework's own (e.g. suppressions)."""
        # No parse tree: the framework's own SQL is trusted and never transpiled.
        query = AudienceQuery(
            path=Path("<framework query>"),
            text=sql,
            parameters=frozenset(),
            tree=None,  # type: ignore[arg-type]
        )
        return self.query(query, {})

    # ------------------------------------------------------------------ parameters

    def _bound(self, query: AudienceQuery, params: Mapping[str, Any]) -> dict[str, Any]:
        missing = sorted(query.parameters - params.keys())
        if missing:
            raise WarehouseError(
                f"{query.path}: parameter(s) {', '.join(':' + m for m in missing)} have no value; "
                "declare them under audience.parameters in the activation's defs.yaml"
            )
        bound = {k: v for k, v in params.items() if k in query.parameters}
        for name, value in sorted(bound.items()):
            if not isinstance(value, _BINDABLE):
                raise WarehouseError(
                    f"{query.path}: parameter :{name} is a {type(value).__name__}, which cannot "
                    "be bound; use a bool, int, float, Decimal, str, date, datetime or None"
                )
        return bound

    def _placeholders(self, query: AudienceQuery, positional: bool) -> tuple[str, list[str]]:
        """The analyst's SQL, verbatim, with each `:name` made the driver's placeholder.

        The text is tokenised in the warehouse's dialect, so a `:name` inside a string literal
        or a comment, or a `::type` cast, is never taken for a parameter. DuckDB gets `$name`;
        PostgreSQL gets `$1, $2 …` (one number per distinct name) and the order to bind them in.
        """
        text = query.text
        tokens = Dialect.get_or_raise(self.dialect).tokenize(text)
        while tokens and tokens[-1].token_type == TokenType.SEMICOLON:
            text = text[: tokens[-1].start]
            tokens = tokens[:-1]
        order: list[str] = []
        pieces: list[str] = []
        cursor = 0
        for colon, name in itertools.pairwise(tokens):
            if (
                colon.token_type != TokenType.COLON
                or name.start != colon.end + 1
                or name.text not in query.parameters
            ):
                continue
            if name.text not in order:
                order.append(name.text)
            marker = f"${order.index(name.text) + 1}" if positional else f"${name.text}"
            pieces.append(text[cursor : colon.start])
            pieces.append(marker)
            cursor = name.end + 1
        pieces.append(text[cursor:])
        return "".join(pieces).strip(), order

    # ------------------------------------------------------------------ DuckDB

    def _duckdb(
        self, path: Path, tables: Mapping[str, pa.Table] | None
    ) -> duckdb.DuckDBPyConnection:
        if not path.exists():
            raise WarehouseError(
                f"DuckDB warehouse {path} does not exist; create the demo one with "
                "`cdp-activation demo` or set CDP_WAREHOUSE_URL"
            )
        try:
            con = connect_duckdb(path, read_only=True)
        except duckdb.Error as err:
            raise WarehouseError(f"cannot open DuckDB warehouse {path}: {err}") from None
        try:
            con.execute("SET enable_progress_bar = false")
            con.execute("SET TimeZone = 'UTC'")
            if self.duckdb_memory_limit:
                _limit_memory(con, self.duckdb_memory_limit)
            for name, table in _checked_tables(tables).items():
                con.register(name, table)
        except BaseException:
            con.close()
            raise
        return con

    def _duckdb_table(
        self,
        path: Path,
        query: AudienceQuery,
        params: Mapping[str, Any],
        tables: Mapping[str, pa.Table] | None,
    ) -> pa.Table:
        sql, _ = self._placeholders(query, positional=False)
        deadline = _Deadline(self.statement_timeout_s)
        with (
            self._duckdb(path, tables) as con,
            self._duckdb_errors(query, params, con, deadline),
        ):
            return _duckdb_relation(con, sql, params).to_arrow_table()

    def _duckdb_batches(
        self,
        path: Path,
        query: AudienceQuery,
        params: Mapping[str, Any],
        tables: Mapping[str, pa.Table] | None,
        batch_rows: int,
    ) -> Iterator[pa.RecordBatch]:
        sql, _ = self._placeholders(query, positional=False)
        deadline = _Deadline(self.statement_timeout_s)
        with self._duckdb(path, tables) as con:
            with self._duckdb_errors(query, params, con, deadline):
                reader = _duckdb_relation(con, sql, params).to_arrow_reader(batch_rows)
            while True:
                with self._duckdb_errors(query, params, con, deadline):
                    batch = next(reader, None)
                if batch is None:
                    yield _empty_batch(reader.schema)  # the schema, for an empty result
                    return
                yield batch

    @contextlib.contextmanager
    def _duckdb_errors(
        self,
        query: AudienceQuery,
        params: Mapping[str, Any],
        con: duckdb.DuckDBPyConnection,
        deadline: _Deadline,
    ) -> Iterator[None]:
        """Interrupt `con` if the deadline passes inside the block; map DuckDB's errors."""
        state = {"active": True, "fired": False}
        lock = threading.Lock()

        def interrupt() -> None:
            with lock:
                if state["active"]:
                    state["fired"] = True
                    con.interrupt()

        timer = threading.Timer(deadline.remaining(), interrupt)
        timer.daemon = True
        timer.start()
        try:
            with deadline.running():
                yield
        except duckdb.Error as err:
            if state["fired"]:
                raise self._timeout_error(query) from None
            message = str(err)
            if "read-only" in message:
                raise self._write_error(query, message) from None
            if isinstance(err, duckdb.OutOfMemoryException):
                raise self._memory_error(query, message) from None
            raise self._refused(query, params, message) from None
        finally:
            with lock:
                state["active"] = False
            timer.cancel()

    # ------------------------------------------------------------------ PostgreSQL

    def _postgres_batches(
        self,
        query: AudienceQuery,
        params: Mapping[str, Any],
        tables: Mapping[str, pa.Table] | None,
        fetch_rows: int,
    ) -> Iterator[pa.RecordBatch]:
        from adbc_driver_postgresql import StatementOptions

        sql, order = self._placeholders(query, positional=True)
        values = tuple(params[name] for name in order)
        checked = _checked_tables(tables)
        deadline = _Deadline(self.statement_timeout_s)
        with self._postgres_connect() as con, con.cursor() as cur:
            try:
                for name, table in checked.items():
                    cur.adbc_ingest(name, table, mode="create", temporary=True)
            except _adbc_error() as err:
                raise WarehouseError(
                    f"{query.path}: could not create the framework's temporary tables "
                    f"({', '.join(checked)}): {_postgres_message(err)}"
                ) from None
            # COPY cannot read from a cursor: every statement below is a plain query.
            cur.adbc_statement.set_options(**{StatementOptions.USE_COPY.value: "false"})
            try:
                # Session settings and the TEMP tables are committed first: a transaction that
                # has already written (or read) cannot be made read-only afterwards.
                cur.execute("SET TimeZone = 'UTC'")
                con.commit()
                cur.execute("SET TRANSACTION READ ONLY")
                # A cursor is planned for its first 10 % of rows by default (fast-start plans,
                # e.g. nested loops); the whole audience is always read, so plan for all of it.
                cur.execute("SET LOCAL cursor_tuple_fraction = 1.0")
                with self._postgres_errors(query, params, cur, deadline):
                    cur.execute(f"DECLARE {_CURSOR} NO SCROLL CURSOR FOR {sql}", values or None)
                while True:
                    with self._postgres_errors(query, params, cur, deadline):
                        cur.execute(f"FETCH FORWARD {int(fetch_rows)} FROM {_CURSOR}")
                        table = _plain_types(cur.fetch_arrow_table())
                    if table.num_rows == 0:
                        yield _empty_batch(table.schema)  # the schema, for an empty result
                        return
                    yield from table.to_batches()
            finally:
                with contextlib.suppress(Exception):
                    con.rollback()  # read-only: nothing to keep; closes the cursor
                for name in checked:
                    with contextlib.suppress(Exception):
                        cur.execute(f'DROP TABLE IF EXISTS pg_temp."{name}"')
                with contextlib.suppress(Exception):
                    con.commit()

    def _postgres_connect(self) -> Any:
        try:
            import adbc_driver_postgresql.dbapi as adbc_pg
        except ImportError:
            raise WarehouseError(
                "PostgreSQL warehouses need the ADBC driver: pip install 'cdp-activation[postgres]'"
            ) from None
        try:
            # Not autocommit: the driver then leaves our transaction alone (in autocommit mode it
            # commits around some bound statements, which would close the cursor).
            return adbc_pg.connect(postgres_uri(self.url), autocommit=False)
        except _adbc_error() as err:
            raise WarehouseError(
                f"cannot connect to the PostgreSQL warehouse at {postgres_endpoint(self.url)}: "
                f"{redact_password(_postgres_message(err), self.url)}"
            ) from None

    @contextlib.contextmanager
    def _postgres_errors(
        self, query: AudienceQuery, params: Mapping[str, Any], cur: Any, deadline: _Deadline
    ) -> Iterator[None]:
        """Give the block what is left of the time limit and map PostgreSQL's errors."""
        cur.execute(f"SET LOCAL statement_timeout = {max(int(deadline.remaining() * 1000), 1)}")
        try:
            with deadline.running():
                yield
        except _adbc_error() as err:
            state = getattr(err, "sqlstate", None)
            message = redact_password(_postgres_message(err), self.url)
            if state == "57014":
                raise self._timeout_error(query) from None
            if state == "25006":
                raise self._write_error(query, message) from None
            raise self._refused(query, params, message) from None

    # ------------------------------------------------------------------ others (SQLAlchemy)

    def _sqlalchemy_frame(
        self,
        query: AudienceQuery,
        params: Mapping[str, Any],
        tables: Mapping[str, pa.Table] | None,
    ) -> pl.DataFrame:
        frames = [
            pl.DataFrame(pl.from_arrow(b))
            for b in self._sqlalchemy_batches(query, params, tables, None)
        ]
        return pl.concat(frames) if frames else pl.DataFrame()

    def _sqlalchemy_batches(
        self,
        query: AudienceQuery,
        params: Mapping[str, Any],
        tables: Mapping[str, pa.Table] | None,
        batch_rows: int | None,
    ) -> Iterator[pa.RecordBatch]:
        if tables:
            raise WarehouseError(
                f"{query.path}: framework tables ({', '.join(tables)}) can be joined on DuckDB "
                f"and PostgreSQL warehouses only, not on {self.dialect}"
            )
        text = query.text if query.tree is None else query.sqlalchemy_text(self.dialect)
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as con:
                options = {"parameters": dict(params)}
                if batch_rows is None:
                    frame = pl.read_database(sa.text(text), con, execute_options=options)
                    yield from frame.to_arrow().to_batches()
                    return
                for chunk in pl.read_database(
                    sa.text(text),
                    con,
                    execute_options=options,
                    iter_batches=True,
                    batch_size=batch_rows,
                ):
                    yield from chunk.to_arrow().to_batches()
        except sa.exc.SQLAlchemyError as err:
            orig = getattr(err, "orig", None)
            message = f"{err.__class__.__name__}: {orig if orig else err}"
            raise self._refused(query, params, redact_password(message, self.url)) from None
        finally:
            engine.dispose()

    # ------------------------------------------------------------------ messages

    def _refused(self, query: AudienceQuery, params: Mapping[str, Any], message: str) -> Exception:
        bound = ", ".join(f":{k} ({type(v).__name__})" for k, v in sorted(params.items()))
        suffix = f" [bound parameters: {bound}]" if bound else ""
        return WarehouseError(
            f"{query.path}: the warehouse refused the query: {message.strip()}{suffix}"
        )

    def _timeout_error(self, query: AudienceQuery) -> Exception:
        return WarehouseError(
            f"{query.path}: the query ran longer than the warehouse's statement timeout of "
            f"{self.statement_timeout_s:g} s and was cancelled; make it cheaper (a missing join "
            "condition?) or raise the warehouse's statement_timeout_s"
        )

    def _memory_error(self, query: AudienceQuery, message: str) -> Exception:
        # DuckDB's own advice (SET memory_limit …) names settings a user cannot reach here.
        first = message.strip().splitlines()[0]
        limit = self.duckdb_memory_limit or "DuckDB's default, 80% of RAM"
        return WarehouseError(
            f"{query.path}: the query needs more memory than the warehouse may use "
            f"(CDP_DUCKDB_MEMORY_LIMIT: {limit}), even spilling to disk ({first}); raise "
            "CDP_DUCKDB_MEMORY_LIMIT or aggregate less (every column of every row of the "
            "audience is held while it runs)"
        )

    def _write_error(self, query: AudienceQuery, message: str) -> Exception:
        return WarehouseError(
            f"{query.path}: the query tried to write, and audience SQL runs read-only; the "
            f"warehouse said: {message.strip()}"
        )


# ---------------------------------------------------------------------- helpers


def _limit_memory(con: duckdb.DuckDBPyConnection, limit: str) -> None:
    """DuckDB's `memory_limit` for `con`'s database, spilling to this process's own temporary
    directory (DuckDB's default is beside the database file, which a read-only warehouse may
    not allow; DuckDB removes it when the database closes).

    Connections to one file in one process share its database and settings: a query of
    another thread may be spilling there right now, and DuckDB refuses to switch a temporary
    directory in use, even to the same path. So the directory is set only when it is not
    already this one; one in use is kept (it works: it is being written)."""
    con.execute("SET memory_limit = ?", [limit])
    spill = str(Path(tempfile.gettempdir()) / f"cdp-duckdb-{os.getpid()}")
    # fetchall: a result left unfinished makes the connection refuse its next statement.
    if con.execute("SELECT current_setting('temp_directory')").fetchall() == [(spill,)]:
        return
    # "Cannot switch temporary directory after the current one has been used": keep it.
    with contextlib.suppress(duckdb.NotImplementedException):
        con.execute("SET temp_directory = ?", [spill])


def _checked_tables(tables: Mapping[str, pa.Table] | None) -> dict[str, pa.Table]:
    """Framework tables by name, checked: a plain identifier each, Arrow data."""
    checked: dict[str, pa.Table] = {}
    for name, table in (tables or {}).items():
        if not _TABLE_NAME.fullmatch(name):
            raise WarehouseError(
                f"framework table name {name!r} must be a plain SQL identifier "
                "(letters, digits, underscore; at most 63 characters)"
            )
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise WarehouseError(
                f"framework table {name!r} must be a pyarrow.Table, got {type(table).__name__}"
            )
        checked[name] = table
    return checked


def _duckdb_relation(
    con: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any]
) -> duckdb.DuckDBPyRelation:
    relation = con.sql(sql, params=dict(params))
    if relation is None:
        raise duckdb.InvalidInputException("the query returned no result set")
    return relation


def _plain_types(table: pa.Table) -> pa.Table:
    """Unwrap ADBC's opaque extension columns (NUMERIC…) to their text storage for polars."""
    if not any(isinstance(t, pa.ExtensionType) for t in table.schema.types):
        return table
    columns = [
        col.cast(col.type.storage_type) if isinstance(col.type, pa.ExtensionType) else col
        for col in table.columns
    ]
    return pa.Table.from_arrays(columns, names=table.schema.names)


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


def _at_least_one(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Yield the non-empty batches, or a single empty one carrying the schema."""
    empty: pa.RecordBatch | None = None
    seen = False
    for batch in batches:
        if batch.num_rows:
            seen = True
            yield batch
        elif empty is None:
            empty = batch
    if not seen and empty is not None:
        yield empty


def _adbc_error() -> type[Exception]:
    import adbc_driver_manager

    return adbc_driver_manager.Error


def _postgres_message(err: Exception) -> str:
    """PostgreSQL's own words from an ADBC error, without the driver's wrapping or the SQL.

    ADBC's message repeats the whole statement ("Failed to execute query '…'"), which for an
    audience is a screenful; the server's `ERROR:` line and its HINT are what a user needs.
    """
    text = str(err)
    start = text.find("ERROR:")
    if start < 0:
        start = text.find("FATAL:")
    if start < 0:
        body = re.sub(r"^[A-Z_]+: (\[libpq\] )?", "", text).strip()
        return body.split("\n\n")[0].strip()
    body = text[start:]
    body = re.split(r"\n\s*Query was:|\.?\s*SQLSTATE:", body)[0]
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    keep = [lines[0].replace("ERROR:  ", "").replace("FATAL:  ", "FATAL: ")]
    keep += [ln for ln in lines[1:] if ln.startswith(("HINT:", "DETAIL:"))]
    return " ".join(keep)


def _url_password(url: str) -> str | None:
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return password or None


def redact_password(message: str, url: str) -> str:
    """Remove the URL's password (as written and decoded) from a message, to be safe."""
    password = _url_password(url)
    if not password:
        return message
    for form in {password, unquote(password)}:
        message = message.replace(form, "***")
    return message


def _locked(err: BaseException) -> bool:
    """DuckDB's "another process has the file" (one writer, or readers, at a time)."""
    return isinstance(err, duckdb.IOException) and "lock" in str(err).lower()


def connect_duckdb(path: Path, *, read_only: bool, wait_seconds: float = 30.0) -> Any:
    """Open a DuckDB file, waiting while another process holds its lock: DuckDB lets one
    process write *or* several read, so a reader meets a live event loader (`demo --live`)
    for the milliseconds of its insert, and the other way round."""
    for attempt in tenacity.Retrying(
        retry=tenacity.retry_if_exception(_locked),
        wait=tenacity.wait_random_exponential(multiplier=0.02, max=0.5),
        stop=tenacity.stop_after_delay(wait_seconds),
        reraise=True,
    ):
        with attempt:
            return duckdb.connect(str(path), read_only=read_only)
    raise AssertionError("unreachable")  # Retrying either returns or re-raises
