"""Audience benchmark: what the framework's warehouse layer costs over the bare query.

For each size (customers in the demo warehouse) it measures, each in a fresh subprocess so the
peak RSS (the child's `ru_maxrss`, from `os.wait4`) belongs to one measurement only:

- DuckDB, bare: `duckdb.connect(file, read_only=True).sql(sql, params=…).to_arrow_table()`;
- DuckDB, framework: `Warehouse.query` → polars, plus the audience contract checks;
- DuckDB, streaming: `Warehouse.query_batches` → `pyarrow.parquet.ParquetWriter`, on the "wide"
  parameters (every customer with an order: ~86 % of them) against `Warehouse.query` collecting
  the same rows, to show memory stays bounded while the audience grows;
- PostgreSQL (with `--postgres URL` or TEST_POSTGRES_URL, 1M customers by default): the same
  against `psql -c "\\copy (query) to '/dev/null'"`, and the transports compared on 1,000,000
  materialised audience rows (why the framework uses an ADBC cursor).

Wall time is the work inside the child (after imports); ratios are framework / bare, measured
in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.index import refresh as refresh_index

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
RESULTS = ROOT / "bench" / "results.md"
WINBACK = ROOT / "sql" / "audiences" / "winback_whatsapp.sql"
SEED = 42
AS_OF = datetime(2025, 6, 1, tzinfo=UTC)
DEFAULT_SIZES = (1_000_000, 10_000_000)
PG_SIZE = 1_000_000
TRANSPORT_ROWS = 1_000_000
BATCH_ROWS = 100_000

PARAMS = {"lapse_threshold": 0.7, "as_of": AS_OF}
"""The activation's defaults: ~26 % of customers."""
WIDE = {"lapse_threshold": -1.0, "as_of": datetime(2030, 1, 1, tzinfo=UTC)}
"""Every customer with an order (~86 %): the largest audience the demo data makes."""
REQUIRED = ("customer_id", "phone", "country", "whatsapp_marketing_consent", "first_name")


# ---------------------------------------------------------------------- data


def demo_file(size: int) -> Path:
    """bench/data/demo_<size>.duckdb, generated unless a file of that size is there."""
    from cdp_activation.demo.data import generate_demo_warehouse

    path = DATA / f"demo_{size}.duckdb"
    marker = path.with_suffix(".json")
    wanted = {"customers": size, "seed": SEED, "as_of": AS_OF.isoformat()}
    if path.exists() and marker.exists() and json.loads(marker.read_text()) == wanted:
        return path
    print(f"generating the {size:,}-customer demo warehouse in {path} …", flush=True)
    started = time.perf_counter()
    generate_demo_warehouse(path, customers=size, seed=SEED, as_of=AS_OF)
    marker.write_text(json.dumps(wanted))
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def postgres_schema(url: str, size: int) -> str:
    """Schema bench_<size> in PostgreSQL, loaded from the DuckDB demo unless already there."""
    import psycopg

    from cdp_activation.audience.warehouse import postgres_uri
    from cdp_activation.demo.postgres import load_demo_into_postgres

    schema = f"bench_{size}"
    tag = f"cdp-activation bench demo customers={size} seed={SEED} as_of={AS_OF.isoformat()}"
    with psycopg.connect(postgres_uri(url), autocommit=True) as con:
        row = con.execute(
            "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
            (schema,),
        ).fetchone()
    if row is not None and row[0] == tag:
        return schema
    print(f"loading the {size:,}-customer demo into PostgreSQL schema {schema} …", flush=True)
    started = time.perf_counter()
    load_demo_into_postgres(demo_file(size), url, schema)
    with psycopg.connect(postgres_uri(url), autocommit=True) as con:
        con.execute(f'COMMENT ON SCHEMA "{schema}" IS {_literal(tag)}')
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return schema


def schema_url(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def transport_table(url: str, schema: str) -> str:
    """A table of exactly TRANSPORT_ROWS audience rows, so transports are timed without the
    query's own cost (which is the same for all of them)."""
    import psycopg

    from cdp_activation.audience.warehouse import postgres_uri

    table = "bench_transport"
    with psycopg.connect(postgres_uri(schema_url(url, schema)), autocommit=True) as con:
        exists = con.execute("SELECT to_regclass(%s)", (f"{schema}.{table}",)).fetchone()
        if exists and exists[0]:
            (count,) = con.execute(f"SELECT count(*) FROM {table}").fetchone()  # type: ignore[misc]
            if count == TRANSPORT_ROWS:
                return table
        sql = literal_sql("postgres", WIDE)
        con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM ({sql}) AS a")
        con.execute(
            f"INSERT INTO {table} SELECT * FROM {table} "
            f"LIMIT greatest({TRANSPORT_ROWS} - (SELECT count(*) FROM {table}), 0)"
        )
        con.execute(
            f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} OFFSET %s)",
            (TRANSPORT_ROWS,),
        )
        con.execute(f"VACUUM ANALYZE {table}")
    return table


def _literal(value: Any) -> str:
    """A SQL literal for psql and the transport baselines only (never the framework's path)."""
    if isinstance(value, datetime):
        return f"TIMESTAMPTZ '{value.isoformat()}'"
    if isinstance(value, int | float):
        return repr(float(value))
    return "'" + str(value).replace("'", "''") + "'"


def literal_sql(dialect: str, params: dict[str, Any]) -> str:
    """The winback query with its parameters pasted in: for tools that cannot bind (psql)."""
    from cdp_activation.audience.sql import load_audience_sql

    query = load_audience_sql(WINBACK, dialect)
    sql = query.for_dialect(dialect)
    for name, value in params.items():
        sql = sql.replace(f"%({name})s", _literal(value)).replace(f"${name}", _literal(value))
    return sql


# ---------------------------------------------------------------------- child measurements


def _check_audience(frame: Any) -> None:
    """The cheap part of `activation_run.validate_audience`: columns, null and duplicate ids."""
    import polars as pl

    missing = [c for c in REQUIRED if c not in frame.columns]
    assert not missing, missing
    assert frame["customer_id"].null_count() == 0
    assert frame["customer_id"].is_duplicated().sum() == 0
    assert frame.schema["whatsapp_marketing_consent"] in (pl.Boolean, pl.Null)


def _params(name: str) -> dict[str, Any]:
    return {"wide": WIDE, "none": {}}.get(name, PARAMS)


def _query(spec: dict[str, Any], dialect: str) -> Any:
    """The winback audience, or the spec's own SQL (e.g. a whole table, for memory figures)."""
    from cdp_activation.audience.sql import load_audience_sql, parse_audience_sql

    if "sql" in spec:
        return parse_audience_sql(spec["sql"], Path("table.sql"), dialect)
    return load_audience_sql(WINBACK, dialect)


def child_main(argv: list[str]) -> int:
    """One measurement, in its own process: prints {"seconds", "rows"} as JSON."""
    kind, spec = argv[0], json.loads(argv[1])
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cdp_activation.audience.sql import load_audience_sql
    from cdp_activation.audience.warehouse import Warehouse

    url, params = spec.get("url", ""), _params(spec.get("params", "default"))
    rows = 0
    started = time.perf_counter()
    if kind == "duckdb_bare":
        import duckdb

        path = url.removeprefix("duckdb:///")
        sql = load_audience_sql(WINBACK, "duckdb").for_dialect("duckdb")
        con = duckdb.connect(path, read_only=True)
        con.execute("SET enable_progress_bar = false")
        rows = con.sql(sql, params=params).to_arrow_table().num_rows
    elif kind == "framework":
        warehouse = Warehouse(url)
        frame = warehouse.query(_query(spec, warehouse.dialect), params)
        if "sql" not in spec:
            _check_audience(frame)
        rows = frame.height
    elif kind == "framework_parquet":
        warehouse = Warehouse(url)
        query = _query(spec, warehouse.dialect)
        writer: pq.ParquetWriter | None = None
        out = Path(spec["out"])
        for batch in warehouse.query_batches(query, params, batch_rows=BATCH_ROWS):
            if writer is None:
                writer = pq.ParquetWriter(out, batch.schema)
            writer.write_batch(batch)
            rows += batch.num_rows
        if writer is not None:
            writer.close()
        out.unlink(missing_ok=True)
    elif kind == "psql":
        subprocess.run(
            ["psql", "-X", "-q", spec["libpq"], "-c", f"\\copy ({spec['sql']}) to '/dev/null'"],
            check=True,
        )
        rows = -1
    elif kind == "t_connectorx":
        import connectorx as cx

        rows = cx.read_sql(spec["libpq"], spec["sql"], return_type="arrow").num_rows
    elif kind in ("t_adbc_copy", "t_adbc_prepared"):
        import adbc_driver_postgresql.dbapi as adbc

        with adbc.connect(spec["libpq"]) as con, con.cursor() as cur:
            if kind == "t_adbc_copy":
                cur.execute(spec["sql"])
            else:
                cur.execute(spec["sql_bound"], (-1.0,))
            rows = cur.fetch_arrow_table().num_rows
    elif kind == "t_framework":
        from cdp_activation.audience.sql import parse_audience_sql

        warehouse = Warehouse(url)
        query = parse_audience_sql(spec["sql_named"], Path("transport.sql"), "postgres")
        rows = pl.from_arrow(
            pa.Table.from_batches(list(warehouse.query_batches(query, {"t": -1.0})))
        ).height  # type: ignore[union-attr]
    elif kind == "t_psycopg_csv":
        import io

        import psycopg
        import pyarrow.csv as pacsv

        with psycopg.connect(spec["libpq"]) as con, con.cursor() as cur:
            cur.execute("SET TimeZone = 'UTC'")
            cur.execute(f"SELECT * FROM ({spec['sql']}) AS q LIMIT 0")
            names = [c.name for c in cur.description or []]
            buffer = io.BytesIO()
            with cur.copy(f"COPY ({spec['sql']}) TO STDOUT (FORMAT csv)") as copy:
                for chunk in copy:
                    buffer.write(chunk)
            buffer.seek(0)
            rows = pacsv.read_csv(
                buffer,
                read_options=pacsv.ReadOptions(column_names=names),
                convert_options=pacsv.ConvertOptions(
                    true_values=["t"],
                    false_values=["f"],
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                ),
            ).num_rows
    else:
        raise SystemExit(f"unknown measurement {kind}")
    print(json.dumps({"seconds": time.perf_counter() - started, "rows": rows}))
    return 0


@dataclass
class Figure:
    """One measurement: what, where, how long, how much memory."""

    label: str
    seconds: float
    rss_mb: float
    rows: int


def measure(label: str, kind: str, spec: dict[str, Any]) -> Figure:
    """Run one measurement in a fresh interpreter; its peak RSS is the child's alone."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "_child", kind, json.dumps(spec)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{label}: the measurement failed ({process.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    figure = Figure(label, result["seconds"], usage.ru_maxrss / 1024, result["rows"])
    rows = f"{figure.rows:>10,}" if figure.rows >= 0 else f"{'-':>10}"
    print(f"  {label:<58} {rows} rows {figure.seconds:7.2f} s {figure.rss_mb:7.0f} MB", flush=True)
    return figure


def best(label: str, kind: str, spec: dict[str, Any], repeat: int) -> Figure:
    """The fastest of `repeat` runs (its own peak RSS): the least disturbed by the machine."""
    runs = [measure(label, kind, spec) for _ in range(repeat)]
    return min(runs, key=lambda f: f.seconds)


# ---------------------------------------------------------------------- scenarios


def duckdb_scenario(size: int, repeat: int) -> list[tuple[str, Figure, Figure | None]]:
    """(what, figure, baseline) rows for one DuckDB size."""
    url = f"duckdb:///{demo_file(size)}"
    out = str(DATA / f"audience_{size}.parquet")
    print(f"DuckDB, {size:,} customers", flush=True)
    bare = best("bare DuckDB → Arrow", "duckdb_bare", {"url": url}, repeat)
    framework = best("Warehouse.query → polars + checks", "framework", {"url": url}, repeat)
    wide = {"url": url, "params": "wide", "out": out}
    collect = best("wide: Warehouse.query → polars (collect)", "framework", wide, repeat)
    stream = best("wide: Warehouse.query_batches → Parquet", "framework_parquet", wide, repeat)
    # The audience query's own working memory (window, aggregates) dominates the figures above;
    # a whole table isolates what holding vs streaming the rows costs.
    table = {"url": url, "params": "none", "out": out, "sql": "SELECT * FROM customers"}
    t_collect = best("customers table: Warehouse.query (collect)", "framework", table, repeat)
    t_stream = best("customers table: query_batches → Parquet", "framework_parquet", table, repeat)
    return [
        (f"DuckDB {size:,}: bare query → Arrow", bare, None),
        (f"DuckDB {size:,}: Warehouse.query → polars + checks", framework, bare),
        (f"DuckDB {size:,} wide: Warehouse.query (collect)", collect, None),
        (f"DuckDB {size:,} wide: query_batches → Parquet", stream, collect),
        (f"DuckDB {size:,} customers table: Warehouse.query (collect)", t_collect, None),
        (f"DuckDB {size:,} customers table: query_batches → Parquet", t_stream, t_collect),
    ]


def postgres_scenario(url: str, repeat: int) -> tuple[list[Any], list[Any]]:
    """Framework vs psql at PG_SIZE customers, and the transport comparison."""
    from cdp_activation.audience.warehouse import postgres_uri

    schema = postgres_schema(url, PG_SIZE)
    wurl = schema_url(url, schema)
    libpq = postgres_uri(wurl)
    print(f"PostgreSQL, {PG_SIZE:,} customers (schema {schema})", flush=True)
    psql = best(
        "psql \\copy (query) to /dev/null",
        "psql",
        {"libpq": libpq, "sql": literal_sql("postgres", PARAMS)},
        repeat,
    )
    framework = best("Warehouse.query → polars + checks", "framework", {"url": wurl}, repeat)
    out = str(DATA / "audience_pg.parquet")
    wide = {"url": wurl, "params": "wide", "out": out}
    collect = best("wide: Warehouse.query → polars (collect)", "framework", wide, repeat)
    stream = best("wide: Warehouse.query_batches → Parquet", "framework_parquet", wide, repeat)
    rows = [
        (f"PostgreSQL {PG_SIZE:,}: psql \\copy to /dev/null", psql, None),
        (f"PostgreSQL {PG_SIZE:,}: Warehouse.query → polars + checks", framework, psql),
        (f"PostgreSQL {PG_SIZE:,} wide: Warehouse.query (collect)", collect, None),
        (f"PostgreSQL {PG_SIZE:,} wide: query_batches → Parquet", stream, collect),
    ]
    table = transport_table(url, schema)
    print(f"PostgreSQL transports, {TRANSPORT_ROWS:,} rows of table {table}", flush=True)
    plain = f"SELECT * FROM {table} WHERE lapse_risk > -1.0"
    spec = {
        "url": wurl,
        "libpq": libpq,
        "sql": plain,
        "sql_bound": f"SELECT * FROM {table} WHERE lapse_risk > $1",
        "sql_named": f"SELECT * FROM {table} WHERE lapse_risk > :t",
    }
    cx_spec = {
        **spec,
        "libpq": postgres_uri(url),
        "sql": f"SELECT * FROM {schema}.{table} WHERE lapse_risk > -1.0",
    }
    transports: list[tuple[str, Figure, str]] = []
    candidates: list[tuple[str, str, dict[str, Any], str]] = [
        ("psql \\copy to /dev/null (floor, no Arrow)", "psql", spec, "pasted"),
        ("connectorx read_sql → Arrow", "t_connectorx", cx_spec, "pasted"),
        ("ADBC default (binary COPY) → Arrow", "t_adbc_copy", spec, "pasted"),
        ("ADBC prepared, bound $1 → Arrow", "t_adbc_prepared", spec, "server-side"),
        ("framework: ADBC cursor, bound $1, FETCH → polars", "t_framework", spec, "server-side"),
        ("psycopg COPY csv → pyarrow.csv", "t_psycopg_csv", spec, "pasted"),
    ]
    for label, kind, one_spec, binding in candidates:
        if kind == "t_connectorx" and not _importable("connectorx"):
            print(f"  {label}: skipped (connectorx is not installed)")
            continue
        transports.append((label, best(label, kind, one_spec, repeat), binding))
    return rows, transports


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    import duckdb
    import polars
    import pyarrow

    mem_kb = 0
    cpu = platform.processor() or "?"
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} x {cpu} (`nproc` = {os.cpu_count()})",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "polars": polars.__version__,
        "pyarrow": pyarrow.__version__,
    }
    if _importable("adbc_driver_postgresql"):
        import adbc_driver_postgresql

        info["adbc-driver-postgresql"] = adbc_driver_postgresql.__version__
    return info


def _ratio(figure: Figure, baseline: Figure | None) -> tuple[str, str]:
    if baseline is None:
        return "", ""
    return f"{figure.seconds / baseline.seconds:.2f}x", f"{figure.rss_mb / baseline.rss_mb:.2f}x"


def report(
    info: dict[str, str],
    rows: list[tuple[str, Figure, Figure | None]],
    transports: list[tuple[str, Figure, str]],
    pg_note: str,
) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Written by `python -m bench audience` (`make bench`); each figure is one fresh",
        "subprocess (the best of the runs asked for); wall time is the work after imports, peak",
        "RSS is the whole child process (a bare interpreter with polars/pyarrow/duckdb imported",
        "is ~100 MB of it).",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Audience: framework vs the bare query",
        "",
        "Default parameters (`lapse_threshold` 0.7, `as_of` 2025-06-01) select ~26 % of the",
        "customers; *wide* (`lapse_threshold` -1, `as_of` 2030-01-01) every customer with an",
        "order (~86 %). Ratios: time and peak RSS against the row named in the ratio column",
        "(bare query for `Warehouse.query`; collecting for streaming).",
        "",
        "| measurement | rows | wall | peak RSS | time ratio | memory ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, figure, baseline in rows:
        t_ratio, m_ratio = _ratio(figure, baseline)
        shown = f"{figure.rows:,}" if figure.rows >= 0 else "(same)"
        lines.append(
            f"| {label} | {shown} | {figure.seconds:.2f} s | {figure.rss_mb:.0f} MB "
            f"| {t_ratio} | {m_ratio} |"
        )
    lines += [
        "",
        "Reading it: the framework's `Warehouse.query` should stay within 1.2x of the bare",
        "query; the audience query's own working memory (window function, aggregates) is most",
        "of the peak RSS of both, so the *customers table* rows (a plain scan of every",
        "customer) show what streaming saves: `query_batches` → Parquet holds a few batches,",
        "collecting holds every row.",
    ]
    lines += ["", "## PostgreSQL transports", ""]
    if transports:
        floor = transports[0][1]
        lines += [
            f"{TRANSPORT_ROWS:,} rows of the demo audience's 14 columns, materialised in a "
            "table, so only the transfer is timed (the audience query itself costs the same "
            "for every transport).",
            "",
            "| transport | parameters | wall | peak RSS | vs psql |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for label, figure, binding in transports:
            lines.append(
                f"| {label} | {binding} | {figure.seconds:.2f} s | {figure.rss_mb:.0f} MB "
                f"| {figure.seconds / floor.seconds:.2f}x |"
            )
        lines += [
            "",
            "The framework keeps the ADBC cursor: the only candidate that binds parameters on "
            "the server, runs inside a READ ONLY transaction with a statement timeout in the "
            "session that holds the TEMP tables of `tables=`, and streams in bounded memory. "
            "connectorx and COPY cannot take bound parameters (and connectorx opens its own "
            "connections, so it sees neither the transaction nor the TEMP tables).",
        ]
    else:
        lines.append(pg_note)
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench audience", description=__doc__)
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(DEFAULT_SIZES),
        help="comma-separated customer counts for DuckDB (default 1000000,10000000; 0: none)",
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get("TEST_POSTGRES_URL"),
        help="PostgreSQL URL for the PostgreSQL figures (default: $TEST_POSTGRES_URL)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure; best kept")
    parser.add_argument("--no-write", action="store_true", help="print only, keep results.md")
    args = parser.parse_args(argv)
    DATA.mkdir(parents=True, exist_ok=True)
    info = machine()
    load_before = os.getloadavg()[0]
    rows: list[tuple[str, Figure, Figure | None]] = []
    transports: list[tuple[str, Figure, str]] = []
    pg_note = "Not measured: no PostgreSQL (pass `--postgres URL` or set TEST_POSTGRES_URL)."
    for size in args.sizes:
        if size > 0:
            rows += duckdb_scenario(size, args.repeat)
    if args.postgres:
        if shutil.which("psql") is None:
            pg_note = "Not measured: `psql` is not installed."
        else:
            pg_rows, transports = postgres_scenario(args.postgres, args.repeat)
            rows += pg_rows
            info["postgresql"] = _server_version(args.postgres)
    info["load average"] = (
        f"{load_before:.1f} before, {os.getloadavg()[2]:.1f} over the last 15 min after "
        "(above 0 means other work shared the cores: compare ratios, not seconds)"
    )
    text = report(info, rows, transports, pg_note)
    print()
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        refresh_index()
        print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


def _server_version(url: str) -> str:
    import psycopg

    from cdp_activation.audience.warehouse import postgres_uri

    with psycopg.connect(postgres_uri(url)) as con:
        row = con.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"
