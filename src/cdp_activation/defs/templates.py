"""Shared assets: each template-capable connector's catalog, synced from the provider."""

from datetime import UTC, datetime
from typing import Any

import dagster as dg

from cdp_activation.components.resources import ConnectorResource
from cdp_activation.feedback.template_catalog import (
    catalog_connectors,
    catalog_frame,
    catalog_markdown,
    catalog_states,
    fetch_catalog,
)
from cdp_activation.ledger.templates import CATALOG, latest_states, record_states
from cdp_activation.plugins import plugins

SOURCES = {
    "meta_whatsapp": (
        "WhatsApp message templates of the business account, synced from Meta's "
        "`GET /{WABA-ID}/message_templates` (paged)"
    ),
    "twilio": (
        "Twilio Content templates and their WhatsApp approvals, synced from the Content API's "
        "`GET /v1/ContentAndApprovals` (paged); a plan names a template by its Content SID"
    ),
    "infobip": (
        "WhatsApp templates of the Infobip sender (CDP_INFOBIP_WHATSAPP_FROM), synced from "
        "`GET /whatsapp/2/senders/{sender}/templates`"
    ),
    "wechat": (
        "The WeChat Official Account's templates, synced from "
        "`GET /cgi-bin/template/get_all_private_template`; a plan names one by its template id"
    ),
}


def catalog_asset(connector_name: str) -> dg.AssetsDefinition:
    """`templates/<connector>`: the catalog as a table, counts by status as numbers."""

    @dg.asset(
        key=dg.AssetKey(["templates", connector_name]),
        group_name="templates",
        kinds=set(sorted(plugins()[connector_name].capabilities.channels)[:3]),
        required_resource_keys={connector_name, "ledger"},
        description=f"{SOURCES.get(connector_name, plugins()[connector_name].title)}: name, "
        "language, category, status, "
        "parameters, and the last status webhook's word on each (a PAUSED or DISABLED word "
        "stops its sends until a newer one approves it). Decisions re-read the catalog live "
        "before any send.",
    )
    def templates(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        resource: ConnectorResource = getattr(context.resources, connector_name)
        read_at = datetime.now(UTC)
        catalog = fetch_catalog(resource.connector())
        engine = context.resources.ledger.ledger().engine
        heard = latest_states(engine, connector_name)
        # The catalog is the provider's word now: newer than any webhook before it.
        record_states(engine, catalog_states(connector_name, catalog, read_at))
        frame = catalog_frame(catalog, heard)
        metadata: dict[str, Any] = {
            "dagster/row_count": frame.height,
            "catalog": dg.MetadataValue.md(catalog_markdown(frame)),
        }
        for status, count in frame.group_by("status").len().sort("status").iter_rows():
            metadata[f"templates_{str(status).lower()}"] = count
        paused = [s for s in heard if s.blocked and s.source != CATALOG]
        if paused:
            metadata["paused_by_webhook"] = dg.MetadataValue.md(
                "\n".join(f"- {s.describe()}" for s in paused)
            )
        return dg.MaterializeResult(metadata=metadata)

    return templates


@dg.definitions
def catalogs() -> dg.Definitions:
    """One `templates/<connector>` asset per installed connector with a template catalog."""
    return dg.Definitions(assets=[catalog_asset(name) for name in sorted(catalog_connectors())])


sync_templates_job = dg.define_asset_job(
    "sync_templates", selection=dg.AssetSelection.groups("templates")
)

sync_templates_schedule = dg.ScheduleDefinition(
    job=sync_templates_job,
    cron_schedule="*/30 * * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Refresh the template catalogs every 30 minutes (off until turned on).",
)
