"""One root for the project's errors, two kinds, and the CLI's one line (issue 16, item 6)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cdp_activation.activation.run import DeliveryFailed
from cdp_activation.audience.sql import AudienceSQLError
from cdp_activation.cli.main import main
from cdp_activation.connectors.base import ConnectorError, CredentialsError, TemplateError
from cdp_activation.delivery.engine import ProviderUnavailable, TemplateBlocked
from cdp_activation.errors import CdpError, cdp_error_in
from cdp_activation.ledger import LeaseLost, LedgerUnavailable
from cdp_activation.settings import SettingsError


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (SettingsError, False),
        (LedgerUnavailable, False),
        (AudienceSQLError, False),
        (CredentialsError, False),
        (TemplateError, False),
        (ConnectorError, True),
        (ProviderUnavailable, True),
        (TemplateBlocked, True),
        (LeaseLost, True),
    ],
)
def test_every_error_has_one_root_and_says_its_kind(error: type[CdpError], transient: bool) -> None:
    assert issubclass(error, CdpError)
    assert error.transient is transient


def test_the_root_is_found_through_wrapping() -> None:
    try:
        try:
            raise TemplateError("template 'x' is PAUSED")
        except TemplateError as inner:
            raise RuntimeError("a step failed") from inner
    except RuntimeError as outer:
        found = cdp_error_in(outer)
    assert isinstance(found, TemplateError) and found.kind == "terminal"
    summary = DeliveryFailed.__new__(DeliveryFailed)
    assert summary.kind == "transient"


def test_the_cli_prints_one_line_and_the_traceback_with_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CDP_LEDGER_URL", f"sqlite:///{tmp_path / 'a-file' / 'ledger.sqlite'}")
    monkeypatch.chdir(tmp_path)
    plain = CliRunner().invoke(main, ["purge"])
    assert plain.exit_code == 1
    lines = plain.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "CDP_LEDGER_URL" in lines[0]
    debug = CliRunner().invoke(main, ["--debug", "purge"])
    assert debug.exit_code == 1 and isinstance(debug.exception, LedgerUnavailable)
