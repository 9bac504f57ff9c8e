"""The activation funnel for analysts: audience → eligible → sent → delivered → read →
converted, by activation, day, country and channel, as the view `activation_funnel`
(`sql/reporting/funnel.sql`) over the tables the ledger is exported to.

Besides the send log, it reads `activation_decision_counts` (each real run's decisions,
counted: the ledger keeps only the customers it plans) and `activation_conversions`: each
experiment's `conversion_sql` run in the warehouse for the span its sends need, exported here
with the activation's conversion window (an activation without one has no converted stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import sqlalchemy as sa

from cdp_activation.activation.run import Activation
from cdp_activation.audience.warehouse import Warehouse, connect_duckdb, duckdb_path
from cdp_activation.db import read_frame, with_driver
from cdp_activation.feedback.send_log import (
    DECISION_COUNTS_TABLE,
    LogTable,
    SendLogExport,
    export_decision_counts,
    export_replies,
    export_send_log,
    export_table,
    warehouse_lock,
)
from cdp_activation.ledger import INITIAL_STEP, SENT, Ledger
from cdp_activation.ledger.base import as_time, db_time
from cdp_activation.settings import project_root

FUNNEL_SQL = Path("sql/reporting/funnel.sql")
FUNNEL_VIEW = "activation_funnel"
CONVERSIONS_TABLE = "activation_conversions"
_UTC = pl.Datetime("us", "UTC")
CONVERSION_COLUMNS: dict[str, pl.DataType] = {
    "conversion_key": pl.String(),
    "activation": pl.String(),
    "customer_id": pl.String(),
    "converted_at": _UTC,
    "window_days": pl.Int64(),
    "updated_at": _UTC,
}
# How far back conversions are read again on each refresh (sends older than this keep the
# conversions already exported).
LOOKBACK = timedelta(days=35)
STAGES = ("audience", "eligible", "sent", "delivered", "read", "converted")


def conversions(
    activations: Sequence[Activation],
    ledger: Ledger,
    warehouse: Warehouse,
    now: datetime | None = None,
) -> pl.DataFrame:
    """Each experiment's conversions over the span its recent first sends need."""
    now = now or datetime.now(UTC)
    frames = [pl.DataFrame(schema=CONVERSION_COLUMNS)]
    for activation in activations:
        experiment = activation.spec.experiment
        if experiment is None or activation.conversion_query is None:
            continue
        window = timedelta(days=experiment.conversion_window_days)
        span = read_frame(
            ledger.engine,
            "SELECT min(sent_at) AS first, max(sent_at) AS last FROM sends "
            "WHERE activation = $1 AND step = $2 AND state = $3 AND sent_at >= $4",
            (activation.name, INITIAL_STEP, SENT, db_time(now - LOOKBACK, ledger.dialect)),
        )
        first, last = span.row(0) if span.height else (None, None)
        if first is None or last is None:
            continue
        start, end = as_time(first), as_time(last) + window
        found = warehouse.query(activation.conversion_query, {"start": start, "end": end})
        frame = found.select(
            pl.col("customer_id").cast(pl.String),
            pl.col("converted_at").cast(_UTC),
        ).with_columns(
            pl.lit(activation.name).alias("activation"),
            pl.lit(experiment.conversion_window_days, dtype=pl.Int64).alias("window_days"),
            pl.lit(now, dtype=_UTC).alias("updated_at"),
        )
        key = pl.concat_str(
            [
                pl.col("activation"),
                pl.col("customer_id"),
                pl.col("converted_at").dt.strftime("%Y-%m-%dT%H:%M:%S%.6f"),
            ],
            separator="|",
        )
        frames.append(
            frame.with_columns(key.alias("conversion_key")).select(list(CONVERSION_COLUMNS))
        )
    return pl.concat(frames, how="vertical")


def refresh_funnel(
    ledger: Ledger, url: str, found_conversions: pl.DataFrame
) -> tuple[dict[str, SendLogExport], pl.DataFrame]:
    """Export the send log and its companions and the conversions to `url`, (re)create the
    `activation_funnel` view, and read it back. Returns the exports and the funnel."""
    exports = {
        "activation_send_log": export_send_log(ledger, url),
        DECISION_COUNTS_TABLE: export_decision_counts(ledger, url),
        **export_replies(ledger, url),
    }
    log = LogTable(CONVERSIONS_TABLE, CONVERSION_COLUMNS, lambda _ledger, _since: found_conversions)
    exports[CONVERSIONS_TABLE] = export_table(ledger, url, log)
    sql = (project_root() / FUNNEL_SQL).read_text(encoding="utf-8")
    view = f"CREATE OR REPLACE VIEW {FUNNEL_VIEW} AS\n{sql}"
    read = (
        f"SELECT * FROM {FUNNEL_VIEW} "
        "ORDER BY activation, partition_key, country, channel, stage_order"
    )
    path = duckdb_path(url)
    if path is not None:
        with connect_duckdb(path, read_only=False) as con:  # waits for another writer
            con.execute(view)
            funnel = con.sql(read).pl()
    else:
        engine = sa.create_engine(with_driver(url))
        try:
            # One at a time: two dropping and creating the view together collide.
            with warehouse_lock(engine, FUNNEL_VIEW), engine.begin() as con:
                con.exec_driver_sql(f"DROP VIEW IF EXISTS {FUNNEL_VIEW}")
                con.exec_driver_sql(view.replace("CREATE OR REPLACE VIEW", "CREATE VIEW", 1))
                result = con.exec_driver_sql(read)
                funnel = pl.DataFrame(
                    [tuple(r) for r in result], schema=list(result.keys()), orient="row"
                )
        finally:
            engine.dispose()
    return exports, funnel


def funnel_totals(funnel: pl.DataFrame) -> dict[str, int]:
    """Customers at each stage, over every activation, day, country and channel."""
    if funnel.is_empty():
        return dict.fromkeys(STAGES, 0)
    sums = dict(funnel.group_by("stage").agg(pl.col("customers").sum()).iter_rows())
    return {stage: int(sums.get(stage, 0) or 0) for stage in STAGES}


def funnel_markdown(funnel: pl.DataFrame) -> str:
    """Per activation and day, customers at each stage (every country and channel)."""
    if funnel.is_empty():
        return "_no run recorded yet_"
    wide = (
        funnel.group_by("activation", "partition_key", "stage")
        .agg(pl.col("customers").sum())
        .pivot(on="stage", index=["activation", "partition_key"], values="customers")
        .sort("activation", "partition_key")
    )
    lines = [
        "| activation | day | " + " | ".join(STAGES) + " |",
        "|---|---|" + "---:|" * len(STAGES),
    ]
    for row in wide.iter_rows(named=True):
        cells = [f"{int(row.get(s) or 0):,}" for s in STAGES]
        lines.append(
            f"| {row['activation']} | {row['partition_key']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)
