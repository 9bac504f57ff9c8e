"""Shared fixtures: a live sandbox provider on a free 127.0.0.1 port and settings pointing at it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cdp_activation.contracts import StatusEvent
from cdp_activation.ledger import Ledger
from cdp_activation.plugins import plugins
from cdp_activation.sandbox import SandboxServer
from cdp_activation.settings import Settings

# The tests run against the sandbox with its published credentials (CDP_SANDBOX), as `make
# demo` and `make dev` do; tests of what happens without it take it away themselves.
os.environ["CDP_SANDBOX"] = "1"


def settings_for_sandbox(server: SandboxServer) -> Settings:
    """Settings whose connectors talk to `server`, ignoring any `.env` or CDP_* tokens.

    Tokens are left unset on purpose: in sandbox mode the sandbox credentials are used,
    which is exactly what `make demo` and `make dev` run with.
    """
    urls: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    for plugin in plugins().values():
        fields = plugin.settings.model_fields
        url = "base_url" if "base_url" in fields else "url"
        if plugin.sandbox and url in fields:
            urls[plugin.flat_name(url)] = f"{server.url}{plugin.sandbox}"
        secrets.update({plugin.flat_name(name): None for name in fields if plugin.is_secret(name)})
    return Settings(
        _env_file=None,  # type: ignore[call-arg]  # pydantic-settings init-only option
        sandbox=True,
        **{
            **urls,
            **secrets,
            "twilio_content_base_url": f"{server.url}/twilio",
            "webhook_url": f"{server.url}/webhook/messages",
        },
    )


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    """One sandbox for the whole session: starting uvicorn per test would dominate run time."""
    with SandboxServer() as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> Iterator[SandboxServer]:
    """The running sandbox, emptied of messages recorded by earlier tests; faults a test sets
    (`configure`) are undone after it."""
    sandbox_server.reset()
    default = sandbox_server.config
    yield sandbox_server
    sandbox_server.config = default


@pytest.fixture
def settings_for() -> Callable[[SandboxServer], Settings]:
    """`settings_for(sandbox)` → `Settings` pointing every connector at that sandbox."""
    return settings_for_sandbox


@pytest.fixture
def sandbox_settings(sandbox: SandboxServer) -> Settings:
    """Settings pointing at the (reset) session sandbox."""
    return settings_for_sandbox(sandbox)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database: SQLite always, PostgreSQL when TEST_POSTGRES_URL is set.

    Each PostgreSQL test gets its own schema (dropped afterwards), so tests never see each
    other's rows and can run against a shared server.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        return
    base = os.environ.get("TEST_POSTGRES_URL")
    if not base:
        pytest.skip(
            "TEST_POSTGRES_URL is not set (CI sets it; locally: "
            "TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test)"
        )
    with scratch_postgres_schema(base, "ledger_test") as url:
        yield url


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    """A `Ledger` on `ledger_url` (SQLite, and PostgreSQL when TEST_POSTGRES_URL is set)."""
    ledger = Ledger(ledger_url)
    yield ledger
    ledger.dispose()


@contextmanager
def scratch_postgres_schema(base: str, prefix: str) -> Iterator[str]:
    """A fresh schema on the PostgreSQL at `base`, dropped afterwards: yields a psycopg URL
    whose search_path is that schema, so tests never see each other's tables."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = base.replace("postgresql://", "postgresql+psycopg://", 1)
    admin = sa.create_engine(url)
    with admin.begin() as con:
        con.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{url}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as con:
            con.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class RecordingLedger(Ledger):
    """A real ledger that also keeps every status event the receiver hands it."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.events: list[StatusEvent] = []

    def record_statuses(self, events: Sequence[StatusEvent]) -> Any:
        self.events.extend(events)
        return super().record_statuses(events)


@dataclass
class CliProject:
    """The real `cdp-activation` command on a small demo warehouse of its own, a fresh
    DAGSTER_HOME and ledger, and the connectors on a sandbox; no `.env`, no CDP_* of ours."""

    tmp: Path
    home: Path
    ledger_file: Path
    env: dict[str, str]

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{self.ledger_file}"

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).parent / "cdp-activation"), *args],
            cwd=self.tmp,  # no `.env` from the checkout
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )


def cli_project(tmp_path: Path, sandbox: SandboxServer, customers: int = 500) -> CliProject:
    """See `CliProject`. No preview is asked for (CDP_CONFIRM_ABOVE is high): a test's own
    subject is what stops a send."""
    from cdp_activation.demo.data import generate_demo_warehouse

    warehouse = tmp_path / "demo.duckdb"
    as_of = datetime.combine(datetime.now(UTC).date(), time.min, tzinfo=UTC)
    generate_demo_warehouse(warehouse, customers=customers, seed=7, as_of=as_of)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    ledger_file = tmp_path / "ledger.sqlite"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "DAGSTER_"))}
    env.update(
        CDP_SANDBOX="1",
        DAGSTER_HOME=str(home),
        CDP_WAREHOUSE_URL=f"duckdb:///{warehouse}",
        CDP_LEDGER_URL=f"sqlite:///{ledger_file}",
        CDP_META_BASE_URL=f"{sandbox.url}/meta",
        CDP_TWILIO_BASE_URL=f"{sandbox.url}/twilio",
        CDP_TWILIO_CONTENT_BASE_URL=f"{sandbox.url}/twilio",
        CDP_CONFIRM_ABOVE="1000000",
    )
    return CliProject(tmp_path, home, ledger_file, env)


def materialized(
    env: dict[str, str], home: Path, select: str, cwd: Path, partition: str | None = None
) -> Any:
    """Materialise `select` with the real `dagster asset materialize` in `env`; the metadata
    of its latest materialisation in the instance at `home`."""
    import dagster as dg

    command = [
        str(Path(sys.executable).parent / "dagster"),
        *("asset", "materialize", "-m", "cdp_activation.definitions", "--select", select),
        *(("--partition", partition) if partition else ()),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    instance = dg.DagsterInstance.from_config(str(home))
    event = instance.get_latest_materialization_event(dg.AssetKey.from_user_string(select))
    assert event is not None and event.asset_materialization is not None
    return event.asset_materialization.metadata
