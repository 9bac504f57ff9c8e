"""The send log: the ledger exported incrementally to a real warehouse (DuckDB, PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest
import sqlalchemy as sa

from cdp_activation.components.resources import LedgerResource, SendLogResource
from cdp_activation.connectors.base import Outcome, SendResult
from cdp_activation.contracts import StatusEvent
from cdp_activation.defs.send_log import send_log
from cdp_activation.feedback.send_log import (
    COLUMNS,
    SEND_LOG_TABLE,
    LogTable,
    changed_sends,
    export_send_log,
    export_table,
)
from cdp_activation.ledger import Ledger, sends
from conftest import scratch_postgres_schema

pytestmark = pytest.mark.integration


@pytest.fixture(params=["duckdb", "postgresql"])
def warehouse_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "duckdb":
        yield f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
        return
    base = os.environ.get("TEST_POSTGRES_URL")
    if not base:
        pytest.skip("TEST_POSTGRES_URL is not set (CI sets it)")
    with scratch_postgres_schema(base, "send_log") as url:
        yield url


def read_log(url: str) -> pl.DataFrame:
    if url.startswith("duckdb:///"):
        with duckdb.connect(url.removeprefix("duckdb:///")) as con:
            return con.sql(f"SELECT * FROM {SEND_LOG_TABLE} ORDER BY send_id").pl()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            return pl.read_database(f"SELECT * FROM {SEND_LOG_TABLE} ORDER BY send_id", con)
    finally:
        engine.dispose()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """Three customers: one sent, one failed, one held out."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    frame = pl.DataFrame(
        {
            "customer_id": ["c1", "c2", "c3"],
            "phone_e164": ["+447911100001", "+447911100002", "+447911100003"],
            "channel": ["whatsapp"] * 3,
            "connector": ["meta_whatsapp"] * 3,
            "step": ["initial"] * 3,
            "template_name": ["winback_offer"] * 3,
            "template_language": ["en"] * 3,
            "variables": [["Ann"], ["Bob"], ["Cy"]],
            "body": [None, None, None],
            "decision": ["send", "send", "holdout"],
        },
        schema_overrides={"body": pl.String},
    )
    ledger.plan("winback", "2026-12-01", frame)
    rows = ledger.pending("winback", "2026-12-01")
    ledger.mark_in_flight([r.id for r in rows])
    ledger.record(
        [
            (rows[0].id, SendResult(rows[0].idempotency_key, Outcome.SENT, "wamid.1"), 1),
            (rows[1].id, SendResult(rows[1].idempotency_key, Outcome.FAILED, None, "131026"), 1),
        ]
    )
    yield ledger
    ledger.dispose()


def test_the_ledger_is_exported_once_per_send_and_changes_follow_incrementally(
    ledger: Ledger, warehouse_url: str
) -> None:
    first = export_send_log(ledger, warehouse_url)
    assert (first.exported, first.since, first.table_rows) == (3, None, 3)
    log = read_log(warehouse_url)
    assert log.columns == list(COLUMNS)  # no phone number, no message text
    assert dict(zip(log["customer_id"], log["state"], strict=True)) == {
        "c1": "sent",
        "c2": "failed",
        "c3": "holdout",
    }
    assert export_send_log(ledger, warehouse_url).table_rows == 3  # again: no duplicate

    # Time passes: the rows exported earlier are older than the export's overlap.
    with ledger.engine.begin() as con:
        con.execute(sends.update().values(updated_at=datetime.now(UTC) - timedelta(days=1)))
    nothing_new = export_send_log(ledger, warehouse_url)
    assert nothing_new.exported == 0 and nothing_new.table_rows == 3

    # A status report changes one send: only it is exported, and the log shows it.
    read = StatusEvent("meta", "wamid.1", "read", datetime.now(UTC), "meta|wamid.1|read")
    assert ledger.record_statuses([read]).advanced == 1
    changed = export_send_log(ledger, warehouse_url)
    assert (changed.exported, changed.table_rows) == (1, 3)
    log = read_log(warehouse_url)
    assert log.filter(pl.col("customer_id") == "c1")["delivery_status"].to_list() == ["read"]


def test_a_send_log_an_earlier_version_made_gains_the_new_columns(
    ledger: Ledger, warehouse_url: str
) -> None:
    """A table exported before `variant` existed: the next export adds the column (old rows
    null) instead of failing on it."""
    export_send_log(ledger, warehouse_url)
    if warehouse_url.startswith("duckdb:///"):
        with duckdb.connect(warehouse_url.removeprefix("duckdb:///")) as con:
            con.execute(f"ALTER TABLE {SEND_LOG_TABLE} DROP COLUMN variant")
    else:
        engine = sa.create_engine(warehouse_url)
        with engine.begin() as con:
            con.exec_driver_sql(f"ALTER TABLE {SEND_LOG_TABLE} DROP COLUMN variant")
        engine.dispose()
    assert "variant" not in read_log(warehouse_url).columns
    with ledger.engine.begin() as con:
        con.execute(sends.update().where(sends.c.customer_id == "c1").values(variant="short"))
        con.execute(sends.update().values(updated_at=datetime.now(UTC) + timedelta(seconds=1)))
    again = export_send_log(ledger, warehouse_url)
    assert again.exported == 3 and again.table_rows == 3
    log = read_log(warehouse_url)
    assert dict(zip(log["customer_id"], log["variant"], strict=True)) == {
        "c1": "short",
        "c2": None,
        "c3": None,
    }


def test_the_send_log_asset_exports_through_its_resources(ledger: Ledger, tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path / 'analytics.duckdb'}"
    result = dg.materialize(
        [send_log],
        resources={"ledger": LedgerResource(url=ledger.url), "send_log": SendLogResource(url=url)},
    )
    assert result.success
    meta = result.asset_materializations_for_node("send_log")[0].metadata
    assert meta["exported_rows"].value == 3 and meta["dagster/row_count"].value == 3
    assert read_log(url).height == 3


_EXPORT_AT = """
import sys, time
from cdp_activation.feedback.send_log import export_replies, export_send_log
from cdp_activation.ledger import Ledger
ledger_url, url, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
ledger = Ledger(ledger_url)
time.sleep(max(0.0, start - time.time()))
export_send_log(ledger, url)
export_replies(ledger, url)
ledger.dispose()
"""


def test_exports_started_together_by_several_processes_all_land_once(
    ledger: Ledger, warehouse_url: str
) -> None:
    """The scheduled export, the funnel's and one started by hand may overlap: started at the
    same instant by six processes, every export succeeds and the log holds each send once.
    Before they took the table's lock, PostgreSQL refused all but one (the table created
    twice, the same keys inserted twice) and DuckDB's lock on the file failed the others."""
    start = time.time() + 2.5  # past every process's imports
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _EXPORT_AT, ledger.url, warehouse_url, str(start)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    failed = [e.strip()[-400:] for p, e in zip(processes, errors, strict=True) if p.returncode]
    assert not failed, failed
    log = read_log(warehouse_url)
    assert sorted(log["customer_id"].to_list()) == ["c1", "c2", "c3"]
    assert dict(zip(log["customer_id"], log["state"], strict=True))["c1"] == "sent"


def test_an_export_the_warehouse_refuses_says_why_and_leaves_the_table_as_it_was(
    ledger: Ledger, tmp_path: Path
) -> None:
    """A table changed by hand so the export cannot fill it (here a NOT NULL column it does
    not know): the warehouse's own refusal comes out, not the aborted transaction's, and the
    rows already there stay."""
    path = tmp_path / "warehouse.duckdb"
    url = f"duckdb:///{path}"
    export_send_log(ledger, url)
    with duckdb.connect(str(path)) as con:
        con.execute(f"ALTER TABLE {SEND_LOG_TABLE} ADD COLUMN owner VARCHAR DEFAULT 'crm'")
        con.execute(f"ALTER TABLE {SEND_LOG_TABLE} ALTER COLUMN owner SET NOT NULL")
        con.execute(f"ALTER TABLE {SEND_LOG_TABLE} ALTER COLUMN owner DROP DEFAULT")
    with pytest.raises(duckdb.ConstraintException, match="owner"):
        export_send_log(ledger, url)
    assert read_log(url).height == 3


def test_the_warehouse_is_free_for_others_while_an_export_reads_the_ledger(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Another process (an audience query) can open the DuckDB warehouse while an export
    reads the ledger, which for a first export of a large ledger takes a while: the export
    holds its own lock file then, not the warehouse."""
    path = tmp_path / "warehouse.duckdb"
    url = f"duckdb:///{path}"
    export_send_log(ledger, url)
    opened: list[int] = []

    def changed(read_from: Ledger, since: datetime | None) -> pl.DataFrame:
        reader = "import duckdb, sys; duckdb.connect(sys.argv[1], read_only=True).close()"
        done = subprocess.run([sys.executable, "-c", reader, str(path)], timeout=60)
        opened.append(done.returncode)
        return changed_sends(read_from, since)

    export_table(ledger, url, LogTable(SEND_LOG_TABLE, COLUMNS, changed))
    assert opened == [0]


def test_an_export_behind_another_says_it_waits_then_lands(
    ledger: Ledger, warehouse_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While one export holds a table (here: its lock taken by hand, as a long export holds
    it), the next one says so in its log, waits, and exports once it is let go."""
    import threading

    from cdp_activation.feedback.send_log import _sink

    sink = _sink(warehouse_url)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with sink.exclusive(SEND_LOG_TABLE):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    caplog.set_level("INFO", logger="cdp_activation.feedback.send_log")
    result: list[int] = []
    exporter = threading.Thread(
        target=lambda: result.append(export_send_log(ledger, warehouse_url).exported)
    )
    exporter.start()
    deadline = time.monotonic() + 30
    while "waiting for it to finish" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "another export holds" in caplog.text and result == []
    release.set()
    holder.join(30)
    exporter.join(60)
    sink.close()
    assert result == [3] and read_log(warehouse_url).height == 3


_HOLD_AND_HANG = """
import sys, time
from cdp_activation.feedback.send_log import SEND_LOG_TABLE, _sink
with _sink(sys.argv[1]).exclusive(SEND_LOG_TABLE):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_an_export_killed_while_it_holds_the_table_does_not_hold_the_next_one(
    ledger: Ledger, warehouse_url: str
) -> None:
    """An export killed mid-way (SIGKILL, a lost pod) leaves no lock behind: the database
    lets go of its session's lock and the kernel of its lock file, so the next export runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AND_HANG, warehouse_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        holder.kill()
        holder.wait(30)
        began = time.monotonic()
        assert export_send_log(ledger, warehouse_url).table_rows == 3
        assert time.monotonic() - began < 20
    finally:
        if holder.poll() is None:
            holder.kill()


def test_an_export_waits_out_a_stuck_one_only_so_long_and_says_so(
    ledger: Ledger, warehouse_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that holds the table and never finishes (alive, but hung) is waited for
    `EXPORT_WAIT` at most: the export then fails in one line saying where to look, having
    written nothing, and the next one, once the table is free, catches up."""
    from cdp_activation.feedback import send_log

    monkeypatch.setattr(send_log, "EXPORT_WAIT", timedelta(seconds=1))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AND_HANG, warehouse_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        began = time.monotonic()
        with pytest.raises(send_log.ExportBusy) as refused:
            export_send_log(ledger, warehouse_url)
        assert 0.9 < time.monotonic() - began < 20
        message = str(refused.value)
        assert message.startswith("another export has held activation_send_log for over 1 s:")
        assert "lock file" in message or "pg_locks" in message
        assert refused.value.transient
    finally:
        holder.kill()
        holder.wait(30)
    assert export_send_log(ledger, warehouse_url).table_rows == 3
