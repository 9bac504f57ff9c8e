"""An ASGI app served by uvicorn from a daemon thread on 127.0.0.1 (tests, demo, CLI helpers).

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
from typing import Any, Self

import httpx
import uvicorn

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 10.0
_SHUTDOWN_TIMEOUT_S = 5.0


class BackgroundServer:
    """Serve `app` in a daemon thread; use as a context manager. `health_path` must answer 200
    once the app is ready."""

    name = "server"

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, health_path: str = "/health"
    ):
        self.app = app
        self.host = host
        self.requested_port = port
        self.health_path = health_path
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"the {self.name} is not running; call start() first")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> Self:
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
            name=f"{self.name}-uvicorn-{self._port}",
            daemon=True,
        )
        self._thread.start()
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        logger.info("%s listening on %s", self.name, self.url)
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError(f"the {self.name} thread exited during startup")
                if self._server is not None and self._server.started:
                    try:
                        if client.get(f"{self.url}{self.health_path}").status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                time.sleep(0.01)
        raise TimeoutError(f"the {self.name} did not answer within {_STARTUP_TIMEOUT_S} s")

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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
