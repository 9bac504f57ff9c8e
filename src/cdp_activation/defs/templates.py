"""Shared assets: each template-capable connector's catalog, synced from the provider."""

import dagster as dg

from cdp_activation.resources import MetaWhatsAppResource
from cdp_activation.templates_catalog import catalog_frame, catalog_markdown, fetch_catalog

META_TEMPLATES = dg.AssetKey(["templates", "meta_whatsapp"])


@dg.asset(
    key=META_TEMPLATES,
    group_name="templates",
    kinds={"whatsapp"},
    description="WhatsApp message templates of the business account, synced from Meta's "
    "`GET /{WABA-ID}/message_templates` (paged): name, language, category, status, "
    "parameters. Decisions re-read the catalog live before any send.",
)
def meta_whatsapp_templates(meta_whatsapp: MetaWhatsAppResource) -> dg.MaterializeResult:
    frame = catalog_frame(fetch_catalog(meta_whatsapp.connector()))
    by_status = frame.group_by("status").len().sort("status")
    metadata: dict[str, object] = {
        "dagster/row_count": frame.height,
        "catalog": dg.MetadataValue.md(catalog_markdown(frame)),
    }
    for status, count in by_status.iter_rows():
        metadata[f"templates_{str(status).lower()}"] = count
    return dg.MaterializeResult(metadata=metadata)


sync_templates_job = dg.define_asset_job(
    "sync_templates", selection=dg.AssetSelection.groups("templates")
)

sync_templates_schedule = dg.ScheduleDefinition(
    job=sync_templates_job,
    cron_schedule="*/30 * * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Refresh the template catalogs every 30 minutes (off until turned on).",
)
