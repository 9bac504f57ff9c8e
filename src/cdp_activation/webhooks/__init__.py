"""Delivery-status webhooks in: signature checks, provider parsers, the receiver app."""

from cdp_activation.webhooks.app import WebhookSecrets, WebhookServer, create_app

__all__ = ["WebhookSecrets", "WebhookServer", "create_app"]
