"""Shared fixtures: a live sandbox provider on a free 127.0.0.1 port and settings pointing at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from cdp_activation.sandbox import SandboxServer
from cdp_activation.settings import Settings


def settings_for_sandbox(server: SandboxServer) -> Settings:
    """Settings whose connectors talk to `server`, ignoring any `.env` or CDP_* tokens.

    Tokens are left unset on purpose: against a loopback URL the sandbox credentials are used,
    which is exactly the embedded default a fresh checkout runs with.
    """
    return Settings(
        _env_file=None,  # type: ignore[call-arg]  # pydantic-settings init-only option
        meta_base_url=f"{server.url}/meta",
        twilio_base_url=f"{server.url}/twilio",
        meta_access_token=None,
        twilio_auth_token=None,
    )


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    """One sandbox for the whole session: starting uvicorn per test would dominate run time."""
    with SandboxServer() as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> SandboxServer:
    """The running sandbox, emptied of messages recorded by earlier tests."""
    sandbox_server.reset()
    return sandbox_server


@pytest.fixture
def settings_for() -> Callable[[SandboxServer], Settings]:
    """`settings_for(sandbox)` → `Settings` pointing every connector at that sandbox."""
    return settings_for_sandbox


@pytest.fixture
def sandbox_settings(sandbox: SandboxServer) -> Settings:
    """Settings pointing at the (reset) session sandbox."""
    return settings_for_sandbox(sandbox)
