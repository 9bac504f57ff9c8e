"""Status sources: Braze Currents events exported to a real DuckDB warehouse, read with the
project's own SQL into a real ledger (SQLite and PostgreSQL), as webhooks are."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest
import sqlalchemy as sa

from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.components.resources import LedgerResource, WarehouseResource
from cdp_activation.connectors.base import Outcome, SendResult
from cdp_activation.defs.status_sources import status_source_asset
from cdp_activation.feedback.status_sources import (
    STATUS_SQL_DIR,
    StatusSource,
    StatusSourceError,
    read_status_source,
)
from cdp_activation.ledger import Ledger
from cdp_activation.settings import project_root

pytestmark = pytest.mark.integration

BRAZE = StatusSource.load(project_root() / STATUS_SQL_DIR / "braze_currents.sql")
NOW = datetime.now(UTC)


def currents_warehouse(path: Path, events: list[tuple[str, str, str, str, int, str | None]]) -> str:
    """A warehouse holding Braze Currents' WhatsApp events (the demo schema's table)."""
    schema = (project_root() / "sql/demo/schema.sql").read_text()
    ddl = schema[schema.index("CREATE OR REPLACE TABLE braze_currents_whatsapp_events") :]
    with duckdb.connect(str(path)) as con:
        con.execute(ddl)
        con.executemany(
            "INSERT INTO braze_currents_whatsapp_events VALUES (?, ?, ?, ?, ?, ?)", events
        )
    return f"duckdb:///{path}"


def event(n: int, kind: str, user: str, dispatch: str = "dispatch-1", code: str | None = None):
    return (
        f"e{n}",
        f"users.messages.whatsapp.{kind}",
        user,
        dispatch,
        # Now, not the module's import time: the send is planned during the test, and a report
        # dated more than 10 minutes before its send was planned is ignored as a replay.
        int(datetime.now(UTC).timestamp()) - 60 + n,
        code,
    )


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    """Three customers sent in one Braze API-triggered send (one dispatch id)."""
    ledger = Ledger(ledger_url)
    frame = pl.DataFrame(
        {
            "customer_id": ["c1", "c2", "c3"],
            "phone_e164": ["+447911100001", "+447911100002", "+447911100003"],
            "channel": ["whatsapp"] * 3,
            "connector": ["braze"] * 3,
            "step": ["initial"] * 3,
            "template_name": ["campaign-1"] * 3,
            "template_language": ["en"] * 3,
            "variables": [["Ann"], ["Bob"], ["Cy"]],
            "body": [None, None, None],
        },
        schema_overrides={"body": pl.String},
    )
    ledger.plan("braze_winback", "2026-12-01", frame)
    rows = ledger.pending("braze_winback", "2026-12-01")
    ledger.mark_in_flight([r.id for r in rows])
    ledger.record(
        [(r.id, SendResult(r.idempotency_key, Outcome.SENT, "dispatch-1"), 1) for r in rows]
    )
    yield ledger
    ledger.dispose()


def statuses(ledger: Ledger) -> dict[str, tuple[str | None, str | None]]:
    rows = ledger.rows("braze_winback")
    return {
        r["customer_id"]: (r["delivery_status"], r["delivery_error_code"])
        for r in rows.iter_rows(named=True)
    }


def test_exported_events_move_each_customer_s_send_once(ledger: Ledger, tmp_path: Path) -> None:
    url = currents_warehouse(
        tmp_path / "w.duckdb",
        [
            event(1, "Send", "c1"),
            event(2, "Delivery", "c1"),
            event(3, "Read", "c1"),
            event(4, "Failure", "c2", code="131026"),
            event(5, "Send", "c3"),
            event(6, "Delivery", "c9", dispatch="someone-elses"),  # not ours: ignored
            event(7, "Click", "c1"),  # not a delivery status: left out by the SQL
        ],
    )
    first = read_status_source(BRAZE, Warehouse(url), ledger)
    # Moves: c1 sent, delivered, read; c2 failed; c3 sent. The stranger's event waits unapplied.
    assert (first.rows, first.new, first.advanced) == (6, 6, 5)
    # The dispatch id covers all three: customer_id keeps each event on its own send.
    assert statuses(ledger) == {
        "c1": ("read", None),
        "c2": ("failed", "131026"),
        "c3": ("sent", None),
    }
    assert first.since <= NOW - timedelta(days=6)  # the first read looks a week back

    again = read_status_source(BRAZE, Warehouse(url), ledger)
    assert (again.rows, again.new, again.advanced) == (6, 0, 0)
    assert again.since > NOW - timedelta(hours=2)  # from the newest event read, less an hour


def test_a_source_that_breaks_the_contract_writes_nothing(ledger: Ledger, tmp_path: Path) -> None:
    url = currents_warehouse(tmp_path / "w.duckdb", [event(1, "Delivery", "c1")])
    sql = tmp_path / "bad.sql"
    sql.write_text(
        "SELECT 'brazil' AS connector, dispatch_id AS provider_message_id, 'bounced' AS status,"
        ' to_timestamp("time") AS occurred_at FROM braze_currents_whatsapp_events'
    )
    with pytest.raises(StatusSourceError) as err:
        read_status_source(StatusSource.load(sql), Warehouse(url), ledger)
    message = str(err.value)
    assert "status must be one of sent, delivered, failed, read; got 'bounced'" in message
    assert "unknown connector(s) 'brazil'" in message
    with ledger.engine.connect() as con:
        assert con.execute(sa.text("SELECT count(*) FROM status_events")).scalar_one() == 0
    assert statuses(ledger)["c1"] == (None, None)


def test_the_status_source_asset_reads_through_its_resources(
    ledger: Ledger, tmp_path: Path
) -> None:
    url = currents_warehouse(tmp_path / "w.duckdb", [event(1, "Delivery", "c2")])
    asset = status_source_asset(BRAZE)
    result = dg.materialize(
        [asset],
        resources={
            "warehouse": WarehouseResource(url=url),
            "ledger": LedgerResource(url=ledger.url),
        },
    )
    assert result.success
    meta = result.asset_materializations_for_node(asset.node_def.name)[0].metadata
    assert meta["statuses_advanced"].value == 1
    assert statuses(ledger)["c2"] == ("delivered", None)
