"""`cdp-activation run NAME --template X` passes the same rules as defs.yaml's template."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer
from conftest import cli_project

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.e2e


def test_the_cli_refuses_a_pending_template_in_one_line_and_sends_nothing(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = cli_project(tmp_path, sandbox)
    ledger_url = project.ledger_url
    result = project.run("run", "winback_whatsapp", "--template", "spring_sale")
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
