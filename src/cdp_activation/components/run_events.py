"""Why a run or a step failed, in one line, from Dagster's events (the CLI's summary and the
run-failure alert say the same)."""

from __future__ import annotations

from typing import Any


def step_failure_message(event: Any) -> str:
    """The innermost cause of a step failure, prefixed with the step."""
    error = event.step_failure_data.error
    message = error.message.strip() if error else "step failed"
    cause = error.cause if error else None
    while cause is not None:
        message = cause.message.strip()
        cause = cause.cause
    # "dagster._core.definitions.events.Failure: Not sent: …" → "Not sent: …": the class of
    # a deliberate failure says nothing to the user; other errors keep their class.
    for prefix in ("dagster._core.definitions.events.Failure: ", "dagster.Failure: "):
        message = message.removeprefix(prefix)
    return f"{event.step_key}: {message}"


def run_failure_message(event: Any) -> str:
    """Why a run failed outside any step (its executor refused to start, e.g. the Celery
    executor's checks): the innermost error, without its class."""
    error = getattr(event.event_specific_data, "error", None)
    if error is None:
        return event.message or "the run failed"
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    head, sep, rest = message.partition(": ")
    # "cdp_activation.scaling.ScalingError: the Celery broker …" → "the Celery broker …"
    return rest if sep and head.rsplit(".", 1)[-1] == error.cls_name else message
