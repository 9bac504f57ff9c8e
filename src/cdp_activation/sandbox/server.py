"""Run the sandbox provider with uvicorn: in a background thread (tests, demo) or blocking (CLI).

Binding the listening socket ourselves, before uvicorn starts, is what makes `port=0` useful:
the OS picks a free port, we know it at once, and there is no window in which another process
could take a port we probed but had not yet bound.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import TracebackType
from typing import Any

import httpx
import uvicorn

from cdp_activation.sandbox.app import (
    MessageStore,
    SandboxAttempt,
    SandboxConfig,
    SandboxMessage,
    create_app,
)

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 10.0
_SHUTDOWN_TIMEOUT_S = 5.0


class SandboxServer:
    """The sandbox on 127.0.0.1 in a daemon thread; use as a context manager.

    `url` is the base URL (`http://127.0.0.1:<port>`); connectors go under `/meta` and `/twilio`.
    The app is built once, so `config` and `configure` act on the running server at once, the
    same state `POST /_sandbox/faults` changes.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, config: SandboxConfig | None = None
    ) -> None:
        self.host = host
        self.requested_port = port
        self.store = MessageStore()
        self.app = create_app(config or SandboxConfig(), self.store)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._port: int | None = None

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

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the sandbox server is not running; call start() first")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> SandboxServer:
        """Bind, start uvicorn in a thread and return once the health route answers."""
        if self._thread is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name=f"sandbox-uvicorn-{self._port}",
            daemon=True,
        )
        self._thread.start()
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        logger.info("sandbox provider listening on %s", self.url)
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the sandbox server thread exited during startup")
                if self._server is not None and self._server.started:
                    try:
                        if client.get(f"{self.url}/_sandbox/health").status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                time.sleep(0.01)
        raise TimeoutError(f"the sandbox server did not answer within {_STARTUP_TIMEOUT_S} s")

    def stop(self) -> None:
        """Ask uvicorn to exit, join its thread and release the port. Safe to call twice."""
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = self._socket = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(_SHUTDOWN_TIMEOUT_S)
            if thread.is_alive() and server is not None:
                server.force_exit = True  # open keep-alive connections: stop waiting for them
                thread.join(_SHUTDOWN_TIMEOUT_S)
        if sock is not None:
            sock.close()
        self._port = None

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

    def reset(self) -> None:
        """Forget accepted messages and requests (between tests); fault settings stay."""
        self.store.clear()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(host: str = "127.0.0.1", port: int = 8787, config: SandboxConfig | None = None) -> None:
    """Serve the sandbox in the foreground until interrupted (Ctrl-C), for the CLI."""
    uvicorn.run(create_app(config), host=host, port=port, log_level="info", lifespan="off")
