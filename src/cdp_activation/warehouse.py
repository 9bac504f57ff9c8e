"""The warehouse: where audience SQL runs. DuckDB file is the embedded default.

Queries run on a read-only connection and results come back as Arrow, then polars, never as
Python rows. Any SQLAlchemy URL works for other warehouses (the SQL is passed through with its
`:name` parameters bound by the driver).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import sqlalchemy as sa

from cdp_activation.audience_sql import AudienceQuery


class WarehouseError(RuntimeError):
    """The warehouse refused or failed a query; the message says which file and why."""


def duckdb_path(url: str) -> Path | None:
    """The file of a `duckdb:///path` URL, or None for another kind of warehouse."""
    prefix = "duckdb:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


class Warehouse:
    """Runs audience queries read-only and returns polars frames."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, query: AudienceQuery, params: Mapping[str, Any]) -> pl.DataFrame:
        missing = sorted(query.parameters - params.keys())
        if missing:
            raise WarehouseError(
                f"{query.path}: parameter(s) {', '.join(':' + m for m in missing)} have no value; "
                "declare them under audience.parameters in the activation's defs.yaml"
            )
        bound = {k: v for k, v in params.items() if k in query.parameters}
        path = duckdb_path(self.url)
        if path is not None:
            return self._query_duckdb(path, query, bound)
        return self._query_sqlalchemy(query, bound)

    def read_table_sql(self, sql: str) -> pl.DataFrame:
        """Run a trusted, parameterless query of the framework's own (e.g. suppressions)."""
        path = duckdb_path(self.url)
        if path is not None:
            with self._duckdb(path) as con:
                relation = con.sql(sql)
                if relation is None:
                    raise WarehouseError(f"the query returned no result set: {sql[:80]}")
                return pl.from_arrow(relation.to_arrow_table())  # type: ignore[return-value]
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as con:
                return pl.read_database(sa.text(sql), con)
        finally:
            engine.dispose()

    def _duckdb(self, path: Path) -> duckdb.DuckDBPyConnection:
        if not path.exists():
            raise WarehouseError(
                f"DuckDB warehouse {path} does not exist; create the demo one with "
                "`cdp-activation demo` or set CDP_WAREHOUSE_URL"
            )
        return duckdb.connect(str(path), read_only=True)

    def _query_duckdb(
        self, path: Path, query: AudienceQuery, params: Mapping[str, Any]
    ) -> pl.DataFrame:
        with self._duckdb(path) as con:
            try:
                relation = con.sql(query.for_dialect("duckdb"), params=dict(params))
                if relation is None:
                    raise WarehouseError(f"{query.path}: the query returned no result set")
                table = relation.to_arrow_table()
            except duckdb.Error as err:
                raise WarehouseError(
                    f"{query.path}: the warehouse refused the query: {err}"
                ) from None
        return pl.from_arrow(table)  # type: ignore[return-value]

    def _query_sqlalchemy(self, query: AudienceQuery, params: Mapping[str, Any]) -> pl.DataFrame:
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as con:
                return pl.read_database(
                    sa.text(query.text), con, execute_options={"parameters": dict(params)}
                )
        except sa.exc.SQLAlchemyError as err:
            raise WarehouseError(
                f"{query.path}: the warehouse refused the query: {err.__class__.__name__}: "
                f"{str(err.orig) if getattr(err, 'orig', None) else err}"
            ) from None
        finally:
            engine.dispose()
import psycopg
def connect_postgres(url):
    url = url.replace("postgresql+psycopg://", "postgresql://")
    return psycopg.connect(url, autocommit=True)
