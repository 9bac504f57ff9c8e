"""How Dagster runs an activation's steps (docs/scaling.md).

Without CDP_CELERY_BROKER_URL: the multiprocess executor, each step a process on this host,
as many at once as a delivery may have claim workers. With it: Dagster's Celery executor,
each step a task on whichever Celery worker takes it, checked before anything runs (a
PostgreSQL ledger and instance, a broker that answers). The CLI's single-worker runs are in
process either way (`execute_in_process`).
"""

import dagster as dg

from cdp_activation import scaling
from cdp_activation.settings import get_settings


@dg.definitions
def executor() -> dg.Definitions:
    settings = get_settings()
    if settings.celery_broker_url:
        from cdp_activation.celery_executor import checked_celery_executor

        return dg.Definitions(
            executor=checked_celery_executor.configured(scaling.celery_executor_config())
        )
    # Every claim worker of a fanned-out delivery at once (they wait on the provider, not
    # the CPU); Dagster's default would run only as many steps as there are cores.
    return dg.Definitions(
        executor=dg.multiprocess_executor.configured(
            {"max_concurrent": settings.delivery_max_workers + 1}
        )
    )
