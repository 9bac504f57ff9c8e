"""The template catalog as data: what each provider says about its templates, for the UI.

Decisions and the `template_approved` check read the catalog live at decision time (a template
can be paused at any moment); this module also turns it into a table a marketer can read.
"""

from __future__ import annotations

import asyncio

import httpx
import polars as pl

from cdp_activation.connectors.base import Connector, ConnectorError, TemplateInfo

# Connectors whose template catalog is a shared asset (`templates/<connector>`).
CATALOG_CONNECTORS = frozenset({"meta_whatsapp", "twilio"})

SCHEMA = {
    "name": pl.String,
    "language": pl.String,
    "category": pl.String,
    "status": pl.String,
    "body_parameter_count": pl.Int64,
    "friendly_name": pl.String,  # Twilio: the Content template's own name beside its SID
}


def fetch_catalog(connector: Connector) -> list[TemplateInfo]:
    fetcher = getattr(connector, "fetch_templates", None)
    if fetcher is None:
        raise ConnectorError(f"connector {connector.name!r} cannot list its templates")

    async def run() -> list[TemplateInfo]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await fetcher(client)

    return asyncio.run(run())


def catalog_frame(catalog: list[TemplateInfo]) -> pl.DataFrame:
    rows = [
        {
            "name": t.name,
            "language": t.language,
            "category": t.category,
            "status": t.status,
            "body_parameter_count": t.body_parameter_count,
            "friendly_name": t.extra.get("friendly_name"),
        }
        for t in catalog
    ]
    return pl.DataFrame(rows, schema=SCHEMA).sort(["name", "language"])


def catalog_markdown(frame: pl.DataFrame) -> str:
    lines = ["| template | language | category | status | parameters |", "|---|---|---|---|---:|"]
    for r in frame.iter_rows(named=True):
        label = f"`{r['name']}`" + (f" ({r['friendly_name']})" if r["friendly_name"] else "")
        lines.append(
            f"| {label} | {r['language']} | {r['category']} | {r['status']} | "
            f"{r['body_parameter_count']} |"
        )
    return "\n".join(lines)
