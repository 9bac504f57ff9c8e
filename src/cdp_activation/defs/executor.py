"""How Dagster runs an activation's steps (docs/scaling.md).

Without CDP_CELERY_BROKER_URL: the multiprocess executor, each step a process on this host,
as many at once as a delivery may have claim workers. With it: Dagster's Celery executor,
each step a task on whichever Celery worker takes it, checked before anything runs (a
PostgreSQL ledger and instance, a broker that answers). CDP_EXECUTOR=k8s: each step a
Kubernetes Job. The CLI's single-worker runs are in process either way
(`execute_in_process`).
"""

import dagster as dg

from cdp_activation import scaling
from cdp_activation.logs import log_format
from cdp_activation.settings import get_settings


@dg.definitions
def executor() -> dg.Definitions:
    defs = _executor()
    if log_format() == "json":  # CDP_LOG_FORMAT=json: Dagster's run log lines as JSON too
        return dg.Definitions.merge(
            defs, dg.Definitions(loggers={"console": dg.json_console_logger})
        )
    return defs


def _executor() -> dg.Definitions:
    settings = get_settings()
    kind = settings.executor or ("celery" if settings.celery_broker_url else "multiprocess")
    if kind == "celery":
        if not settings.celery_broker_url:
            raise scaling.ScalingError(
                "CDP_EXECUTOR=celery needs CDP_CELERY_BROKER_URL (the broker its workers use)"
            )
        from cdp_activation.celery_executor import checked_celery_executor

        return dg.Definitions(
            executor=checked_celery_executor.configured(scaling.celery_executor_config())
        )
    if kind == "k8s":
        return dg.Definitions(executor=_k8s_executor())
    # Every claim worker of a fanned-out delivery at once (they wait on the provider, not
    # the CPU); Dagster's default would run only as many steps as there are cores.
    return dg.Definitions(
        executor=dg.multiprocess_executor.configured(
            {"max_concurrent": settings.delivery_max_workers + 1}
        )
    )


def _k8s_executor() -> dg.ExecutorDefinition:
    """Each step a Kubernetes Job (dagster-k8s), its CDP_* variables from a ConfigMap and a
    Secret. Pods are other hosts: a SQLite ledger cannot be shared with them."""
    settings = get_settings()
    if problem := scaling.celery_problem("", settings.ledger_url, "CDP_EXECUTOR=k8s"):
        raise scaling.ScalingError(problem)
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(
        {
            "max_concurrent": settings.delivery_max_workers + 1,
            "env_config_maps": [settings.k8s_env_config_map],
            "env_secrets": [settings.k8s_env_secret],
        }
    )
