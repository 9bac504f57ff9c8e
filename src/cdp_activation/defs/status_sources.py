"""Shared assets: one per status source (`sql/statuses/<name>.sql`), reading the delivery
statuses a platform exports to the warehouse into the ledger, on a schedule."""

import dagster as dg

from cdp_activation.audience.sql import sql_dialect
from cdp_activation.components.resources import LedgerResource, WarehouseResource
from cdp_activation.feedback.status_sources import StatusSource, read_status_source, status_sources
from cdp_activation.settings import get_settings, project_root


def status_source_asset(source: StatusSource) -> dg.AssetsDefinition:
    """`delivery_status/<name>`: what one read brought in, as numbers."""

    @dg.asset(
        key=dg.AssetKey(["delivery_status", source.name]),
        group_name="delivery_status",
        kinds={"sql"},
        description=f"Delivery statuses exported to the warehouse, read by "
        f"`{source.query.path.relative_to(project_root())}` into the ledger (the same states "
        "as status webhooks: only ever forward, each event once).",
    )
    def delivery_status(
        warehouse: WarehouseResource, ledger: LedgerResource
    ) -> dg.MaterializeResult:
        store = ledger.ledger()
        try:
            read = read_status_source(source, warehouse.warehouse(), store)
        finally:
            store.dispose()
        return dg.MaterializeResult(
            metadata={
                "events_read": read.rows,
                "events_new": read.new,
                "statuses_advanced": read.advanced,
                "since": read.since.isoformat(),
            }
        )

    return delivery_status


@dg.definitions
def status_source_defs() -> dg.Definitions:
    dialect = sql_dialect(get_settings().warehouse_url)
    assets = [status_source_asset(s) for s in status_sources(project_root(), dialect)]
    if not assets:
        return dg.Definitions()
    job = dg.define_asset_job(
        "read_status_sources", selection=dg.AssetSelection.groups("delivery_status")
    )
    schedule = dg.ScheduleDefinition(
        job=job,
        cron_schedule="*/15 * * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Read the status sources every 15 minutes (off until turned on).",
    )
    return dg.Definitions(assets=assets, jobs=[job], schedules=[schedule])
