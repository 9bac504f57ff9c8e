"""The template catalog as data: what each provider says about its templates, for the UI.

Decisions and the `template_approved` check read the catalog live at decision time (a template
can be paused at any moment); this module also turns it into a table a marketer can read,
beside the newest word the status webhooks gave on each template (`template_states.py`),
which is what the delivery engine obeys between two syncs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

import httpx
import polars as pl

from cdp_activation.connectors.base import Connector, ConnectorError, TemplateInfo
from cdp_activation.ledger.templates import CATALOG, TemplateState
from cdp_activation.plugins import plugins


def catalog_connectors() -> frozenset[str]:
    """Connectors whose template catalog is a shared asset (`templates/<connector>`): the
    installed plugins whose connector can list its templates."""
    return frozenset(name for name, plugin in plugins().items() if plugin.has_catalog)


SCHEMA: dict[str, pl.DataType] = {
    "name": pl.String(),
    "language": pl.String(),
    "category": pl.String(),
    "status": pl.String(),
    "body_parameter_count": pl.Int64(),
    "friendly_name": pl.String(),  # Twilio: the Content template's own name beside its SID
    "webhook_status": pl.String(),  # the newest status webhook's word on it, if any
    "webhook_at": pl.Datetime("us", "UTC"),
}


def fetch_catalog(connector: Connector) -> list[TemplateInfo]:
    fetcher = getattr(connector, "fetch_templates", None)
    if fetcher is None:
        raise ConnectorError(f"connector {connector.name!r} cannot list its templates")

    async def run() -> list[TemplateInfo]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await fetcher(client)

    return asyncio.run(run())


def catalog_frame(catalog: list[TemplateInfo], heard: Sequence[TemplateState] = ()) -> pl.DataFrame:
    """The catalog, with the newest webhook word on each template beside its status."""
    webhooks = {(h.name, h.language): h for h in heard if h.source != CATALOG}
    rows = []
    for t in catalog:
        word = webhooks.get((t.name, t.language))
        rows.append(
            {
                "name": t.name,
                "language": t.language,
                "category": t.category,
                "status": t.status,
                "body_parameter_count": t.body_parameter_count,
                "friendly_name": t.extra.get("friendly_name"),
                "webhook_status": word.status if word else None,
                "webhook_at": word.occurred_at if word else None,
            }
        )
    return pl.DataFrame(rows, schema=SCHEMA).sort(["name", "language"])


def catalog_states(
    connector: str, catalog: list[TemplateInfo], at: datetime
) -> list[TemplateState]:
    """The catalog's statuses as words on each template, true at `at` (when it was read)."""
    return [
        TemplateState(connector, t.name, t.language, t.status, at, source=CATALOG)
        for t in catalog
        if t.name and t.language and t.status
    ]


def catalog_markdown(frame: pl.DataFrame) -> str:
    lines = [
        "| template | language | category | status | parameters | last status webhook |",
        "|---|---|---|---|---:|---|",
    ]
    for r in frame.iter_rows(named=True):
        label = f"`{r['name']}`" + (f" ({r['friendly_name']})" if r["friendly_name"] else "")
        heard = (
            f"{r['webhook_status']} at {r['webhook_at']:%Y-%m-%d %H:%M} UTC"
            if r["webhook_status"]
            else ""
        )
        lines.append(
            f"| {label} | {r['language']} | {r['category']} | {r['status']} | "
            f"{r['body_parameter_count']} | {heard} |"
        )
    return "\n".join(lines)
