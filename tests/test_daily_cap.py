"""One message a day across activations (CDP_DAILY_CAP=1): winback_whatsapp (priority 10)
and winback_experiment (priority 5) share their audience. Whichever runs first, or both at
once, each customer gets the same messages from the same activation, and never two on one
channel that day."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer
from conftest import CliProject, cli_project

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
HIGH, LOW = "winback_whatsapp", "winback_experiment"
CAP = {"CDP_DAILY_CAP": "1"}
ALL_DAY = ("--send-window", "00:00-23:59", "--json")


def run(project: CliProject, activation: str) -> dict:
    done = project.run("run", activation, *ALL_DAY, **CAP)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["success"], summary
    return summary


def start(project: CliProject, activation: str) -> subprocess.Popen[str]:
    import sys

    return subprocess.Popen(
        [str(Path(sys.executable).parent / "cdp-activation"), "run", activation, *ALL_DAY],
        cwd=project.tmp,
        env={**project.env, **CAP},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcome(project: CliProject) -> tuple[set[tuple[str, str, str]], pl.DataFrame]:
    """(activation, customer, channel) of every message accepted, and the low one's rows."""
    ledger = Ledger(project.ledger_url)
    try:
        rows = pl.concat([ledger.rows(HIGH), ledger.rows(LOW)], how="diagonal_relaxed")
    finally:
        ledger.dispose()
    sent = rows.filter(pl.col("state") == "sent")
    return set(sent.select("activation", "customer_id", "channel").iter_rows()), rows


def test_the_day_goes_to_the_higher_priority_whatever_runs_first(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    outcomes = {}
    for order in ("high first", "low first", "at once"):
        project = cli_project(tmp_path / order.replace(" ", "_"), sandbox, customers=1_500)
        if order == "high first":
            run(project, HIGH)
            run(project, LOW)
        elif order == "low first":
            run(project, LOW)
            run(project, HIGH)
        else:
            # The instance and the ledger as a deployment has them before its runs: two first
            # runs at once would race to create Dagster's own storage.
            import dagster as dg

            dg.DagsterInstance.from_config(str(project.home)).dispose()
            Ledger(project.ledger_url).dispose()
            both = [start(project, HIGH), start(project, LOW)]
            for process in both:
                out, err = process.communicate(timeout=300)
                assert process.returncode == 0, out + err
        outcomes[order] = outcome(project)

    sent = outcomes["high first"][0]
    assert outcomes["low first"][0] == sent
    assert outcomes["at once"][0] == sent
    # Something to compare: both activations sent, and the audiences overlap.
    by_activation = Counter(a for a, _, _ in sent)
    assert by_activation[HIGH] > 50 and by_activation[LOW] > 0, by_activation
    # Never two messages on one channel that day.
    per_channel = Counter((c, ch) for _, c, ch in sent)
    assert max(per_channel.values()) == 1
    # The low one says why it left the high one's customers: the day's message was taken
    # (excluded rows are not in the ledger; its decisions' counts are).
    high_customers = {c for a, c, _ in sent if a == HIGH}
    low_sent = {c for a, c, _ in sent if a == LOW}
    assert not (high_customers & low_sent)
    for order in ("high first", "low first", "at once"):
        project_rows = outcomes[order][1]
        assert project_rows.filter(
            (pl.col("activation") == LOW)
            & pl.col("customer_id").is_in(list(high_customers))
            & pl.col("state").is_in(["planned", "sent", "in_flight"])
        ).is_empty(), order


def test_an_activation_has_run_the_day_only_once_its_rows_are_in_the_ledger(
    tmp_path: Path, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lower activation deciding the day reads whom a higher one takes from the ledger's
    rows once the higher one has run (its `decision_counts`), else works it out. The counts
    must therefore follow the plan: written before it, a lower activation deciding between
    the two commits found the higher one had run and took nobody from it (seen in CI: both
    sent their 305 and 274 customers, and the claim's caps had to stop 272)."""
    import os

    from cdp_activation.cli.runner import run_activation

    project = cli_project(tmp_path, sandbox, customers=400)
    for key in [k for k in os.environ if k.startswith(("CDP_", "DAGSTER_"))]:
        monkeypatch.delenv(key)
    for key, value in {**project.env, **CAP}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(project.tmp)
    rows_when_counted: list[int] = []
    real = Ledger.record_decision_counts

    def counted(self: Ledger, activation: str, partition_key: str, *args: object) -> None:
        rows_when_counted.append(sum(self.counts(activation, partition_key).values()))
        real(self, activation, partition_key, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Ledger, "record_decision_counts", counted)
    from datetime import UTC, datetime

    summary = run_activation(
        HIGH, datetime.now(UTC).date().isoformat(), send_window=("00:00", "23:59")
    )
    assert summary.success, summary.error
    assert rows_when_counted and rows_when_counted[0] > 50, rows_when_counted


def test_a_taken_channel_is_left_for_the_next_one_with_its_own_reason() -> None:
    from test_policy import NO_QUIET, customer, decide_frame

    policy = NO_QUIET.model_copy(update={"frequency_caps": []})
    taken = pl.DataFrame(
        {
            "customer_id": ["1", "2", "2", "3"],
            "channel": ["whatsapp", "whatsapp", "sms", "sms"],
            "messages": [1, 1, 1, 1],
        },
        schema_overrides={"messages": pl.UInt32},
    )
    frame = decide_frame(
        [customer(1), customer(2), customer(3), customer(4)],
        policy,
        daily_taken=taken,
        daily_cap=1,
    )
    got = {r["customer_id"]: (r["channel"], r["reason"]) for r in frame.iter_rows(named=True)}
    assert got[1] == ("sms", None)  # WhatsApp taken today: the plan's next channel
    assert got[2] == (None, "whatsapp_daily_cap+sms_daily_cap")
    assert got[3] == ("whatsapp", None)  # only SMS taken: WhatsApp is first anyway
    assert got[4] == ("whatsapp", None)
    # A cap of two leaves room for one more.
    roomy = decide_frame([customer(2)], policy, daily_taken=taken, daily_cap=2)
    assert roomy["channel"].to_list() == ["whatsapp"]
