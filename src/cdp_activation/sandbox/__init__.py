"""Local provider emulator (Meta, Twilio, Infobip, Vonage, JSON webhook) over real HTTP."""

from cdp_activation.sandbox.app import (
    MessageStore,
    SandboxConfig,
    SandboxMessage,
    body_parameter_count,
    create_app,
    load_catalog,
    twilio_content_sid,
)
from cdp_activation.sandbox.server import SandboxServer, serve

__all__ = [
    "MessageStore",
    "SandboxConfig",
    "SandboxMessage",
    "SandboxServer",
    "body_parameter_count",
    "create_app",
    "load_catalog",
    "serve",
    "twilio_content_sid",
]
