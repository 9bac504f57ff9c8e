"""`make scale-demo`: one activation on N Celery workers, on this machine's services.

Dagster's instance and the ledger go to two fresh databases on the local PostgreSQL, the
broker is the local RabbitMQ, the provider is the sandbox in its own process; the demo
warehouse has a million customers. The win-back runs through `cdp-activation run --workers N`
as a user would start it; each worker's and the total throughput are printed, and every
process started here is stopped at the end, Ctrl-C included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from cdp_activation.masking import masked
from cdp_activation.settings import project_root

BIN = Path(sys.executable).parent


class Processes:
    """Child processes, each in its own session, stopped together (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], env: Mapping[str, str], **kwargs: Any) -> subprocess.Popen:
        process = subprocess.Popen(args, env=dict(env), start_new_session=True, **kwargs)
        self.started.append(process)
        return process

    def celery_workers(self, n: int, env: Mapping[str, str], cwd: Path) -> None:
        """`cdp-activation celery-worker` n times, one step at a time each."""
        for i in range(n):
            self.start(
                [str(BIN / "cdp-activation"), "celery-worker", "--name", f"w{i + 1}-{_tag()}"],
                env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self, grace: float = 20.0) -> None:
        for process in self.started:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.started:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _tag() -> str:
    return uuid.uuid4().hex[:6]


@contextmanager
def fresh_database(base: str, name: str) -> Iterator[str]:
    """Database `name` on the server at `base` (a postgresql:// URL), created empty (dropped
    first if a previous demo left it) and dropped at the end; yields its URL without a
    driver."""
    admin = sa.create_engine(
        base.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as con:
        con.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        con.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as con:
            con.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited during start-up")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


def run(
    *,
    workers: int,
    customers: int,
    max_recipients: int,
    postgres: str,
    broker: str,
    say: Any = print,
) -> dict[str, Any]:
    """Set everything up, run the win-back once on `workers` Celery workers, tear down."""
    from cdp_activation.demo.data import generate_demo_warehouse
    from cdp_activation.scaling import check_broker

    check_broker(broker)
    root = project_root()
    home = root / "dagster_home" / "scale-demo"
    home.mkdir(parents=True, exist_ok=True)
    warehouse = home / f"warehouse_{customers}.duckdb"
    if not warehouse.exists():
        say(f"building a {customers:,}-customer demo warehouse at {warehouse} (once)")
        generate_demo_warehouse(warehouse, customers=customers)
    shutil.copy(root / "dagster_home" / "dagster.postgres.yaml.example", home / "dagster.yaml")
    processes = Processes()
    with (
        fresh_database(postgres, "cdp_scale_demo_dagster") as dagster_db,
        fresh_database(postgres, "cdp_scale_demo_ledger") as ledger_db,
    ):
        try:
            port = free_port()
            sandbox_url = f"http://127.0.0.1:{port}"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "DAGSTER"))}
            env |= {
                "CDP_SANDBOX": "1",  # the sandbox's published credentials
                "DAGSTER_HOME": str(home),
                "DAGSTER_PG_URL": dagster_db.replace("postgresql://", "postgresql+psycopg2://"),
                "CDP_LEDGER_URL": ledger_db.replace("postgresql://", "postgresql+psycopg://"),
                "CDP_WAREHOUSE_URL": f"duckdb:///{warehouse}",
                "CDP_CELERY_BROKER_URL": broker,
                "CDP_META_BASE_URL": f"{sandbox_url}/meta",
                "CDP_TWILIO_BASE_URL": f"{sandbox_url}/twilio",
                "CDP_TWILIO_CONTENT_BASE_URL": f"{sandbox_url}/twilio",
                # The sandbox takes any rate; a real Meta number starts at 80/s.
                "CDP_META_RATE_PER_SECOND": "5000",
                "CDP_TWILIO_RATE_PER_SECOND": "5000",
                "CDP_CONFIRM_ABOVE": str(max_recipients + 1),
            }
            sandbox = processes.start(
                [str(BIN / "cdp-activation"), "sandbox", "--port", str(port)],
                env,
                cwd=root,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for(f"{sandbox_url}/_sandbox/health", sandbox)
            say(f"sandbox on {sandbox_url}; {workers} Celery workers on {masked(broker)}")
            processes.celery_workers(workers, env, root)
            say(
                f"running winback_whatsapp on {workers} claim workers "
                f"(at most {max_recipients:,} recipients, every hour a send hour)"
            )
            done = subprocess.run(
                [
                    str(BIN / "cdp-activation"),
                    *("run", "winback_whatsapp", "--workers", str(workers)),
                    *("--max-recipients", str(max_recipients)),
                    *("--send-window", "00:00-23:59", "--json", "--no-wait"),
                ],
                env=env,
                cwd=root,
                capture_output=True,
                text=True,
                check=False,
            )
            lines = done.stdout.strip().splitlines()
            if not lines or not lines[-1].startswith("{"):
                raise RuntimeError(f"the run printed no summary:\n{done.stderr[-2000:]}")
            return dict(json.loads(lines[-1]))
        finally:
            processes.stop()
