"""Dagster resources: thin, configurable handles on the warehouse, the ledger and connectors.

Secrets are fields set from `dg.EnvVar` (see `defs/resources.py`), so Dagster resolves them at
run time and never shows them in the UI.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any, ClassVar

import dagster as dg
from pydantic import Field, PrivateAttr, SecretStr, ValidationError, create_model

from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.connectors.base import Connector, ConnectorConfigError
from cdp_activation.feedback.send_log import (
    SendLogExport,
    export_decision_counts,
    export_replies,
    export_send_log,
)
from cdp_activation.ledger import Ledger
from cdp_activation.plugins import ConnectorSettings, plugin
from cdp_activation.settings import sandbox_mode, settings_error_message


class WarehouseResource(dg.ConfigurableResource):
    """Where audience SQL runs: a `duckdb:///file` (read-only) or any SQLAlchemy URL."""

    url: str
    duckdb_memory_limit: str = Field(
        default="",
        description="DuckDB's memory_limit for audience queries (CDP_DUCKDB_MEMORY_LIMIT); "
        "empty: DuckDB's default.",
    )

    def warehouse(self) -> Warehouse:
        return Warehouse(self.url, duckdb_memory_limit=self.duckdb_memory_limit)


class LedgerResource(dg.ConfigurableResource):
    """The send ledger: SQLite file by default, PostgreSQL in production."""

    url: str
    _opened: Ledger | None = PrivateAttr(default=None)

    def ledger(self) -> Ledger:
        """The run's ledger: opened (and, the first time in this process, migrated) on first
        use, then shared by every step of the run in this process, and closed at teardown."""
        if self._opened is None:
            self._opened = Ledger(self.url)
        return self._opened

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._opened is not None:
            self._opened.dispose()
            self._opened = None


class SendLogResource(dg.ConfigurableResource):
    """Where the ledger is exported for analysts (`activation_send_log`): a writable DuckDB
    file or SQLAlchemy URL, by default the warehouse's."""

    url: str

    def export(self, ledger: Ledger) -> SendLogExport:
        return export_send_log(ledger, self.url)

    def export_replies(self, ledger: Ledger) -> dict[str, SendLogExport]:
        return export_replies(ledger, self.url)

    def export_decision_counts(self, ledger: Ledger) -> SendLogExport:
        return export_decision_counts(ledger, self.url)


class ConnectorResource(dg.ConfigurableResource):
    """A provider connector: the fields of its plugin's settings (`plugins.py`) as Dagster
    config, secrets as `dg.EnvVar`s; `connector()` builds the plain-Python client. One class
    per installed connector is derived from its plugin (`connector_resource`)."""

    # Messages/s for this sender; None: the connector's default. Zero or less is refused (a
    # Launchpad override too), as CDP_*_RATE_PER_SECOND is.
    rate_per_second: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    plugin_name: ClassVar[str] = ""

    def connector(self) -> Connector:
        found = plugin(self.plugin_name)
        values: dict[str, Any] = {}
        for name in found.settings.model_fields:
            value = getattr(self, name, None)
            if value is None:
                continue
            if found.is_secret(name) and _is_mapping(found.settings, name):
                value = _secret_mapping(found.env_name(name), value)
            values[name] = value
        try:
            settings = found.settings.model_validate(values)
        except ValidationError as err:
            raise ConnectorConfigError(
                f"{found.name} resource: {settings_error_message(err, found)}"
            ) from None
        connector: Connector = found.build(settings, sandbox_mode())
        return connector


def _is_mapping(settings: type[ConnectorSettings], name: str) -> bool:
    return "dict" in str(settings.model_fields[name].annotation)


def _secret_mapping(variable: str, value: str) -> dict[str, SecretStr]:
    """A JSON object of secrets (CDP_WEBHOOK_HEADERS), kept as one EnvVar since any of its
    values may be a secret; the value is never echoed."""
    try:
        raw = json.loads(value)
    except json.JSONDecodeError:
        raw = None
    if not isinstance(raw, dict):
        raise ConnectorConfigError(
            f'{variable} must be a JSON object, e.g. {{"Authorization": "…"}}'
        )
    return {str(k): SecretStr(str(v)) for k, v in raw.items()}


@cache
def connector_resource(name: str) -> type[ConnectorResource]:
    """The Dagster resource class of the connector `name`, derived from its plugin: every
    field of its settings but the receiver's signing secrets; secrets as optional strings
    (set from `dg.EnvVar`s, never shown), JSON for a mapping of secrets."""
    found = plugin(name)
    fields: dict[str, Any] = {}
    for field, info in found.settings.model_fields.items():
        if field == "rate_per_second" or found.for_receiver_only(field):
            continue
        if found.is_secret(field):
            fields[field] = (str | None, None)
        else:
            fields[field] = (info.annotation, copy.copy(info))
    title = "".join(part.title() for part in name.split("_"))
    cls: type[ConnectorResource] = create_model(
        f"{title}Resource",
        __base__=ConnectorResource,
        __module__=__name__,
        __doc__=f"{found.title}: {found.docs}.",
        **fields,
    )
    cls.plugin_name = name
    return cls
