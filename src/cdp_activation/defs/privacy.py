"""The retention job: personal data older than CDP_PII_RETENTION_DAYS leaves the ledger."""

from pathlib import Path

import dagster as dg

from cdp_activation.components.resources import LedgerResource
from cdp_activation.retention import purge
from cdp_activation.settings import get_settings


@dg.op(
    description="Take numbers, message texts and provider payloads out of finished sends and "
    "status reports older than CDP_PII_RETENTION_DAYS, and old phone cache entries."
)
def purge_personal_data_op(context: dg.OpExecutionContext, ledger: LedgerResource) -> None:
    days = get_settings().pii_retention_days
    storage_dir = Path(context.instance.storage_directory())
    done = purge(ledger.ledger(), days, storage_dir=storage_dir)
    context.log.info(
        f"older than {days} days: {done.sends} sends, {done.status_reports} status reports, "
        f"{done.phone_cache} phone cache entries and {done.outputs} stored step outputs purged"
    )


@dg.job(description="Purge personal data past its retention (CDP_PII_RETENTION_DAYS).")
def purge_personal_data() -> None:
    purge_personal_data_op()


purge_schedule = dg.ScheduleDefinition(
    job=purge_personal_data,
    cron_schedule="17 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every day at 03:17 UTC: personal data past its retention leaves the ledger "
    "(on by default: a retention nobody enforces is none).",
)
