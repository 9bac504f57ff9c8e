"""The warehouse against real engines: one suite, run on DuckDB always and on PostgreSQL when
TEST_POSTGRES_URL is set (each run in its own schema, dropped afterwards).

The same demo data is in both, so the same audience file with the same parameters must give the
same rows; what differs per engine is only how a write or a slow query is provoked.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pytest
import sqlglot
from polars.testing import assert_frame_equal

from cdp_activation.audience.sql import AudienceQuery, load_audience_sql
from cdp_activation.audience.warehouse import Warehouse, WarehouseError
from cdp_activation.demo.data import DEMO_TABLES, generate_demo_warehouse
from cdp_activation.demo.postgres import DemoLoadError, load_demo_into_postgres
from cdp_activation.settings import project_root

AS_OF = datetime(2025, 6, 1, tzinfo=UTC)
PARAMS = {"lapse_threshold": 0.7, "as_of": AS_OF}
WINBACK = project_root() / "sql" / "audiences" / "winback_whatsapp.sql"


@dataclass(frozen=True)
class Backend:
    """One engine under test and how to provoke it."""

    name: str
    url: str
    slow_sql: str  # runs for many seconds
    write_sqls: tuple[str, ...]  # each tries to change the suppressions table

    def warehouse(self, **options: float) -> Warehouse:
        return Warehouse(self.url, **options)

    def suppressions(self) -> int:
        frame = Warehouse(self.url).read_table_sql("SELECT count(*) AS n FROM suppressions")
        return int(frame["n"][0])


def raw_query(sql: str, dialect: str, name: str = "probe.sql") -> AudienceQuery:
    """An AudienceQuery built by hand, bypassing the loader's checks: what the warehouse itself
    must refuse even if a file got past `load_audience_sql`."""
    tree = sqlglot.parse_one(sql, read=dialect)
    params = frozenset(p.name for p in tree.find_all(sqlglot.exp.Placeholder) if p.name)
    return AudienceQuery(path=Path(name), text=sql, parameters=params, tree=tree)


def audience_file(
    tmp_path: Path, sql: str, dialect: str, name: str = "audience.sql"
) -> AudienceQuery:
    path = tmp_path / name
    path.write_text(sql)
    return load_audience_sql(path, dialect)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo_duckdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("warehouse") / "demo.duckdb"
    generate_demo_warehouse(path, customers=3_000, seed=11, as_of=AS_OF)
    return path


@pytest.fixture(scope="module")
def postgres_url(demo_duckdb: Path) -> Iterator[str]:
    """The demo loaded into a fresh schema of TEST_POSTGRES_URL; its URL sets search_path."""
    base = os.environ.get("TEST_POSTGRES_URL")
    if not base:
        pytest.skip(
            "TEST_POSTGRES_URL is not set (CI sets it; locally: "
            "TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test)"
        )
    import psycopg

    schema = f"warehouse_test_{uuid.uuid4().hex[:12]}"
    load_demo_into_postgres(demo_duckdb, base, schema)
    with psycopg.connect(base, autocommit=True) as con:
        # A function that writes: a SELECT calling it is the subtlest write an audience can hide.
        con.execute(
            f'CREATE FUNCTION "{schema}".probe_write() RETURNS bigint LANGUAGE sql VOLATILE AS '
            f'$$ INSERT INTO "{schema}".suppressions SELECT * FROM "{schema}".suppressions '
            "LIMIT 1 RETURNING 1 $$"
        )
        con.execute(f'CREATE SEQUENCE "{schema}".probe_sequence')
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as con:
            con.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["duckdb", "postgres"])
def backend(request: pytest.FixtureRequest, demo_duckdb: Path) -> Backend:
    if request.param == "duckdb":
        return Backend(
            name="duckdb",
            url=f"duckdb:///{demo_duckdb}",
            slow_sql="SELECT count(*) AS n FROM range(20000000000) AS t(i) WHERE hash(i) % 7 = 0",
            write_sqls=(
                "INSERT INTO suppressions SELECT * FROM suppressions LIMIT 1 RETURNING phone",
                "DELETE FROM suppressions RETURNING phone",
            ),
        )
    return Backend(
        name="postgres",
        url=request.getfixturevalue("postgres_url"),
        slow_sql="SELECT pg_sleep(30) AS slept",
        write_sqls=(
            "SELECT probe_write() AS wrote",
            "SELECT nextval('probe_sequence') AS n",
            "WITH gone AS (DELETE FROM suppressions RETURNING phone) SELECT count(*) FROM gone",
        ),
    )


# ---------------------------------------------------------------------- same data, same rows


def test_demo_tables_copied_with_types_and_rows(demo_duckdb: Path, postgres_url: str) -> None:
    pg = Warehouse(postgres_url)
    dd = Warehouse(f"duckdb:///{demo_duckdb}")
    for table in DEMO_TABLES:
        count = f"SELECT count(*) AS n FROM {table}"
        assert pg.read_table_sql(count)["n"][0] == dd.read_table_sql(count)["n"][0], table
    types = pg.read_table_sql(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
    )
    kinds = {(r["table_name"], r["column_name"]): r["data_type"] for r in types.to_dicts()}
    assert kinds["customers", "created_at"] == "timestamp with time zone"
    assert kinds["channel_consents", "opted_in"] == "boolean"
    assert kinds["lapse_scores", "lapse_risk"] == "double precision"
    assert kinds["orders", "amount"] == "numeric"
    assert kinds["customers", "customer_id"] == "bigint"


def test_winback_gives_identical_rows_on_duckdb_and_postgres(
    demo_duckdb: Path, postgres_url: str
) -> None:
    frames = {}
    for url in (f"duckdb:///{demo_duckdb}", postgres_url):
        warehouse = Warehouse(url)
        query = load_audience_sql(WINBACK, warehouse.dialect)
        frames[warehouse.dialect] = warehouse.query(query, PARAMS)
    duck, pg = frames["duckdb"], frames["postgres"]
    assert duck.height > 50
    # Same columns and types without casting; the cast only guards the comparison.
    assert pg.schema == duck.schema
    assert_frame_equal(
        pg.cast(dict(duck.schema)).sort("customer_id"),
        duck.sort("customer_id"),
        check_exact=True,
    )


def test_loading_again_replaces_the_tables(demo_duckdb: Path, postgres_url: str) -> None:
    base = os.environ["TEST_POSTGRES_URL"]
    schema = f"warehouse_reload_{uuid.uuid4().hex[:8]}"
    try:
        first = load_demo_into_postgres(demo_duckdb, base, schema)
        second = load_demo_into_postgres(demo_duckdb, base, schema)  # replaces, no duplicates
        assert first == second
        assert first["customers"] == 3_000
    finally:
        import psycopg

        with psycopg.connect(base, autocommit=True) as con:
            con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# ---------------------------------------------------------------------- one suite, both engines


def test_dialect(backend: Backend) -> None:
    assert backend.warehouse().dialect == backend.name


def test_bound_parameters_change_the_audience(backend: Backend) -> None:
    warehouse = backend.warehouse()
    query = load_audience_sql(WINBACK, warehouse.dialect)
    loose = warehouse.query(query, {**PARAMS, "lapse_threshold": 0.7})
    strict = warehouse.query(query, {**PARAMS, "lapse_threshold": 0.9})
    assert 0 < strict.height < loose.height
    assert strict["lapse_risk"].min() > 0.9  # type: ignore[operator]
    assert set(strict["customer_id"]) <= set(loose["customer_id"])
    # A threshold that looks like SQL is a value, never SQL: no rows, no error, no injection.
    with pytest.raises(WarehouseError, match=r":lapse_threshold \(str\)"):
        warehouse.query(query, {**PARAMS, "lapse_threshold": "0 OR 1=1"})


def test_missing_parameter_is_named(backend: Backend) -> None:
    warehouse = backend.warehouse()
    query = load_audience_sql(WINBACK, warehouse.dialect)
    with pytest.raises(WarehouseError, match=r"winback_whatsapp\.sql: parameter\(s\) :as_of"):
        warehouse.query(query, {"lapse_threshold": 0.7})
    with pytest.raises(WarehouseError, match=":as_of"):
        next(warehouse.query_batches(query, {"lapse_threshold": 0.7}))


def test_mistyped_parameter_is_a_clear_error(backend: Backend) -> None:
    warehouse = backend.warehouse()
    query = load_audience_sql(WINBACK, warehouse.dialect)
    with pytest.raises(WarehouseError) as refused:
        warehouse.query(query, {**PARAMS, "lapse_threshold": "high"})
    message = str(refused.value)
    assert "winback_whatsapp.sql: the warehouse refused the query" in message
    assert ":lapse_threshold (str)" in message  # which parameter, and what it was given
    with pytest.raises(WarehouseError, match=r":lapse_threshold is a dict, which cannot be bound"):
        warehouse.query(query, {**PARAMS, "lapse_threshold": {"gt": 0.7}})


def test_bad_column_names_the_file_and_the_column(backend: Backend, tmp_path: Path) -> None:
    warehouse = backend.warehouse()
    query = audience_file(
        tmp_path,
        "SELECT customer_id, favourite_colour FROM customers WHERE customer_id > :n",
        warehouse.dialect,
        name="colourful.sql",
    )
    with pytest.raises(WarehouseError, match=r"colourful\.sql: the warehouse refused") as refused:
        warehouse.query(query, {"n": 0})
    assert "favourite_colour" in str(refused.value)
    assert "SELECT customer_id" not in str(refused.value)  # the server's words, not the SQL


def test_colons_in_strings_and_casts_are_not_parameters(backend: Backend, tmp_path: Path) -> None:
    warehouse = backend.warehouse()
    query = audience_file(
        tmp_path,
        "-- :not_a_parameter in a comment\n"
        "SELECT customer_id, '12:30 :x' AS label, CAST(customer_id AS VARCHAR) AS id_text\n"
        "FROM customers WHERE customer_id <= :last ORDER BY customer_id;\n",
        warehouse.dialect,
    )
    assert query.parameters == {"last"}
    frame = warehouse.query(query, {"last": 3})
    assert frame["label"].to_list() == ["12:30 :x"] * 3
    assert frame["id_text"].to_list() == ["1", "2", "3"]


def test_writes_are_refused_by_the_warehouse(backend: Backend) -> None:
    before = backend.suppressions()
    warehouse = backend.warehouse()
    for sql in backend.write_sqls:
        with pytest.raises(WarehouseError, match=r"probe\.sql: ") as refused:
            warehouse.query(raw_query(sql, warehouse.dialect), {})
        if not sql.startswith("WITH"):  # PostgreSQL refuses DML in a cursor's WITH earlier
            assert "read-only" in str(refused.value)
    assert backend.suppressions() == before


def test_slow_query_hits_the_timeout(backend: Backend) -> None:
    warehouse = backend.warehouse(statement_timeout_s=0.5)
    query = raw_query(backend.slow_sql, warehouse.dialect, name="slow.sql")
    started = time.perf_counter()
    with pytest.raises(WarehouseError, match=r"slow\.sql: .*statement timeout of 0\.5 s"):
        warehouse.query(query, {})
    assert time.perf_counter() - started < 10
    with pytest.raises(WarehouseError, match="statement timeout"):
        list(warehouse.query_batches(query, {}))
    # The same warehouse answers the next query: the cancel did not poison anything.
    assert warehouse.read_table_sql("SELECT 1 AS one")["one"].to_list() == [1]


def test_framework_tables_are_joinable_for_one_query(backend: Backend, tmp_path: Path) -> None:
    warehouse = backend.warehouse()
    recent = pa.table(
        {
            "customer_id": pa.array([1, 2, 3, 5, 8], pa.int64()),
            "sends_7d": pa.array([4, 0, 1, 7, 2], pa.int32()),
            "last_sent_at": pa.array([AS_OF] * 5, pa.timestamp("us", tz="UTC")),
        }
    )
    query = audience_file(
        tmp_path,
        "SELECT c.customer_id, r.sends_7d, r.last_sent_at\n"
        "FROM customers AS c JOIN recent_sends AS r ON r.customer_id = c.customer_id\n"
        "WHERE r.sends_7d >= :cap ORDER BY c.customer_id",
        warehouse.dialect,
        name="capped.sql",
    )
    frame = warehouse.query(query, {"cap": 2}, tables={"recent_sends": recent})
    assert frame["customer_id"].to_list() == [1, 5, 8]
    assert frame["sends_7d"].to_list() == [4, 7, 2]
    assert frame["last_sent_at"].to_list() == [AS_OF] * 3
    batches = list(warehouse.query_batches(query, {"cap": 2}, tables={"recent_sends": recent}))
    assert sum(b.num_rows for b in batches) == 3
    # An empty table still has its columns, so the SQL keeps working with no sends at all.
    empty = warehouse.query(query, {"cap": 0}, tables={"recent_sends": recent.slice(0, 0)})
    assert empty.height == 0 and empty.columns == ["customer_id", "sends_7d", "last_sent_at"]
    # Registered for that query only.
    with pytest.raises(WarehouseError, match="recent_sends"):
        warehouse.query(query, {"cap": 2})
    with pytest.raises(WarehouseError, match="plain SQL identifier"):
        warehouse.query(query, {"cap": 2}, tables={"recent sends; DROP": recent})


def test_query_batches_yield_the_rows_of_query(backend: Backend) -> None:
    warehouse = backend.warehouse()
    query = load_audience_sql(WINBACK, warehouse.dialect)
    whole = warehouse.query(query, PARAMS)
    batches = list(warehouse.query_batches(query, PARAMS, batch_rows=50))
    assert len(batches) > 2
    assert all(0 < b.num_rows <= 50 for b in batches)
    streamed = pl.from_arrow(pa.Table.from_batches(batches))
    assert isinstance(streamed, pl.DataFrame)
    assert_frame_equal(streamed.sort("customer_id"), whole.sort("customer_id"))


def test_empty_result_still_has_a_schema(backend: Backend) -> None:
    warehouse = backend.warehouse()
    query = load_audience_sql(WINBACK, warehouse.dialect)
    params = {**PARAMS, "lapse_threshold": 2.0}
    assert warehouse.query(query, params).height == 0
    (batch,) = list(warehouse.query_batches(query, params))
    assert batch.num_rows == 0
    assert "customer_id" in batch.schema.names


def test_stopping_early_releases_the_connection(backend: Backend) -> None:
    warehouse = backend.warehouse()
    query = load_audience_sql(WINBACK, warehouse.dialect)
    stream = warehouse.query_batches(query, PARAMS, batch_rows=10)
    assert next(stream).num_rows == 10
    stream.close()  # cancels the cursor, closes the connection
    assert warehouse.query(query, PARAMS).height > 10


# ---------------------------------------------------------------------- connections


def test_dialect_of_each_kind_of_url() -> None:
    assert Warehouse("duckdb:///x.duckdb").dialect == "duckdb"
    assert Warehouse("postgresql://u@h/db").dialect == "postgres"
    assert Warehouse("postgresql+psycopg://u@h/db").dialect == "postgres"
    assert Warehouse("snowflake://u@acct/db/schema").dialect == "snowflake"
    assert Warehouse("bigquery://project/dataset").dialect == "bigquery"
    assert Warehouse("trino://u@h:8080/hive/crm").dialect == "trino"
    with pytest.raises(WarehouseError, match="oracle"):
        _ = Warehouse("oracle://scott@db/orcl").dialect


def test_missing_duckdb_file_is_named(tmp_path: Path) -> None:
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'nope.duckdb'}")
    with pytest.raises(WarehouseError, match=r"nope\.duckdb does not exist"):
        warehouse.query(raw_query("SELECT 1 AS x", "duckdb"), {})


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://analyst:S3cr3t-pw%21@127.0.0.1:1/crm",  # nothing listens on port 1
        "postgresql+psycopg://analyst:S3cr3t-pw%21@127.0.0.1:1/crm",
    ],
)
def test_connection_failure_names_host_and_port_never_the_password(
    url: str, demo_duckdb: Path
) -> None:
    warehouse = Warehouse(url)
    with pytest.raises(WarehouseError) as failed:
        warehouse.query(raw_query("SELECT 1 AS x", "postgres"), {})
    message = str(failed.value)
    assert "127.0.0.1:1/crm" in message
    assert "S3cr3t" not in message and "analyst" not in message
    assert "S3cr3t" not in repr(warehouse)
    with pytest.raises(DemoLoadError) as failed_load:
        load_demo_into_postgres(demo_duckdb, url)
    assert "127.0.0.1:1/crm" in str(failed_load.value)
    assert "S3cr3t" not in str(failed_load.value)


def test_rejected_login_never_shows_the_password(postgres_url: str) -> None:
    """A server that answers (unknown role): its message, but not the password we sent."""
    host_part = postgres_url.split("://", 1)[1].split("@", 1)[-1]
    url = f"postgresql://no_such_role_{uuid.uuid4().hex[:6]}:S3cr3t-pw@{host_part}"
    with pytest.raises(WarehouseError, match="cannot connect") as failed:
        Warehouse(url).query(raw_query("SELECT 1 AS x", "postgres"), {})
    assert "S3cr3t" not in str(failed.value)
    assert "127.0.0.1:5432" in str(failed.value) or "localhost" in str(failed.value)


def test_duckdb_warehouse_file_is_opened_read_only(demo_duckdb: Path) -> None:
    """While an audience query runs, another process may hold the file read-only too."""
    other = duckdb.connect(str(demo_duckdb), read_only=True)
    try:
        frame = Warehouse(f"duckdb:///{demo_duckdb}").query(
            load_audience_sql(WINBACK, "duckdb"), PARAMS
        )
        assert frame.height > 0
    finally:
        other.close()


def test_a_duckdb_query_past_its_memory_limit_spills_or_says_which_setting_to_raise(
    demo_duckdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CDP_DUCKDB_MEMORY_LIMIT bounds what an audience query may hold (it runs inside the step
    that then holds its result): a sort of ~100 MB of text under a 64 MB limit spills to a
    temporary directory of its own, removed after; what cannot spill (one 100 MB value) is a
    one-line error naming the setting."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    url = f"duckdb:///{demo_duckdb}"
    warehouse = Warehouse(url, duckdb_memory_limit="64MB")
    limit = warehouse.read_table_sql("SELECT current_setting('memory_limit') AS m")["m"][0]
    assert limit.replace(" ", "") == "61.0MiB"
    sorted_sql = (
        "SELECT count(*) AS n, min(h) AS first FROM (SELECT md5(CAST(i AS VARCHAR)) AS h "
        "FROM range(3000000) AS t(i) ORDER BY h)"
    )
    spilled = warehouse.query(raw_query(sorted_sql, "duckdb", name="big_sort.sql"), {})
    unlimited = Warehouse(url, duckdb_memory_limit="").query(
        raw_query(sorted_sql, "duckdb", name="big_sort.sql"), {}
    )
    assert spilled.to_dicts() == unlimited.to_dicts() and spilled["n"][0] == 3_000_000
    assert list(tmp_path.iterdir()) == []  # DuckDB removed its spill directory
    one_value = (
        "SELECT length(string_agg(md5(CAST(i AS VARCHAR)), ',')) AS n FROM range(3000000) AS t(i)"
    )
    with pytest.raises(WarehouseError) as refused:
        warehouse.query(raw_query(one_value, "duckdb", name="one_value.sql"), {})
    message = str(refused.value)
    assert message.startswith("one_value.sql: the query needs more memory")
    assert "CDP_DUCKDB_MEMORY_LIMIT: 64MB" in message and "\n" not in message
    assert "SET memory_limit" not in message


def test_two_queries_at_once_on_one_duckdb_file_share_its_spill_directory(
    demo_duckdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections to one DuckDB file in one process share its database and settings (a
    sensor and a run in one process, two threads of a code server): a query starting while
    another is spilling keeps the directory in use (DuckDB refuses to switch it) and both
    answer."""
    import threading

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    warehouse = Warehouse(f"duckdb:///{demo_duckdb}", duckdb_memory_limit="300MB")
    long_sort = raw_query(
        "SELECT count(*) AS n FROM (SELECT md5(CAST(i AS VARCHAR)) AS h "
        "FROM range(12000000) AS t(i) ORDER BY h)",
        "duckdb",
        name="long_sort.sql",
    )
    results: dict[str, Any] = {}

    def sort() -> None:
        try:
            results["sort"] = warehouse.query(long_sort, {})["n"][0]
        except Exception as err:  # reported below
            results["sort"] = err

    thread = threading.Thread(target=sort)
    thread.start()
    deadline = time.monotonic() + 60
    while thread.is_alive() and not any(f for d in tmp_path.iterdir() for f in d.iterdir()):
        assert time.monotonic() < deadline, "the sort never spilled"
        time.sleep(0.02)
    assert thread.is_alive(), "the sort ended before it could be overlapped"
    # Another query on the same file while the first one's blocks are on disk.
    assert warehouse.read_table_sql("SELECT 1 AS one")["one"].to_list() == [1]
    thread.join(120)
    assert results["sort"] == 12_000_000
    assert list(tmp_path.iterdir()) == []
