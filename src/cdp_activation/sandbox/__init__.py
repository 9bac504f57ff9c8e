"""Local provider emulator (Meta, Twilio, Infobip, Vonage, Braze, LINE, a JSON webhook) over
real HTTP: `core` (settings, faults, the message store), `exchange` (what every request goes
through), one module per provider under `providers/`, and `app` (the control routes and the
ASGI app)."""

from cdp_activation.sandbox.app import create_app
from cdp_activation.sandbox.catalog import body_parameter_count, load_catalog
from cdp_activation.sandbox.core import (
    Fault,
    MessageStore,
    SandboxAttempt,
    SandboxConfig,
    SandboxMessage,
    request_fault,
)
from cdp_activation.sandbox.providers.twilio import twilio_content_sid
from cdp_activation.sandbox.server import SandboxServer, serve

__all__ = [
    "Fault",
    "MessageStore",
    "SandboxAttempt",
    "SandboxConfig",
    "SandboxMessage",
    "SandboxServer",
    "body_parameter_count",
    "create_app",
    "load_catalog",
    "request_fault",
    "serve",
    "twilio_content_sid",
]
