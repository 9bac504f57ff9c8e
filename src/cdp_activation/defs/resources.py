"""The resources every activation uses, configured from the environment (`CDP_*`).

Non-secret settings take their embedded defaults (DuckDB demo warehouse, SQLite ledger, local
sandbox); secrets are `dg.EnvVar`s when set, so they stay out of the UI and run metadata.
"""

import os
from typing import Any

import dagster as dg

from cdp_activation.components.resources import (
    ConnectorResource,
    LedgerResource,
    SendLogResource,
    WarehouseResource,
    connector_resource,
)
from cdp_activation.plugins import plugins
from cdp_activation.settings import Settings, export_dotenv, get_settings
from cdp_activation.storage import SealedFilesystemIOManager


def _env_or(name: str, default: str) -> str | dg.EnvVar:
    return dg.EnvVar(name) if os.environ.get(name) else default


def _env_secret(name: str) -> dg.EnvVar | None:
    return dg.EnvVar(name) if os.environ.get(name) else None


def _connector(name: str, settings: Settings) -> ConnectorResource:
    """The connector's resource: its settings as they are now, secrets as EnvVars (resolved at
    run time, never shown in the UI) when set."""
    resource = connector_resource(name)
    found = plugins()[name]
    values: dict[str, Any] = {}
    for field in resource.model_fields:
        if found.is_secret(field):
            values[field] = _env_secret(found.env_name(field))
        else:
            values[field] = getattr(settings, found.flat_name(field))
    return resource(**values)


@dg.definitions
def resources() -> dg.Definitions:
    export_dotenv()  # secrets only in .env reach the resources as they reach the CLI
    settings = get_settings()
    # The send log goes to the warehouse unless a (writable) URL of its own is set.
    send_log_variable = (
        "CDP_SEND_LOG_URL" if os.environ.get("CDP_SEND_LOG_URL") else "CDP_WAREHOUSE_URL"
    )
    return dg.Definitions(
        resources={
            # A database URL may hold a password: when it comes from the environment it stays
            # an EnvVar, resolved at run time and never shown in the UI.
            "warehouse": WarehouseResource(
                url=_env_or("CDP_WAREHOUSE_URL", settings.warehouse_url),
                duckdb_memory_limit=settings.duckdb_memory_limit,
            ),
            "ledger": LedgerResource(url=_env_or("CDP_LEDGER_URL", settings.ledger_url)),
            # Step outputs hold whole audiences: sealed on disk (storage.py), not pickled in
            # clear like Dagster's default.
            "io_manager": SealedFilesystemIOManager(),
            "send_log": SendLogResource(url=_env_or(send_log_variable, settings.send_log_url)),
            # One resource per installed connector, derived from its plugin.
            **{name: _connector(name, settings) for name in plugins()},
        }
    )
