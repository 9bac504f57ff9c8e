"""Connector registry: every provider connector registered by its unique `name`.

An activation names its connector in YAML; this module turns that name into a configured
instance, so an unknown name is a clear error listing what exists, and two connectors can never
silently claim the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

from cdp_activation.connectors.base import Connector, ConnectorConfigError
from cdp_activation.connectors.braze import BrazeConnector
from cdp_activation.connectors.infobip import InfobipConnector
from cdp_activation.connectors.line import LineConnector
from cdp_activation.connectors.meta_whatsapp import MetaWhatsAppConnector
from cdp_activation.connectors.twilio import TwilioConnector
from cdp_activation.connectors.vonage import VonageConnector
from cdp_activation.connectors.webhook import WebhookConnector

if TYPE_CHECKING:
    from cdp_activation.settings import Settings

_REGISTRY: dict[str, type] = {}
CONNECTORS: Mapping[str, type] = MappingProxyType(_REGISTRY)
"""Read-only view: connector name → class."""

C = TypeVar("C", bound=type)


def register(cls: C) -> C:
    """Register a connector class under `cls.name` (usable as a class decorator).

    Raises `ValueError` when the name is missing or already taken by another class.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} has no `name` class attribute to register under")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"connector name {name!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def connector_class(name: str) -> type[Connector]:
    """The class registered as `name`; `ValueError` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise ValueError(f"unknown connector {name!r}; known connectors: {known}") from None


def connector_from_settings(name: str, settings: Settings) -> Connector:
    """A ready connector built from deployment settings (each class's `from_settings`)."""
    cls = connector_class(name)
    factory = getattr(cls, "from_settings", None)
    if factory is None:
        raise ConnectorConfigError(
            f"connector {name!r} cannot be built from settings: {cls.__qualname__} has no "
            "from_settings classmethod"
        )
    connector: Connector = factory(settings)
    return connector


register(MetaWhatsAppConnector)
register(TwilioConnector)
register(InfobipConnector)
register(VonageConnector)
register(WebhookConnector)
register(BrazeConnector)
register(LineConnector)

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
    "register",
]
