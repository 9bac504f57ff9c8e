"""Alerts (issue 21, item 1; docs/operations.md): Dagster's sensors tell Slack, e-mail and a
JSON webhook when a run fails or is blocked, when one that succeeded is degraded, and when the
receivers refuse many signatures.

The destinations are real servers: the sandbox takes Slack's Web API and the webhook over
HTTP, aiosmtpd takes the e-mail over SMTP. The end-to-end test runs the real Dagster daemon
on a real instance while the real CLI runs the activation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
from aiosmtpd.controller import Controller

from cdp_activation.alerts import model
from cdp_activation.alerts.conditions import backlog_growing, degraded_findings
from cdp_activation.alerts.destinations import Destinations, Dispatcher
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer
from cdp_activation.sandbox_credentials import SANDBOX_SLACK_TOKEN
from cdp_activation.spec import AlertsSpec
from conftest import cli_project
from test_cli import free_port

ACTIVATION = "winback_whatsapp"


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[_Inbox, int]]:
    inbox = _Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def _alert_env(sandbox: SandboxServer, smtp_port: int) -> dict[str, str]:
    return {
        "CDP_ALERT_WEBHOOK_URL": f"{sandbox.url}/alerts/webhook",
        "CDP_ALERT_SLACK_TOKEN": SANDBOX_SLACK_TOKEN,
        "CDP_ALERT_SLACK_CHANNEL": "#activations",
        "CDP_ALERT_SLACK_API_URL": f"{sandbox.url}/slack/api/",
        "CDP_ALERT_SMTP_HOST": "127.0.0.1",
        "CDP_ALERT_SMTP_PORT": str(smtp_port),
        "CDP_ALERT_EMAIL_FROM": "cdp@example.com",
        "CDP_ALERT_EMAIL_TO": "oncall@example.com, marketing-ops@example.com",
    }


# ------------------------------------------------------------------ conditions


SUMMARY = {
    "activation": ACTIVATION,
    "partition": "2026-12-05",
    "dry_run": False,
    "sent": 9_000,
    "failed": 100,
    "unknown": 10,
    "dead_letter": 0,
    "ledger_states": {"sent": 9_000, "failed": 100, "unknown": 10},
    "configured_rate_per_second": 80.0,
    "throughput_per_second": 75.0,
    "error_codes": {"131026": 100},
    "accepted_as": {},
}


def test_a_healthy_run_raises_no_finding_and_each_threshold_one() -> None:
    spec = AlertsSpec()
    assert degraded_findings(SUMMARY, spec, 10_000, [9_500, 10_200, 9_900]) == []

    failing = {**SUMMARY, "failed": 1_000, "error_codes": {"131026": 700, "131049": 300}}
    (finding,) = degraded_findings(failing, spec)
    assert finding.startswith("1,000 of 10,010 answered messages failed (10.0%, threshold 5.0%)")
    assert "131026 (700), 131049 (300)" in finding

    (finding,) = degraded_findings({**SUMMARY, "unknown": 200}, spec)
    assert "200 of 9,300 answered messages are unknown (2.2%" in finding

    dead = {**SUMMARY, "dead_letter": 500, "ledger_states": {"sent": 9_000, "dead_letter": 500}}
    (finding,) = degraded_findings(dead, spec)
    assert "500 of the partition's 9,500 messages are dead letters (5.3%" in finding

    (finding,) = degraded_findings(SUMMARY, spec, 25_000, [9_500, 10_200, 9_900])
    assert "the audience is 25,000 where the last 3 runs' median is 9,900 (+153%" in finding
    assert degraded_findings(SUMMARY, spec, 25_000, [9_500]) == []  # no usual range yet

    (finding,) = degraded_findings({**SUMMARY, "throughput_per_second": 9.5}, spec)
    assert "sent at 9.5 messages/s where the connectors' limits allow 80.0/s (12%" in finding
    small = {**SUMMARY, "sent": 500, "failed": 5, "unknown": 0, "throughput_per_second": 1.0}
    assert degraded_findings(small, spec) == []  # a small run's time is its start-up

    (finding,) = degraded_findings({**SUMMARY, "accepted_as": {"paused": 40}}, spec)
    assert finding.startswith("40 messages accepted as paused")

    # A deferred-sends run of three messages, one failed: no trend to tell.
    tiny = {**SUMMARY, "sent": 2, "failed": 1, "unknown": 0, "ledger_states": {"sent": 2}}
    assert degraded_findings(tiny, spec) == []
    assert len(degraded_findings(tiny, AlertsSpec(share_min_messages=1))) == 1

    strict = AlertsSpec(max_failed_share=0.001, max_unknown_share=0.0001)
    assert len(degraded_findings(SUMMARY, strict)) == 2
    assert degraded_findings({**SUMMARY, "dry_run": True, "failed": 9_000}, spec) == []


def test_a_backlog_alerts_only_when_it_grew_at_each_check_past_the_minimum() -> None:
    spec = AlertsSpec(fallback_backlog_min=100, fallback_backlog_checks=3)
    assert backlog_growing([50, 120, 300], spec)
    assert not backlog_growing([50, 300, 300], spec)  # steady: the fallback keeps up
    assert not backlog_growing([10, 20, 90], spec)  # growing, but small
    assert not backlog_growing([120, 300], spec)  # not enough checks yet


def test_thresholds_out_of_range_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="max_failed_share is a share: from 0 to 1, got 5"):
        AlertsSpec(max_failed_share=5)
    with pytest.raises(ValueError, match="history_runs must be from 2 to 100, got 1"):
        AlertsSpec(history_runs=1)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        AlertsSpec.model_validate({"max_fail_share": 0.1})


# ------------------------------------------------------------------ destinations


ALERT = model.Alert(
    kind=model.DEGRADED,
    title=f"{ACTIVATION}: run succeeded but degraded",
    activation=ACTIVATION,
    partition="2026-12-05",
    # An error that echoed a number must not carry it out.
    findings=["1,000 of 10,010 answered messages failed; last: +447911123456 not on WhatsApp"],
    figures={"sent": 9_000, "failed": 1_000},
    run_id="abc",
    link="http://127.0.0.1:3000/runs/abc",
)


def test_each_destination_receives_the_alert_without_the_phone_number(
    sandbox: SandboxServer, smtp: tuple[_Inbox, int]
) -> None:
    inbox, port = smtp
    env = _alert_env(sandbox, port)
    destinations = Destinations(
        webhook_url=env["CDP_ALERT_WEBHOOK_URL"],
        slack_token=SANDBOX_SLACK_TOKEN,
        slack_channel="#activations",
        slack_api_url=env["CDP_ALERT_SLACK_API_URL"],
        smtp_host="127.0.0.1",
        smtp_port=port,
        email_from="cdp@example.com",
        email_to=("oncall@example.com",),
    )
    dispatcher = Dispatcher(destinations)
    assert dispatcher.send(ALERT) == ["webhook", "slack", "email"]
    assert dispatcher.down == {}
    received = {a["destination"]: a["body"] for a in sandbox.alerts()}
    assert received["webhook"]["kind"] == "degraded"
    assert received["webhook"]["activation"] == ACTIVATION
    assert received["webhook"]["link"] == "http://127.0.0.1:3000/runs/abc"
    assert received["webhook"]["figures"] == {"sent": 9_000, "failed": 1_000}
    assert received["slack"]["channel"] == "#activations"
    assert "2026-12-05" in received["slack"]["text"]
    (mail,) = inbox.messages
    assert mail["Subject"].strip() == (
        f"[cdp-activation] {ACTIVATION}: run succeeded but degraded (2026-12-05)"
    )
    assert mail["To"] == "oncall@example.com"
    everything = json.dumps(received) + mail.get_content()
    assert "+447911123456" not in everything and "+44********56" in everything


def test_an_unreachable_destination_is_logged_once_and_the_others_still_get_every_alert(
    sandbox: SandboxServer, smtp: tuple[_Inbox, int], caplog: pytest.LogCaptureFixture
) -> None:
    inbox, port = smtp
    closed = f"http://127.0.0.1:{free_port()}/hook?token=s3cr3t-in-url"
    destinations = Destinations(
        webhook_url=closed,
        slack_token="xoxb-wrong",  # refused by Slack: invalid_auth
        slack_channel="#activations",
        slack_api_url=f"{sandbox.url}/slack/api/",
        smtp_host="127.0.0.1",
        smtp_port=port,
        email_from="cdp@example.com",
        email_to=("oncall@example.com",),
    )
    dispatcher = Dispatcher(destinations, logging.getLogger("alerts-test"))
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="alerts-test"):
        for _ in range(3):
            assert dispatcher.send(ALERT) == ["email"]
    assert time.monotonic() - began < 5.0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # the webhook once, Slack once
    assert any(w.startswith("alert destination webhook could not be reached") for w in warnings)
    assert any("invalid_auth" in w for w in warnings)
    assert not any("s3cr3t" in w or "xoxb-wrong" in w for w in warnings)
    assert len(inbox.messages) == 3
    assert sandbox.alerts() == []


def test_invalid_alert_settings_are_a_validate_error_naming_the_variable(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = cli_project(tmp_path, sandbox, customers=10)
    cases = {
        "CDP_ALERT_SLACK_CHANNEL": ({"CDP_ALERT_SLACK_TOKEN": "xoxb-1"}, "need both"),
        "CDP_ALERT_EMAIL_TO": ({"CDP_ALERT_EMAIL_TO": "ops@example.com"}, "CDP_ALERT_SMTP_HOST"),
        "CDP_ALERT_WEBHOOK_URL": (
            {"CDP_ALERT_WEBHOOK_URL": "hooks.example.com/T0/s3cr3t"},
            "http:// or https:// URL",
        ),
    }
    for variable, (env, words) in cases.items():
        done = project.run("validate", **env)
        assert done.returncode == 1, done.stderr
        line = done.stderr.strip().splitlines()[-1]
        assert variable in line and words in line, line
        assert "s3cr3t" not in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------ end to end


def _sensor_cursors(home: Path) -> dict[str, str | None]:
    from dagster._core.scheduler.instigation import InstigatorType

    instance = dg.DagsterInstance.from_config(str(home))
    try:
        return {
            state.instigator_name: getattr(state.instigator_data, "cursor", None)
            for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        }
    finally:
        instance.dispose()


def _wait(what: str, check: Any, seconds: float = 90.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
@pytest.mark.e2e
def test_the_daemon_alerts_on_a_blocked_run_a_degraded_run_and_forged_webhooks(
    tmp_path: Path, sandbox: SandboxServer, smtp: tuple[_Inbox, int]
) -> None:
    inbox, port = smtp
    project = cli_project(tmp_path, sandbox, customers=600)
    env = {
        **project.env,
        **_alert_env(sandbox, port),
        "CDP_ALERT_INTERVAL_SECONDS": "5",
        "CDP_ALERT_SIGNATURE_REFUSALS": "5",
        "CDP_DAGSTER_UI_URL": "https://dagster.example.com",
    }
    daemon = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster-daemon"),
            *("run", "-m", "cdp_activation.definitions", "--log-level", "warning"),
        ],
        env=env,
        cwd=project.tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Run-status sensors start from their first tick: runs before it are history.
        watched = ("alert_on_run_failure", f"{ACTIVATION}_degraded_run_alert")
        _wait(
            "the alert sensors' first tick",
            lambda: all(_sensor_cursors(project.home).get(n) for n in watched),
        )

        # 1. Blocked: the template was paused at Meta; template_approved stops the run.
        paused = httpx.post(
            f"{sandbox.url}/_sandbox/templates",
            json={"name": "winback_offer", "language": "en", "status": "PAUSED"},
        )
        assert paused.status_code == 200, paused.text
        blocked = project.run("run", ACTIVATION, "--send-window", "00:00-23:59", **env)
        assert blocked.returncode != 0
        httpx.post(
            f"{sandbox.url}/_sandbox/templates",
            json={"name": "winback_offer", "language": "en", "status": "APPROVED"},
        )

        # 2. Degraded: it succeeds, but a third of WhatsApp numbers are not on WhatsApp.
        sandbox.configure(rate_not_on_whatsapp=0.3)
        degraded = project.run("run", ACTIVATION, "--send-window", "00:00-23:59", **env)
        assert degraded.returncode == 0, degraded.stderr[-2000:]

        # 3. Forged reports: the receivers counted refusals in the ledger.
        ledger = Ledger(project.ledger_url)
        try:
            ledger.record_refusals({"meta": 4, "twilio": 3})
            numbers = set(ledger.rows(ACTIVATION)["recipient"].to_list())
        finally:
            ledger.dispose()

        kinds = {"run_blocked", "degraded", "signature_refusals"}

        def webhook_kinds() -> set[str]:
            got = {a["body"]["kind"] for a in sandbox.alerts() if a["destination"] == "webhook"}
            return got if kinds <= got else set()

        try:
            _wait("the three alerts", webhook_kinds)
        except AssertionError:
            daemon.terminate()
            _, err = daemon.communicate(timeout=20)
            got = [(a["destination"], a["body"].get("kind")) for a in sandbox.alerts()]
            raise AssertionError(f"alerts {got}; daemon: {err[-3000:]}") from None
        time.sleep(6)  # one more tick: nothing is told twice
        alerts = sandbox.alerts()
        by_kind = {a["body"]["kind"]: a["body"] for a in alerts if a["destination"] == "webhook"}
        assert sorted(a["body"]["kind"] for a in alerts if a["destination"] == "webhook") == (
            sorted(kinds)
        )
        assert len([a for a in alerts if a["destination"] == "slack"]) == 3
        _wait("three e-mails", lambda: len(inbox.messages) >= 3, 20)
        assert len(inbox.messages) == 3

        block = by_kind["run_blocked"]
        assert block["activation"] == ACTIVATION and block["partition"]
        assert any(
            "check template_approved on winback_whatsapp/decisions" in f for f in block["findings"]
        )
        assert any("winback_offer" in f and "PAUSED" in f for f in block["findings"])
        assert block["link"].startswith("https://dagster.example.com/runs/")

        slow = by_kind["degraded"]
        assert slow["partition"] == block["partition"]
        assert any("answered messages failed" in f and "131026" in f for f in slow["findings"])
        assert slow["figures"]["failed"] > 0 and slow["link"].endswith(slow["run_id"])

        forged = by_kind["signature_refusals"]
        assert forged["figures"]["refused"] == 7
        assert "meta 4, twilio 3" in forged["findings"][0]

        text = json.dumps(alerts) + "".join(m.get_content() for m in inbox.messages)
        assert numbers and not [n for n in numbers if n in text]
        assert SANDBOX_SLACK_TOKEN not in text
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()


def test_a_threshold_out_of_range_in_defs_yaml_is_a_validate_error_naming_file_and_field(
    tmp_path: Path,
) -> None:
    from cdp_activation.cli.validation import validate_project
    from test_cli import WINBACK, scratch_project

    root = scratch_project(tmp_path)
    defs = root / WINBACK
    text = defs.read_text()
    assert "\n  schedule:\n" in text
    defs.write_text(
        text.replace("\n  schedule:\n", "\n  alerts:\n    max_failed_share: 5\n  schedule:\n", 1)
    )
    valid, problems = validate_project(root)
    assert "winback_whatsapp" not in valid
    line = defs.read_text().splitlines().index("    max_failed_share: 5") + 1
    assert any(
        f"{defs}:{line}: alerts.max_failed_share" in p and "from 0 to 1, got 5" in p
        for p in problems
    ), problems


def _alerting_to_the_sandbox(monkeypatch: pytest.MonkeyPatch, sandbox: SandboxServer) -> Any:
    """The project's winback_whatsapp activation, with alerts going to the sandbox's webhook."""
    import yaml

    from cdp_activation.activation.run import Activation
    from cdp_activation.spec import ActivationSpec

    monkeypatch.setenv("CDP_SANDBOX", "1")
    monkeypatch.setenv("CDP_ALERT_WEBHOOK_URL", f"{sandbox.url}/alerts/webhook")
    root = Path(__file__).resolve().parents[1]
    defs = root / "src/cdp_activation/defs/activations" / ACTIVATION / "defs.yaml"
    spec = ActivationSpec.model_validate(yaml.safe_load(defs.read_text())["attributes"])
    return Activation.from_spec(ACTIVATION, spec)


def _unreachable_first_messages(ledger: Ledger, start: int, count: int) -> None:
    """`count` WhatsApp first messages Meta refused as not on WhatsApp (131026): each is due
    its SMS fallback at once."""
    import polars as pl

    from cdp_activation.connectors.base import Outcome, SendResult

    customers = [f"c{i}" for i in range(start, start + count)]
    frame = pl.DataFrame(
        {
            "customer_id": customers,
            "phone_e164": [f"+4479112{i:05d}" for i in range(start, start + count)],
            "channel": ["whatsapp"] * count,
            "connector": ["meta_whatsapp"] * count,
            "step": ["initial"] * count,
            "template_name": ["winback_offer"] * count,
            "template_language": ["en"] * count,
            "variables": [["Ann", "45", "C1"]] * count,
            "body": [None] * count,
        },
        schema_overrides={"body": pl.String},
    )
    ledger.plan(ACTIVATION, "2026-12-05", frame)
    rows = [r for r in ledger.pending(ACTIVATION, "2026-12-05") if r.customer_id in customers]
    ledger.mark_in_flight([r.id for r in rows])
    ledger.record(
        [
            (r.id, SendResult(r.idempotency_key, Outcome.FAILED, None, error_code="131026"), 1)
            for r in rows
        ]
    )


def test_the_fallback_backlog_alert_fires_once_while_it_grows_and_again_after_a_pause(
    tmp_path: Path, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `<name>_fallback_backlog_alert` sensor, evaluated by Dagster's own sensor context on
    a real ledger: undecided fallbacks growing at each of 3 checks past 100 is one alert; a
    fourth growing check tells nothing new; once it stopped growing and grows again, again."""
    from cdp_activation.components.alerting import activation_alert_sensors
    from cdp_activation.components.resources import LedgerResource

    activation = _alerting_to_the_sandbox(monkeypatch, sandbox)
    (sensor,) = [
        s for s in activation_alert_sensors(activation, []) if "fallback_backlog" in s.name
    ]
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    ledger = Ledger(url)
    cursor = None

    def check() -> list[dict[str, Any]]:
        nonlocal cursor
        with (
            dg.instance_for_test() as instance,
            dg.build_sensor_context(
                instance=instance, cursor=cursor, resources={"ledger": LedgerResource(url=url)}
            ) as context,
        ):
            sensor(context)
            cursor = context.cursor
        return [a["body"] for a in sandbox.alerts()]

    try:
        told = 0
        for size in (40, 80, 30):  # 40 → 120 → 150: grew at each check, past 100
            _unreachable_first_messages(ledger, told, size)
            told += size
            alerts = check()
        (alert,) = alerts
        assert alert["kind"] == "fallback_backlog" and alert["activation"] == ACTIVATION
        assert alert["figures"] == {"backlog": 150}
        assert "40 → 120 → 150" in alert["findings"][0]
        _unreachable_first_messages(ledger, told, 10)
        told += 10
        assert len(check()) == 1  # still growing: told already
        assert len(check()) == 1  # steady at 160: the episode is over
        for size in (5, 5, 5):  # 160 → 165 → 170 (three checks rising: told) → 175
            _unreachable_first_messages(ledger, told, size)
            told += size
            alerts = check()
        assert [a["kind"] for a in alerts] == ["fallback_backlog", "fallback_backlog"]
        assert alerts[1]["figures"] == {"backlog": 170}
    finally:
        ledger.dispose()


def test_a_secret_or_a_url_password_an_error_echoed_leaves_the_alert_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cdp_activation.components.alerting import _without_secrets

    monkeypatch.setenv("CDP_SANDBOX", "1")
    monkeypatch.setenv("CDP_META_ACCESS_TOKEN", "EAAG-very-secret-token")
    alert = dataclasses.replace(
        ALERT,
        findings=[
            "deliveries: meta refused EAAG-very-secret-token as expired",
            "could not open postgresql://cdp:hunter2@db.internal:5432/ledger (timeout)",
        ],
    )
    findings = _without_secrets(alert).findings
    assert findings[0] == "deliveries: meta refused *** as expired"
    assert "hunter2" not in findings[1] and "postgresql://cdp:***@db.internal" in findings[1]


def test_the_degraded_run_sensor_reads_every_run_finished_since_its_last_tick(
    sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of other jobs finished before the activation's degraded run, between two ticks:
    one tick passes over them and still tells of the degraded run (a sensor that returned
    something for a run it passed over ended its tick there: one run a tick)."""
    from cdp_activation.components.alerting import activation_alert_sensors

    activation = _alerting_to_the_sandbox(monkeypatch, sandbox)
    failing = {**SUMMARY, "failed": 1_000}

    @dg.op
    def deliveries_op() -> dg.Output[None]:
        yield dg.AssetMaterialization(
            asset_key=[ACTIVATION, "deliveries"],
            metadata={"summary": dg.MetadataValue.json(failing)},
        )
        yield dg.Output(None)

    @dg.op
    def other_op() -> None:
        pass

    activation_job = dg.GraphDefinition(name=f"{ACTIVATION}_job", node_defs=[deliveries_op])
    activation_job = activation_job.to_job()
    others = [
        dg.GraphDefinition(name=f"other_{i}", node_defs=[other_op]).to_job() for i in range(3)
    ]
    (sensor,) = [
        s for s in activation_alert_sensors(activation, [activation_job]) if "degraded" in s.name
    ]
    with dg.instance_for_test() as instance:
        first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
        assert first.cursor  # the first tick only sets where it starts
        for job in others:
            assert job.execute_in_process(instance=instance).success
        assert activation_job.execute_in_process(instance=instance).success
        sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    (alert,) = [a["body"] for a in sandbox.alerts()]
    assert alert["kind"] == "degraded" and alert["figures"]["failed"] == 1_000
