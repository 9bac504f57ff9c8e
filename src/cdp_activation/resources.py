"""Dagster resources: thin, configurable handles on the warehouse, the ledger and connectors.

Secrets are fields set from `dg.EnvVar` (see `defs/resources.py`), so Dagster resolves them at
run time and never shows them in the UI.
"""

from __future__ import annotations

import dagster as dg

from cdp_activation.connectors.base import Connector
from cdp_activation.connectors.meta_whatsapp import MetaWhatsAppConnector
from cdp_activation.connectors.twilio import TwilioConnector
from cdp_activation.ledger import Ledger
from cdp_activation.settings import (
    SANDBOX_META_TOKEN,
    SANDBOX_TWILIO_AUTH_TOKEN,
    _secret,
)
from cdp_activation.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """Where audience SQL runs: a `duckdb:///file` (read-only) or any SQLAlchemy URL."""

    url: str

    def warehouse(self) -> Warehouse:
        return Warehouse(self.url)


class LedgerResource(dg.ConfigurableResource):
    """The send ledger: SQLite file by default, PostgreSQL in production."""

    url: str

    def ledger(self) -> Ledger:
        return Ledger(self.url)


class ConnectorResource(dg.ConfigurableResource):
    """A provider connector; `connector()` builds the plain-Python client."""

    rate_per_second: float | None = None  # messages/s for this sender; None: connector default

    def connector(self) -> Connector:
        raise NotImplementedError

    def _with_rate(self, connector: Connector) -> Connector:
        connector.rate_per_second = self.rate_per_second  # type: ignore[attr-defined]
        return connector


class MetaWhatsAppResource(ConnectorResource):
    """Meta WhatsApp Cloud API (Graph API `/{phone_number_id}/messages`)."""

    base_url: str
    api_version: str = "v23.0"
    phone_number_id: str
    waba_id: str
    access_token: str | None = None

    def connector(self) -> Connector:
        token = self.access_token
        return self._with_rate(
            MetaWhatsAppConnector(
                base_url=self.base_url,
                api_version=self.api_version,
                phone_number_id=self.phone_number_id,
                waba_id=self.waba_id,
                access_token=_secret(
                    None if not token else _Secret(token),
                    self.base_url,
                    SANDBOX_META_TOKEN,
                    "CDP_META_ACCESS_TOKEN",
                ),
            )
        )


class TwilioResource(ConnectorResource):
    """Twilio Programmable Messaging (`/2010-04-01/Accounts/{sid}/Messages.json`)."""

    base_url: str
    account_sid: str
    auth_token: str | None = None
    from_number: str

    def connector(self) -> Connector:
        token = self.auth_token
        return self._with_rate(
            TwilioConnector(
                base_url=self.base_url,
                account_sid=self.account_sid,
                auth_token=_secret(
                    None if not token else _Secret(token),
                    self.base_url,
                    SANDBOX_TWILIO_AUTH_TOKEN,
                    "CDP_TWILIO_AUTH_TOKEN",
                ),
                from_number=self.from_number,
            )
        )


class _Secret:
    """Adapter so `_secret` takes a plain string the same way as a pydantic SecretStr."""

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value
