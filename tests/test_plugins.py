"""Connectors are plugins: entry points of `cdp_activation.connectors`, declared once.

A package installed beside the project (here: a distribution on the path of a subprocess, as
pip would leave it) adds a connector with its settings, its Dagster resource, its status
webhook route and its row in the docs, without a line changed in this project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdp_activation.cli.connector_tables import connectors_markdown, webhooks_markdown
from cdp_activation.plugins import plugins

ROOT = Path(__file__).resolve().parents[1]

ACME = """
import hashlib
import hmac
from typing import ClassVar

from pydantic import SecretStr

from cdp_activation.connectors.base import Capabilities, OutboundMessage, Outcome, SendResult
from cdp_activation.plugins import (
    ConnectorPlugin, ConnectorSettings, ContractCase, Credentials, StatusWebhook, credential,
)
from cdp_activation.contracts import StatusEvent


class AcmeConnector:
    name: ClassVar[str] = "acme"
    capabilities: ClassVar[Capabilities] = Capabilities(
        channels=frozenset({"rcs"}), max_batch_size=10, default_rate_per_second=5.0,
        idempotency=False,
    )
    rate_per_second = None

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url, self._key = base_url, api_key

    async def send_batch(self, client, messages):
        return [SendResult(m.key, Outcome.SENT, provider_message_id="acme-1") for m in messages]

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***")


class AcmeSettings(ConnectorSettings):
    base_url: str = "https://api.acme.example"
    api_key: SecretStr | None = credential("acme-sandbox-key")
    hook_secret: SecretStr | None = credential(None, receiver=True)

    def build(self, credentials: Credentials) -> AcmeConnector:
        return AcmeConnector(self.base_url, credentials.get("api_key"))


def verify(secret, request):
    expected = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(request.headers.get("x-acme-signature", ""), expected)


def parse(request):
    return []


PLUGIN = ConnectorPlugin(
    name="acme", title="Acme RCS", connector=AcmeConnector, settings=AcmeSettings,
    env_prefix="acme", docs="RCS through Acme",
    status_webhook=StatusWebhook(
        route="acme", secret="hook_secret", verify=verify, parse=parse, checked_with="HMAC"
    ),
    contract=ContractCase(
        message=lambda i: OutboundMessage(f"k{i}", "+4479000000", "rcs", body="hi"),
        bad_recipient=OutboundMessage("bad", "1", "rcs", body="hi"),
        failure_code="bad", credential="api_key",
    ),
)
"""

CHECKS = """
import hashlib, hmac, json, sys
import dagster as dg
import httpx
from cdp_activation.connectors import CONNECTORS, connector_from_settings
from cdp_activation.cli.connector_tables import connectors_markdown, webhooks_markdown
from cdp_activation.defs.resources import resources
from cdp_activation.ledger import Ledger
from cdp_activation.settings import get_settings
from cdp_activation.feedback.receiver import WebhookServer

settings = get_settings()
connector = connector_from_settings("acme", settings)
configured = resources().resources["acme"]
secrets = settings.webhook_secrets()
body = b'{"statuses": []}'
signature = hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
ledger = Ledger(sys.argv[1])
with WebhookServer(ledger, secrets) as server:
    good = httpx.post(f"{server.url}/webhooks/acme", content=body,
                      headers={"x-acme-signature": signature}).status_code
    forged = httpx.post(f"{server.url}/webhooks/acme", content=body,
                        headers={"x-acme-signature": "0" * 64}).status_code
print(json.dumps({
    "registered": "acme" in CONNECTORS,
    "key": connector._key,
    "rate": connector.rate_per_second,
    "env_var": isinstance(configured.api_key, dg.EnvVar),
    "receiver_secret_in_resource": "hook_secret" in type(configured).model_fields,
    "webhook": [good, forged],
    "in_docs": "`acme` | Acme RCS | rcs | 10 | 5/s" in connectors_markdown()
    and "`/webhooks/acme`" in webhooks_markdown(),
}))
"""


def install(site: Path, name: str, module: str, source: str, entry: str) -> None:
    """A distribution as pip leaves it: the module, and its metadata with the entry point."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[cdp_activation.connectors]\n{entry}\n")


def run(site: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("CDP_") or k == "CDP_PROJECT_ROOT"
    }
    environ.update(PYTHONPATH=str(site), CDP_SANDBOX="1", **(env or {}))
    return subprocess.run(
        args, cwd=site, env=environ, capture_output=True, text=True, timeout=120, check=False
    )


def test_another_package_adds_a_connector_without_touching_this_one(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install(site, "acme_cdp", "acme_cdp", ACME, "acme = acme_cdp:PLUGIN")
    env = {
        "CDP_ACME_API_KEY": "acme-live-key",
        "CDP_ACME_RATE_PER_SECOND": "2.5",
        "CDP_ACME_HOOK_SECRET": "hook-secret",
    }
    ledger = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    result = run(site, sys.executable, "-c", CHECKS, ledger, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {
        "registered": True,
        "key": "acme-live-key",  # from its own variable, CDP_ACME_API_KEY
        "rate": 2.5,
        "env_var": True,  # a Dagster EnvVar, never shown in the UI
        "receiver_secret_in_resource": False,
        "webhook": [200, 401],  # its route, checked with its own scheme
        "in_docs": True,
    }
    # Its settings are checked like every other: one line naming the variable.
    bad = run(
        site,
        str(ROOT / ".venv/bin/cdp-activation"),
        "connectors",
        env={"CDP_ACME_RATE_PER_SECOND": "0"},
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "Error: CDP_ACME_RATE_PER_SECOND=0: must be greater than 0 (messages per second; unset "
        "it to use the connector's default)"
    ], bad.stderr


def test_a_plugin_claiming_a_taken_name_is_refused_in_one_line(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    impostor = "from cdp_activation.connectors.twilio import PLUGIN\n"
    install(site, "impostor", "impostor", impostor, "twilio = impostor:PLUGIN")
    result = run(site, str(ROOT / ".venv/bin/cdp-activation"), "connectors")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "connector name 'twilio' is registered twice" in line
    assert "impostor:PLUGIN" in line and "cdp_activation.connectors.twilio:PLUGIN" in line


@pytest.mark.parametrize(
    ("marker", "table"), [("connectors", connectors_markdown), ("webhooks", webhooks_markdown)]
)
def test_the_docs_tables_are_the_registry_s(marker: str, table: object) -> None:
    docs = (ROOT / "docs" / "connectors.md").read_text()
    begin = docs.index(f"<!-- {marker}:begin")
    body = docs[docs.index("\n", begin) + 1 : docs.index(f"<!-- {marker}:end -->")]
    assert body.strip() == table(), "run `cdp-activation connectors` and paste its tables"  # type: ignore[operator]


def test_every_built_in_connector_is_a_plugin_with_a_contract_case_and_a_sandbox() -> None:
    for name, plugin in plugins().items():
        assert plugin.connector.name == name
        assert plugin.contract is not None, name
        assert plugin.sandbox, name
