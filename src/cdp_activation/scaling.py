"""Many workers: what the Celery executor needs before a run may start (docs/scaling.md).

Plain Python the executor (defs/executor.py), the CLI and the tests share: the refusals that
must come before anything runs, and the configuration Celery workers are started with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cdp_activation.errors import CdpError
from cdp_activation.masking import masked
from cdp_activation.settings import get_settings


class ScalingError(CdpError, RuntimeError):
    """A many-worker setup that cannot work, found before anything is claimed or sent."""


def celery_executor_config() -> dict[str, Any]:
    """The Celery executor's configuration from CDP_CELERY_*: the same for the run's
    orchestrating process and for every worker (`worker_yaml`). The broker URL stays an
    environment variable reference, so its password never reaches the UI."""
    return {
        "broker": {"env": "CDP_CELERY_BROKER_URL"},
        "backend": get_settings().celery_backend_url,
        # A worker takes one step at a time: a claim worker holds its step until none are
        # due, and prefetching would park steps behind it.
        "config_source": {"worker_prefetch_multiplier": 1},
    }


def write_worker_yaml(path: Path) -> Path:
    """The file `dagster-celery worker start -y FILE` reads. It holds the broker URL itself
    (Celery workers take no environment reference there), so it is written with mode 0600."""
    settings = get_settings()
    config = celery_executor_config() | {"broker": settings.celery_broker_url}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"execution": {"config": config}}, sort_keys=False))
    path.chmod(0o600)
    return path


def check_broker(url: str, timeout: float = 5.0) -> None:
    """Raise `ScalingError` naming the broker (password masked) when it does not answer."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as err:  # kombu raises the transport's own errors
        reason = str(err).replace(url, masked(url)) or type(err).__name__
        raise ScalingError(
            f"the Celery broker at {masked(url)} does not answer ({reason}); start it, or "
            "fix CDP_CELERY_BROKER_URL. Nothing was claimed or sent."
        ) from None


def celery_workers(broker: str, backend: str, timeout: float = 2.0) -> int:
    """How many Celery workers answer a ping on this broker now."""
    from dagster_celery.make_app import make_app

    app = make_app({"broker": broker, "backend": backend})
    try:
        return len(app.control.ping(timeout=timeout) or [])
    finally:
        app.close()


def celery_problem(
    instance_storage: str, ledger_url: str, executor: str = "the Celery executor"
) -> str | None:
    """Why `executor` cannot run here, if it cannot: its workers are other hosts, and SQLite
    (the ledger's or Dagster's own storage) is one host's file."""
    if ledger_url.startswith("sqlite"):
        return (
            f"{executor} needs a ledger every worker host can reach: set CDP_LEDGER_URL to a "
            "PostgreSQL URL (the ledger is SQLite, one host's file)"
        )
    if "sqlite" in instance_storage.lower():
        return (
            f"{executor} needs Dagster's instance on PostgreSQL (its workers read and write "
            "the run's events from other hosts): use dagster_home/dagster.postgres.yaml.example "
            "as DAGSTER_HOME's dagster.yaml"
        )
    return None
