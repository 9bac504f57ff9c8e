"""Run an activation through Dagster from Python (the CLI and the end-to-end tests use this).

The run goes through the real Dagster instance under DAGSTER_HOME, so it shows in the UI like
a run launched there: same assets, checks, partitions and metadata.
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from cdp_activation import heap
from cdp_activation.activation.run import DeliverySummary
from cdp_activation.components.run_events import run_failure_message, step_failure_message
from cdp_activation.errors import CdpError
from cdp_activation.processes import host_id, process_gone, started_at
from cdp_activation.settings import SettingsError, get_settings, project_root
from cdp_activation.spec import check_workers

SUMMARY_KEYS = ("audience", "eligible", "excluded", "sent", "failed", "already_sent")


class ActivationNotFound(LookupError):
    pass


# ---------------------------------------------------------------- one run per activation
#
# Runs launched through Dagster's queue (Launchpad, schedules, sensors) wait there: the
# instance's dagster.yaml allows one in-progress run per value of the `activation` run tag.
# `execute_in_process`, which the CLI uses, never goes through that queue, so the runner does
# the same before it starts: it waits until no run of the activation (either job, any
# partition) is queued or in progress on the instance, and says which run it waits behind.
# The check and the start of our own run are not one atomic step: two processes that look in
# the same few milliseconds can both start. The ledger's claim guard (a row is sent only by
# the process that moved it planned -> in_flight) keeps that harmless; this only makes it rare.

HOST_TAG = "cdp/host"
PID_TAG = "cdp/pid"
PID_START_TAG = "cdp/pid_start"  # boot id and start time of that pid: pids get reused

UNFINISHED = (
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
    dg.DagsterRunStatus.SUSPENDED,
)
RUNNING = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)


@dataclass(frozen=True)
class ActiveRun:
    """A run of an activation that is queued or in progress on the instance."""

    run_id: str
    activation: str
    job_name: str
    status: str
    partition: str | None
    since: datetime | None  # when it started (or was queued)
    launched_by: str

    def describe(self) -> str:
        """`1a2b3c4d (winback_whatsapp, partition 2026-12-04, started 21:05 UTC by …)`."""
        what = self.activation
        if self.job_name.endswith("_fallback_job"):
            what += " fallback"
        if self.partition:
            what += f", partition {self.partition}"
        verb = {
            "QUEUED": "queued",
            "NOT_STARTED": "created",
            "STARTING": "starting",
            "CANCELING": "being canceled, started",
            "SUSPENDED": "suspended, started",
        }.get(self.status, "started")
        if self.since is not None:
            since = self.since.astimezone(UTC)
            today = datetime.now(UTC).date()
            fmt = "%H:%M UTC" if since.date() == today else "%Y-%m-%d %H:%M UTC"
            verb += f" {since.strftime(fmt)}"
        return f"{self.run_id[:8]} ({what}, {verb} by {self.launched_by})"


class ActivationBusy(CdpError, RuntimeError):
    """Another run of the activation is queued or in progress, and we were not to wait (or
    waited as long as we were allowed to)."""

    transient = True

    def __init__(self, active: ActiveRun, waited: float | None = None) -> None:
        self.active = active
        self.waited = waited
        if waited is None:
            message = (
                f"{active.activation} is busy: run {active.describe()} is not finished; "
                "try again when it is, or leave out --no-wait to wait behind it"
            )
        else:
            message = (
                f"gave up after {waited:,.0f} s waiting behind run {active.describe()}; "
                "nothing was started"
            )
        super().__init__(message)


@dataclass(frozen=True)
class RunQueue:
    """How a run waits for the activation's other runs (see `wait_for_turn`).

    `wait=False` fails at once with `ActivationBusy`; `timeout` (seconds) fails after that
    long; `None` waits as long as it takes, as Dagster's own run queue does. `on_wait` is
    called once for each run waited behind; `on_stale` when a run whose process is gone is
    marked failed instead of waited for.
    """

    wait: bool = True
    timeout: float | None = None
    on_wait: Callable[[ActiveRun], None] | None = None
    on_stale: Callable[[ActiveRun, str], None] | None = None
    poll_seconds: float = 1.0


def wait_for_turn(
    name: str, queue: RunQueue | None = None, instance: dg.DagsterInstance | None = None
) -> None:
    """Return once no run of activation `name` is queued or in progress on the instance.

    A run this host started with `execute_in_process` whose process is gone (SIGKILL, power
    loss) stays STARTED in Dagster's run storage forever; it is marked failed, not waited for.
    Runs launched elsewhere (other hosts, Dagster's run workers) are waited for: Dagster's run
    monitoring, or the UI's Terminate, ends those.
    """
    queue = queue or RunQueue()
    if instance is None:
        ensure_dagster_home()
        instance = dg.DagsterInstance.get()
    announced: set[str] = set()
    began = time.monotonic()
    while True:
        active = active_runs(instance, name, on_stale=queue.on_stale)
        if not active:
            return
        first = active[0]
        if not queue.wait:
            raise ActivationBusy(first)
        waited = time.monotonic() - began
        if queue.timeout is not None and waited >= queue.timeout:
            raise ActivationBusy(first, waited=waited)
        if first.run_id not in announced:
            announced.add(first.run_id)
            if queue.on_wait is not None:
                queue.on_wait(first)
        heap.started()  # a wait may be long: not with the collector off (heap.py)
        # Jittered: two processes waiting behind the same run rarely look at the same instant.
        pause = queue.poll_seconds * random.uniform(0.75, 1.25)
        if queue.timeout is not None:
            pause = max(0.0, min(pause, queue.timeout - waited))
        time.sleep(pause)


def active_runs(
    instance: dg.DagsterInstance,
    name: str,
    on_stale: Callable[[ActiveRun, str], None] | None = None,
) -> list[ActiveRun]:
    """The activation's queued or in-progress runs, running ones first, then oldest first.

    A run belongs to the activation if it carries its `activation` tag (both of its jobs do)
    or materialises one of its assets (a run launched from the asset graph has no job tags).
    Runs this host started whose process is gone are marked failed and left out.
    """
    found: list[tuple[bool, float, ActiveRun]] = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=list(UNFINISHED))):
        run = record.dagster_run
        if not _belongs_to(run, name):
            continue
        active = _active_run(record, name)
        gone = _process_gone(run.tags)
        if gone is not None and run.status != dg.DagsterRunStatus.QUEUED:
            _mark_dead(instance, run, gone)
            if on_stale is not None:
                on_stale(active, gone)
            continue
        since = active.since.timestamp() if active.since else 0.0
        found.append((run.status not in RUNNING, since, active))
    return [active for *_, active in sorted(found, key=lambda item: item[:2])]


def _belongs_to(run: Any, name: str) -> bool:
    if run.tags.get("activation") == name:
        return True
    keys = [*(run.asset_selection or ()), *(c.asset_key for c in run.asset_check_selection or ())]
    return any(key.path[0] == name for key in keys)


def _active_run(record: Any, name: str) -> ActiveRun:
    run = record.dagster_run
    tags = run.tags
    if record.start_time is not None:
        since: datetime | None = datetime.fromtimestamp(record.start_time, UTC)
    else:
        since = record.create_timestamp
    return ActiveRun(
        run_id=run.run_id,
        activation=name,
        job_name=run.job_name,
        status=run.status.value,
        partition=tags.get("dagster/partition"),
        since=since,
        launched_by=_launched_by(tags),
    )


def _launched_by(tags: Mapping[str, str]) -> str:
    if "launched_by" in tags:
        who = tags["launched_by"]
        if PID_TAG in tags:
            host = tags.get(HOST_TAG, "?").split(":", 1)[0]  # the hostname of `host_id()`
            who += f", pid {tags[PID_TAG]} on {host}"
        return who
    for tag, label in (
        ("dagster/schedule_name", "schedule"),
        ("dagster/sensor_name", "sensor"),
        ("dagster/backfill", "backfill"),
    ):
        if tag in tags:
            return f"{label} {tags[tag]}"
    return tags.get("dagster/user", "the Dagster UI")


def _process_tags() -> dict[str, str]:
    """Who runs this run: host, pid and its start time, so another process can tell if it is
    still alive (`processes.process_gone`)."""
    tags = {HOST_TAG: host_id(), PID_TAG: str(os.getpid())}
    start = started_at()
    if start is not None:
        tags[PID_START_TAG] = f"{start:.2f}"
    return tags


def _process_gone(tags: Mapping[str, str]) -> str | None:
    """Why the process that runs a run is certainly gone; None if alive or not ours to tell
    (another host, or a run without our tags)."""
    host, pid_text = tags.get(HOST_TAG), tags.get(PID_TAG)
    if not host or not pid_text:
        return None
    try:
        pid = int(pid_text)
        start = float(tags[PID_START_TAG]) if PID_START_TAG in tags else None
    except ValueError:
        return None
    return process_gone(host, pid, start)


def _mark_dead(instance: dg.DagsterInstance, run: Any, why: str) -> None:
    current = instance.get_run_by_id(run.run_id)
    if current is None or current.is_finished:
        return
    instance.report_run_failed(
        current,
        message=f"Marked failed by cdp-activation (pid {os.getpid()} on "
        f"{socket.gethostname()}): {why}, so the run will never finish. Rows it left in "
        "flight are recovered by the ledger once their lease expires.",
    )
    with suppress(Exception):  # slots only exist with op-granularity pools
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


@dataclass
class RunSummary:
    """What one activation run selected, decided and sent."""

    activation: str
    partition: str
    run_id: str
    success: bool
    dry_run: bool
    audience: int = 0
    eligible: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    to_send: int = 0
    deferred: int = 0
    holdout: int = 0
    cancelled: int = 0
    sent: int = 0
    failed: int = 0
    unknown: int = 0
    dead_letter: int = 0
    already_sent: int = 0
    resent_unknown: int = 0  # unknown rows sent again (delivery.resend_unknown)
    retried: int = 0  # retryable answers waited out in the ledger, then sent again
    held_for_quiet_hours: int = 0  # reached in their quiet hours: waiting until they end
    revived: int = 0  # dead letters an earlier version gave up on, planned again
    # Where the whole partition stands after the run, not only what this run did:
    waiting: int = 0  # planned and due, not sent (a stopped run): the next run sends them
    in_flight: int = 0  # another run is sending them, or the next run recovers them
    unknown_reconciled: int = 0  # unknown sends a status report proved accepted
    replied: int = 0  # the partition's customers who wrote back
    opted_out: int = 0  # … and who are opted out now
    recovered_in_flight: int = 0  # rows a gone worker left in flight, recovered by this run
    partition_states: dict[str, int] = field(default_factory=dict)
    dead_letter_by_reason: dict[str, int] = field(default_factory=dict)
    cancelled_by_reason: dict[str, int] = field(default_factory=dict)
    stopped_by: str | None = None  # why sending stopped early (provider down, interrupted)
    per_worker: list[dict[str, Any]] = field(default_factory=list)  # claim workers' figures
    error_codes: dict[str, int] = field(default_factory=dict)
    accepted_as: dict[str, int] = field(default_factory=dict)  # Meta: held, paused
    estimated_cost: float | None = None
    currency: str = ""
    estimated_cost_by_channel: str = ""  # Markdown table
    sample_messages: str = ""  # Markdown table, phone numbers masked
    failed_checks: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    elapsed_seconds: float = 0.0
    estimated_seconds: float | None = None

    def as_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["eligible_total"] = sum(self.eligible.values())
        data["excluded_total"] = sum(self.excluded.values())
        return data

    def take_decisions(self, part: Mapping[str, Any]) -> None:
        """The decisions asset's `summary` entry (`components.metadata.decisions_metadata`)."""
        self.eligible = {k: int(v) for k, v in (part.get("eligible") or {}).items()}
        self.excluded = {k: int(v) for k, v in (part.get("excluded") or {}).items()}
        self.holdout = int(part.get("holdout", 0))
        if part.get("estimated_cost") is not None:
            self.estimated_cost = float(part["estimated_cost"])
            self.currency = str(part.get("currency", ""))
            self.estimated_cost_by_channel = str(part.get("estimated_cost_by_channel", ""))
        self.sample_messages = str(part.get("sample_messages", ""))

    def take_delivery(self, delivery: DeliverySummary) -> None:
        """What the deliveries step did and where the partition stands."""
        for name in _DELIVERY_COUNTS:
            setattr(self, name, getattr(delivery, name))
        if delivery.dry_run:
            self.estimated_seconds = delivery.estimated_seconds
        self.error_codes = dict(delivery.error_codes) or self.error_codes
        self.accepted_as = dict(delivery.accepted_as) or self.accepted_as
        self.partition_states = dict(delivery.ledger_states)
        self.dead_letter_by_reason = dict(delivery.dead_letter_by_reason)
        self.cancelled_by_reason = dict(delivery.cancelled_by_reason)
        self.stopped_by = delivery.stopped_by or self.stopped_by
        if len(delivery.workers) > 1:
            self.per_worker = list(delivery.workers)


# The counts a run summary takes from its deliveries step as they are: the whole numbers both
# name alike (`eligible` is a count there and a per-channel table here, so it is not one).
_DELIVERY_COUNTS = tuple(
    f.name
    for f in fields(DeliverySummary)
    if f.type in ("int", int)
    and any(g.name == f.name and g.type in ("int", int) for g in fields(RunSummary))
)


def ensure_dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or project_root() / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def today_partition() -> str:
    return datetime.now(UTC).date().isoformat()


def current_partition(definitions: dg.Definitions, name: str) -> str:
    """The activation's newest partition: today, or an event-driven activation's open
    window (`2026-12-05T10:15`)."""
    partitions = definitions.resolve_job_def(f"{name}_job").partitions_def
    key = partitions.get_last_partition_key() if partitions is not None else None
    return key or today_partition()


class DefinitionsError(SettingsError):
    """An activation (its defs.yaml or its SQL) cannot be loaded: said in one line, naming
    it, instead of the traceback of the component tree."""


def load_definitions(tolerant: bool = False) -> dg.Definitions:
    """The project's definitions. `tolerant` (the CLI): a broken activation is left out and
    its reason kept (`broken_activations`), so the others still run."""
    from cdp_activation.definitions import defs

    if tolerant:
        # In the environment, so the step processes of a run load the same way.
        os.environ["CDP_TOLERATE_BROKEN_ACTIVATIONS"] = "1"
    try:
        return defs()
    except SettingsError:
        raise
    except Exception as err:
        raise DefinitionsError(_definitions_problem(err)) from None
    finally:
        heap.started()  # a command's start-up ends here (heap.py)


def broken_activations() -> dict[str, str]:
    """Activations a tolerant load left out, with why (one line each)."""
    from cdp_activation.components.activation import BROKEN

    return dict(BROKEN)


def _definitions_problem(err: BaseException) -> str:
    """One line: which activation, and the innermost reason."""
    where = re.search(r"activations/(\w+)", str(err))
    # The first error of ours (or pydantic's, for defs.yaml) along the chain says it best;
    # below it are the parser's own words.
    chain: list[BaseException] = [err]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    inner = next(
        (e for e in chain if type(e).__module__.startswith(("cdp_activation", "pydantic"))),
        chain[-1],
    )
    lines = [line.strip() for line in str(inner).strip().splitlines() if line.strip()]
    reason = " ".join(lines[:3]) if lines else type(inner).__name__
    subject = f"activation {where.group(1)}" if where else "the project's definitions"
    return (
        f"{subject} cannot be loaded: {reason[:400]} (`cdp-activation validate` lists every "
        "problem with its file and line)"
    )


def activation_names(definitions: dg.Definitions) -> list[str]:
    """Every activation: the `activation` tag of its main job (its fallback job has a step)."""
    return sorted(
        job.tags["activation"]
        for job in definitions.resolve_all_job_defs()
        if "activation" in job.tags and "step" not in job.tags
    )


def run_activation(
    name: str,
    partition: str | None = None,
    *,
    dry_run: bool = False,
    parameters: Mapping[str, Any] | None = None,
    max_recipients: int | None = None,
    template: str | None = None,
    send_window: tuple[str, str] | None = None,
    log_level: str = "CRITICAL",  # the caller reports; Dagster's own log has the details
    definitions: dg.Definitions | None = None,
    instance: dg.DagsterInstance | None = None,
    tags: Mapping[str, str] | None = None,
    queue: RunQueue | None = RunQueue(),
    workers: int | None = None,
    in_flight: int | None = None,
) -> RunSummary:
    """Materialise `<name>/audience -> decisions -> deliveries` for one partition.

    By default the project's definitions run on the instance under DAGSTER_HOME. It starts
    once no other run of the activation is queued or in progress there (`wait_for_turn`);
    `queue=None` skips that wait (tests of the ledger's own guard against overlapping runs).

    `in_flight` (default: the activation's `delivery.in_flight`, else
    CDP_DELIVERY_CONCURRENCY) is the requests each claim worker keeps in the air.
    `workers` (default: the activation's `delivery.workers`) above 1 runs the job on its
    executor, so the claim workers are processes (or Celery tasks), not one after another in
    this process; that needs the instance under DAGSTER_HOME, not an ephemeral one.
    """
    get_settings()  # a setting that makes no sense fails here, in one line, before anything
    if instance is None:
        ensure_dagster_home()
        instance = dg.DagsterInstance.get()
    definitions = definitions or load_definitions(tolerant=True)
    names = activation_names(definitions)
    if name not in names and name in broken_activations():
        raise DefinitionsError(
            f"activation {name} cannot be loaded: {broken_activations()[name]} "
            "(`cdp-activation validate` lists every problem with its file and line)"
        )
    if name not in names:
        raise ActivationNotFound(
            f"no activation named {name!r}; known: {', '.join(names) or 'none'} "
            "(each is a folder under src/cdp_activation/defs/activations/)"
        )
    partition = partition or current_partition(definitions, name)
    delivery_config: dict[str, Any] = {"dry_run": dry_run}
    if workers is not None:
        try:
            delivery_config["workers"] = check_workers(workers)
        except ValueError as err:  # before anything runs, in one line
            raise SettingsError(f"workers {err}") from None
    if in_flight is not None:
        if not 1 <= in_flight <= 1024:
            raise SettingsError(f"in_flight must be between 1 and 1024, got {in_flight}")
        delivery_config["in_flight"] = in_flight
    ops: dict[str, Any] = {f"{name}__deliveries": {"config": delivery_config}}
    if parameters:
        ops[f"{name}__audience"] = {"config": dict(parameters)}
    choices: dict[str, Any] = {}
    if max_recipients is not None:
        choices["max_recipients"] = max_recipients
    if template is not None:
        choices["template"] = template
    if send_window is not None:
        choices["send_window_start"], choices["send_window_end"] = send_window
    if choices:
        ops[f"{name}__decisions"] = {"config": choices}
    if queue is not None:
        wait_for_turn(name, queue, instance)
    started = time.perf_counter()
    result = _execute(
        definitions,
        instance,
        f"{name}_job",
        partition,
        ops,
        log_level,
        {"activation": name, **(tags or {})},
        in_process=_workers_of(definitions, name, workers) == 1,
    )
    summary = RunSummary(
        activation=name,
        partition=partition,
        run_id=result.run_id,
        success=result.success,
        dry_run=dry_run,
    )
    _fill_from_events(summary, result, name)
    summary.elapsed_seconds = round(time.perf_counter() - started, 2)
    return summary


@dataclass
class FallbackSummary:
    """What one fallback run found due, decided and sent."""

    activation: str
    partition: str
    run_id: str
    success: bool
    dry_run: bool
    channel: str = ""
    first_messages: dict[str, int] = field(default_factory=dict)  # by outcome (delivered, …)
    due: dict[str, int] = field(default_factory=dict)  # by fallback_reason
    due_codes: dict[str, int] = field(default_factory=dict)  # failure codes among the due
    eligible: int = 0
    excluded: dict[str, int] = field(default_factory=dict)  # by the policy's reason code
    sent: int = 0
    failed: int = 0
    unknown: int = 0
    dead_letter: int = 0
    deferred: int = 0
    cancelled: int = 0
    error: str | None = None
    elapsed_seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def take(self, part: Mapping[str, Any], delivery: Mapping[str, Any] | None) -> None:
        """The fallback asset's `fallback` and `summary` entries."""
        self.channel = str(part.get("channel", ""))
        self.first_messages = _int_map(part.get("first_messages"))
        self.due = _int_map(part.get("due"))
        self.due_codes = _int_map(part.get("due_codes"))
        self.excluded = _int_map(part.get("excluded"))
        self.eligible = int(part.get("eligible", 0))
        if not isinstance(delivery, Mapping):
            return
        sent = DeliverySummary.from_json(delivery)
        for name in ("sent", "failed", "unknown", "dead_letter", "deferred", "cancelled"):
            setattr(self, name, getattr(sent, name))


def run_fallback(
    name: str,
    partition: str | None = None,
    *,
    dry_run: bool = False,
    not_delivered_within_minutes: float | None = None,
    send_window: tuple[str, str] | None = None,
    log_level: str = "CRITICAL",
    definitions: dg.Definitions | None = None,
    instance: dg.DagsterInstance | None = None,
    queue: RunQueue | None = RunQueue(),
) -> FallbackSummary:
    """Materialise `<name>/fallback` for one partition (what the fallback sensor launches),
    once no other run of the activation is queued or in progress (see `run_activation`).
    Without `send_window`, the window the partition's latest real send was decided with."""
    get_settings()
    if instance is None:
        ensure_dagster_home()
        instance = dg.DagsterInstance.get()
    definitions = definitions or load_definitions(tolerant=True)
    if name in broken_activations():
        raise DefinitionsError(f"activation {name} cannot be loaded: {broken_activations()[name]}")
    job_name = f"{name}_fallback_job"
    if job_name not in {job.name for job in definitions.resolve_all_job_defs()}:
        raise ActivationNotFound(
            f"activation {name!r} has no fallback (channel_plan.fallback in its defs.yaml)"
        )
    partition = partition or current_partition(definitions, name)
    config: dict[str, Any] = {"dry_run": dry_run}
    if not_delivered_within_minutes is not None:
        config["not_delivered_within_minutes"] = not_delivered_within_minutes
    if send_window is not None:
        config["send_window_start"], config["send_window_end"] = send_window
    if queue is not None:
        wait_for_turn(name, queue, instance)
    started = time.perf_counter()
    result = _execute(
        definitions,
        instance,
        job_name,
        partition,
        {f"{name}__fallback": {"config": config}},
        log_level,
        {"activation": name, "step": "fallback"},
    )
    summary = FallbackSummary(name, partition, result.run_id, result.success, dry_run)
    for event in result.all_events:
        if event.is_step_materialization:
            meta = {
                k: v.value
                for k, v in event.step_materialization_data.materialization.metadata.items()
            }
            summary.take(meta.get("fallback") or {}, meta.get("summary"))
        elif event.is_step_failure:
            summary.error = step_failure_message(event)
    summary.elapsed_seconds = round(time.perf_counter() - started, 2)
    return summary


def _execute(
    definitions: dg.Definitions,
    instance: dg.DagsterInstance,
    job_name: str,
    partition: str,
    ops: dict[str, Any],
    log_level: str,
    tags: Mapping[str, str],
    in_process: bool = True,
) -> Any:
    run_config = {"ops": ops, "loggers": {"console": {"config": {"log_level": log_level}}}}
    run_tags = {"launched_by": "cdp-activation-cli", **_process_tags(), **tags}
    if not in_process:
        # On the job's own executor (defs/executor.py): each step a process or Celery task,
        # loaded again from this module by whichever process runs it.
        job = dg.build_reconstructable_job(
            __name__, "project_job", reconstructable_args=(job_name,)
        )
        with dg.execute_job(
            job,
            instance=instance,
            run_config=run_config,
            tags={**run_tags, "dagster/partition": partition},
            raise_on_error=False,
        ) as result:
            return _Finished(result.run_id, result.success, list(result.all_events))
    return _execute_in_process(
        definitions.resolve_job_def(job_name), instance, partition, run_config, run_tags
    )


def _execute_in_process(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    partition: str,
    run_config: Mapping[str, Any],
    tags: Mapping[str, str],
) -> Any:
    """`job.execute_in_process(...)`, without keeping each step's output in memory.

    `execute_in_process` holds every output until the run ends (for its result's
    `output_for_node`): a 10,000,000-customer run held its audience, its decisions and the
    prepared plan at once, 10.7 GB (bench/results_e2e.md). The runner reads events, never
    outputs (the IO manager stores them for the next step), so this is the same execution with
    Dagster's output capture off: each output is freed once stored. Dagster's own steps, from
    `JobDefinition.execute_in_process` (dagster 1.13, pinned in pyproject.toml).
    """
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.definitions.partitions.context import partition_loading_context
    from dagster._core.execution.execute_in_process import (
        core_execute_in_process,
        merge_run_tags,
    )

    ephemeral = job.as_ephemeral_job(
        resource_defs={}, input_values={}, op_selection=None, asset_selection=[]
    )
    if ephemeral.partitions_def:
        with partition_loading_context(dynamic_partitions_store=instance) as context:
            ephemeral.validate_partition_key(
                partition_key=partition, selected_asset_keys=set(), context=context
            )
    return core_execute_in_process(
        job=InMemoryJob(job_def=ephemeral),
        run_config=run_config,
        instance=instance,
        output_capturing_enabled=False,
        raise_on_error=False,
        run_tags=merge_run_tags(
            job_def=job,
            partition_key=partition,
            tags=tags,
            asset_selection=[],
            instance=instance,
            run_config=run_config,
        ),
        asset_selection=frozenset(),
    )


@dataclass
class _Finished:
    """What the runner reads of a run executed out of process (its result closes with it)."""

    run_id: str
    success: bool
    all_events: list[Any]


def project_job(job_name: str) -> dg.JobDefinition:
    """A job of the project's definitions (what each step process of a run loads)."""
    return load_definitions(tolerant=True).resolve_job_def(job_name)


def _workers_of(definitions: dg.Definitions, name: str, workers: int | None) -> int:
    """The claim workers a run of `name` will fan out into."""
    if workers is not None:
        return workers
    job = definitions.resolve_job_def(f"{name}_job")
    if not job.graph.has_node_named(f"{name}__deliveries"):
        return 1
    # The deliveries graph's run config (components/fan_out.py), default from defs.yaml.
    mapping = getattr(
        job.graph.node_named(f"{name}__deliveries").definition, "config_mapping", None
    )
    field = mapping.config_schema.config_type.fields.get("workers") if mapping else None
    return int(field.default_value) if field is not None else 1


def _int_map(value: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _fill_from_events(summary: RunSummary, result: Any, name: str) -> None:
    for event in result.all_events:
        if event.is_step_materialization:
            materialization = event.step_materialization_data.materialization
            key = materialization.asset_key.path[-1]
            meta = {k: v.value for k, v in materialization.metadata.items()}
            if key == "audience":
                summary.audience = int(meta.get("audience_size", 0))
            elif key == "decisions":
                summary.take_decisions(meta.get("summary") or {})
            elif key == "deliveries" and isinstance(meta.get("summary"), dict):
                summary.take_delivery(DeliverySummary.from_json(meta["summary"]))
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if not evaluation.passed:
                summary.failed_checks[evaluation.check_name] = evaluation.description or "failed"
        elif event.is_run_failure and summary.error is None:
            summary.error = run_failure_message(event)
        elif event.is_step_failure:
            summary.error = step_failure_message(event)
            # A deliveries step that stopped early says where the partition stands.
            failure = event.step_failure_data.user_failure_data
            if failure is not None and event.step_key.startswith(f"{name}__deliveries"):
                recorded = failure.metadata.get("summary")
                if recorded is not None:
                    summary.take_delivery(DeliverySummary.from_json(recorded.value))
