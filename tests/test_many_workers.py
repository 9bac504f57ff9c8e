"""One activation on many workers (docs/scaling.md), through the CLI as users run it.

- `--workers 3` on one machine: the deliveries step fans out into three claim-worker steps,
  each its own process (Dagster's multiprocess executor), and every recipient is sent once.
- Four Celery workers (`cdp-activation celery-worker`, RabbitMQ on 127.0.0.1:5672, Dagster's
  instance and the ledger on PostgreSQL, dagster_home/dagster.postgres.yaml.example as the
  instance's configuration): 20,000 recipients through a provider that answers 10% 429s, 5%
  5xx, 2% timeouts and drops 1% after accepting, while claim workers are SIGKILLed at random
  instants (at least 10 kills), run after run, until a run finishes: every recipient accepted
  at most once, every row terminal, no worker left holding a lease.
- What cannot work is refused before anything is claimed: the Celery executor with a SQLite
  ledger, a broker that does not answer (its password masked), `workers` out of bounds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import psutil
import pytest
import sqlalchemy as sa

from cdp_activation.demo.scale import Processes, fresh_database
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer
from conftest import cli_project
from test_never_twice import FAULTS, assert_each_key_once

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"
ACTIVATION = "winback_whatsapp"
# Every hour of the day is inside the send window: nobody waits for their morning.
ALL_DAY = ("--send-window", "00:00-23:59")
TERMINAL = {"sent", "failed", "unknown"}
CUSTOMERS = 80_000  # with lapse_threshold=0.0, more than 20,000 eligible today


def postgres_base() -> str:
    base = os.environ.get("TEST_POSTGRES_URL")
    if not base:
        pytest.skip(
            "TEST_POSTGRES_URL is not set (CI sets it; locally: "
            "TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test)"
        )
    return base


def require_broker() -> None:
    from cdp_activation.scaling import ScalingError, check_broker

    try:
        check_broker(BROKER, timeout=3)
    except ScalingError as err:
        pytest.skip(f"no RabbitMQ to run Celery workers against: {err}")


def scratch_database(base: str) -> Any:
    """A fresh PostgreSQL database on the server at `base`, dropped afterwards (its URL
    without a driver: callers name theirs)."""
    return fresh_database(base, f"cdp_scale_{uuid.uuid4().hex[:10]}")


def ledger_rows(url: str, partition: str) -> pl.DataFrame:
    ledger = Ledger(url)
    try:
        return ledger.rows(ACTIVATION, partition)
    finally:
        ledger.dispose()


def alive_claim_workers(url: str) -> list[int]:
    """Pids of this host's claim workers that hold a lease now (the ledger's own record)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            return [
                pid
                for (pid,) in con.execute(
                    sa.text("SELECT pid FROM delivery_workers WHERE state = 'alive'")
                )
            ]
    finally:
        engine.dispose()


def test_three_workers_on_one_machine_send_everyone_once(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = cli_project(tmp_path, sandbox, customers=3_000)
    run_started = datetime.now(UTC)
    run = project.run("run", ACTIVATION, "--workers", "3", *ALL_DAY, "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["success"], summary
    # At least what was due when the run began: the 00:00-23:59 window leaves a minute of
    # quiet, and customers deferred over it fall due, and go, while the workers claim.
    assert summary["sent"] + summary["failed"] >= summary["to_send"] > 300, summary
    # Three claim steps ran, each its own process, and each one's figures are recorded.
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(project.home))
    records = instance.get_records_for_run(summary["run_id"]).records
    pids: dict[str, set[int]] = {}
    for record in records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event and event.is_step_start and "__deliveries_claim[" in (entry.step_key or ""):
            pids.setdefault(entry.step_key, set()).add(event.pid)
    assert len(pids) == 3, sorted(pids)
    assert len(set().union(*pids.values())) == 3, pids  # each in its own process
    per_worker = next(
        r.event_log_entry.dagster_event.step_materialization_data.materialization.metadata
        for r in records
        if r.event_log_entry.dagster_event is not None
        and r.event_log_entry.dagster_event.is_step_materialization
        and r.event_log_entry.dagster_event.asset_key.path[-1] == "deliveries"
    )["summary"].value["workers"]
    assert sum(w["sent"] for w in per_worker) == summary["sent"]
    rows = ledger_rows(project.ledger_url, summary["partition"])
    assert rows.filter(pl.col("state") == "sent").height == summary["sent"]
    # Nobody due was left behind: what is still planned waits for its own quiet hours' end.
    left = [
        r
        for r in rows.filter(pl.col("state") == "planned").iter_rows(named=True)
        if r["not_before"] is None or r["not_before"].replace(tzinfo=UTC) < run_started
    ]
    assert not left, left[:3]
    assert_each_key_once(sandbox.messages(), rows)


def test_workers_out_of_bounds_are_refused_naming_the_field(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = cli_project(tmp_path, sandbox, customers=200)
    run = project.run("run", ACTIVATION, "--workers", "50", *ALL_DAY)
    assert run.returncode != 0
    said = run.stdout + run.stderr
    assert "workers must be between 1 and 32 (CDP_DELIVERY_MAX_WORKERS), got 50" in said
    assert "Traceback" not in said
    assert ledger_rows(project.ledger_url, today()).is_empty()  # nothing planned or sent
    assert not sandbox.messages()


def today() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).date().isoformat()


def test_the_celery_executor_refuses_a_sqlite_ledger_before_anything_runs(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    require_broker()
    project = cli_project(tmp_path, sandbox, customers=200)
    run = project.run("run", ACTIVATION, "--workers", "2", *ALL_DAY, CDP_CELERY_BROKER_URL=BROKER)
    assert run.returncode != 0
    assert "the Celery executor needs a ledger every worker host can reach" in run.stdout
    assert not sandbox.messages()


def test_an_unreachable_broker_fails_the_run_naming_it_with_the_password_masked(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    base = postgres_base()
    project = cli_project(tmp_path, sandbox, customers=200)
    with scratch_database(base) as dagster_db, scratch_database(base) as ledger_db:
        shutil.copy(
            ROOT / "dagster_home" / "dagster.postgres.yaml.example",
            project.home / "dagster.yaml",
        )
        run = project.run(
            "run",
            ACTIVATION,
            "--workers",
            "2",
            *ALL_DAY,
            DAGSTER_PG_URL=dagster_db.replace("postgresql://", "postgresql+psycopg2://", 1),
            CDP_LEDGER_URL=ledger_db.replace("postgresql://", "postgresql+psycopg://", 1),
            CDP_CELERY_BROKER_URL="pyamqp://guest:s3cret-pw@127.0.0.1:1//",
        )
        assert run.returncode != 0
        output = run.stdout + run.stderr
        assert "the Celery broker at pyamqp://guest:***@127.0.0.1:1// does not answer" in output
        assert "s3cret-pw" not in output
        assert ledger_rows(ledger_db, today()).is_empty()
    assert not sandbox.messages()


class Killer(threading.Thread):
    """SIGKILLs a random claim worker holding a lease every `every` seconds, `kills` times."""

    def __init__(self, ledger_url: str, kills: int, every: float) -> None:
        super().__init__(daemon=True)
        self.url = ledger_url
        self.wanted = kills
        self.every = every
        self.killed: list[int] = []
        self.halt = threading.Event()
        self.rng = random.Random(20261205)

    def run(self) -> None:
        while not self.halt.is_set() and len(self.killed) < self.wanted:
            self.halt.wait(self.every * self.rng.uniform(0.5, 1.5))
            try:
                pids = [p for p in alive_claim_workers(self.url) if psutil.pid_exists(p)]
            except sa.exc.ProgrammingError:  # no claim worker registered yet: no table
                continue
            if pids:
                pid = self.rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                except ProcessLookupError:
                    pass


@pytest.mark.timeout(900)
def test_four_celery_workers_send_20000_once_through_faults_and_kills(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    base = postgres_base()
    require_broker()
    sandbox.configure(**FAULTS)
    project = cli_project(tmp_path, sandbox, customers=CUSTOMERS)
    with scratch_database(base) as dagster_db, scratch_database(base) as ledger_db:
        ledger_url = ledger_db.replace("postgresql://", "postgresql+psycopg://", 1)
        shutil.copy(
            ROOT / "dagster_home" / "dagster.postgres.yaml.example",
            project.home / "dagster.yaml",
        )
        env = {
            **project.env,
            "DAGSTER_PG_URL": dagster_db.replace("postgresql://", "postgresql+psycopg2://", 1),
            "CDP_LEDGER_URL": ledger_url,
            "CDP_CELERY_BROKER_URL": BROKER,
            # Enough tries that the faults above never leave a message for a later run.
            "CDP_DELIVERY_MAX_ATTEMPTS": "12",
            # The sender's rate is not what this test is about (test_shared_rate_limit.py).
            "CDP_META_RATE_PER_SECOND": "2000",
            "CDP_TWILIO_RATE_PER_SECOND": "2000",
            "CDP_DELIVERY_LEASE_SECONDS": "10",
        }
        _purge_broker()
        workers = Processes()
        workers.celery_workers(4, env, tmp_path)
        killer = Killer(ledger_url, kills=10, every=0.7)
        runs: list[dict] = []
        try:
            killer.start()
            for _ in range(8):
                run = subprocess.run(
                    [
                        str(Path(sys.executable).parent / "cdp-activation"),
                        "run",
                        ACTIVATION,
                        # Eight claim steps on four Celery workers (one step at a time
                        # each): a killed claim worker's place is taken by the next one.
                        "--workers",
                        "8",
                        "--max-recipients",
                        "20000",
                        "--param",
                        "lapse_threshold=0.0",
                        *ALL_DAY,
                        "--json",
                    ],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=400,
                )
                summary = json.loads(run.stdout.strip().splitlines()[-1])
                runs.append(summary)
                if summary["success"] and len(killer.killed) >= killer.wanted:
                    break
                if summary["success"]:
                    # Everything went out before the kills were done: nothing left to kill.
                    break
            killer.halt.set()
            killer.join(10)
        finally:
            workers.stop()
        partition = runs[0]["partition"]
        rows = ledger_rows(ledger_url, partition)
        chosen = rows.filter(~pl.col("state").is_in(["holdout", "excluded", "cancelled"]))
        states = Counter(chosen["state"].to_list())
        assert runs[-1]["success"], runs[-1]
        # 20,000 chosen a run; a re-run may choose a customer or two differently (the cap is
        # applied to what is eligible then), and a row the first run already had in flight
        # stays what it became: never twice, but the partition may hold a few more rows.
        assert 20_000 <= chosen.height <= 20_050, states
        assert set(states) <= TERMINAL, states
        assert len(killer.killed) >= 10, (killer.killed, [r["error"] for r in runs])
        assert_each_key_once(sandbox.messages(), chosen)
        # Every claim worker is stopped, or was taken for gone and its rows recovered.
        assert not alive_claim_workers(ledger_url)
        print(f"{len(runs)} runs, {len(killer.killed)} claim workers killed, states {dict(states)}")


def _purge_broker() -> None:
    """Tasks an earlier, interrupted test left in the queue would take a worker's turn."""
    from dagster_celery.make_app import make_app

    app = make_app({"broker": BROKER, "backend": "rpc://"})
    try:
        app.control.purge()
    finally:
        app.close()


def test_the_kubernetes_instance_example_is_a_valid_configuration(tmp_path: Path) -> None:
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    shutil.copy(ROOT / "dagster_home" / "dagster.k8s.yaml.example", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = validate_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, [e.message for e in checked.errors]


@pytest.mark.parametrize("ledger", ["postgresql", "sqlite"])
def test_dagster_validates_the_definitions_on_the_kubernetes_executor(
    tmp_path: Path, ledger: str
) -> None:
    """Kubernetes cannot run here: what can be checked is that Dagster accepts the
    definitions with each step a Kubernetes Job, and refuses a ledger pods cannot share."""
    url = (
        "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        if ledger == "postgresql"
        else f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "DAGSTER_"))}
    env |= {"CDP_EXECUTOR": "k8s", "CDP_LEDGER_URL": url, "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "definitions",
            "validate",
            "-w",
            str(ROOT / "workspace.yaml"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = done.stdout + done.stderr
    if ledger == "postgresql":
        assert done.returncode == 0, output[-3000:]
        assert "All code locations passed validation" in output
    else:
        assert done.returncode != 0
        assert "CDP_EXECUTOR=k8s needs a ledger every worker host can reach" in output
