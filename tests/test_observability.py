"""Metrics and JSON logs of a real send (issue 21, items 2 and 3; docs/operations.md).

The real `cdp-activation run` and `cdp-activation webhooks serve` processes, a sandbox provider
over HTTP that throttles some requests and reports statuses back to the receiver: the receiver's
`/metrics`, scraped while the send is under way and after, adds up every process's figures
(CDP_METRICS_DIR), and they agree with the ledger; with CDP_LOG_FORMAT=json every stderr line
of the run is JSON, one per batch and one run summary, and no phone number is in them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer
from conftest import cli_project
from test_cli import free_port

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ACTIVATION = "winback_whatsapp"


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """`/metrics` as {sample name: {sorted labels: value}}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(
        value
        for key, value in samples.get(name, {}).items()
        if all((k, v) in key for k, v in labels.items())
    )


def start_receiver(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "cdp-activation"),
            "webhooks",
            "serve",
            "--port",
            str(port),
        ],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the receiver did not start: {process.stderr.read()[-2000:]}")  # type: ignore[union-attr]


def test_metrics_of_every_process_are_scraped_during_a_real_send_and_match_the_ledger(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = cli_project(tmp_path, sandbox, customers=1_500)
    env = {
        **project.env,
        "CDP_METRICS_DIR": str(tmp_path / "metrics"),
        "CDP_LOG_FORMAT": "json",
    }
    receiver, url = start_receiver(env, project.tmp)
    try:
        # Slow enough to be scraped mid-send; some requests throttled (429 + Retry-After).
        sandbox.configure(
            latency_ms=40,
            rate_429=0.05,
            retry_after_s=0.2,
            status_webhooks_url=url,
            status_delay_ms=1,
        )
        run = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "cdp-activation"),
                "run",
                ACTIVATION,
                "--send-window",
                "00:00-23:59",
                "--json",
            ],
            env=env,
            cwd=project.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        during = 0.0
        while run.poll() is None:
            during = total(scrape(url), "cdp_messages_total", outcome="sent")
            if during:
                break
            time.sleep(0.2)
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        assert during > 0, "nothing was scraped while the run was sending"

        ledger = Ledger(project.ledger_url)
        try:
            rows = ledger.rows(ACTIVATION)
            sent = rows.filter(pl.col("state") == "sent")
            numbers = set(rows["recipient"].to_list())
            # The receiver has every report the sandbox sent once the counts stop moving.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                reported = (
                    ledger.engine.connect()
                    .exec_driver_sql("SELECT COUNT(*) FROM status_events")
                    .scalar_one()
                )
                time.sleep(1.0)
                again = (
                    ledger.engine.connect()
                    .exec_driver_sql("SELECT COUNT(*) FROM status_events")
                    .scalar_one()
                )
                if again == reported and reported:
                    break
        finally:
            ledger.dispose()
        after = scrape(url)
        assert during < sent.height, "the mid-send scrape saw the whole send"

        # Messages: the run's own figures, from its processes' files, equal the ledger's.
        by_outcome = {
            o: total(after, "cdp_messages_total", activation=ACTIVATION, outcome=o)
            for o in ("sent", "failed", "unknown", "retry")
        }
        assert by_outcome["sent"] == sent.height
        assert by_outcome["failed"] == rows.filter(pl.col("state") == "failed").height
        assert by_outcome["unknown"] == 0
        for connector in set(sent["connector"].to_list()):
            assert total(after, "cdp_messages_total", connector=connector, outcome="sent") == (
                sent.filter(pl.col("connector") == connector).height
            )
        throttled = total(after, "cdp_provider_throttled_total")
        assert throttled > 0 and by_outcome["retry"] >= throttled
        assert total(after, "cdp_retry_after_wait_seconds_total") >= 0.2 * throttled - 1e-6
        requests = total(after, "cdp_provider_request_seconds_count")
        assert requests >= by_outcome["sent"] / 200  # batches or single messages
        slow = total(after, "cdp_provider_request_seconds_bucket", le="0.025")
        assert slow < requests, "every request answered under 25 ms despite 40 ms latency"
        assert total(after, "cdp_rate_limiter_wait_seconds_count") >= requests
        assert total(after, "cdp_ledger_seconds_count", operation="claim") > 0
        assert total(after, "cdp_ledger_seconds_count", operation="record") > 0

        # Webhooks: the sandbox's reports as the receiver stored them, by provider and status.
        delivered = total(after, "cdp_webhook_events_total", status="delivered")
        assert delivered > 0
        assert total(after, "cdp_webhook_requests_total", code="200") > 0
        forged = httpx.post(
            f"{url}/webhooks/meta", content=b'{"entry": []}', headers={"X-Hub-Signature-256": "x"}
        )
        assert forged.status_code == 401
        assert total(scrape(url), "cdp_webhook_signature_refusals_total", provider="meta") == 1

        # Logs: every line JSON; one batch line per answered request, one run summary.
        lines = [json.loads(line) for line in err.splitlines() if line.strip()]
        batches = [line for line in lines if line.get("event") == "batch"]
        summaries = [line for line in lines if line.get("event") == "run_summary"]
        assert sum(b["sent"] for b in batches) == sent.height
        assert len(batches) == requests
        assert {b["activation"] for b in batches} == {ACTIVATION}
        assert any(b["retry"] for b in batches)
        (summary,) = [s for s in summaries if s["step"] == "initial"]
        assert summary["sent"] == sent.height and summary["partition"]
        assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
        assert not [n for n in numbers if n in err], "a phone number is in the logs"
        assert json.loads(out.strip().splitlines()[-1])["success"]
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)


def test_with_a_metrics_port_the_webhook_port_serves_no_metrics(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = cli_project(tmp_path, sandbox, customers=10)
    port = free_port()
    receiver, url = start_receiver({**project.env, "CDP_METRICS_PORT": str(port)}, project.tmp)
    try:
        refused = httpx.post(f"{url}/webhooks/meta", content=b"{}")
        assert refused.status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 404  # not beside the webhooks
        samples = scrape(f"http://127.0.0.1:{port}")
        assert total(samples, "cdp_webhook_signature_refusals_total", provider="meta") == 1
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)


def test_without_a_metrics_dir_the_receiver_counts_its_refusals_in_metrics_and_ledger(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = cli_project(tmp_path, sandbox, customers=10)
    began = datetime.now(UTC)
    receiver, url = start_receiver(project.env, project.tmp)
    try:
        for _ in range(3):
            refused = httpx.post(f"{url}/webhooks/twilio", data={"MessageSid": "SM1"})
            assert refused.status_code == 401
        samples = scrape(url)
        assert total(samples, "cdp_webhook_signature_refusals_total", provider="twilio") == 3
        assert total(samples, "cdp_webhook_requests_total", provider="twilio", code="401") == 3
        assert total(samples, "cdp_messages_total") == 0  # no sender writes here
        ledger = Ledger(project.ledger_url)
        try:
            deadline = time.monotonic() + 10
            while ledger.refusals_since(began) != {"twilio": 3} and time.monotonic() < deadline:
                time.sleep(0.1)
            assert ledger.refusals_since(began) == {"twilio": 3}
        finally:
            ledger.dispose()
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)


def test_the_documented_dashboard_and_alert_rules_read_metrics_that_exist() -> None:
    """docs/grafana-dashboard.json and docs/prometheus-alerts.yml query only metric names
    and labels `metrics.py` defines: a renamed metric breaks this, not a dashboard in
    production."""
    import re

    import yaml

    from cdp_activation import metrics

    docs = Path(__file__).resolve().parents[1] / "docs"
    dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
    rules = yaml.safe_load((docs / "prometheus-alerts.yml").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    defined = {
        m._name: set(m._labelnames)  # type: ignore[attr-defined]
        for m in vars(metrics).values()
        if hasattr(m, "_labelnames") and hasattr(m, "_name")
    }

    def base(name: str) -> str:
        return re.sub(r"_(bucket|count|sum|total)$", "", name)

    used = 0
    for query in queries:
        bases = {base(n) for n in re.findall(r"\bcdp_[a-z_]+", query)}
        for name in bases:
            assert name in defined, f"{name} in {query!r} is not a metric of metrics.py"
        used += bool(bases)
        labels = set().union(*(defined[b] for b in bases)) | {"le", "job"}
        matched = set(re.findall(r"(\w+)\s*=~?\s*\"", query))
        grouped = {n.strip() for by in re.findall(r"by \(([^)]*)\)", query) for n in by.split(",")}
        assert matched | grouped <= labels, (matched | grouped - labels, query)
    assert used >= len(queries) - 1  # every query but `up` reads one of ours


def test_the_demo_with_json_logs_writes_only_json_and_its_batches_add_up(tmp_path: Path) -> None:
    """`CDP_LOG_FORMAT=json cdp-activation demo`, as a new user would try it: every stderr line
    (the CLI's, the sandbox's and the receiver's processes are its own) is JSON, the batch
    lines add up to the summary, and the run does not stall on a child process's log."""
    from test_cli import clean_env, run_cli

    home = tmp_path / "dagster_home"
    home.mkdir()
    # Dagster prints a telemetry notice (not a log line) into a fresh instance's first run.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = clean_env(DAGSTER_HOME=str(home), CDP_LOG_FORMAT="json")
    demo = ("demo", "--customers", "3000", "--port", str(free_port()))
    done = run_cli(*demo, "--send-window", "00:00-23:59", "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    batches = [x for x in lines if x.get("event") == "batch" and x["step"] == "initial"]
    assert summary["sent"] > 100
    assert sum(b["sent"] for b in batches) == summary["sent"]
    assert sum(b["failed"] for b in batches) == summary["failed"]
    steps = {x["step"] for x in lines if x.get("event") == "run_summary"}
    assert steps == {"initial", "fallback"}
    assert not [x for x in lines if x.get("logger") in ("httpx", "alembic.runtime.migration")]


def test_json_logs_mask_numbers_everywhere_but_in_identifiers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    from cdp_activation import logs

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "to %s", ("+447911123456",), None)
    record.run_id = "12345678-aaaa-bbbb-cccc-123456789012"  # eight digits: an id, kept
    record.workers = [{"stopped_by": "+447911123456 refused", "worker": "12345678"}]
    try:
        raise ValueError("bad +447911123456")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert logs.MaskPhones().filter(record)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.json_formatter())
    handler.emit(record)
    line = json.loads(stream.getvalue())
    assert line["message"] == "to +44********56"
    assert line["run_id"] == "12345678-aaaa-bbbb-cccc-123456789012"
    assert line["workers"] == [{"stopped_by": "+44********56 refused", "worker": "12345678"}]
    assert "ValueError: bad +44********56" in line["exception"]
    assert "+447911123456" not in stream.getvalue()
