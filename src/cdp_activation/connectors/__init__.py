"""The connectors: one module per provider, each declaring its `PLUGIN` (`plugins.py`).

An activation names its connector in YAML; the registry of installed plugins (entry points
`cdp_activation.connectors`) turns that name into a configured instance, so an unknown name is
a clear error listing what exists, and two connectors can never claim the same name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from cdp_activation.connectors.base import Connector
from cdp_activation.connectors.braze import BrazeConnector
from cdp_activation.connectors.infobip import InfobipConnector
from cdp_activation.connectors.line import LineConnector
from cdp_activation.connectors.meta_whatsapp import MetaWhatsAppConnector
from cdp_activation.connectors.twilio import TwilioConnector
from cdp_activation.connectors.vonage import VonageConnector
from cdp_activation.connectors.webhook import WebhookConnector
from cdp_activation.plugins import plugin, plugins

if TYPE_CHECKING:
    from cdp_activation.settings import Settings


class _Connectors(Mapping[str, type]):
    """Read-only view of the installed connectors: name -> class (from the plugins)."""

    def __getitem__(self, name: str) -> type:
        return plugins()[name].connector

    def __iter__(self) -> Iterator[str]:
        return iter(plugins())

    def __len__(self) -> int:
        return len(plugins())


CONNECTORS: Mapping[str, type] = _Connectors()


def connector_class(name: str) -> type[Connector]:
    """The class of the connector named `name`; `ValueError` listing the known names otherwise."""
    cls: type[Connector] = plugin(name).connector
    return cls


def connector_from_settings(name: str, settings: Settings) -> Connector:
    """A ready connector built from deployment settings (its plugin's settings model)."""
    found = plugin(name)
    connector: Connector = found.build(settings.connector_settings(name), settings.sandbox)
    return connector


__all__ = [
    "CONNECTORS",
    "BrazeConnector",
    "InfobipConnector",
    "LineConnector",
    "MetaWhatsAppConnector",
    "TwilioConnector",
    "VonageConnector",
    "WebhookConnector",
    "connector_class",
    "connector_from_settings",
]
