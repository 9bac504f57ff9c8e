"""Dagster resources: thin, configurable handles on the warehouse, the ledger and connectors.

Secrets are fields set from `dg.EnvVar` (see `defs/resources.py`), so Dagster resolves them at
run time and never shows them in the UI.
"""

from __future__ import annotations

import json

import dagster as dg
from pydantic import Field, PrivateAttr, SecretStr

from cdp_activation.connectors.base import Connector, ConnectorConfigError
from cdp_activation.connectors.braze import BrazeConnector
from cdp_activation.connectors.infobip import InfobipConnector
from cdp_activation.connectors.line import LineConnector
from cdp_activation.connectors.meta_whatsapp import MetaWhatsAppConnector
from cdp_activation.connectors.twilio import TwilioConnector
from cdp_activation.connectors.vonage import VonageConnector
from cdp_activation.connectors.webhook import DEFAULT_BATCH_SIZE, WebhookConnector
from cdp_activation.ledger import Ledger
from cdp_activation.send_log import SendLogExport, export_send_log
from cdp_activation.settings import (
    SANDBOX_BRAZE_API_KEY,
    SANDBOX_INFOBIP_API_KEY,
    SANDBOX_LINE_TOKEN,
    SANDBOX_META_TOKEN,
    SANDBOX_TWILIO_AUTH_TOKEN,
    SANDBOX_VONAGE_API_SECRET,
    resolve_secret,
    webhook_headers_or_sandbox,
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


class ConnectorResource(dg.ConfigurableResource):
    """A provider connector; `connector()` builds the plain-Python client."""

    # Messages/s for this sender; None: the connector's default. Zero or less is refused (a
    # Launchpad override too), as CDP_*_RATE_PER_SECOND is.
    rate_per_second: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    def connector(self) -> Connector:
        raise NotImplementedError

    def _with_rate(self, connector: Connector) -> Connector:
        connector.rate_per_second = self.rate_per_second
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
                access_token=resolve_secret(
                    token,
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
    content_base_url: str | None = None  # the Content API's host; None: `base_url`
    whatsapp_from: str | None = None  # the WhatsApp sender; None: `from_number`
    # Where Twilio posts status callbacks, each with `?ref=cdp-<send id>` (empty: none).
    status_callback_url: str = ""

    def connector(self) -> Connector:
        token = self.auth_token
        return self._with_rate(
            TwilioConnector(
                base_url=self.base_url,
                account_sid=self.account_sid,
                auth_token=resolve_secret(
                    token,
                    self.base_url,
                    SANDBOX_TWILIO_AUTH_TOKEN,
                    "CDP_TWILIO_AUTH_TOKEN",
                ),
                from_number=self.from_number,
                content_base_url=self.content_base_url,
                whatsapp_from=self.whatsapp_from,
                status_callback_url=self.status_callback_url,
            )
        )


class InfobipResource(ConnectorResource):
    """Infobip WhatsApp templates, SMS (`/sms/3/messages`) and Viber (`/viber/2/messages`)."""

    base_url: str
    api_key: str | None = None
    whatsapp_from: str
    sms_sender: str
    viber_sender: str = ""

    def connector(self) -> Connector:
        key = self.api_key
        return self._with_rate(
            InfobipConnector(
                base_url=self.base_url,
                api_key=resolve_secret(
                    key,
                    self.base_url,
                    SANDBOX_INFOBIP_API_KEY,
                    "CDP_INFOBIP_API_KEY",
                ),
                whatsapp_from=self.whatsapp_from,
                sms_sender=self.sms_sender,
                viber_sender=self.viber_sender,
            )
        )


class VonageResource(ConnectorResource):
    """Vonage Messages API v1 (`/v1/messages`): WhatsApp and SMS, HTTP Basic auth."""

    base_url: str
    api_key: str
    api_secret: str | None = None
    whatsapp_from: str
    sms_from: str
    whatsapp_namespace: str = ""
    viber_from: str = ""

    def connector(self) -> Connector:
        secret = self.api_secret
        return self._with_rate(
            VonageConnector(
                base_url=self.base_url,
                api_key=self.api_key,
                api_secret=resolve_secret(
                    secret,
                    self.base_url,
                    SANDBOX_VONAGE_API_SECRET,
                    "CDP_VONAGE_API_SECRET",
                ),
                whatsapp_from=self.whatsapp_from,
                sms_from=self.sms_from,
                whatsapp_namespace=self.whatsapp_namespace,
                viber_from=self.viber_from,
            )
        )


class BrazeResource(ConnectorResource):
    """Braze REST API: API-triggered campaigns (`/campaigns/trigger/send`)."""

    base_url: str
    api_key: str | None = None

    def connector(self) -> Connector:
        return self._with_rate(
            BrazeConnector(
                base_url=self.base_url,
                api_key=resolve_secret(
                    self.api_key, self.base_url, SANDBOX_BRAZE_API_KEY, "CDP_BRAZE_API_KEY"
                ),
            )
        )


class LineResource(ConnectorResource):
    """LINE Messaging API: multicast and push text messages with `X-Line-Retry-Key`."""

    base_url: str
    channel_access_token: str | None = None

    def connector(self) -> Connector:
        return self._with_rate(
            LineConnector(
                base_url=self.base_url,
                channel_access_token=resolve_secret(
                    self.channel_access_token,
                    self.base_url,
                    SANDBOX_LINE_TOKEN,
                    "CDP_LINE_CHANNEL_ACCESS_TOKEN",
                ),
            )
        )


class WebhookResource(ConnectorResource):
    """A JSON webhook receiver (contract in `connectors/webhook.py`).

    `headers_json` is the whole CDP_WEBHOOK_HEADERS JSON object, kept as one EnvVar because any
    of its values may be a secret.
    """

    url: str
    headers_json: str | None = None
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, gt=0)

    def connector(self) -> Connector:
        headers: dict[str, SecretStr] | None = None
        if self.headers_json:
            try:
                raw = json.loads(self.headers_json)
            except json.JSONDecodeError:
                raw = None
            if not isinstance(raw, dict):
                # The value itself may be a secret: never echo it.
                raise ConnectorConfigError(
                    'CDP_WEBHOOK_HEADERS must be a JSON object, e.g. {"Authorization": "…"}'
                )
            headers = {str(k): SecretStr(str(v)) for k, v in raw.items()}
        return self._with_rate(
            WebhookConnector(
                url=self.url,
                headers=webhook_headers_or_sandbox(headers),
                batch_size=self.batch_size,
            )
        )
