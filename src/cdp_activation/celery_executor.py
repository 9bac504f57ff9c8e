"""Dagster's Celery executor, refusing before the first step what cannot work (see
defs/executor.py). Imported only when CDP_CELERY_BROKER_URL is set: dagster-celery is the
`scale` extra."""

from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster._core.execution.retries import RetryMode  # as dagster_celery itself does
from dagster_celery import celery_executor
from dagster_celery.executor import CeleryExecutor

from cdp_activation import scaling
from cdp_activation.settings import get_settings


class _CheckedCeleryExecutor(CeleryExecutor):
    """The Celery executor, refusing before the first step what cannot work."""

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        storage = type(plan_context.instance.run_storage).__name__
        if problem := scaling.celery_problem(storage, get_settings().ledger_url):
            raise scaling.ScalingError(f"Not sent: {problem}")
        scaling.check_broker(self.broker)
        if not scaling.celery_workers(self.broker, self.backend):
            plan_context.log.warning(
                "No Celery worker answers on this broker: the run's steps wait in its queue "
                "until one starts (`cdp-activation celery-worker`, docs/scaling.md)."
            )
        yield from super().execute(plan_context, execution_plan)


@dg.executor(  # type: ignore[call-overload]  # its config schema is the Celery executor's
    name="celery",
    config_schema=celery_executor.config_schema,
    requirements=dg.multiple_process_executor_requirements(),
)
def checked_celery_executor(init_context: dg.InitExecutorContext) -> CeleryExecutor:
    config = init_context.executor_config
    return _CheckedCeleryExecutor(
        broker=config.get("broker"),
        backend=config.get("backend"),
        config_source=config.get("config_source"),
        include=config.get("include"),
        retries=RetryMode.from_config(config["retries"]),  # type: ignore[arg-type]
    )
