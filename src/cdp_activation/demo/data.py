"""The demo warehouse: a deterministic, realistic-looking CDP export in one DuckDB file.

The data is made entirely in SQL (`sql/demo/schema.sql` then `sql/demo/generate.sql`), because
a Python loop over rows would take hours for the 10M-customer benchmark while DuckDB makes it in
minutes, in parallel, spilling to disk instead of holding everything in RAM.

Every value is a hash of (seed, row key, salt), never `random()`, so the same
(customers, seed, as_of) gives the same table contents on any machine and thread count, and
tests can assert on the data. All times are relative to `as_of`, so a demo generated "now"
always has fresh 24-hour windows and recent orders.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from cdp_activation.settings import project_root

log = logging.getLogger(__name__)

DEMO_TABLES = (
    "customers",
    "channel_consents",
    "lapse_scores",
    "last_inbound_messages",
    "suppressions",
    "orders",
    "cart_events",
    "wechat_followers",
)
"""The tables the generator fills, in creation order."""

MEMORY_LIMIT = "4GB"
"""DuckDB's memory cap while generating. 10M customers make ~100M rows in all; with a cap DuckDB
spills to a temp directory next to the file instead of growing until the machine swaps."""


def demo_sql_dir() -> Path:
    """Where `schema.sql` and `generate.sql` live (`<project root>/sql/demo`)."""
    return project_root() / "sql" / "demo"


def default_as_of() -> datetime:
    """Now in UTC truncated to the hour: stable for an hour, so reruns within it match."""
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def generate_demo_warehouse(
    path: Path,
    customers: int = 100_000,
    seed: int = 42,
    as_of: datetime | None = None,
) -> dict[str, int]:
    """Build the demo warehouse at `path`, replacing any file there; return rows per table.

    The warehouse is built in a temporary file in the same directory and renamed over `path`
    only when complete, so a reader (a running audience query, `dagster dev`) sees either the
    old warehouse or the new one, never a half-built one. A naive `as_of` is taken as UTC.
    """
    if customers < 0:
        raise ValueError(f"customers must be >= 0, got {customers}")
    if as_of is None:
        as_of = default_as_of()
    elif as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    as_of = as_of.astimezone(UTC)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.building")
    started = time.perf_counter()
    try:
        counts = _build(tmp, customers=customers, seed=seed, as_of=as_of)
        # A write-ahead log left by an earlier, uncleanly closed writer of `path` would be
        # replayed onto the new file on its next open: drop it before the swap.
        Path(f"{path}.wal").unlink(missing_ok=True)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, Path(f"{tmp}.wal")):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(f"{tmp}.spill", ignore_errors=True)
    log.info(
        "demo warehouse %s: %d customers (seed %d, as_of %s) in %.1fs: %s",
        path,
        customers,
        seed,
        as_of.isoformat(),
        time.perf_counter() - started,
        counts,
    )
    return counts


def _build(db_file: Path, *, customers: int, seed: int, as_of: datetime) -> dict[str, int]:
    """Fill a fresh DuckDB file and checkpoint it, so the renamed file needs no WAL."""
    con = duckdb.connect(str(db_file))
    try:
        # The cap makes DuckDB spill instead of growing. The spill directory sits beside the
        # file, on the same disk. Insertion order is not needed (nothing depends on it), and
        # dropping it lets DuckDB insert in parallel with less buffering.
        con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
        con.execute(f"SET temp_directory = '{_sql_str(f'{db_file}.spill')}'")
        con.execute("SET preserve_insertion_order = false")
        counts = fill_demo_warehouse(con, customers=customers, seed=seed, as_of=as_of)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return counts


def fill_demo_warehouse(
    con: duckdb.DuckDBPyConnection, *, customers: int, seed: int, as_of: datetime
) -> dict[str, int]:
    """Run schema.sql and generate.sql on an open connection; return rows per table.

    Split out of `generate_demo_warehouse` so tests and benchmarks can fill an in-memory
    database or one with other settings (e.g. a different thread count). Sets the session
    time zone to UTC, so times never depend on the machine's zone.
    """
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"SET VARIABLE customers = {int(customers)}::BIGINT")
    con.execute(f"SET VARIABLE seed = {int(seed)}::BIGINT")
    con.execute(f"SET VARIABLE as_of = TIMESTAMPTZ '{as_of.astimezone(UTC).isoformat()}'")
    sql_dir = demo_sql_dir()
    for script in (sql_dir / "schema.sql", sql_dir / "generate.sql"):
        for statement in duckdb.extract_statements(script.read_text(encoding="utf-8")):
            step = time.perf_counter()
            con.execute(statement)
            log.debug(
                "%s: %.2fs: %s",
                script.name,
                time.perf_counter() - step,
                statement.query.strip().splitlines()[0][:80],
            )
    return {table: _count(con, table) for table in DEMO_TABLES}


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def _sql_str(value: str) -> str:
    """Escape a value for a single-quoted SQL string literal."""
    return value.replace("'", "''")
