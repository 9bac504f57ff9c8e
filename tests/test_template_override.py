"""`cdp-activation run NAME --template X` passes the same rules as defs.yaml's template."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, time
from pathlib import Path

import pytest

from cdp_activation.demo_data import generate_demo_warehouse
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.e2e


def test_the_cli_refuses_a_pending_template_in_one_line_and_sends_nothing(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    warehouse = tmp_path / "demo.duckdb"
    as_of = datetime.combine(datetime.now(UTC).date(), time.min, tzinfo=UTC)
    generate_demo_warehouse(warehouse, customers=500, seed=7, as_of=as_of)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home),
        CDP_WAREHOUSE_URL=f"duckdb:///{warehouse}",
        CDP_LEDGER_URL=ledger_url,
        CDP_META_BASE_URL=f"{sandbox.url}/meta",
        CDP_TWILIO_BASE_URL=f"{sandbox.url}/twilio",
        CDP_TWILIO_CONTENT_BASE_URL=f"{sandbox.url}/twilio",
        CDP_CONFIRM_ABOVE="1000000",  # no preview needed: only the template check stops it
    )
    result = subprocess.run(
        [str(BIN / "cdp-activation"), "run", "winback_whatsapp", "--template", "spring_sale"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:] + result.stdout[-2000:]
    [line] = [x for x in result.stdout.splitlines() if x.startswith("run failed")]
    assert "run template 'spring_sale' refused: template 'spring_sale' (en) is PENDING" in line
    assert "unset to send 'winback_offer' from defs.yaml" in line
    assert sandbox.messages() == []
    ledger = Ledger(ledger_url)
    try:
        assert ledger.rows("winback_whatsapp").is_empty()
    finally:
        ledger.dispose()
