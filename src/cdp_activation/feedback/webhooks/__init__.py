"""Delivery-status webhooks in: signature checks, provider parsers, the receiver app.

The receiver (`app`) is imported on first use: the connectors' plugins read `parsers` and
`signatures` while the settings are still being built, before the receiver can be."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdp_activation.feedback.webhooks.app import WebhookServer, create_app
    from cdp_activation.plugins import WebhookSecrets

__all__ = ["WebhookSecrets", "WebhookServer", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "WebhookSecrets":
        from cdp_activation.plugins import WebhookSecrets

        return WebhookSecrets
    if name in ("WebhookServer", "create_app"):
        from cdp_activation.feedback.webhooks import app

        return getattr(app, name)
    raise AttributeError(name)
