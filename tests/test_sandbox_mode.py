"""The sandbox is a mode you turn on (CDP_SANDBOX=1), never inferred from an address (issue 15).

Without it: an unset credential is an error naming the variable, whatever the base URL; the
receiver refuses webhooks signed with the sandbox's published secrets and its verify token;
nothing is sent with the sandbox's token. With it, the same setup works as `make demo` does.
And `.env` reaches the Dagster resources as it reaches the CLI.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cdp_activation.components.resources import connector_resource
from cdp_activation.connectors import connector_from_settings
from cdp_activation.connectors import signatures as sig
from cdp_activation.connectors.base import ConnectorConfigError
from cdp_activation.feedback.receiver import WebhookServer
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer
from cdp_activation.settings import (
    SANDBOX_META_APP_SECRET,
    SANDBOX_META_TOKEN,
    SANDBOX_META_VERIFY_TOKEN,
    SANDBOX_STATUS_SECRET,
    Settings,
)
from conftest import cli_project
from test_webhooks import meta_status

pytestmark = pytest.mark.integration

LOCAL_NOT_SANDBOX = "http://127.0.0.1:4010"


@pytest.fixture
def no_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CDP_SANDBOX", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout


def test_a_local_base_url_without_a_token_is_an_error_outside_sandbox_mode(
    no_sandbox: None,
) -> None:
    settings = Settings(_env_file=None, meta_base_url=LOCAL_NOT_SANDBOX, meta_access_token=None)  # type: ignore[call-arg]
    with pytest.raises(ConnectorConfigError) as raised:
        connector_from_settings("meta_whatsapp", settings)
    assert "CDP_META_ACCESS_TOKEN is not set" in str(raised.value)
    assert "CDP_SANDBOX=1" in str(raised.value)
    resource = connector_resource("meta_whatsapp")(
        base_url=LOCAL_NOT_SANDBOX, api_version="v23.0", phone_number_id="1", waba_id="2"
    )
    with pytest.raises(ConnectorConfigError, match="CDP_META_ACCESS_TOKEN"):
        resource.connector()
    sandboxed = Settings(_env_file=None, meta_base_url=LOCAL_NOT_SANDBOX, sandbox=True)  # type: ignore[call-arg]
    assert connector_from_settings("meta_whatsapp", sandboxed)._access_token == SANDBOX_META_TOKEN


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    yield ledger
    ledger.dispose()


def receiver_checks(server: WebhookServer) -> tuple[int, int, int]:
    """(Meta report signed with the sandbox's app secret, Meta subscription check with the
    sandbox's verify token, /webhooks/sandbox signed with the sandbox's status secret)."""
    body = meta_status("m-1", "failed", int(time.time()), code=131026)
    meta = httpx.post(
        f"{server.url}/webhooks/meta",
        content=body,
        headers={"X-Hub-Signature-256": sig.meta_signature(SANDBOX_META_APP_SECRET, body)},
    )
    check = httpx.get(
        f"{server.url}/webhooks/meta",
        params={
            "hub.mode": "subscribe",
            "hub.verify_token": SANDBOX_META_VERIFY_TOKEN,
            "hub.challenge": "7",
        },
    )
    sandbox_body = json.dumps({"statuses": []}).encode()
    sandbox = httpx.post(
        f"{server.url}/webhooks/sandbox",
        content=sandbox_body,
        headers={"X-Sandbox-Signature": sig.sandbox_signature(SANDBOX_STATUS_SECRET, sandbox_body)},
    )
    return meta.status_code, check.status_code, sandbox.status_code


def test_the_receiver_trusts_the_published_sandbox_secrets_only_in_sandbox_mode(
    no_sandbox: None, ledger: Ledger
) -> None:
    local = {"meta_base_url": LOCAL_NOT_SANDBOX, "webhook_url": f"{LOCAL_NOT_SANDBOX}/hook"}
    plain = Settings(_env_file=None, **local)  # type: ignore[call-arg]
    with WebhookServer(ledger, plain.webhook_secrets()) as server:
        assert receiver_checks(server) == (401, 403, 401)
    with ledger.engine.connect() as con:
        assert con.exec_driver_sql("SELECT count(*) FROM status_events").scalar_one() == 0
    sandboxed = Settings(_env_file=None, sandbox=True, **local)  # type: ignore[call-arg]
    with WebhookServer(ledger, sandboxed.webhook_secrets()) as server:
        assert receiver_checks(server) == (200, 200, 200)


def project_without_sandbox_mode(tmp_path: Path, sandbox: SandboxServer) -> Any:
    """A CLI project against `sandbox` whose environment does not say CDP_SANDBOX."""
    project = cli_project(tmp_path, sandbox, customers=300)
    project.env.pop("CDP_SANDBOX")
    # As a real deployment has it: the key that seals Dagster's stored outputs (storage.py).
    project.env["CDP_PII_HASH_KEY"] = "a-long-random-key-of-this-deployment"
    return project


def test_the_cli_sends_nothing_with_the_sandbox_token_outside_sandbox_mode(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = project_without_sandbox_mode(tmp_path, sandbox)
    run = project.run("run", "winback_whatsapp", "--send-window", "00:00-23:59")
    assert run.returncode != 0
    output = run.stdout + run.stderr
    # Whichever connector is built first names its own variable.
    assert re.search(r"CDP_(META_ACCESS|TWILIO_AUTH)_TOKEN is not set", output), output
    assert "CDP_SANDBOX=1" in output
    assert sandbox.messages() == []


def test_a_token_only_in_dotenv_reaches_the_dagster_resources(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = project_without_sandbox_mode(tmp_path, sandbox)
    # The credentials the sandbox accepts, given as a user gives real ones: in .env only.
    from cdp_activation.settings import SANDBOX_TWILIO_AUTH_TOKEN

    (project.tmp / ".env").write_text(
        f"CDP_META_ACCESS_TOKEN={SANDBOX_META_TOKEN}\n"
        f"CDP_TWILIO_AUTH_TOKEN={SANDBOX_TWILIO_AUTH_TOKEN}\n"
    )
    run = project.run("run", "winback_whatsapp", "--send-window", "00:00-23:59", "--json")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["sent"] > 0
    assert len(sandbox.messages()) == summary["sent"]
