"""The commands a newcomer types, run as real subprocesses."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_activation.cli.validation import validate_project
from cdp_activation.settings import project_root

ROOT = project_root()
BIN = Path(sys.executable).parent
WINBACK = "src/cdp_activation/defs/activations/winback_whatsapp/defs.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "DAGSTER_"))}
    env["CDP_SANDBOX"] = "1"  # the sandbox's credentials, as `make demo` has them
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "cdp-activation"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.e2e
def test_demo_twice_the_second_run_sends_nothing(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = clean_env(DAGSTER_HOME=str(home))
    port = str(free_port())
    # Real clock in a subprocess: at some hours every demo customer is asleep (03:00-03:30 UTC
    # in winter), so the send window is the whole day here; quiet hours are the e2e tests'.
    demo = ("demo", "--customers", "3000", "--port", port, "--send-window", "00:00-23:59")
    first = run_cli(*demo, "--json", env=env)
    assert first.returncode == 0, first.stderr + first.stdout
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    for key in ("audience", "eligible", "excluded", "sent", "failed", "deferred", "already_sent"):
        assert key in summary
    assert summary["sent"] > 100 and summary["deferred"] == 0
    assert summary["already_sent"] == 0
    assert isinstance(summary["eligible"], dict) and "whatsapp" in summary["eligible"]
    # The readable table too: each count on its own row.
    for label, count in (("sent", summary["sent"]), ("failed", summary["failed"])):
        assert re.search(rf"│ {label} +│ +{count:,} │", first.stdout), first.stdout
    assert "excluded ·" in first.stdout
    # It previewed before it sent, and ended with the SMS fallback.
    assert "preview (dry run)" in first.stderr and "would send" in first.stderr
    done = summary["sent"] + summary["failed"]
    assert f"{done}/{done}" in first.stderr  # the progress bar, at its end
    fallback = summary["fallback"]
    assert fallback["success"] and fallback["channel"] == "sms"
    decided = fallback["sent"] + fallback["failed"] + fallback["deferred"]
    assert sum(fallback["due"].values()) == decided + sum(fallback["excluded"].values())
    assert re.search(rf"│ fallen back · sms sent +│ +{fallback['sent']:,} │", first.stdout)
    # The sandbox reported back through the status webhook receiver: every accepted message
    # has its latest report in the ledger, most of them delivered or read.
    reports = summary["delivery_statuses"]
    assert sum(reports.values()) == summary["sent"]
    assert reports.get("delivered", 0) + reports.get("read", 0) > summary["sent"] / 2
    # Some customers wrote back (the sandbox plays them), and some of those said stop.
    replies = summary["replies"]
    assert replies["replied"] > 0 and 0 < replies["opted_out"] < replies["replied"]
    assert re.search(rf"│ replies · opted out .*│ +{replies['opted_out']:,} │", first.stdout)

    second = run_cli(*demo, "--json", env=env)
    assert second.returncode == 0, second.stderr + second.stdout
    again = json.loads(second.stdout.strip().splitlines()[-1])
    assert again["sent"] == 0
    # Its preview said so before it ran: nothing now, the rest sent by the first run.
    said = " ".join(second.stderr.split())
    earlier = f"{again['already_sent']:,} sent by an earlier run"
    assert f"would send 0 now (0 deferred by quiet hours, {earlier})" in said, said
    # Nothing was due: no progress bar, nor the empty line an unused one left.
    lines = second.stderr.splitlines()
    sending = next(i for i, line in enumerate(lines) if line.startswith("4/5 sending"))
    assert "sending ━" not in second.stderr and lines[sending + 1].strip(), second.stderr
    # Nothing twice; the ones who opted out in between are no longer chosen at all.
    left_out = summary["sent"] - again["already_sent"]
    assert 0 <= left_out <= replies["opted_out"]
    assert again["audience"] == summary["audience"]
    # The runs are in the instance the UI reads.
    assert (home / "history" / "runs.db").exists() or (home / "storage").exists()


def test_validate_passes_on_the_project() -> None:
    result = run_cli("validate", env=clean_env())
    assert result.returncode == 0, result.stderr
    assert "winback_whatsapp" in result.stderr


def test_dagster_definitions_validate_passes() -> None:
    result = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=clean_env(DAGSTER_HOME=str(ROOT / "dagster_home")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Validation successful" in result.stdout + result.stderr


def scratch_project(tmp_path: Path) -> Path:
    """A copy of the project's defs and SQL that a test may break."""
    root = tmp_path / "project"
    shutil.copytree(ROOT / "sql", root / "sql")
    shutil.copytree(
        ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "workspace.yaml"):
        shutil.copy(ROOT / name, root / name)
    return root


def test_validate_reports_every_problem_with_file_line_and_field(tmp_path: Path) -> None:
    root = scratch_project(tmp_path)
    defs = root / WINBACK
    text = defs.read_text()
    text = text.replace("category: marketing", "category: promo")
    text = text.replace("connector: twilio", "connector: twillio")
    defs.write_text(text)
    (root / "sql/audiences/broken.sql").write_text("-- oops\nSELECT id,\nFROM customers WHERE")
    (root / "sql/audiences/writes.sql").write_text("UPDATE customers SET phone = NULL")

    valid, problems = validate_project(root)
    assert "winback_whatsapp" not in valid
    joined = "\n".join(problems)
    category_line = text.splitlines().index("          category: promo") + 1
    assert f"{defs}:{category_line}: channel_plan.steps.0.template.category" in joined
    assert "'marketing', 'utility' or 'authentication'" in joined
    assert "broken.sql:" in joined and "does not parse" in joined
    assert "writes.sql" in joined and "UPDATE statement is not allowed" in joined
    # Unknown connector is found once the schema errors are fixed:
    defs.write_text(text.replace("category: promo", "category: marketing"))
    _, problems = validate_project(root)
    assert any("steps.1.connector: unknown connector 'twillio'" in p for p in problems)

    result = run_cli("validate", env=clean_env(CDP_PROJECT_ROOT=str(root)), cwd=root)
    assert result.returncode == 1
    assert "twillio" in result.stderr and "broken.sql" in result.stderr


def test_dagster_refuses_a_wrong_defs_yaml_naming_file_line_and_field(tmp_path: Path) -> None:
    root = scratch_project(tmp_path)
    defs = root / WINBACK
    defs.write_text(defs.read_text().replace("default: 0.7", "default: high"))
    result = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=root,
        env=clean_env(
            PYTHONPATH=str(root / "src"), DAGSTER_HOME=str(tmp_path), CDP_PROJECT_ROOT=str(root)
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{defs}:" in output
    assert "lapse_threshold" in output
    assert "'high' is not a valid float" in output


@pytest.mark.parametrize("workers", ["0", "33"])
def test_validate_refuses_delivery_workers_out_of_bounds_naming_file_and_field(
    tmp_path: Path, workers: str
) -> None:
    root = scratch_project(tmp_path)
    defs = root / WINBACK
    text = defs.read_text().replace(
        "  partitions_start_date:", f"  delivery:\n    workers: {workers}\n  partitions_start_date:"
    )
    defs.write_text(text)
    valid, problems = validate_project(root)
    assert "winback_whatsapp" not in valid
    line = text.splitlines().index(f"    workers: {workers}") + 1
    joined = "\n".join(problems)
    assert f"{defs}:{line}: delivery.workers" in joined, joined
    assert f"must be between 1 and 32 (CDP_DELIVERY_MAX_WORKERS), got {workers}" in joined


@pytest.mark.parametrize(
    ("ledger", "reason"),
    [
        ("/etc/hostname/ledger.sqlite", "File exists: /etc/hostname"),
        ("/proc/no-such-dir/ledger.sqlite", "No such file or directory: /proc/no-such-dir"),
    ],
)
def test_a_ledger_that_cannot_be_opened_is_one_line_naming_the_setting(
    tmp_path: Path, ledger: str, reason: str
) -> None:
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    result = run_cli(
        "run",
        "winback_whatsapp",
        env=clean_env(
            CDP_LEDGER_URL=f"sqlite:///{ledger}", DAGSTER_HOME=str(tmp_path), CDP_SANDBOX="0"
        ),
        cwd=tmp_path,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"CDP_LEDGER_URL=sqlite:///{ledger}: cannot open the ledger ({reason})" in output
    assert "Traceback" not in output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_validate_runs_each_audience_in_the_warehouse_and_checks_its_templates(
    tmp_path: Path, sandbox: object
) -> None:
    """What only a preview found before: columns and types the warehouse returns, a table
    that is not there, a template not in the provider's catalog (the sandbox's, live)."""
    from conftest import cli_project

    project = cli_project(tmp_path / "p", sandbox, customers=200)  # type: ignore[arg-type]
    root = scratch_project(tmp_path)
    env = {**project.env, "CDP_PROJECT_ROOT": str(root)}
    winback_sql = root / "sql/audiences/winback_whatsapp.sql"
    sql = winback_sql.read_text()
    replace = "    co.whatsapp_marketing_consent,"
    assert replace in sql
    winback_sql.write_text(
        sql.replace(
            replace,
            "    CASE WHEN co.whatsapp_marketing_consent THEN 'Y' ELSE 'N' END"
            " AS whatsapp_marketing_consent,",
        )
    )
    shipped = root / "src/cdp_activation/defs/activations/order_shipped_update/defs.yaml"
    shipped_text = shipped.read_text()
    template = re.search(r"name: (\w+)", shipped_text.split("template:", 1)[1])
    assert template is not None
    shipped.write_text(shipped_text.replace(template.group(1), "no_such_template", 1))

    offline = run_cli("validate", "--offline", env=env, cwd=root)
    assert offline.returncode == 0, offline.stdout + offline.stderr  # the files are fine

    live = run_cli("validate", env=env, cwd=root)
    output = live.stdout + live.stderr
    assert live.returncode == 1, output
    assert "column whatsapp_marketing_consent must be boolean" in output
    assert "no_such_template" in output
    # Neither broken activation is ok (nor winback_braze_canvas, which shares the SQL).
    assert not {"ok  winback_whatsapp", "ok  order_shipped_update"} & set(output.splitlines())
    assert "ok  winback_braze_canvas" not in output

    winback_sql.write_text(sql.replace("FROM customers AS c", "FROM no_such_table AS c"))
    missing = run_cli("validate", env=env, cwd=root)
    assert missing.returncode == 1
    said = missing.stdout + missing.stderr
    assert "the audience of winback_whatsapp fails in the warehouse" in said, said
    assert "no_such_table does not exist" in said
    assert "Traceback" not in said


def test_a_broken_activation_is_one_line_and_the_others_still_run(
    tmp_path: Path, sandbox: object
) -> None:
    from conftest import cli_project

    project = cli_project(tmp_path / "p", sandbox, customers=200)  # type: ignore[arg-type]
    root = scratch_project(tmp_path)
    sql = root / "sql/audiences/order_shipped_update.sql"
    text = sql.read_text()
    assert "\nSELECT\n" in text
    sql.write_text(text.replace("\nSELECT\n", "\nSELEC\n", 1))
    env = {**project.env, "PYTHONPATH": str(root / "src"), "CDP_PROJECT_ROOT": str(root)}

    broken = run_cli("preview", "order_shipped_update", env=env, cwd=root)
    assert broken.returncode == 1
    assert "Traceback" not in broken.stderr
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1, broken.stderr
    assert lines[0].startswith("Error: activation order_shipped_update cannot be loaded: ")
    assert f"{sql}:" in lines[0] and "SQL does not parse at `" in lines[0]

    other = run_cli("preview", "winback_whatsapp", "--json", env=env, cwd=root)
    assert other.returncode == 0, other.stderr[-2000:]
    assert json.loads(other.stdout.strip().splitlines()[-1])["success"]
    notes = [line for line in other.stderr.splitlines() if "order_shipped_update" in line]
    assert len(notes) == 1 and "is broken and was left out" in notes[0], other.stderr


def test_the_demo_says_why_quiet_hours_hold_messages_and_how_to_send_them_now() -> None:
    from cdp_activation.cli.main import _quiet_hours_hint

    # 03:00 UTC in winter: every demo customer asleep, nothing goes now.
    everyone = _quiet_hours_hint(0, 20_385, None)
    assert everyone is not None
    assert "all 20,385 messages wait" in everyone
    assert "make demo SEND_WINDOW=00:00-23:59" in everyone
    some = _quiet_hours_hint(6_242, 14_348, None)
    assert some is not None and "14,348 of 20,590 messages wait" in some
    assert _quiet_hours_hint(20_385, 0, None) is None  # nobody waits: nothing to explain
    assert _quiet_hours_hint(0, 100, ("09:00", "10:00")) is None  # the window was chosen
    # The make target hands the window to the command as it says.
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # Not the caller's make variables (`make test SEND_WINDOW=…` reaches a child make).
    outer = {"SEND_WINDOW", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    env = {k: v for k, v in os.environ.items() if k not in outer}
    dry = subprocess.run(
        [make, "-n", "demo", "SEND_WINDOW=00:00-23:59"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "cdp-activation demo --send-window 00:00-23:59" in dry.stdout, dry.stdout + dry.stderr
    plain = subprocess.run(
        [make, "-n", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert "--send-window" not in plain.stdout


def test_a_send_window_that_is_not_two_times_of_day_is_refused_before_any_run(
    tmp_path: Path,
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = clean_env(DAGSTER_HOME=str(home))
    for command in (
        ("run", "winback_whatsapp"),
        ("preview", "winback_whatsapp"),
        ("fallback", "winback_whatsapp", "--dry-run"),
    ):
        result = run_cli(*command, "--send-window", "09:00-25:00", env=env)
        assert result.returncode == 2, result.stderr + result.stdout
        lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert lines == [
            "Error: Invalid value for --send-window: send window 09:00-25:00: '25:00' is not "
            "a time of day like 21:00"
        ], result.stderr
    assert list(home.iterdir()) == []  # no Dagster instance made, no run started
