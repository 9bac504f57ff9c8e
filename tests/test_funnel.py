"""The funnel (sql/reporting/funnel.sql) after a real run, against counts taken from the
ledger and the warehouse independently: audience → eligible → sent → delivered → read →
converted."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest

from cdp_activation.connectors.status_parsers import parse_meta
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer
from conftest import cli_project, materialized

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
ACTIVATION = "winback_experiment"


def meta_report(wamid: str, status: str, at: datetime) -> bytes:
    entry = {
        "id": wamid,
        "status": status,
        "timestamp": str(int(at.timestamp())),
        "recipient_id": "447700900001",
    }
    value = {"statuses": [entry]}
    return json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
        }
    ).encode()


def test_the_funnel_counts_each_stage_after_a_real_run(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = cli_project(tmp_path, sandbox, customers=2_000)
    run = project.run("run", ACTIVATION, "--send-window", "00:00-23:59", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    partition = summary["partition"]

    ledger = Ledger(project.ledger_url)
    try:
        rows = ledger.rows(ACTIVATION, partition)
        sent = rows.filter((pl.col("state") == "sent") & (pl.col("channel") == "whatsapp"))
        assert sent.height > 40
        now = datetime.now(UTC)
        delivered, read = sent[:20], sent[20:30]
        for wamid in delivered["provider_message_id"]:
            ledger.record_statuses(parse_meta(meta_report(wamid, "delivered", now), now))
        for wamid in read["provider_message_id"]:
            ledger.record_statuses(parse_meta(meta_report(wamid, "read", now), now))
    finally:
        ledger.dispose()
    # Orders: 7 of the read customers within the week after their send, 3 more 8 days after
    # (outside the window), and one from a held-out customer (never sent: not a conversion).
    warehouse = Path(project.env["CDP_WAREHOUSE_URL"].removeprefix("duckdb:///"))
    held = rows.filter(pl.col("state") == "holdout")["customer_id"][0]
    orders = [(int(c), now + timedelta(days=2)) for c in read["customer_id"][:7]]
    orders += [(int(c), now + timedelta(days=8)) for c in read["customer_id"][7:10]]
    orders += [(int(held), now + timedelta(days=1))]
    with duckdb.connect(str(warehouse)) as con:
        con.register(
            "extra", pl.DataFrame(orders, schema=["c", "ordered"], orient="row").to_arrow()
        )
        con.execute(
            "INSERT INTO orders "
            "SELECT 9000000 + row_number() OVER (), c, ordered, 10, 'EUR' FROM extra"
        )

    metadata = materialized(project.env, project.home, "activation_funnel", tmp_path)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        funnel = con.sql(
            "SELECT stage, channel, sum(customers) AS n FROM activation_funnel "
            f"WHERE activation = '{ACTIVATION}' AND partition_key = '{partition}' "
            "GROUP BY stage, channel"
        ).pl()
    by_stage = dict(funnel.group_by("stage").agg(pl.col("n").sum()).iter_rows())
    assert by_stage["audience"] == summary["audience"]
    assert by_stage["eligible"] == summary["eligible_total"]
    initial_sent = rows.filter((pl.col("state") == "sent") & (pl.col("step") == "initial"))
    assert by_stage["sent"] == initial_sent.height
    assert by_stage["delivered"] == 30  # delivered, and read (which was delivered first)
    assert by_stage["read"] == 10
    assert by_stage["converted"] == 7
    whatsapp = dict(funnel.filter(pl.col("channel") == "whatsapp").select("stage", "n").iter_rows())
    assert whatsapp["sent"] == sent.height
    # The same figures in the asset's metadata, for the UI and its plots.
    assert metadata["customers_converted"].value == 7
    assert metadata["customers_audience"].value == summary["audience"]
    assert f"| {ACTIVATION} | {partition} |" in metadata["funnel"].value
