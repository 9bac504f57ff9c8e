"""Warehouses without a server here (Snowflake, BigQuery, Trino): their SQLAlchemy dialects
compile every audience query with its parameters bound, and sqlglot reads it in that dialect."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
import sqlglot

from cdp_activation.audience.sql import AudienceSQLError, load_audience_sql, sql_dialect
from cdp_activation.settings import project_root

AUDIENCES = sorted((project_root() / "sql" / "audiences").glob("*.sql"))

WAREHOUSES = [
    pytest.param(
        "snowflake://analyst@acme-xy12345/CRM/PUBLIC?warehouse=ACTIVATION",
        "snowflake",
        id="snowflake",
    ),
    pytest.param("bigquery://acme-project/crm", "bigquery", id="bigquery"),
    pytest.param("trino://analyst@trino.internal:8080/hive/crm", "trino", id="trino"),
    pytest.param("postgresql+psycopg://analyst@db.internal:5432/crm", "postgres", id="postgres"),
]


@pytest.mark.parametrize(("url", "dialect"), WAREHOUSES)
@pytest.mark.parametrize("audience", AUDIENCES, ids=lambda p: p.stem)
def test_dialect_compiles_the_audience_with_bound_parameters(
    url: str, dialect: str, audience: Path
) -> None:
    assert sql_dialect(url) == dialect
    # The installed SQLAlchemy dialect of the URL (an optional extra); nothing connects.
    sa_dialect = sa.engine.make_url(url).get_dialect()()
    query = load_audience_sql(audience, dialect)
    compiled = sa.text(query.sqlalchemy_text(dialect)).compile(dialect=sa_dialect)
    # Every :name became a driver placeholder, bound from the run's values, never pasted in.
    assert set(compiled.params) == set(query.parameters)
    rendered = str(compiled)
    if sa_dialect.paramstyle != "named":  # else ':name' is the driver's own placeholder
        for name in query.parameters:
            assert f":{name}" not in rendered
    assert "0.7" not in rendered  # defaults are bound at run time, not in the statement


def test_sqlalchemy_text_keeps_the_sql_but_not_comments_or_colons_in_strings(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.sql"
    path.write_text(
        "-- uses :lapse_threshold (default 0.7)\n"
        "SELECT customer_id, '12 :30' AS s, x::int AS y /* :nope */\n"
        "FROM t WHERE score > :lapse_threshold"
    )
    query = load_audience_sql(path, "postgres")
    text = query.sqlalchemy_text("postgres")
    assert "--" not in text and "/*" not in text
    compiled = sa.text(text).compile(dialect=sa.create_engine("postgresql+psycopg://x@h/d").dialect)
    assert set(compiled.params) == {"lapse_threshold"}
    assert "'12 :30'" in str(compiled) and "::int" in str(compiled).replace("::INTEGER", "::int")


@pytest.mark.parametrize(("url", "dialect"), WAREHOUSES)
def test_the_demo_audience_transpiles_to_each_dialect(url: str, dialect: str) -> None:
    """How an analyst ports the demo SQL: sqlglot rewrites it for the target warehouse."""
    source = (project_root() / "sql" / "audiences" / "winback_whatsapp.sql").read_text()
    (ported,) = sqlglot.transpile(source, read="duckdb", write=dialect)
    reparsed = sqlglot.parse_one(ported, read=dialect)
    assert reparsed is not None
    assert {"lapse_threshold", "as_of"} <= {
        p.name for p in reparsed.find_all(sqlglot.exp.Placeholder)
    } | {p.name for p in reparsed.find_all(sqlglot.exp.Parameter)}


def test_unknown_warehouse_scheme_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported warehouse URL scheme 'oracle'"):
        sql_dialect("oracle://scott@db/orcl")


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("WITH x AS (DELETE FROM customers RETURNING *) SELECT * FROM x", "contains a DELETE"),
        ("SELECT * INTO copy_of_customers FROM customers", "SELECT … INTO creates a table"),
        ("CREATE TABLE t AS SELECT 1", "CREATE statement is not allowed"),
        ("SELECT 1; DROP TABLE customers", "2 statements"),
    ],
)
def test_writes_are_refused_in_the_postgres_dialect(tmp_path: Path, sql: str, message: str) -> None:
    path = tmp_path / "evil.sql"
    path.write_text(sql)
    with pytest.raises(AudienceSQLError, match=message):
        load_audience_sql(path, "postgres")
