"""Run an activation through Dagster from Python (the CLI and the end-to-end tests use this).

The run goes through the real Dagster instance under DAGSTER_HOME, so it shows in the UI like
a run launched there: same assets, checks, partitions and metadata.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from cdp_activation.settings import project_root

SUMMARY_KEYS = ("audience", "eligible", "excluded", "sent", "failed", "already_sent")


class ActivationNotFound(LookupError):
    pass


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
    error_codes: dict[str, int] = field(default_factory=dict)
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


COUNTS = frozenset(
    f.name for f in fields(RunSummary) if f.type in ("int", int) and f.name != "audience"
)


def ensure_dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or project_root() / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def today_partition() -> str:
    return datetime.now(UTC).date().isoformat()


def load_definitions() -> dg.Definitions:
    from cdp_activation.definitions import defs

    return defs()


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
) -> RunSummary:
    """Materialise `<name>/audience -> decisions -> deliveries` for one partition.

    By default the project's definitions run on the instance under DAGSTER_HOME.
    """
    if instance is None:
        ensure_dagster_home()
        instance = dg.DagsterInstance.get()
    definitions = definitions or load_definitions()
    names = activation_names(definitions)
    if name not in names:
        raise ActivationNotFound(
            f"no activation named {name!r}; known: {', '.join(names) or 'none'} "
            "(each is a folder under src/cdp_activation/defs/activations/)"
        )
    partition = partition or today_partition()
    ops: dict[str, Any] = {
        f"{name}__deliveries": {"config": {"dry_run": dry_run}},
    }
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
    started = time.perf_counter()
    result = _execute(
        definitions,
        instance,
        f"{name}_job",
        partition,
        ops,
        log_level,
        {"activation": name, **(tags or {})},
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


def run_fallback(
    name: str,
    partition: str | None = None,
    *,
    dry_run: bool = False,
    not_delivered_within_minutes: float | None = None,
    log_level: str = "CRITICAL",
    definitions: dg.Definitions | None = None,
    instance: dg.DagsterInstance | None = None,
) -> FallbackSummary:
    """Materialise `<name>/fallback` for one partition (what the fallback sensor launches)."""
    if instance is None:
        ensure_dagster_home()
        instance = dg.DagsterInstance.get()
    definitions = definitions or load_definitions()
    job_name = f"{name}_fallback_job"
    if job_name not in {job.name for job in definitions.resolve_all_job_defs()}:
        raise ActivationNotFound(
            f"activation {name!r} has no fallback (channel_plan.fallback in its defs.yaml)"
        )
    partition = partition or today_partition()
    config: dict[str, Any] = {"dry_run": dry_run}
    if not_delivered_within_minutes is not None:
        config["not_delivered_within_minutes"] = not_delivered_within_minutes
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
            summary.first_messages = _int_map(meta.get("first_messages_json"))
            summary.due = _int_map(meta.get("due_by_reason_json"))
            summary.due_codes = _int_map(meta.get("due_by_code_json"))
            summary.excluded = _int_map(meta.get("excluded_by_reason_json"))
            summary.eligible = int(meta.get("fallback_eligible", 0))
            for attr in ("sent", "failed", "unknown", "dead_letter", "deferred", "cancelled"):
                setattr(summary, attr, int(meta.get(attr, 0)))
            summary.channel = str(meta.get("channel", ""))
        elif event.is_step_failure:
            summary.error = _failure_message(event)
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
) -> Any:
    job = definitions.resolve_job_def(job_name)
    return job.execute_in_process(
        instance=instance,
        partition_key=partition,
        run_config={"ops": ops, "loggers": {"console": {"config": {"log_level": log_level}}}},
        raise_on_error=False,
        tags={"launched_by": "cdp-activation-cli", **tags},
    )


def _int_map(value: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _failure_message(event: Any) -> str:
    """The innermost cause of a step failure, prefixed with the step."""
    error = event.step_failure_data.error
    message = error.message.strip() if error else "step failed"
    cause = error.cause if error else None
    while cause is not None:
        message = cause.message.strip()
        cause = cause.cause
    return f"{event.step_key}: {message}"


def _fill_from_events(summary: RunSummary, result: Any, name: str) -> None:
    for event in result.all_events:
        if event.is_step_materialization:
            materialization = event.step_materialization_data.materialization
            key = materialization.asset_key.path[-1]
            meta = {k: v.value for k, v in materialization.metadata.items()}
            if key == "audience":
                summary.audience = int(meta.get("audience_size", 0))
            elif key == "decisions":
                summary.eligible = {
                    k.removeprefix("eligible_"): int(v)
                    for k, v in meta.items()
                    if k.startswith("eligible_") and k != "eligible_by_channel"
                }
                summary.excluded = {
                    k.removeprefix("excluded_"): int(v)
                    for k, v in meta.items()
                    if k.startswith("excluded_") and k != "excluded_by_reason"
                }
                summary.holdout = int(meta.get("holdout", 0))
                if "estimated_cost" in meta:
                    summary.estimated_cost = float(meta["estimated_cost"])
                    summary.currency = str(meta.get("currency", ""))
                    summary.estimated_cost_by_channel = str(
                        meta.get("estimated_cost_by_channel", "")
                    )
                summary.sample_messages = str(meta.get("sample_messages", ""))
            elif key == "deliveries":
                # Every count the deliveries asset recorded that the summary also reports.
                for attr in COUNTS & meta.keys():
                    setattr(summary, attr, int(meta[attr]))
                if "estimated_seconds_at_rate_limit" in meta:
                    summary.estimated_seconds = float(meta["estimated_seconds_at_rate_limit"])
                codes = meta.get("error_codes_json")
                if isinstance(codes, dict):
                    summary.error_codes = {str(k): int(v) for k, v in codes.items()}
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if not evaluation.passed:
                summary.failed_checks[evaluation.check_name] = evaluation.description or "failed"
        elif event.is_step_failure:
            summary.error = _failure_message(event)
