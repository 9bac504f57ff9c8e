"""A second run of an activation queues behind the first (issue 13, item 5).

Runs through Dagster's queue are held back by dagster_home/dagster.yaml (one in-progress run
per `activation` tag value, and one per activation pool); the CLI, whose `execute_in_process`
never enters that queue, waits itself (runner.wait_for_turn) and says which run it waits
behind. Everything here runs on real Dagster instances in a temporary DAGSTER_HOME carrying
the project's dagster.yaml, with small jobs shaped like an activation's, so no warehouse,
ledger or provider is involved: what is tested is who starts when.
"""

# No `from __future__ import annotations`: Dagster reads the toy asset's config annotation.
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.instance.config import PoolGranularity
from dagster._core.op_concurrency_limits_counter import GlobalOpConcurrencyLimitsCounter
from dagster._core.remote_origin import (
    RegisteredCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._utils.tags import TagConcurrencyLimitsCounter

from cdp_activation.cli.runner import (
    HOST_TAG,
    PID_START_TAG,
    PID_TAG,
    ActivationBusy,
    ActiveRun,
    RunQueue,
    _process_gone,
    active_runs,
    run_activation,
)
from cdp_activation.settings import project_root

ROOT = project_root()
TESTS = Path(__file__).parent
BIN = Path(sys.executable).parent
PARTITION = "2026-01-05"


class DeliveriesConfig(dg.Config):
    dry_run: bool = True


def toy_definitions(name: str = "toy", hold: Callable[[], None] | None = None) -> dg.Definitions:
    """An activation as the runner sees one: `<name>_job` tagged `activation: <name>`,
    a daily-partitioned `<name>/deliveries` with a `dry_run` config, in the pool
    `activation-<name>`. `hold` runs inside the step (to keep the run in progress)."""
    partitions = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1)

    @dg.asset(key=[name, "deliveries"], partitions_def=partitions, pool=f"activation-{name}")
    def deliveries(config: DeliveriesConfig) -> dg.MaterializeResult:
        if hold is not None:
            hold()
        return dg.MaterializeResult(metadata={"sent": 0})

    job = dg.define_asset_job(f"{name}_job", selection=[deliveries], tags={"activation": name})
    return dg.Definitions(assets=[deliveries], jobs=[job])


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DAGSTER_HOME with the project's own dagster.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


class Held:
    """A run kept in progress in a thread of this process until `release()`."""

    def __init__(self, name: str = "toy") -> None:
        self.entered = threading.Event()
        self._release = threading.Event()
        self.definitions = toy_definitions(name, hold=self._hold)
        self.name = name
        self.summary: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _hold(self) -> None:
        self.entered.set()
        self._release.wait(120)

    def _run(self) -> None:
        self.summary = run_activation(
            self.name, PARTITION, definitions=self.definitions, queue=None
        )

    def start(self) -> "Held":
        self._thread.start()
        assert self.entered.wait(60), "the held run did not start"
        return self

    def release(self) -> None:
        self._release.set()
        self._thread.join(60)
        assert self.summary is not None and self.summary.success, self.summary


@contextmanager
def held_run(name: str = "toy") -> Iterator[Held]:
    held = Held(name).start()
    try:
        yield held
    finally:
        if not held._release.is_set():
            held.release()


def only_run_id(instance: dg.DagsterInstance) -> str:
    records = instance.get_run_records()
    assert len(records) == 1
    return records[0].dagster_run.run_id


# ---------------------------------------------------------------- (a) the instance config


def test_the_instance_allows_one_run_per_activation(home: Path) -> None:
    instance = dg.DagsterInstance.from_config(str(home))
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    config = instance.get_concurrency_config()
    queue = config.run_queue_config
    assert queue is not None
    assert queue.max_concurrent_runs == 4
    assert {
        "key": "activation",
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    } in queue.tag_concurrency_limits
    assert config.pool_config.pool_granularity == PoolGranularity.RUN
    assert config.pool_config.default_pool_limit == 1


def test_the_project_assets_are_in_their_activation_pool() -> None:
    from cdp_activation.cli.runner import activation_names, load_definitions

    definitions = load_definitions()
    names = activation_names(definitions)
    assert names
    pools: dict[str, set[str | None]] = {name: set() for name in names}
    for assets_def in definitions.resolve_asset_graph().assets_defs:
        owners = {key.path[0] for key in assets_def.keys} & set(names)
        for name in owners:
            # Graph-backed assets (deliveries, fallback: prepare, claim workers, finish):
            # every op of theirs is in the pool.
            pools[name] |= {op.pool for op in assets_def.node_def.iterate_op_defs()}
    assert pools == {name: {f"activation-{name}"} for name in names}


def queue_run(instance: dg.DagsterInstance, job: Any, **kwargs: Any) -> Any:
    """A run in the queue, as the UI's Launchpad or a sensor puts one there."""
    origin = RemoteJobOrigin(
        repository_origin=RemoteRepositoryOrigin(
            code_location_origin=RegisteredCodeLocationOrigin("cdp_activation"),
            repository_name="__repository__",
        ),
        job_name=job.name,
    )
    run = instance.create_run_for_job(
        job, status=dg.DagsterRunStatus.QUEUED, remote_job_origin=origin, **kwargs
    )
    assert run.run_op_concurrency is not None  # the pools it needs, as the queue reads them
    return run


def test_the_queue_holds_back_a_second_run_of_the_same_activation(home: Path) -> None:
    """What the run queue daemon decides (its own counters) while a CLI run is in progress:
    the same activation waits, whether launched as its job (tag) or from the asset graph
    (pool); another activation goes."""
    instance = dg.DagsterInstance.get()
    other = toy_definitions("other")
    with held_run("toy") as held:
        in_progress = instance.get_run_records(
            dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])
        )
        assert len(in_progress) == 1
        toy_job = held.definitions.resolve_job_def("toy_job")
        asset_graph = held.definitions.resolve_implicit_global_asset_job_def()
        queued = {
            "same job": queue_run(instance, toy_job, tags=dict(toy_job.tags)),
            "asset graph": queue_run(
                instance, asset_graph, asset_selection={dg.AssetKey(["toy", "deliveries"])}
            ),
            "other activation": queue_run(
                instance, other.resolve_job_def("other_job"), tags={"activation": "other"}
            ),
        }
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
        tags = TagConcurrencyLimitsCounter(limits, [r.dagster_run for r in in_progress])
        assert tags.is_blocked(queued["same job"])
        assert not tags.is_blocked(queued["other activation"])

        def pools() -> GlobalOpConcurrencyLimitsCounter:
            return GlobalOpConcurrencyLimitsCounter(
                instance,
                list(queued.values()),
                in_progress,
                concurrency_keys=instance.event_log_storage.get_concurrency_keys(),
                pool_limits=instance.event_log_storage.get_pool_limits(),
                pool_granularity=PoolGranularity.RUN,
            )

        pools()  # the daemon's first look gives a new pool its default limit (1)
        counter = pools()
        assert counter.is_blocked(queued["asset graph"])
        assert counter.is_blocked(queued["same job"])
        assert not counter.is_blocked(queued["other activation"])
        # And the CLI would wait behind the running one first, then the queued ones.
        order = [a.run_id for a in active_runs(instance, "toy")]
        assert order[0] == in_progress[0].dagster_run.run_id
        assert set(order[1:]) == {queued["same job"].run_id, queued["asset graph"].run_id}


# ---------------------------------------------------------------- (b) the runner waits


def test_a_second_run_waits_behind_the_first_and_starts_after_it(home: Path) -> None:
    instance = dg.DagsterInstance.get()
    seen: list[ActiveRun] = []
    second: dict[str, Any] = {}
    with held_run("toy") as held:
        first_id = only_run_id(instance)
        thread = threading.Thread(
            target=lambda: second.setdefault(
                "summary",
                run_activation(
                    "toy",
                    PARTITION,
                    definitions=toy_definitions("toy"),
                    queue=RunQueue(on_wait=seen.append, poll_seconds=0.2),
                ),
            ),
            daemon=True,
        )
        thread.start()
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # several polls: still waiting, said once, nothing started
        assert [a.run_id for a in seen] == [first_id]
        assert len(instance.get_run_records()) == 1
        line = seen[0].describe()
        assert line.startswith(f"{first_id[:8]} (toy, partition {PARTITION}, started ")
        assert f"UTC by cdp-activation-cli, pid {os.getpid()} on {socket.gethostname()})" in line
        held.release()
    thread.join(60)
    summary = second["summary"]
    assert summary.success
    first = instance.get_run_record_by_id(first_id)
    after = instance.get_run_record_by_id(summary.run_id)
    assert first is not None and after is not None
    assert first.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    assert after.start_time >= first.end_time


def test_no_wait_and_a_timeout_fail_naming_the_run(home: Path) -> None:
    instance = dg.DagsterInstance.get()
    definitions = toy_definitions("toy")
    with held_run("toy"):
        first_id = only_run_id(instance)
        began = time.monotonic()
        with pytest.raises(ActivationBusy, match=f"run {first_id[:8]} \\(toy, partition"):
            run_activation("toy", PARTITION, definitions=definitions, queue=RunQueue(wait=False))
        assert time.monotonic() - began < 5
        began = time.monotonic()
        with pytest.raises(
            ActivationBusy, match=f"gave up after 1 s waiting behind run {first_id[:8]}"
        ):
            run_activation("toy", PARTITION, definitions=definitions, queue=RunQueue(timeout=1.0))
        assert 1.0 <= time.monotonic() - began < 6
        assert len(instance.get_run_records()) == 1
        # Another activation does not wait.
        other = run_activation(
            "other", PARTITION, definitions=toy_definitions("other"), queue=RunQueue(wait=False)
        )
        assert other.success


# ---------------------------------------------------------------- (d) a dead run is not waited for

WORKER = """
import time
from test_run_queue import PARTITION, toy_definitions
from cdp_activation.cli.runner import run_activation

def hold():
    print("started", flush=True)
    time.sleep(600)

run_activation("toy", PARTITION, definitions=toy_definitions("toy", hold=hold), queue=None)
"""


def test_a_run_whose_process_was_killed_is_marked_failed_not_waited_for(home: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")])}
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "started"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    instance = dg.DagsterInstance.get()
    (record,) = instance.get_run_records()
    dead = record.dagster_run
    assert dead.status == dg.DagsterRunStatus.STARTED  # what Dagster shows forever
    assert dead.tags[PID_TAG] == str(worker.pid)

    waited: list[ActiveRun] = []
    stale: list[tuple[ActiveRun, str]] = []
    began = time.monotonic()
    summary = run_activation(
        "toy",
        PARTITION,
        definitions=toy_definitions("toy"),
        queue=RunQueue(
            on_wait=waited.append, on_stale=lambda a, why: stale.append((a, why)), timeout=10
        ),
    )
    assert summary.success
    assert time.monotonic() - began < 8
    assert waited == []
    assert [(a.run_id, why) for a, why in stale] == [
        (dead.run_id, f"process {worker.pid} on {socket.gethostname()} is gone")
    ]
    ended = instance.get_run_by_id(dead.run_id)
    assert ended is not None and ended.status == dg.DagsterRunStatus.FAILURE
    failure = instance.get_records_for_run(
        dead.run_id, of_type=dg.DagsterEventType.RUN_FAILURE
    ).records
    assert "Marked failed by cdp-activation" in failure[0].event_log_entry.message


def test_which_processes_count_as_gone() -> None:
    from cdp_activation.processes import host_id

    host = host_id()
    name = socket.gethostname()
    ours = {HOST_TAG: host, PID_TAG: str(os.getpid())}
    assert _process_gone(ours) is None
    # A zombie (killed, not yet reaped) is gone.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _process_gone({HOST_TAG: host, PID_TAG: str(child.pid)}):
            break
        time.sleep(0.05)
    assert _process_gone({HOST_TAG: host, PID_TAG: str(child.pid)}) is not None
    child.wait()
    # The pid is alive, but it is not the process that started the run (pid reused): this
    # one started long after the run's recorded start.
    reused = {**ours, PID_START_TAG: "1000.00"}
    assert _process_gone(reused) == f"pid {os.getpid()} on {name} is another process now"
    # Another host's runs are not ours to judge; nor runs without our tags.
    assert _process_gone({HOST_TAG: "elsewhere", PID_TAG: str(child.pid)}) is None
    assert _process_gone({}) is None


# ---------------------------------------------------------------- (b, c) the CLI


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "DAGSTER_"))}
    env["CDP_SANDBOX"] = "1"
    # Nowhere near the local sandbox: the CLI must not start one for these runs.
    env.update(
        DAGSTER_HOME=str(home),
        CDP_META_BASE_URL="http://127.0.0.1:9/meta",
        CDP_TWILIO_BASE_URL="http://127.0.0.1:9/twilio",
        CDP_TWILIO_CONTENT_BASE_URL="http://127.0.0.1:9/twilio",
    )
    return env


def test_cli_no_wait_fails_at_once_with_one_line(home: Path) -> None:
    instance = dg.DagsterInstance.get()
    with held_run("winback_whatsapp"):
        first_id = only_run_id(instance)
        began = time.monotonic()
        result = subprocess.run(
            [str(BIN / "cdp-activation"), "run", "winback_whatsapp", "--no-wait"],
            cwd=ROOT,
            env=cli_env(home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - began
        assert result.returncode == 75, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(
            f"Error: winback_whatsapp is busy: run {first_id[:8]} (winback_whatsapp, "
            f"partition {PARTITION}, started "
        )
        assert "leave out --no-wait to wait behind it" in lines[0]
        assert "waiting behind" not in result.stderr
        assert elapsed < 60  # the CLI's own start; it never waits
        assert len(instance.get_run_records()) == 1


def test_cli_says_which_run_it_waits_behind_then_goes_on(home: Path) -> None:
    """`toy` is no activation of the project: once its turn comes the CLI goes on and says
    so, which shows it went on only after the held run ended."""
    instance = dg.DagsterInstance.get()
    with held_run("toy") as held:
        first_id = only_run_id(instance)
        process = subprocess.Popen(
            [str(BIN / "cdp-activation"), "preview", "toy", "--wait-timeout", "120"],
            cwd=ROOT,
            env=cli_env(home),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        assert process.stderr is not None
        first_line = process.stderr.readline()
        assert first_line.startswith(
            f"waiting behind run {first_id[:8]} (toy, partition {PARTITION}, started "
        ), first_line
        assert "by cdp-activation-cli, pid" in first_line
        time.sleep(2)
        assert process.poll() is None  # still waiting
        held.release()
        released = time.time()
    rest = process.stderr.read()
    assert process.wait(60) == 1
    assert "waiting behind" not in rest  # said once
    assert "no activation named 'toy'" in rest
    first = instance.get_run_record_by_id(first_id)
    assert first is not None and first.end_time is not None and first.end_time <= released


def test_cli_wait_timeout_gives_up_naming_the_run(home: Path) -> None:
    instance = dg.DagsterInstance.get()
    with held_run("winback_whatsapp"):
        first_id = only_run_id(instance)
        result = subprocess.run(
            [str(BIN / "cdp-activation"), "fallback", "winback_whatsapp", "--wait-timeout", "1"],
            cwd=ROOT,
            env=cli_env(home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 75, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith(f"waiting behind run {first_id[:8]} (winback_whatsapp, ")
        assert lines[-1].startswith(
            f"Error: gave up after 1 s waiting behind run {first_id[:8]} (winback_whatsapp, "
        )
        assert len(instance.get_run_records()) == 1
