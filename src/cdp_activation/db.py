"""The framework's own database (ledger and phone cache): one way to open it.

SQLite (WAL, a busy timeout, its folder created) by default; PostgreSQL through psycopg 3 in
production, where a plain `postgresql://` URL means that driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa


def with_driver(url: str) -> str:
    """`postgresql://…` means psycopg 3 here (the driver this project installs)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def open_engine(url: str) -> sa.Engine:
    url = with_driver(url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
