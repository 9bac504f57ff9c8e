"""Copy the demo warehouse from its DuckDB file into PostgreSQL, for tests and benchmarks.

DuckDB's `postgres` extension would do this in one statement, but it is downloaded on first use
and this project must work offline, so the copy goes through psycopg instead. Each table is
read from DuckDB as Arrow record batches, written as CSV by pyarrow's C++ writer and streamed
into `COPY … FROM STDIN (FORMAT csv)`: no Python loop over rows, bounded memory, and about
as fast as PostgreSQL can ingest (~1M rows/s on 2 cores). CSV rather than binary COPY because
pyarrow writes CSV natively, while binary COPY would need a Python encoder per value.

CSV keeps NULL and the empty string apart (an unquoted empty field is NULL, `""` is an empty
string, which is how pyarrow writes them), doubles are written in shortest round-trip form, and
timestamps with their UTC offset, so PostgreSQL holds exactly the values DuckDB held and an
audience query returns the same rows on both.
"""

from __future__ import annotations

import io
import logging
import re
import time
from pathlib import Path

import duckdb
import psycopg
import pyarrow.csv as pacsv
from psycopg import sql

from cdp_activation.audience.warehouse import postgres_endpoint, postgres_uri, redact_password
from cdp_activation.demo.data import DEMO_TABLES
from cdp_activation.errors import CdpError

log = logging.getLogger(__name__)

BATCH_ROWS = 500_000
"""Rows per Arrow batch read from DuckDB and sent as one CSV chunk: big enough to amortise the
per-chunk cost, small enough (~50 MB of CSV) that memory stays flat for the 10M demo."""

_SIMPLE_TYPES = {
    "BIGINT": "BIGINT",
    "INTEGER": "INTEGER",
    "SMALLINT": "SMALLINT",
    "BOOLEAN": "BOOLEAN",
    "DOUBLE": "DOUBLE PRECISION",
    "FLOAT": "REAL",
    "VARCHAR": "TEXT",
    "DATE": "DATE",
    "TIMESTAMP": "TIMESTAMP",
    "TIMESTAMP WITH TIME ZONE": "TIMESTAMPTZ",
}
_DECIMAL = re.compile(r"DECIMAL\((\d+),\s*(\d+)\)")

PRIMARY_KEYS = {"customers": "customer_id"}
"""Keys worth having in PostgreSQL (DuckDB's schema declares the same one)."""


class DemoLoadError(CdpError, RuntimeError):
    """The demo warehouse could not be copied; the message says which table and why."""


def postgres_type(duckdb_type: str) -> str:
    """The PostgreSQL column type that holds a DuckDB column's values without loss."""
    if duckdb_type in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[duckdb_type]
    match = _DECIMAL.fullmatch(duckdb_type)
    if match:
        return f"NUMERIC({match[1]}, {match[2]})"
    raise DemoLoadError(f"no PostgreSQL type for DuckDB type {duckdb_type}")


def load_demo_into_postgres(duckdb_file: Path, url: str, schema: str = "public") -> dict[str, int]:
    """Replace the six demo tables in `schema` at `url` with those of `duckdb_file`.

    Returns rows per table. The schema is created if missing. Each table is dropped, created
    and filled in one transaction, so a failed load leaves the previous table in place, and
    `COPY … FREEZE` (allowed because the table is new in that transaction) writes the rows
    already frozen, sparing PostgreSQL a vacuum pass over them afterwards.
    """
    duckdb_file = Path(duckdb_file)
    if not duckdb_file.is_file():
        raise DemoLoadError(f"demo warehouse {duckdb_file} does not exist")
    counts: dict[str, int] = {}
    try:
        source = duckdb.connect(str(duckdb_file), read_only=True)
    except duckdb.Error as err:
        raise DemoLoadError(f"cannot open the demo warehouse {duckdb_file}: {err}") from None
    try:
        source.execute("SET TimeZone = 'UTC'")
        source.execute("SET enable_progress_bar = false")
        with _connect(url) as pg:
            with pg.transaction():
                pg.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            for table in DEMO_TABLES:
                started = time.perf_counter()
                counts[table] = _copy_table(source, pg, schema, table)
                log.info(
                    "demo table %s.%s: %d rows in %.1fs",
                    schema,
                    table,
                    counts[table],
                    time.perf_counter() - started,
                )
    finally:
        source.close()
    return counts


def _connect(url: str) -> psycopg.Connection:
    """An autocommit psycopg connection; a failure names host and port, never the password."""
    try:
        return psycopg.connect(postgres_uri(url), autocommit=True)
    except psycopg.OperationalError as err:
        reason = redact_password(str(err).strip(), url)
        raise DemoLoadError(
            f"cannot connect to PostgreSQL at {postgres_endpoint(url)}: {reason}"
        ) from None


def _copy_table(
    source: duckdb.DuckDBPyConnection, pg: psycopg.Connection, schema: str, table: str
) -> int:
    columns = source.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()
    if not columns:
        raise DemoLoadError(f"the demo warehouse has no table {table}")
    target = sql.Identifier(schema, table)
    definitions = [
        sql.SQL("{} {}{}").format(
            sql.Identifier(name),
            sql.SQL(postgres_type(kind)),  # from our own mapping
            sql.SQL("" if nullable == "YES" else " NOT NULL"),
        )
        for name, kind, nullable in columns
    ]
    names = sql.SQL(", ").join(sql.Identifier(name) for name, _, _ in columns)
    rows = 0
    with pg.transaction():
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target))
        pg.execute(sql.SQL("CREATE TABLE {} ({})").format(target, sql.SQL(", ").join(definitions)))
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv, FREEZE true)").format(
            target, names
        )
        reader = source.sql(f'SELECT * FROM "{table}"').to_arrow_reader(BATCH_ROWS)
        options = pacsv.WriteOptions(include_header=False)
        with pg.cursor() as cur, cur.copy(copy_sql) as copy:
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                buffer = io.BytesIO()
                pacsv.write_csv(batch, buffer, options)
                copy.write(buffer.getbuffer())
                rows += batch.num_rows
        key = PRIMARY_KEYS.get(table)
        if key is not None:
            pg.execute(
                sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(target, sql.Identifier(key))
            )
    pg.execute(sql.SQL("ANALYZE {}").format(target))
    return rows
