"""Run the sandbox provider with uvicorn: in a background thread (tests, demo) or blocking (CLI)."""

from __future__ import annotations

import time
from typing import Any

import uvicorn

from cdp_activation import heap
from cdp_activation.sandbox.app import create_app
from cdp_activation.sandbox.core import MessageStore, SandboxAttempt, SandboxConfig, SandboxMessage
from cdp_activation.sandbox.status_webhooks import close_client
from cdp_activation.serving import BackgroundServer


class SandboxServer(BackgroundServer):
    """The sandbox on 127.0.0.1 in a daemon thread; use as a context manager.

    `url` is the base URL (`http://127.0.0.1:<port>`); connectors go under `/meta` and `/twilio`.
    The app is built once, so `config` and `configure` act on the running server at once, the
    same state `POST /_sandbox/faults` changes.
    """

    name = "sandbox provider"

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, config: SandboxConfig | None = None
    ) -> None:
        self.store = MessageStore()
        super().__init__(
            create_app(config or SandboxConfig(), self.store), host, port, "/_sandbox/health"
        )

    @property
    def config(self) -> SandboxConfig:
        """The behaviour in force (it may have been changed through the control route)."""
        config: SandboxConfig = self.app.state.config
        return config

    @config.setter
    def config(self, config: SandboxConfig) -> None:
        self.app.state.config = config

    def configure(self, **faults: Any) -> SandboxConfig:
        """Change some fault settings while running (`configure(rate_429=0.1)`); see
        `SandboxConfig`. Requests already being answered keep the settings they started with."""
        self.config = self.config.with_faults(faults)
        return self.config

    def stop(self) -> None:
        close_client(self.app)  # the status webhook client lives in the server's loop
        super().stop()

    def profiles(self) -> dict[str, dict[str, object]]:
        """Braze user attributes written through `/users/track`, by external id."""
        return self.store.profiles()

    def messages(self) -> list[SandboxMessage]:
        """Accepted messages so far, read straight from the in-process store."""
        return self.store.list()

    def attempts(self) -> list[SandboxAttempt]:
        """Every provider request so far, with its arrival and answer times and result."""
        return self.store.attempts()

    def duplicates(self) -> dict[tuple[Any, ...], int]:
        """Messages accepted more than once (same provider, recipient and content)."""
        return self.store.duplicates()

    def wait_idle(self, timeout: float = 30.0, quiet: float = 0.05) -> None:
        """Wait until no request is being answered (none for `quiet` seconds in a row): the
        requests of a killed client, still held for their latency, have all been answered and
        recorded. Raises TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        while time.monotonic() < deadline:
            if self.store.in_progress == 0:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= quiet:
                    return
            else:
                idle_since = None
            time.sleep(0.005)
        raise TimeoutError(f"the sandbox still answers {self.store.in_progress} request(s)")

    def reset(self) -> None:
        """Forget accepted messages, requests and template status changes (between tests);
        fault settings stay."""
        self.store.clear()
        self.app.state.template_statuses = {}
        self.app.state.alerts.clear()

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts the sandbox took (`alert_inbox.py`), oldest first."""
        return list(self.app.state.alerts)


def serve(
    host: str = "127.0.0.1",
    port: int = 8787,
    config: SandboxConfig | None = None,
    access_log: bool = True,
) -> None:
    """Serve the sandbox in the foreground until interrupted (Ctrl-C), for the CLI."""
    app = create_app(config)
    heap.tune_for_serving()  # a process that lives to serve, as the status receiver's
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=access_log,
        lifespan="off",
    )
