"""Secrets reach Dagster as EnvVars: resolved at run time, never shown in the UI."""

from __future__ import annotations

import dagster as dg
import pytest

from cdp_activation.defs.resources import resources


def test_urls_and_tokens_from_the_environment_stay_env_vars(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CDP_WAREHOUSE_URL", "postgresql://analyst:s3cret@db.internal/crm")
    monkeypatch.setenv("CDP_LEDGER_URL", "postgresql://ledger:s3cret@db.internal/cdp")
    monkeypatch.setenv("CDP_META_ACCESS_TOKEN", "EAAG-secret-token")
    monkeypatch.setenv("CDP_TWILIO_AUTH_TOKEN", "twilio-secret")
    configured = resources().resources
    assert isinstance(configured["warehouse"].url, dg.EnvVar)
    assert isinstance(configured["ledger"].url, dg.EnvVar)
    assert isinstance(configured["meta_whatsapp"].access_token, dg.EnvVar)
    assert isinstance(configured["twilio"].auth_token, dg.EnvVar)
    shown = repr(configured)
    assert "s3cret" not in shown and "EAAG-secret-token" not in shown
    assert "twilio-secret" not in shown


def test_the_embedded_default_needs_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "CDP_WAREHOUSE_URL",
        "CDP_LEDGER_URL",
        "CDP_META_ACCESS_TOKEN",
        "CDP_TWILIO_AUTH_TOKEN",
        "CDP_META_BASE_URL",
        "CDP_TWILIO_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    configured = resources().resources
    assert configured["warehouse"].url.startswith("duckdb:///")
    assert configured["ledger"].url.startswith("sqlite:///")
    # Against the local sandbox the connector uses the sandbox's own test credentials.
    assert configured["meta_whatsapp"].connector().base_url.startswith("http://127.0.0.1:")
